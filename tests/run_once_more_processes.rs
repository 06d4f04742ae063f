//! `ten_triggers_from_two_processes_during_one_run_make_one_follow_up_with_the_last_payload`:
//! the run-once-more strategy across OS processes. Process A dispatches the original (a 1 s
//! run) and, during it, sends five more triggers; process B sends five. Exactly two dispatches
//! may happen: the original, and one follow-up with the last trigger's payload.
//!
//! The binary has its own `main` (harness = false): run plainly it is the parent test; it
//! re-executes itself with `ROM_CHILD` set to make each child process.

mod common;

use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::RedisServer;
use tower::{Layer, ServiceExt};
use tower_idempotency::{IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, RedisStore};

const KEY: &str = "octo/repo:7:abcdef1";

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(role) = std::env::var("ROM_CHILD") {
        let url = std::env::var("ROM_URL").expect("ROM_URL");
        let start: u64 = std::env::var("ROM_START_MS")
            .expect("ROM_START_MS")
            .parse()
            .expect("ms");
        rt.block_on(child(&role, &url, start));
        return;
    }
    let started = Instant::now();
    let server = RedisServer::start();
    let exe = std::env::current_exe().expect("current_exe");
    // Both children schedule their triggers from the same wall-clock start, 1.5 s from now
    // (time for both to start and connect).
    let start = unix_ms() + 1500;
    let children: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|role| {
            Command::new(&exe)
                .env("ROM_CHILD", role)
                .env("ROM_URL", server.url())
                .env("ROM_START_MS", start.to_string())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    for mut child in children {
        let status = child.wait().expect("child");
        assert!(status.success(), "a child process failed: {status}");
    }
    let dispatched = server.cli(&["LRANGE", "dispatches", "0", "-1"]);
    let dispatched: Vec<&str> = dispatched.lines().collect();
    assert_eq!(
        dispatched,
        vec!["p0", "p10"],
        "exactly two dispatches: the original, then one follow-up with the last trigger's payload"
    );
    println!(
        "test ten_triggers_from_two_processes_during_one_run_make_one_follow_up_with_the_last_payload ... ok ({:?})",
        started.elapsed()
    );
    println!("\ntest result: ok. 1 passed; 0 failed");
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

async fn sleep_until_ms(at: u64) {
    let now = unix_ms();
    if at > now {
        tokio::time::sleep(Duration::from_millis(at - now)).await;
    }
}

async fn child(role: &str, url: &str, start: u64) {
    let store = RedisStore::connect(url).await.expect("child: connect");
    let conn = store.connection();
    let layer = IdempotencyLayer::new(store, |_: &String| -> Result<_, KeyError> {
        IdempotencyKey::new(KEY).map(Some)
    })
    .with_namespace("review:")
    .with_run_once_more(
        |payload: &String| Some(payload.clone().into_bytes()),
        |bytes: &[u8]| String::from_utf8(bytes.to_vec()).ok(),
    )
    .build()
    .expect("valid settings");
    let svc = layer.layer(tower::service_fn(move |payload: String| {
        let mut conn = conn.clone();
        async move {
            let _: i64 = redis::cmd("RPUSH")
                .arg("dispatches")
                .arg(&payload)
                .query_async(&mut conn)
                .await
                .expect("record the dispatch");
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, Infallible>(())
        }
    }));
    // Process A: the original at 0 ms, then p2, p4, …, p10; process B: p1, p3, …, p9. All ten
    // within the original's 1 s run; p10 (from A) is the last.
    let original = (role == "a").then(|| {
        let svc = svc.clone();
        tokio::spawn(async move {
            sleep_until_ms(start).await;
            svc.oneshot("p0".to_owned()).await
        })
    });
    let mine: Vec<u64> = if role == "a" {
        vec![2, 4, 6, 8, 10]
    } else {
        vec![1, 3, 5, 7, 9]
    };
    for n in mine {
        sleep_until_ms(start + 100 + 60 * n).await;
        let answer = svc.clone().oneshot(format!("p{n}")).await;
        assert!(
            matches!(&answer, Err(e @ IdempotencyError::Duplicate { .. }) if e.is_duplicate_in_progress()),
            "{role}: trigger p{n} during the run is recorded as the follow-up: {answer:?}"
        );
    }
    if let Some(original) = original {
        original
            .await
            .expect("task")
            .expect("the original ran, then its follow-up");
    }
}

//! The run-once-more strategy (issue 12, part 3): triggers during a run are collapsed into one
//! follow-up run with the latest trigger's request, across layer instances sharing one Redis.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::RedisServer;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, RedisStore};

#[derive(Clone, Debug)]
struct Trigger {
    payload: String,
}

type Dispatches = Arc<Mutex<Vec<String>>>;

/// One "process": its own connection and layer (its own coalescer and background owner).
async fn process(
    url: String,
    dispatches: Dispatches,
) -> impl Service<Trigger, Response = (), Error = IdempotencyError<Infallible>, Future: Send> + Clone + Send {
    let store = RedisStore::connect(url).await.expect("connect");
    let layer = IdempotencyLayer::new(store, |_: &Trigger| -> Result<_, KeyError> {
        IdempotencyKey::new("octo/repo:7:abcdef1").map(Some)
    })
    .with_namespace("review:")
    .with_run_once_more(
        |t: &Trigger| Some(t.payload.clone().into_bytes()),
        |bytes: &[u8]| {
            Some(Trigger {
                payload: String::from_utf8(bytes.to_vec()).ok()?,
            })
        },
    )
    .build()
    .expect("valid settings");
    layer.layer(tower::service_fn(move |t: Trigger| {
        let dispatches = dispatches.clone();
        async move {
            dispatches.lock().unwrap().push(t.payload);
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, Infallible>(())
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_triggers_during_one_run_from_two_processes_make_exactly_one_follow_up_with_the_last_payload() {
    let server = RedisServer::start();
    let dispatches = Dispatches::default();
    let a = process(server.url(), dispatches.clone()).await;
    let b = process(server.url(), dispatches.clone()).await;

    let original = tokio::spawn(a.clone().oneshot(Trigger { payload: "p0".into() }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for n in 1..=10 {
        let svc = if n % 2 == 0 { a.clone() } else { b.clone() };
        let answer = svc
            .oneshot(Trigger {
                payload: format!("p{n}"),
            })
            .await;
        assert!(
            matches!(&answer, Err(e) if e.is_duplicate_in_progress()),
            "trigger {n} during the run is recorded as the follow-up and answered duplicate: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    original.await.expect("task").expect("the original ran");

    assert_eq!(
        *dispatches.lock().unwrap(),
        vec!["p0".to_owned(), "p10".to_owned()],
        "exactly two dispatches: the original, then one follow-up with the last trigger's payload"
    );
    // Nothing is left to run: a trigger now is a duplicate of the completed follow-up.
    let after = b.oneshot(Trigger { payload: "late".into() }).await;
    assert!(matches!(&after, Err(e) if e.is_duplicate_completed()), "{after:?}");
    assert_eq!(dispatches.lock().unwrap().len(), 2);
}

/// A follow-up recorded just as the run settles is not lost: whoever takes it runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_racing_the_end_of_the_run_is_never_lost_nor_run_twice() {
    let server = RedisServer::start();
    for round in 0..5u64 {
        let dispatches = Dispatches::default();
        let a = process(server.url(), dispatches.clone()).await;
        let b = process(server.url(), dispatches.clone()).await;
        server.cli(&["FLUSHALL"]);
        let original = tokio::spawn(a.clone().oneshot(Trigger {
            payload: "first".into(),
        }));
        // Around the end of the 1 s run.
        tokio::time::sleep(Duration::from_millis(950 + round * 20)).await;
        let late = b.oneshot(Trigger { payload: "late".into() }).await;
        original.await.expect("task").expect("the original ran");
        let seen = dispatches.lock().unwrap().clone();
        assert_eq!(
            seen.first().map(String::as_str),
            Some("first"),
            "round {round}: {seen:?}"
        );
        let late_runs = seen.iter().filter(|p| *p == "late").count();
        // Recorded while the run was in progress (or run by itself): exactly once. Arrived
        // after the run completed: a duplicate of it, not run.
        let expected = match &late {
            Err(e) if e.is_duplicate_completed() => 0,
            _ => 1,
        };
        assert_eq!(late_runs, expected, "round {round}: {seen:?}, {late:?}");
    }
}

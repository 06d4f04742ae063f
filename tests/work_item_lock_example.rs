//! `examples/work_item_lock.rs` as a user runs it: its exit code and final line against a
//! throwaway `redis-server`, and a holder process killed with `kill -9` whose slots come back
//! after their lease — not before.
//!
//! Needs the example built next to this test: `cargo test --all-features` does that; for this
//! file alone, `cargo build --all-features --example work_item_lock` first.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{RedisServer, example_binary};
use tower_idempotency::RedisStore;
use tower_idempotency::limit::{Acquire, LimitStore};
use tower_idempotency::store::ClaimToken;

fn final_line_value(line: &str, name: &str) -> usize {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

#[test]
fn example_exits_zero_with_max_concurrency_within_the_limit() {
    let server = RedisServer::start();
    let out = Command::new(example_binary("work_item_lock"))
        .args([
            "--redis",
            &server.url(),
            "--processes",
            "2",
            "--jobs",
            "10",
            "--run-ms",
            "20",
        ])
        .env_remove("REDIS_URL")
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("limit="))
        .unwrap_or_else(|| panic!("no final line in\n{stdout}"));
    assert_eq!(final_line_value(line, "limit"), 2);
    assert_eq!(final_line_value(line, "runs"), 20, "every run ran: {line}");
    let max = final_line_value(line, "max_concurrency");
    assert!((1..=2).contains(&max), "{line}");
    assert_eq!(final_line_value(line, "store_errors"), 0, "{line}");
    assert!(stdout.contains("in-memory semaphore: limit=2"), "{stdout}");
    // Nothing is left behind in the user's Redis.
    assert_eq!(server.cli(&["DBSIZE"]), "0");
}

#[test]
fn killed_holder_process_gets_its_slots_back_after_the_lease_and_not_before() {
    let server = RedisServer::start();
    let lease = Duration::from_secs(6);
    // A holder process: two runs that hold both slots for ten minutes, renewing every 2 s.
    let mut holder = Command::new(example_binary("work_item_lock"))
        .args([
            "--child",
            "--gate",
            "redis",
            "--redis",
            &server.url(),
            "--run-id",
            "kill-test",
        ])
        .args(["--process", "1", "--jobs", "2", "--limit", "2", "--run-ms", "600000"])
        .args(["--lease-ms", &lease.as_millis().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    let key = "work-item-lock:{kill-test}:redis:limit:project-1:work-item-42:review";
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "READY");
    holder.stdin.as_mut().unwrap().write_all(b"GO\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.cli(&["ZCARD", key]) != "2" {
        assert!(Instant::now() < deadline, "the holder never took both slots");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let a renewal or two happen, then kill it without a chance to release anything.
    std::thread::sleep(Duration::from_secs(3));
    holder.kill().expect("kill -9 the holder");
    let killed = Instant::now();
    holder.wait().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = RedisStore::connect(server.url()).await.unwrap();
        let me = ClaimToken::generate();
        // Right after the kill the dead process still holds both slots: its leases run on.
        match store.acquire(key, &me, 2, lease).await.unwrap() {
            Acquire::AtCapacity { retry_after } => assert!(retry_after <= lease, "{retry_after:?}"),
            other => panic!("a slot came back before the dead holder's lease ran out: {other:?}"),
        }
        // Within a lease (plus a generous margin for a loaded machine), they come back.
        loop {
            if store.acquire(key, &me, 2, lease).await.unwrap() == Acquire::Granted {
                break;
            }
            assert!(
                killed.elapsed() < lease * 5,
                "the slots did not come back within 5 leases of the kill"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("slot back {:?} after kill -9 (lease {lease:?})", killed.elapsed());
        // Its last renewal was at most one renewal interval (a third of the lease) before the
        // kill, so the leases ran on for at least two thirds of a lease; a third is a bound
        // that a late renewal on a loaded machine cannot break.
        assert!(
            killed.elapsed() >= lease / 3,
            "slots back too early: {:?}",
            killed.elapsed()
        );
        assert_eq!(
            store.acquire(key, &ClaimToken::generate(), 2, lease).await.unwrap(),
            Acquire::Granted,
            "both of the dead process's slots came back"
        );
    });
}

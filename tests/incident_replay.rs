//! The README's main job, `examples/incident_replay.rs`, run in a short form: its exit code is
//! the verdict (0 only when every key was dispatched exactly once).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::RedisServer;

fn example_binary() -> PathBuf {
    common::example_binary("incident_replay")
}

#[test]
fn incident_replay_dispatches_each_key_exactly_once() {
    let server = RedisServer::start();
    let out = Command::new(example_binary())
        .args(["--rounds", "4", "--triggers", "6", "--redis", &server.url()])
        .env_remove("REDIS_URL")
        .output()
        .expect("run incident_replay");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("triggers="))
        .expect("summary line");
    assert!(summary.starts_with("triggers=24 dispatched=4 "), "{summary}");
    assert!(summary.ends_with("store_errors=0"), "{summary}");
    // The comparison with per-process maps ran and dispatched more than once per key.
    let memory = stdout
        .lines()
        .find(|l| l.starts_with("in-memory map:"))
        .expect("comparison line");
    assert!(memory.contains("dispatched=8 for 4 keys"), "{memory}");
    // It cleaned up after itself: nothing of the replay is left in Redis.
    assert_eq!(
        server.cli(&["DBSIZE"]),
        "0",
        "keys left behind: {}",
        server.cli(&["KEYS", "*"])
    );
}

#[test]
fn incident_replay_exits_non_zero_when_redis_is_unreachable() {
    let out = Command::new(example_binary())
        .args(["--rounds", "1", "--redis", "redis://127.0.0.1:1"])
        .output()
        .expect("run incident_replay");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not answer"), "{stderr}");
}

//! The `tower-idempotency` binary, run as a process against redis-servers the tests start:
//! output (text and `--json`), exit codes (0 found, 1 no such key, 2 usage or unreachable
//! Redis), `REDIS_URL`, namespaces, force release with its warn log, and a cluster.

#[path = "../../tests/common/redis_server.rs"]
mod redis_server;

#[path = "../../tests/common/redis_cluster.rs"]
mod redis_cluster;

use std::net::TcpListener;
use std::process::{Command, Output};

use redis_server::RedisServer;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tower-idempotency");

/// Runs the tool with `args`, `REDIS_URL` and `USER` cleared unless a test sets them.
fn run(args: &[&str]) -> Output {
    run_with_env(args, &[])
}

fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .env("USER", "ci-user");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the tower-idempotency binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn list_json_prints_one_object_per_claim_under_the_namespace() {
    let server = RedisServer::start();
    server.cli(&["SET", "review:a", "0123456789abcdef-1a", "PX", "60000"]);
    server.cli(&["SET", "review:b", "owner:1700000000000-0", "PX", "60000"]);
    server.cli(&["SET", "other:c", "0123456789abcdef-2", "PX", "60000"]);

    let out = run(&["list", "--redis", &server.url(), "--namespace", "review:", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut lines = json_lines(&out);
    lines.sort_by_key(|v| v["key"].as_str().unwrap().to_owned());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["key"], "review:a");
    assert_eq!(lines[0]["state"], "claimed");
    assert_eq!(lines[0]["owner"], "0123456789abcdef-1a");
    let ttl = lines[0]["ttl_ms"].as_u64().expect("ttl_ms is a number");
    assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
    assert_eq!(lines[1]["owner"], "owner:1700000000000-0");
    for absent in ["age_ms", "fencing_token", "outcome_bytes"] {
        assert_eq!(lines[0][absent], Value::Null, "{absent} is not stored");
    }
}

#[test]
fn list_limit_bounds_the_output_and_text_output_has_one_line_per_key() {
    let server = RedisServer::start();
    for i in 0..5 {
        server.cli(&["SET", &format!("n:{i}"), "owner:x", "PX", "60000"]);
    }
    let out = run(&["--redis", &server.url(), "--namespace", "n:", "list", "--limit", "3"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.lines()
            .all(|l| l.starts_with("n:") && l.contains("\tclaimed\towner:x\t")),
        "{text}"
    );
}

#[test]
fn show_prints_a_claim_and_exits_0_and_a_missing_key_exits_1() {
    let server = RedisServer::start();
    server.cli(&["SET", "review:job", "0123456789abcdef-7", "PX", "60000"]);

    let out = run(&["show", "job", "--redis", &server.url(), "--namespace", "review:"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("key:           review:job"), "{text}");
    assert!(text.contains("owner:         0123456789abcdef-7"), "{text}");
    assert!(text.contains("age:           not stored"), "{text}");

    let out = run(&[
        "show",
        "job",
        "--redis",
        &server.url(),
        "--namespace",
        "review:",
        "--json",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["key"], "review:job");
    assert_eq!(lines[0]["state"], "claimed");
    assert!(lines[0]["ttl_ms"].as_u64().is_some());

    let out = run(&["show", "nope", "--redis", &server.url(), "--namespace", "review:"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("no such key: review:nope"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
}

#[test]
fn show_reports_a_key_without_expiry() {
    let server = RedisServer::start();
    server.cli(&["SET", "stuck", "owner:gone"]);
    let out = run(&["show", "stuck", "--redis", &server.url(), "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["ttl_ms"], Value::Null);
    let out = run(&["show", "stuck", "--redis", &server.url()]);
    assert!(stdout(&out).contains("time left:     no expiry"), "{}", stdout(&out));
}

#[test]
fn release_deletes_the_claim_logs_who_and_why_and_a_second_release_exits_1() {
    let server = RedisServer::start();
    server.cli(&["SET", "review:job", "0123456789abcdef-9", "PX", "60000"]);

    let out = run(&[
        "release",
        "job",
        "--redis",
        &server.url(),
        "--namespace",
        "review:",
        "--why",
        "worker OOM-killed",
        "--who",
        "alice",
        "--json",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines[0]["key"], "review:job");
    assert_eq!(lines[0]["owner"], "0123456789abcdef-9");
    assert_eq!(lines[0]["released"], true);
    let log = stderr(&out);
    assert!(
        log.contains("WARN")
            && log.contains("force-released")
            && log.contains("alice")
            && log.contains("worker OOM-killed"),
        "{log}"
    );
    assert_eq!(server.cli(&["EXISTS", "review:job"]), "0");

    // --who defaults to $USER.
    server.cli(&["SET", "review:job2", "owner:x", "PX", "60000"]);
    let out = run(&[
        "release",
        "job2",
        "--redis",
        &server.url(),
        "--namespace",
        "review:",
        "--why",
        "test",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("ci-user"), "{}", stderr(&out));

    let out = run(&[
        "release",
        "job",
        "--redis",
        &server.url(),
        "--namespace",
        "review:",
        "--why",
        "again",
    ]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("no such key: review:job"), "{}", stderr(&out));
}

#[test]
fn release_refuses_a_key_that_is_not_a_claim_and_exits_2() {
    let server = RedisServer::start();
    server.cli(&["HSET", "review:h", "f", "v"]);
    let out = run(&[
        "release",
        "h",
        "--redis",
        &server.url(),
        "--namespace",
        "review:",
        "--why",
        "t",
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("review:h is not a claim"), "{}", stderr(&out));
    assert_eq!(server.cli(&["EXISTS", "review:h"]), "1");
    let out = run(&[
        "show",
        "h",
        "--redis",
        &server.url(),
        "--namespace",
        "review:",
        "--json",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json_lines(&out)[0]["state"], "not_a_claim");
}

#[test]
fn release_needs_no_flags_beyond_the_key() {
    // `release KEY` alone parses (the reason and the operator have defaults); here the Redis is
    // unreachable, so the answer is 2 with a message about Redis, not about usage.
    let out = run(&["release", "job", "--redis", "redis://127.0.0.1:1"]);
    assert_eq!(code(&out), 2);
    assert!(!stderr(&out).contains("--why"), "{}", stderr(&out));
}

#[test]
fn bad_usage_exits_2() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["show"],
        &["list", "--redis", "redis://a", "--redis-cluster", "redis://b"],
        &["list", "--limit", "lots"],
    ] {
        let out = run(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("error: ") || err.contains("Usage: "), "{args:?}: {err}");
    }
}

#[test]
fn an_unreachable_redis_exits_2_with_a_clear_message_and_no_password() {
    let port = dead_port();
    let url = format!("redis://user:hunter2@127.0.0.1:{port}");
    let out = run(&["list", "--redis", &url, "--timeout-ms", "500"]);
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot connect to Redis at redis://user:***@127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let out = run(&["show", "k", "--redis", "not a url"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("cannot connect to Redis"), "{}", stderr(&out));
}

#[test]
fn redis_url_comes_from_the_environment_when_no_flag_is_given() {
    let server = RedisServer::start();
    server.cli(&["SET", "envkey", "owner:e", "PX", "60000"]);
    let out = run_with_env(&["show", "envkey"], &[("REDIS_URL", &server.url())]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // --redis wins over REDIS_URL.
    let dead = format!("redis://127.0.0.1:{}", dead_port());
    let out = run_with_env(&["show", "envkey", "--redis", &dead], &[("REDIS_URL", &server.url())]);
    assert_eq!(code(&out), 2);
}

#[test]
fn wedged_lists_claims_without_expiry_or_with_more_time_left_than_the_threshold() {
    let server = RedisServer::start();
    server.cli(&["SET", "w:forever", "owner:stuck"]);
    server.cli(&["SET", "w:long", "owner:long", "PX", "3600000"]);
    server.cli(&["SET", "w:fine", "owner:fine", "PX", "60000"]);
    let out = run(&[
        "wedged",
        "--time-left-over-ms",
        "300000",
        "--redis",
        &server.url(),
        "--namespace",
        "w:",
        "--json",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut keys: Vec<String> = json_lines(&out)
        .iter()
        .map(|v| v["key"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["w:forever", "w:long"]);
    assert!(stderr(&out).contains("wedged idempotency claim"), "{}", stderr(&out));
}

#[test]
fn a_cluster_is_listed_across_all_primaries_and_keys_are_shown_and_released() {
    let cluster = redis_cluster::RedisCluster::start();
    let mut keys = Vec::new();
    for node in 0..3 {
        for key in cluster.keys_on(node, "c:job", 2) {
            cluster.cli(&["SET", &key, "owner:x", "PX", "60000"]);
            keys.push(key);
        }
    }
    keys.sort();
    let nodes = cluster.urls().join(",");

    let out = run(&["list", "--redis-cluster", &nodes, "--namespace", "c:", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut listed: Vec<String> = json_lines(&out)
        .iter()
        .map(|v| v["key"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, keys);

    let short = keys[0].trim_start_matches("c:");
    let out = run(&["show", short, "--redis-cluster", &nodes, "--namespace", "c:"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&[
        "release",
        short,
        "--redis-cluster",
        &nodes,
        "--namespace",
        "c:",
        "--why",
        "t",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&["show", short, "--redis-cluster", &nodes, "--namespace", "c:"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));

    // Under the operator ACL from SECURITY.md (its namespace is `review-dispatch:`) plus the
    // `+cluster|slots +ping` it says a cluster needs, on every node: nothing is refused.
    let mut acl = operator_acl("ops-test-password");
    acl.extend(["+cluster|slots".to_owned(), "+ping".to_owned()]);
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    for node in 0..3 {
        assert_eq!(cluster.node(node).cli(&acl), "OK");
    }
    for key in cluster
        .keys_on(0, "review-dispatch:job", 1)
        .into_iter()
        .chain(cluster.keys_on(2, "review-dispatch:job", 1))
    {
        cluster.cli(&["SET", &key, "owner:x", "PX", "60000"]);
    }
    let as_ops: Vec<String> = cluster
        .urls()
        .iter()
        .map(|u| u.replace("redis://", "redis://tower-idempotency-ops:ops-test-password@"))
        .collect();
    let out = run(&[
        "list",
        "--redis-cluster",
        &as_ops.join(","),
        "--namespace",
        "review-dispatch:",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
    for node in 0..3 {
        let log = cluster.node(node).cli(&["ACL", "LOG"]);
        let lines: Vec<&str> = log.lines().collect();
        let refused: Vec<&str> = lines
            .windows(2)
            .filter(|w| w[0] == "object" && w[1] != "client|setinfo")
            .map(|w| w[1])
            .collect();
        assert!(refused.is_empty(), "node {node} refused {refused:?}:\n{log}");
    }
}

/// The operator's `ACL SETUSER tower-idempotency-ops …` line from SECURITY.md, with the
/// placeholder password replaced.
fn operator_acl(password: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../SECURITY.md")).expect("SECURITY.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with("ACL SETUSER tower-idempotency-ops "))
        .expect("SECURITY.md has the operator's `ACL SETUSER` line");
    line.split_whitespace()
        .map(|w| {
            if w == ">CHANGE-ME" {
                format!(">{password}")
            } else {
                w.to_owned()
            }
        })
        .collect()
}

#[test]
fn every_command_works_under_the_operator_acl_from_security_md() {
    let server = RedisServer::start();
    let acl = operator_acl("ops-test-password");
    let args: Vec<&str> = acl.iter().map(String::as_str).collect();
    assert_eq!(server.cli(&args), "OK", "{acl:?}");
    server.cli(&["SET", "review-dispatch:a", "owner:a", "PX", "60000"]);
    server.cli(&["SET", "review-dispatch:b", "owner:b"]);
    let url = format!(
        "redis://tower-idempotency-ops:ops-test-password@127.0.0.1:{}",
        server.port()
    );
    let ns = ["--redis", &url, "--namespace", "review-dispatch:"];

    let out = run(&[&["list"], &ns[..]].concat());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
    let out = run(&[&["show", "a"], &ns[..]].concat());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&[&["wedged", "--time-left-over-ms", "300000"], &ns[..]].concat());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("review-dispatch:b"), "{}", stdout(&out));
    let out = run(&[&["release", "a", "--why", "acl test"], &ns[..]].concat());
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(server.cli(&["EXISTS", "review-dispatch:a"]), "0");

    // Nothing the tool sent was refused, except `CLIENT SETINFO` (sent on connect, answer ignored).
    let log = server.cli(&["ACL", "LOG"]);
    let lines: Vec<&str> = log.lines().collect();
    let refused: Vec<&str> = lines
        .windows(2)
        .filter(|w| w[0] == "object")
        .map(|w| w[1])
        .filter(|object| *object != "client|setinfo")
        .collect();
    assert!(
        refused.is_empty(),
        "the tool needed something the ACL refuses: {refused:?}\n{log}"
    );

    // Outside its namespace it can read nothing.
    server.cli(&["SET", "elsewhere:x", "owner:x", "PX", "60000"]);
    let out = run(&["show", "elsewhere:x", "--redis", &url]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("NoPerm"), "{}", stderr(&out));
}

#[test]
fn show_and_list_report_a_completed_record_with_its_outcome_size_and_fencing_token() {
    let server = RedisServer::start();
    // A completed record, as the layer writes it (see `store::Record`): owner `owner:1-0`,
    // fencing token 42, a 9-byte stored outcome.
    server.cli(&[
        "SET",
        "review:done",
        "\u{1e}owner:1-0\u{1f}c1700000000000\u{1f}n42\u{1e}{\"id\":7}",
        "PX",
        "60000",
    ]);
    let out = run(&["list", "--redis", &server.url(), "--namespace", "review:", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["state"], "completed");
    assert_eq!(lines[0]["owner"], "owner:1-0");
    assert_eq!(lines[0]["fencing_token"], 42);
    assert_eq!(lines[0]["outcome_bytes"], 8);

    let out = run(&["show", "done", "--redis", &server.url(), "--namespace", "review:"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("state:         completed"), "{text}");
    assert!(text.contains("fencing token: 42"), "{text}");
    assert!(text.contains("outcome size:  8 bytes"), "{text}");
}

//! The human override (a person's `pull_request` `review_requested`), over real HTTP against a
//! real Redis: it takes the key over while the automated claim holds it and dispatches a fresh
//! review, once per delivery; automated triggers stay deduplicated; and in a cross-process race
//! of automated triggers and two distinct override deliveries, exactly 1 + 2 reviews dispatch.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::RedisServer;
use tokio::time::Instant;
use webhook_router::RouterConfig;
use webhook_support::{RawResponse, post, serve};

const REPOSITORY_ID: u64 = 186_853_002;

fn check_suite(pr: u64, sha: &str) -> String {
    format!(
        r#"{{"action":"completed","repository":{{"id":{REPOSITORY_ID},"full_name":"Codertocat/Hello-World"}},"check_suite":{{"head_sha":"{sha}","conclusion":"success","pull_requests":[{{"number":{pr},"head":{{"sha":"{sha}"}},"base":{{"repo":{{"id":{REPOSITORY_ID}}}}}}}]}}}}"#
    )
}

fn review_requested(pr: u64, sha: &str) -> String {
    format!(
        r#"{{"action":"review_requested","number":{pr},"repository":{{"id":{REPOSITORY_ID},"full_name":"Codertocat/Hello-World"}},"pull_request":{{"number":{pr},"head":{{"sha":"{sha}"}}}}}}"#
    )
}

async fn deliver(addr: SocketAddr, event: &str, delivery: &str, body: &str) -> RawResponse {
    let headers = [
        ("content-type", "application/json"),
        ("x-github-event", event),
        ("x-github-delivery", delivery),
        ("x-github-hook-id", "4242"),
    ];
    post(addr, "/webhooks/github", &headers, body.as_bytes()).await
}

fn status(response: &RawResponse) -> (u16, String) {
    let kind = serde_json::from_str::<serde_json::Value>(&response.body).expect("JSON body")["status"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    (response.status, kind)
}

/// `(event, delivery)` of each stream entry, for one SHA.
fn entries_for(server: &RedisServer, stream: &str, sha: &str) -> Vec<(String, String)> {
    let out = server.cli(&["XRANGE", stream, "-", "+"]);
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .chunks(11)
        .filter_map(|c| {
            let field = |name: &str| c.iter().position(|l| l == name).and_then(|i| c.get(i + 1)).cloned();
            (field("sha")? == sha).then(|| {
                (
                    field("event").unwrap_or_default(),
                    field("delivery").unwrap_or_default(),
                )
            })
        })
        .collect()
}

#[tokio::test]
async fn a_review_request_takes_the_claim_over_once_per_delivery() {
    let server = RedisServer::start();
    let sha = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
    let app = webhook_router::build(&RouterConfig::new(server.url()))
        .await
        .expect("router");
    let addr = serve(app).await;

    let automated = deliver(addr, "check_suite", "suite-1", &check_suite(2, sha)).await;
    assert_eq!(status(&automated), (202, "dispatched".into()), "{}", automated.body);
    let person = deliver(addr, "pull_request", "review-1", &review_requested(2, sha)).await;
    assert_eq!(
        status(&person),
        (202, "dispatched".into()),
        "a person gets a fresh review: {}",
        person.body
    );
    assert_eq!(server.cli(&["XLEN", "reviews"]), "2", "a second stream entry");

    let redelivered = deliver(addr, "pull_request", "review-1", &review_requested(2, sha)).await;
    assert_eq!(status(&redelivered), (200, "duplicate".into()), "the same request once");
    let automated_again = deliver(addr, "check_suite", "suite-2", &check_suite(2, sha)).await;
    assert_eq!(status(&automated_again), (200, "duplicate".into()));
    assert_eq!(server.cli(&["XLEN", "reviews"]), "2");
    assert_eq!(
        entries_for(&server, "reviews", sha),
        vec![
            ("check_suite".to_owned(), "suite-1".to_owned()),
            ("pull_request".to_owned(), "review-1".to_owned())
        ]
    );
}

/// The `github_webhook` example binary `cargo test` built next to this test's binary.
fn router_binary() -> PathBuf {
    common::example_binary("github_webhook")
}

/// One router process, killed on drop.
struct RouterProcess {
    child: Child,
    addr: SocketAddr,
}

impl RouterProcess {
    async fn start(redis_url: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(router_binary())
            .args(["--listen", &addr.to_string(), "--redis", redis_url])
            .env_remove("REDIS_URL")
            .env_remove("GITHUB_WEBHOOK_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start github_webhook");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "router on {addr} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, addr }
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_process_race_of_automated_triggers_and_two_overrides_dispatches_one_plus_two() {
    const ROUNDS: u64 = 8;
    let server = RedisServer::start();
    let routers = [
        RouterProcess::start(&server.url()).await,
        RouterProcess::start(&server.url()).await,
    ];
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let sha = format!("{:040x}", 0xabcdef_u128 * (round as u128 + 7));
        let mut deliveries = Vec::new();
        // Six automated triggers (several CI apps, GitHub's redeliveries) …
        for n in 0..6 {
            deliveries.push(("check_suite", format!("suite-{round}-{}", n % 4), check_suite(3, &sha)));
        }
        // … and two people asking for a review, each delivery sent twice.
        for n in 0..4 {
            deliveries.push((
                "pull_request",
                format!("review-{round}-{}", n % 2),
                review_requested(3, &sha),
            ));
        }
        let mut tasks = Vec::new();
        for (i, (event, delivery, body)) in deliveries.into_iter().enumerate() {
            // Both processes get every delivery, in an order that differs per round.
            for router in &routers {
                let addr = router.addr;
                let (delivery, body) = (delivery.clone(), body.clone());
                let jitter = Duration::from_millis(((i as u64 * 7 + round * 13) % 11) * 2);
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(jitter).await;
                    deliver(addr, event, &delivery, &body).await
                }));
            }
        }
        for task in tasks {
            let response = task.await.expect("delivery task");
            if std::env::var_os("OVERRIDE_DEBUG").is_some() {
                eprintln!("{} {}", response.status, response.body);
            }
            let (code, kind) = status(&response);
            assert!(
                (code, kind.as_str()) == (202, "dispatched") || (code, kind.as_str()) == (200, "duplicate"),
                "{} {}",
                response.status,
                response.body
            );
        }
        rounds.push(sha);
    }
    for sha in &rounds {
        let entries = entries_for(&server, "reviews", sha);
        let automated = entries.iter().filter(|(e, _)| e == "check_suite").count();
        let mut overrides: Vec<&str> = entries
            .iter()
            .filter(|(e, _)| e == "pull_request")
            .map(|(_, d)| d.as_str())
            .collect();
        overrides.sort();
        assert_eq!(automated, 1, "one automated review for {sha}: {entries:?}");
        assert_eq!(
            overrides.len(),
            2,
            "one review per person's request for {sha}: {entries:?}"
        );
        overrides.dedup();
        assert_eq!(overrides.len(), 2, "two distinct requests: {entries:?}");
    }
}

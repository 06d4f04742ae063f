//! End to end: two instances of the reference webhook router, each with its own Redis
//! connection, serve HTTP on their own ports and receive the same signed deliveries
//! concurrently (several automated deliveries per (repository, PR, head SHA): one `check_suite
//! completed` per CI app, `workflow_run completed`, and GitHub's redeliveries). Exactly one
//! stream entry per (repository, PR, SHA) must result. (`pull_request review_requested` is a
//! human override with its own rules: tests/webhook_override.rs.)
//!
//! The control run gives each instance its own in-memory store (the per-process map of the
//! incident): then every triple is dispatched once per instance, which the same check catches.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use axum::Router;
use common::RedisServer;
use tokio::sync::oneshot;
use tower_idempotency::MemoryStore;
use webhook_router::RouterConfig;
use webhook_support::{RawResponse, github_signature, post};

const SECRET: &[u8] = b"shared webhook secret";
const PULL_REQUESTS: u64 = 30;
const SHAS_PER_PR: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Triple {
    project: String,
    pr: u64,
    sha: String,
}

fn sha(pr: u64, n: u64) -> String {
    format!("{:040x}", (pr * 1_000_003 + n * 7_919) as u128 * 0x9e37_79b9_7f4a_7c15)
}

/// Every delivery GitHub would send for the test's triples, plus some that dispatch nothing.
fn deliveries() -> (Vec<(String, String, String)>, BTreeSet<Triple>) {
    let mut out = Vec::new();
    let mut triples = BTreeSet::new();
    for pr in 1..=PULL_REQUESTS {
        let (project, repository_id) = if pr % 2 == 0 {
            ("octo-org/octo-repo", 300_029_405)
        } else {
            ("Codertocat/Hello-World", 186_853_002)
        };
        for n in 0..SHAS_PER_PR {
            let sha = sha(pr, n);
            triples.insert(Triple {
                project: project.to_owned(),
                pr,
                sha: sha.clone(),
            });
            let tag = format!("{pr}-{n}");
            for app in ["ci-one", "ci-two"] {
                out.push((
                    "check_suite".to_owned(),
                    format!("suite-{app}-{tag}"),
                    format!(
                        r#"{{"action":"completed","repository":{{"id":{repository_id},"full_name":"{project}"}},"check_suite":{{"head_sha":"{sha}","head_branch":"feature","conclusion":"success","app":{{"slug":"{app}"}},"pull_requests":[{{"number":{pr},"head":{{"sha":"{sha}"}},"base":{{"repo":{{"id":{repository_id}}}}}}}]}}}}"#
                    ),
                ));
            }
            // A workflow run whose PR is only named by its head branch.
            out.push((
                "workflow_run".to_owned(),
                format!("run-{tag}"),
                format!(
                    r#"{{"action":"completed","repository":{{"full_name":"{project}"}},"workflow_run":{{"head_sha":"{sha}","head_branch":"refs/pull/{pr}/head","conclusion":"success","pull_requests":[]}}}}"#
                ),
            ));
            // Events that must not dispatch or claim.
            out.push((
                "check_suite".to_owned(),
                format!("requested-{tag}"),
                format!(
                    r#"{{"action":"requested","repository":{{"id":{repository_id},"full_name":"{project}"}},"check_suite":{{"head_sha":"{sha}","conclusion":null,"pull_requests":[{{"number":{pr},"base":{{"repo":{{"id":{repository_id}}}}}}}]}}}}"#
                ),
            ));
            out.push((
                "push".to_owned(),
                format!("push-{tag}"),
                r#"{"ref":"refs/heads/main"}"#.to_owned(),
            ));
        }
    }
    // GitHub's redeliveries: the same delivery id and body again.
    let again: Vec<_> = out.iter().step_by(3).cloned().collect();
    out.extend(again);
    (out, triples)
}

async fn start(
    router: Router,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(webhook_router::serve_on(listener, router, async {
        let _ = stopped.await;
    }));
    (addr, stop, task)
}

/// Connections in flight at once: enough for every triple's deliveries to race on both
/// instances. Unbounded (~1000 connects in one burst), the kernel's accept queues overflow on a
/// 2-core machine and SYN-cookie failures reset connections before any byte is read
/// (`ListenOverflows` / `SyncookiesFailed` in /proc/net/netstat): a test-client artefact, not
/// the router's.
const IN_FLIGHT: usize = 64;

/// Sends every delivery to both instances at the same moment; returns every response.
async fn deliver_to_both(a: SocketAddr, b: SocketAddr, deliveries: &[(String, String, String)]) -> Vec<RawResponse> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::new();
    for (event, delivery, body) in deliveries {
        let signature = github_signature(SECRET, body.as_bytes());
        for addr in [a, b] {
            let (event, delivery, body, signature) = (event.clone(), delivery.clone(), body.clone(), signature.clone());
            let permits = permits.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.expect("semaphore");
                let headers = [
                    ("content-type", "application/json"),
                    ("x-github-event", event.as_str()),
                    ("x-github-delivery", delivery.as_str()),
                    ("x-hub-signature-256", signature.as_str()),
                ];
                post(addr, "/webhooks/github", &headers, body.as_bytes()).await
            }));
        }
    }
    let mut responses = Vec::new();
    for task in tasks {
        responses.push(task.await.expect("request task"));
    }
    responses
}

/// The stream's entries as (triple, event, delivery).
async fn entries(server: &RedisServer, stream: &str) -> Vec<(Triple, String, String)> {
    let mut conn = common::raw_conn(server).await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|entry| {
            let field = |name: &str| {
                entry
                    .get::<String>(name)
                    .unwrap_or_else(|| panic!("field {name} in {entry:?}"))
            };
            (
                Triple {
                    project: field("project"),
                    pr: field("pr").parse().unwrap(),
                    sha: field("sha"),
                },
                field("event"),
                field("delivery"),
            )
        })
        .collect()
}

fn config(server: &RedisServer, stream: &str) -> RouterConfig {
    let mut cfg = RouterConfig::new(server.url());
    cfg.secret = Some(SECRET.to_vec());
    cfg.stream = stream.to_owned();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_router_instances_dispatch_each_triple_exactly_once() {
    let server = RedisServer::start();
    let (deliveries, triples) = deliveries();
    let cfg = config(&server, "reviews");
    // Two instances, each with its own store and its own connection.
    let (a, stop_a, task_a) = start(webhook_router::build(&cfg).await.unwrap()).await;
    let (b, stop_b, task_b) = start(webhook_router::build(&cfg).await.unwrap()).await;

    let responses = deliver_to_both(a, b, &deliveries).await;

    let mut by_status: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for response in &responses {
        let kind = serde_json::from_str::<serde_json::Value>(&response.body).expect("JSON body")["status"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        *by_status.entry((response.status, kind)).or_default() += 1;
    }
    let dispatched = by_status.get(&(202, "dispatched".to_owned())).copied().unwrap_or(0);
    let duplicates = by_status.get(&(200, "duplicate".to_owned())).copied().unwrap_or(0);
    let ignored = by_status.get(&(200, "ignored".to_owned())).copied().unwrap_or(0);
    assert_eq!(
        dispatched + duplicates + ignored,
        responses.len(),
        "only 202 dispatched, 200 duplicate and 200 ignored: {by_status:?}"
    );
    assert_eq!(dispatched, triples.len(), "{by_status:?}");

    let entries = entries(&server, "reviews").await;
    let mut per_triple: BTreeMap<Triple, usize> = BTreeMap::new();
    for (triple, event, delivery) in &entries {
        *per_triple.entry(triple.clone()).or_default() += 1;
        assert!(
            deliveries.iter().any(|(e, d, _)| e == event && d == delivery),
            "entry from an unknown delivery {event} {delivery}"
        );
        assert!(["pull_request", "check_suite", "workflow_run"].contains(&event.as_str()));
    }
    let repeated: Vec<_> = per_triple.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "triples dispatched more than once: {repeated:?}");
    assert_eq!(
        per_triple.keys().cloned().collect::<BTreeSet<_>>(),
        triples,
        "every triple dispatched"
    );
    println!(
        "{} deliveries to 2 instances: {dispatched} dispatched, {duplicates} duplicates, {ignored} ignored; {} stream entries for {} triples",
        deliveries.len(),
        entries.len(),
        triples.len()
    );

    for (stop, task) in [(stop_a, task_a), (stop_b, task_b)] {
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }
}

/// The control: per-instance memory stores cannot see each other's claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_per_process_memory_stores_the_same_check_finds_double_dispatches() {
    let server = RedisServer::start();
    let (deliveries, triples) = deliveries();
    let cfg = config(&server, "reviews-memory");
    let conn = || async {
        redis::Client::open(server.url())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap()
    };
    let (a, stop_a, _) = start(webhook_router::build_with_store(&cfg, MemoryStore::new(), conn().await)).await;
    let (b, stop_b, _) = start(webhook_router::build_with_store(&cfg, MemoryStore::new(), conn().await)).await;

    deliver_to_both(a, b, &deliveries).await;

    let entries = entries(&server, "reviews-memory").await;
    let mut per_triple: BTreeMap<Triple, usize> = BTreeMap::new();
    for (triple, _, _) in &entries {
        *per_triple.entry(triple.clone()).or_default() += 1;
    }
    assert_eq!(per_triple.len(), triples.len());
    assert!(
        per_triple.values().all(|n| *n == 2),
        "each instance dispatched each triple once: {per_triple:?}"
    );
    let _ = (stop_a.send(()), stop_b.send(()));
}

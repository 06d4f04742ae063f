//! The reference GitHub webhook router (`examples/github_webhook.rs`, code in
//! `examples/support/webhook_router.rs`) follows its contract: every status, body and stream
//! entry, against a real Redis (in-process, and over real HTTP); and its command line.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use common::RedisServer;
use tower::ServiceExt;
use webhook_router::{ConfigError, Provider, RouterConfig};
use webhook_support::{
    github_delivery, github_signature, post, post_head_only, serve, signed_github_delivery, status_and_body,
};

const SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
const SHA_B: &str = "3484a3fb816e0859fd6e1cea078d76385ff50625";

fn review_requested(pr: u64, sha: &str) -> String {
    format!(
        r#"{{"action":"review_requested","number":{pr},"repository":{{"full_name":"Codertocat/Hello-World"}},"pull_request":{{"number":{pr},"head":{{"sha":"{sha}"}}}}}}"#
    )
}

/// Hello-World's `repository.id`; the suite's pull request has it as its base repository.
const REPOSITORY_ID: u64 = 186_853_002;

fn check_suite(action: &str, conclusion: &str, pr: u64, sha: &str) -> String {
    format!(
        r#"{{"action":"{action}","repository":{{"id":{REPOSITORY_ID},"full_name":"Codertocat/Hello-World"}},"check_suite":{{"head_sha":"{sha}","head_branch":"changes","status":"completed","conclusion":"{conclusion}","pull_requests":[{{"number":{pr},"head":{{"sha":"{sha}"}},"base":{{"repo":{{"id":{REPOSITORY_ID}}}}}}}]}}}}"#
    )
}

/// The claim key of Hello-World's pull request `pr` at `sha`: the repository lower-cased.
fn claim(pr: u64, sha: &str) -> String {
    format!("github-dispatch:codertocat/hello-world:{pr}:{sha}")
}

async fn router(server: &RedisServer, tweak: impl FnOnce(&mut RouterConfig)) -> Router {
    let mut cfg = RouterConfig::new(server.url());
    tweak(&mut cfg);
    webhook_router::build(&cfg).await.expect("router")
}

async fn send(app: &Router, request: Request<Body>) -> (u16, String) {
    status_and_body(app.clone().oneshot(request).await.unwrap()).await
}

fn stream_entries(server: &RedisServer, stream: &str) -> Vec<Vec<String>> {
    // `redis-cli` prints an entry as its id, then field and value lines.
    let out = server.cli(&["XRANGE", stream, "-", "+"]);
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    lines.chunks(11).map(|c| c[1..].to_vec()).collect()
}

#[tokio::test]
async fn a_dispatching_event_is_202_and_one_xadd_with_the_documented_fields() {
    let server = RedisServer::start();
    let app = router(&server, |_| {}).await;

    let (status, body) = send(
        &app,
        github_delivery("check_suite", "delivery-1", check_suite("completed", "success", 2, SHA)),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        body,
        format!(r#"{{"status":"dispatched","key":"codertocat/hello-world:2:{SHA}"}}"#)
    );
    assert_eq!(
        stream_entries(&server, "reviews"),
        vec![
            [
                "project",
                "Codertocat/Hello-World",
                "pr",
                "2",
                "sha",
                SHA,
                "event",
                "check_suite",
                "delivery",
                "delivery-1"
            ]
            .map(String::from)
            .to_vec()
        ]
    );
    let ttl: i64 = server.cli(&["TTL", &claim(2, SHA)]).trim().parse().unwrap();
    assert!((295..=300).contains(&ttl), "claim TTL {ttl}");
}

#[tokio::test]
async fn duplicates_across_events_and_deliveries_are_200_with_the_duplicate_body() {
    let server = RedisServer::start();
    let app = router(&server, |_| {}).await;

    let (status, _) = send(
        &app,
        github_delivery("check_suite", "d-1", check_suite("completed", "success", 2, SHA)),
    )
    .await;
    assert_eq!(status, 202);
    // GitHub's redelivery, and another automated event about the same (repository, PR, SHA).
    for request in [
        github_delivery("check_suite", "d-1", check_suite("completed", "success", 2, SHA)),
        github_delivery("check_suite", "d-2", check_suite("completed", "success", 2, SHA)),
    ] {
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers()["idempotency-status"], "duplicate");
        let (status, body) = status_and_body(response).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            format!(r#"{{"status":"duplicate","key":"codertocat/hello-world:2:{SHA}"}}"#)
        );
    }
    // A new head SHA is new work.
    let (status, _) = send(
        &app,
        github_delivery("check_suite", "d-3", check_suite("completed", "success", 2, SHA_B)),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(stream_entries(&server, "reviews").len(), 2);
}

#[tokio::test]
async fn events_that_dispatch_nothing_are_200_ignored_and_take_no_claim() {
    let server = RedisServer::start();
    let app = router(&server, |_| {}).await;
    let opened = review_requested(2, SHA).replace("review_requested", "opened");
    let workflow_failed = format!(
        r#"{{"action":"completed","repository":{{"full_name":"o/r"}},"workflow_run":{{"head_sha":"{SHA}","conclusion":"failure","pull_requests":[{{"number":3}}]}}}}"#
    );
    let deliveries = [
        ("push", r#"{"ref":"refs/heads/main"}"#.to_owned()),
        ("ping", r#"{"zen":"Keep it logically awesome."}"#.to_owned()),
        ("status", r#"{"state":"success"}"#.to_owned()),
        (
            "issue_comment",
            r#"{"action":"created","issue":{"number":1}}"#.to_owned(),
        ),
        ("pull_request", opened),
        ("check_suite", check_suite("requested", "success", 2, SHA)),
        ("check_suite", check_suite("completed", "failure", 2, SHA)),
        ("check_suite", check_suite("completed", "neutral", 2, SHA)),
        (
            "check_run",
            r#"{"action":"completed","check_run":{"conclusion":"success"}}"#.to_owned(),
        ),
        ("workflow_run", workflow_failed),
        ("pull_request_review", r#"{"action":"submitted"}"#.to_owned()),
    ];
    for (event, body) in deliveries {
        let (status, text) = send(&app, github_delivery(event, "d", body)).await;
        assert_eq!((status, text.as_str()), (200, r#"{"status":"ignored"}"#), "{event}");
    }
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0", "no claim, no stream entry");

    // A filtered-out event did not block the real trigger that follows it.
    let (status, _) = send(
        &app,
        github_delivery("check_suite", "d", check_suite("completed", "success", 2, SHA)),
    )
    .await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn at_capacity_the_answer_is_429_blocked_and_the_claim_is_released() {
    let server = RedisServer::start();
    let app = router(&server, |cfg| {
        cfg.capacity = Some(1);
        cfg.stream = "review-queue".into();
    })
    .await;

    let (status, _) = send(&app, github_delivery("pull_request", "d-1", review_requested(2, SHA))).await;
    assert_eq!(status, 202);
    let (status, body) = send(&app, github_delivery("pull_request", "d-2", review_requested(3, SHA))).await;
    assert_eq!((status, body.as_str()), (429, r#"{"status":"blocked"}"#));
    let blocked_claim = claim(3, SHA);
    assert_eq!(
        server.cli(&["EXISTS", &blocked_claim]).trim(),
        "0",
        "the claim was released"
    );
    assert_eq!(stream_entries(&server, "review-queue").len(), 1);

    // Once the queue drains, the redelivery dispatches (it was not blocked by its own claim).
    server.cli(&["DEL", "review-queue"]);
    let (status, _) = send(&app, github_delivery("pull_request", "d-2", review_requested(3, SHA))).await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn a_stream_that_refuses_the_write_is_503_and_the_claim_is_released() {
    let server = RedisServer::start();
    let app = router(&server, |_| {}).await;
    // Not a stream: XADD fails with WRONGTYPE, which surely did not apply.
    server.cli(&["SET", "reviews", "not a stream"]);

    let response = app
        .clone()
        .oneshot(github_delivery("pull_request", "d-1", review_requested(2, SHA)))
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = status_and_body(response).await;
    assert_eq!((status, body.as_str()), (503, r#"{"status":"unavailable"}"#));
    assert_eq!(
        server.cli(&["EXISTS", &claim(2, SHA)]).trim(),
        "0",
        "released: a redelivery may dispatch"
    );

    server.cli(&["DEL", "reviews"]);
    let (status, _) = send(&app, github_delivery("pull_request", "d-1", review_requested(2, SHA))).await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn store_unavailable_is_503_and_health_stays_200() {
    let mut server = RedisServer::start();
    let app = router(&server, |_| {}).await;
    server.kill();

    let started = std::time::Instant::now();
    let response = app
        .clone()
        .oneshot(github_delivery("pull_request", "d-1", review_requested(2, SHA)))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "failed closed promptly");
    assert_eq!(response.headers()["retry-after"], "5");
    let (status, body) = status_and_body(response).await;
    assert_eq!((status, body.as_str()), (503, r#"{"status":"unavailable"}"#));

    let health = Request::get("/healthz").body(Body::empty()).unwrap();
    assert_eq!(send(&app, health).await, (200, r#"{"status":"ok"}"#.to_owned()));

    // Redis is back: the same delivery dispatches (nothing was claimed while it was down).
    server.restart();
    let mut status = 0;
    for _ in 0..50 {
        status = send(&app, github_delivery("pull_request", "d-1", review_requested(2, SHA)))
            .await
            .0;
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 202);
}

#[tokio::test]
async fn bad_input_is_400_or_413_and_bad_signatures_are_403() {
    let server = RedisServer::start();
    let secret = b"router secret".to_vec();
    let app = router(&server, |cfg| cfg.secret = Some(secret.clone())).await;

    // Signatures come first: unsigned and wrongly signed deliveries are 403.
    let (status, body) = send(&app, github_delivery("pull_request", "d-1", review_requested(2, SHA))).await;
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"missing `x-hub-signature-256` header"}"#)
    );
    let (status, _) = send(
        &app,
        signed_github_delivery(b"wrong", "pull_request", "d-1", review_requested(2, SHA)),
    )
    .await;
    assert_eq!(status, 403);

    // Signed but malformed: 400 naming the problem.
    let (status, body) = send(
        &app,
        signed_github_delivery(&secret, "pull_request", "d-1", "{not json"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body.starts_with(r#"{"error":"malformed `pull_request` payload at `.`: "#),
        "{body}"
    );
    let missing_sha = review_requested(2, SHA).replace(&format!(r#""sha":"{SHA}""#), r#""ref":"x""#);
    let (status, body) = send(
        &app,
        signed_github_delivery(&secret, "pull_request", "d-1", missing_sha),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (
            400,
            r#"{"error":"`pull_request` payload has no `pull_request.head.sha`"}"#
        )
    );
    let mut no_event = signed_github_delivery(&secret, "pull_request", "d-1", review_requested(2, SHA));
    no_event.headers_mut().remove("x-github-event");
    let (status, body) = send(&app, no_event).await;
    assert_eq!(
        (status, body.as_str()),
        (400, r#"{"error":"missing `x-github-event` header"}"#)
    );

    // Over 25 MB.
    let big = vec![b' '; 25 * 1024 * 1024 + 1];
    let (status, _) = send(&app, signed_github_delivery(&secret, "pull_request", "d-1", big)).await;
    assert_eq!(status, 413);

    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0", "nothing claimed or dispatched");
    let (status, _) = send(
        &app,
        signed_github_delivery(&secret, "pull_request", "d-1", review_requested(2, SHA)),
    )
    .await;
    assert_eq!(status, 202, "correctly signed");
}

#[tokio::test]
async fn health_is_200() {
    let server = RedisServer::start();
    let app = router(&server, |_| {}).await;
    let (status, body) = send(&app, Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn command_line_defaults_follow_the_contract() {
    let cfg = RouterConfig::parse(args(&[]), None, None).unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:3000".parse().unwrap());
    assert_eq!(cfg.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(cfg.namespace, "github-dispatch:");
    assert_eq!(cfg.ttl, Duration::from_secs(300));
    assert_eq!(cfg.stream, "reviews");
    assert_eq!(cfg.capacity, None);
    assert_eq!(cfg.secret, None);

    // REDIS_URL and GITHUB_WEBHOOK_SECRET, as read once by the caller; an empty REDIS_URL means
    // unset, an empty secret is refused.
    let cfg = RouterConfig::parse(args(&[]), Some("redis://10.0.0.1:6380/2".into()), Some("s3".into())).unwrap();
    assert_eq!(cfg.redis_url, "redis://10.0.0.1:6380/2");
    assert_eq!(cfg.secret.as_deref(), Some(&b"s3"[..]));
    let cfg = RouterConfig::parse(args(&[]), Some(String::new()), None).unwrap();
    assert_eq!(cfg.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(cfg.secret, None);
    assert_eq!(
        RouterConfig::parse(args(&[]), None, Some(String::new())).unwrap_err(),
        ConfigError::EmptySecret("GITHUB_WEBHOOK_SECRET")
    );
    // The GitLab router's flag is not the GitHub router's.
    assert_eq!(
        RouterConfig::parse(args(&["--detached-pipelines"]), None, None).unwrap_err(),
        ConfigError::UnknownArgument("--detached-pipelines".into())
    );
    assert!(
        !format!(
            "{:?}",
            RouterConfig::parse(args(&[]), None, Some("s3cr3t".into())).unwrap()
        )
        .contains("s3cr3t")
    );
}

#[test]
fn command_line_flags_override_the_defaults() {
    let cfg = RouterConfig::parse(
        args(&[
            "--listen",
            "0.0.0.0:8080",
            "--redis=redis://r:1",
            "--namespace",
            "ns:",
            "--ttl-secs",
            "60",
            "--stream",
            "s",
            "--capacity=7",
        ]),
        Some("redis://from-env:1".into()),
        None,
    )
    .unwrap();
    assert_eq!(cfg.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(cfg.redis_url, "redis://r:1", "--redis wins over REDIS_URL");
    assert_eq!(cfg.namespace, "ns:");
    assert_eq!(cfg.ttl, Duration::from_secs(60));
    assert_eq!(cfg.stream, "s");
    assert_eq!(cfg.capacity, Some(7));
}

#[test]
fn command_line_errors_name_the_flag() {
    let parse = |list: &[&str]| RouterConfig::parse(args(list), None, None).unwrap_err();
    assert_eq!(parse(&["--help"]), ConfigError::Help);
    assert_eq!(parse(&["-h"]), ConfigError::Help);
    assert_eq!(parse(&["--port", "1"]), ConfigError::UnknownArgument("--port".into()));
    assert_eq!(parse(&["extra"]), ConfigError::UnknownArgument("extra".into()));
    assert_eq!(parse(&["--listen"]), ConfigError::MissingValue("--listen".into()));
    for bad in [
        &["--listen", "localhost"][..],
        &["--ttl-secs", "0"],
        &["--ttl-secs", "-5"],
        &["--capacity", "many"],
        &["--redis", ""],
        &["--stream="],
    ] {
        match parse(bad) {
            ConfigError::InvalidValue { flag, .. } => assert_eq!(flag, bad[0].split('=').next().unwrap()),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

/// The router, serving real HTTP on a free port, with claims and the stream in `server`.
async fn serve_router(server: &RedisServer, tweak: impl FnOnce(&mut RouterConfig)) -> std::net::SocketAddr {
    serve(router(server, tweak).await).await
}

#[tokio::test]
async fn an_empty_secret_stops_the_router_with_exit_code_2_and_a_message_naming_it() {
    let code = webhook_router::run_with(
        Provider::GitHub,
        args(&["--listen", "127.0.0.1:0"]),
        None,
        Some(String::new()),
    )
    .await;
    assert_eq!(code, std::process::ExitCode::from(2));
    let message = ConfigError::EmptySecret("GITHUB_WEBHOOK_SECRET").to_string();
    assert!(
        message.starts_with("GITHUB_WEBHOOK_SECRET is set but empty"),
        "{message}"
    );
    assert!(message.contains("unset it"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_deliveries_at_capacity_five_are_exactly_five_202_and_fifteen_429_with_those_claims_released()
{
    let server = RedisServer::start();
    let addr = serve_router(&server, |cfg| cfg.capacity = Some(5)).await;

    let tasks: Vec<_> = (1..=20u64)
        .map(|pr| {
            tokio::spawn(async move {
                let body = check_suite("completed", "success", pr, SHA);
                let delivery = format!("d-{pr}");
                let headers = [
                    ("content-type", "application/json"),
                    ("x-github-event", "check_suite"),
                    ("x-github-delivery", delivery.as_str()),
                ];
                (pr, post(addr, "/webhooks/github", &headers, body.as_bytes()).await)
            })
        })
        .collect();
    let mut dispatched = Vec::new();
    let mut blocked = Vec::new();
    for task in tasks {
        let (pr, response) = task.await.unwrap();
        match response.status {
            202 => dispatched.push(pr),
            429 => {
                assert_eq!(response.body, r#"{"status":"blocked"}"#);
                blocked.push(pr);
            }
            other => panic!("PR {pr}: {other} {}", response.body),
        }
    }
    assert_eq!((dispatched.len(), blocked.len()), (5, 15), "dispatched {dispatched:?}");
    assert_eq!(
        server.cli(&["XLEN", "reviews"]).trim(),
        "5",
        "the stream never overshoots"
    );
    for pr in &blocked {
        assert_eq!(
            server.cli(&["EXISTS", &claim(*pr, SHA)]).trim(),
            "0",
            "PR {pr}: released"
        );
    }
    for pr in &dispatched {
        assert_eq!(server.cli(&["EXISTS", &claim(*pr, SHA)]).trim(), "1", "PR {pr}: kept");
    }
}

#[tokio::test]
async fn unauthenticated_heads_declaring_20_mb_are_answered_within_a_second_without_the_body() {
    let server = RedisServer::start();
    let secret = b"router secret".to_vec();
    let addr = serve_router(&server, |cfg| cfg.secret = Some(secret.clone())).await;
    let event = [
        ("content-type", "application/json"),
        ("x-github-event", "pull_request"),
        ("x-github-delivery", "d-1"),
    ];
    let within_a_second = |head: Vec<(&'static str, String)>, length: u64| {
        let mut headers: Vec<(&str, String)> = event.iter().map(|(n, v)| (*n, v.to_string())).collect();
        headers.extend(head);
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            tokio::time::timeout(
                Duration::from_secs(1),
                post_head_only(addr, "/webhooks/github", &headers, length),
            )
            .await
            .expect("answered within 1 s, without waiting for the body")
        }
    };
    // No signature: refused from the head alone.
    let response = within_a_second(vec![], 20_000_000).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (403, r#"{"error":"missing `x-hub-signature-256` header"}"#)
    );
    // A malformed signature: the same.
    let response = within_a_second(vec![("x-hub-signature-256", "sha1=abc".into())], 20_000_000).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (403, r#"{"error":"malformed `x-hub-signature-256` header"}"#)
    );
    // A well-formed signature, but a declared length over the 25 MB limit: 413 before reading.
    let signature = github_signature(&secret, b"whatever");
    let response = within_a_second(vec![("x-hub-signature-256", signature)], 26 * 1024 * 1024).await;
    assert_eq!(response.status, 413);
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0", "nothing claimed");
}

#[tokio::test]
async fn bad_signatures_over_http_are_403_without_www_authenticate_and_take_no_claim() {
    let server = RedisServer::start();
    let secret = b"router secret".to_vec();
    let addr = serve_router(&server, |cfg| cfg.secret = Some(secret.clone())).await;
    let body = review_requested(2, SHA);
    let wrong = github_signature(b"not the secret", body.as_bytes());
    let headers = [
        ("content-type", "application/json"),
        ("x-github-event", "pull_request"),
        ("x-github-delivery", "d-1"),
        ("x-hub-signature-256", wrong.as_str()),
    ];
    let response = post(addr, "/webhooks/github", &headers, body.as_bytes()).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (403, r#"{"error":"`x-hub-signature-256` does not match"}"#)
    );
    // 403, not 401: no HTTP authentication scheme could answer a challenge here.
    assert_eq!(response.header("www-authenticate"), None);
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");

    let right = github_signature(&secret, body.as_bytes());
    let headers = [
        ("content-type", "application/json"),
        ("x-github-event", "pull_request"),
        ("x-github-delivery", "d-1"),
        ("x-hub-signature-256", right.as_str()),
    ];
    assert_eq!(
        post(addr, "/webhooks/github", &headers, body.as_bytes()).await.status,
        202
    );
}

#[tokio::test]
async fn form_encoded_deliveries_ping_included_are_415_naming_the_content_type_to_set() {
    let server = RedisServer::start();
    let secret = b"router secret".to_vec();
    let addr = serve_router(&server, |cfg| cfg.secret = Some(secret.clone())).await;
    for (event, json) in [
        ("ping", r#"{"zen":"Keep it logically awesome."}"#.to_owned()),
        ("pull_request", review_requested(2, SHA)),
    ] {
        // GitHub's other content type: `payload=<url-encoded JSON>`, signed over the raw body.
        let body = format!(
            "payload={}",
            json.replace('"', "%22").replace('{', "%7B").replace('}', "%7D")
        );
        let signature = github_signature(&secret, body.as_bytes());
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-github-event", event),
            ("x-github-delivery", "d-1"),
            ("x-hub-signature-256", signature.as_str()),
        ];
        let response = post(addr, "/webhooks/github", &headers, body.as_bytes()).await;
        assert_eq!(response.status, 415, "{event}: {}", response.body);
        assert_eq!(
            response.body,
            r#"{"error":"unsupported content type `application/x-www-form-urlencoded`: the payload must be JSON; set the webhook's content type to `application/json`"}"#,
            "{event}"
        );
    }
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0", "nothing claimed or dispatched");
}

#[tokio::test]
async fn a_worker_key_in_mixed_case_and_a_webhook_in_lower_case_are_one_claim() {
    use tower::{Service, ServiceBuilder};
    use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, RedisStore};

    let server = RedisServer::start();
    let addr = serve_router(&server, |_| {}).await;

    // A queue worker keys the review from its own record, spelled `CODERTOCAT/hello-WORLD` with
    // an upper-case SHA, and claims it first.
    let store = RedisStore::connect(server.url()).await.unwrap();
    let mut worker = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(store, |job: &(String, u64, String)| -> Result<_, KeyError> {
                IdempotencyKey::for_pull_request(&job.0, job.1, &job.2).map(Some)
            })
            .with_namespace("github-dispatch:"),
        )
        .service_fn(|_job: (String, u64, String)| async { Ok::<_, std::convert::Infallible>("dispatched") });
    let job = ("CODERTOCAT/hello-WORLD".to_owned(), 2, SHA.to_ascii_uppercase());
    assert_eq!(worker.call(job).await.unwrap(), "dispatched");

    // The webhook carries `Codertocat/Hello-World`: the same claim, so a duplicate.
    let body = check_suite("completed", "success", 2, SHA);
    let headers = [
        ("content-type", "application/json"),
        ("x-github-event", "check_suite"),
        ("x-github-delivery", "d-1"),
    ];
    let response = post(addr, "/webhooks/github", &headers, body.as_bytes()).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.header("idempotency-status"), Some("duplicate"));
    assert_eq!(
        response.body,
        format!(r#"{{"status":"duplicate","key":"codertocat/hello-world:2:{SHA}"}}"#)
    );
    assert_eq!(server.cli(&["XLEN", "reviews"]).trim(), "0", "one review, the worker's");

    // And the other way round: the webhook first, then a worker spelling it differently.
    let body = check_suite("completed", "success", 3, SHA);
    assert_eq!(
        post(addr, "/webhooks/github", &headers, body.as_bytes()).await.status,
        202
    );
    let job = ("codertocat/HELLO-world".to_owned(), 3, SHA.to_owned());
    assert!(worker.call(job).await.is_err(), "the worker's claim is a duplicate");
}

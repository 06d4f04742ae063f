//! Checks before the claim: a delivery whose checks are not all done defers without taking a
//! claim, so a concurrent all-green delivery for the same key dispatches — exactly once. The
//! control shows the failure this prevents: deferring inside the handler holds the claim while
//! the green delivery arrives, so it is answered duplicate and nothing dispatches.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::{Router, routing::post};
use common::RedisServer;
use http::request::Parts;
use tower_idempotency::http::{
    DispatchRules, DispatchTarget, GitHubDispatchKey, HttpIdempotencyLayer, JsonResponses, PreClaim,
};
use tower_idempotency::{IdempotencyKey, RedisStore};
use webhook_support::{RawResponse, post as http_post, serve};

const SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
const REPOSITORY_ID: u64 = 186_853_002;

fn check_suite(delivery: &str) -> (String, String) {
    (
        delivery.to_owned(),
        format!(
            r#"{{"action":"completed","repository":{{"id":{REPOSITORY_ID},"full_name":"Codertocat/Hello-World"}},"check_suite":{{"head_sha":"{SHA}","conclusion":"success","pull_requests":[{{"number":2,"head":{{"sha":"{SHA}"}},"base":{{"repo":{{"id":{REPOSITORY_ID}}}}}}}]}}}}"#
        ),
    )
}

/// The checks API as the test's handler sees it: each delivery says, in a header, whether the
/// commit's other checks were all done when it was sent (a CI app finishing first sees the
/// others still running). Looking it up takes a while, as an API call does.
async fn all_checks_done(checks: Option<String>) -> bool {
    tokio::time::sleep(Duration::from_millis(150)).await;
    checks.as_deref() == Some("all-green")
}

async fn deliver(addr: std::net::SocketAddr, delivery: &str, body: &str, checks: &str) -> RawResponse {
    let headers = [
        ("content-type", "application/json"),
        ("x-github-event", "check_suite"),
        ("x-github-delivery", delivery),
        ("x-test-checks", checks),
    ];
    http_post(addr, "/webhooks/github", &headers, body.as_bytes()).await
}

fn layer(store: RedisStore) -> HttpIdempotencyLayer<GitHubDispatchKey<DispatchRules>> {
    let rules = DispatchRules::new().allow("check_suite", Some("completed"), Some("success"));
    HttpIdempotencyLayer::new(store, GitHubDispatchKey::new().with_filter(rules))
        .with_responses(JsonResponses::webhook())
        .with_namespace("github-dispatch:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferring_delivery_takes_no_claim_so_the_concurrent_green_one_dispatches_once() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.expect("connect");
    let dispatched = Arc::new(AtomicUsize::new(0));
    let d = dispatched.clone();
    let app: Router = Router::new()
        .route(
            "/webhooks/github",
            post(move |target: Option<axum::Extension<DispatchTarget>>| {
                let d = d.clone();
                async move {
                    assert!(target.is_some(), "only claimed deliveries reach the handler");
                    d.fetch_add(1, Ordering::SeqCst);
                    StatusCode::ACCEPTED
                }
            }),
        )
        .route_layer(
            layer(store)
                .with_pre_claim(|parts: &Parts, _key: &IdempotencyKey| {
                    let checks = parts
                        .headers
                        .get("x-test-checks")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    async move {
                        if all_checks_done(checks).await {
                            PreClaim::Claim
                        } else {
                            PreClaim::Defer
                        }
                    }
                })
                .build()
                .expect("valid settings"),
        );
    let addr = serve(app).await;

    let (early_id, early) = check_suite("suite-ci-one");
    let (green_id, green) = check_suite("suite-ci-two");
    let (early, green) = tokio::join!(deliver(addr, &early_id, &early, "others-running"), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        deliver(addr, &green_id, &green, "all-green").await
    });
    assert_eq!(early.status, 200, "{}", early.body);
    assert!(early.body.contains(r#""status":"deferred""#), "{}", early.body);
    assert_eq!(green.status, 202, "the all-green delivery dispatches: {}", green.body);
    assert_eq!(dispatched.load(Ordering::SeqCst), 1, "exactly one dispatch");
    assert_eq!(
        server.cli(&["EXISTS", &format!("github-dispatch:codertocat/hello-world:2:{SHA}")]),
        "1",
        "the dispatch holds its claim"
    );
}

/// The control: the same check inside the handler, after the claim. The deferring delivery
/// holds the key while it asks; the green delivery is a duplicate; the deferral then releases
/// the claim — and nothing ever dispatches. (Ordered by the test, not by timing: the green
/// delivery is sent once the deferring one holds the claim, and the check answers after it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_deferring_in_the_handler_holds_the_claim_and_loses_the_dispatch() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.expect("connect");
    let dispatched = Arc::new(AtomicUsize::new(0));
    let still_asking = Arc::new(tokio::sync::Notify::new());
    let (d, asking) = (dispatched.clone(), still_asking.clone());
    let app: Router = Router::new()
        .route(
            "/webhooks/github",
            post(move |headers: HeaderMap| {
                let (d, asking) = (d.clone(), asking.clone());
                async move {
                    if headers.get("x-test-checks").and_then(|v| v.to_str().ok()) == Some("all-green") {
                        d.fetch_add(1, Ordering::SeqCst);
                        StatusCode::ACCEPTED
                    } else {
                        // Still asking the checks API while the green delivery arrives …
                        asking.notified().await;
                        // … then "not yet": 429 releases the claim (the HTTP classifier's rule).
                        StatusCode::TOO_MANY_REQUESTS
                    }
                }
            }),
        )
        .route_layer(layer(store).build().expect("valid settings"));
    let addr = serve(app).await;

    let (early_id, early) = check_suite("suite-ci-one");
    let (green_id, green) = check_suite("suite-ci-two");
    let early = tokio::spawn(async move { deliver(addr, &early_id, &early, "others-running").await });
    let claim = format!("github-dispatch:codertocat/hello-world:2:{SHA}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.cli(&["EXISTS", &claim]) != "1" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deferring delivery never claimed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let green = deliver(addr, &green_id, &green, "all-green").await;
    still_asking.notify_one();
    let early = early.await.expect("early delivery");
    assert_eq!(early.status, 429);
    assert_eq!(green.status, 200, "{}", green.body);
    assert!(green.body.contains("duplicate"), "{}", green.body);
    assert_eq!(dispatched.load(Ordering::SeqCst), 0, "the race loses the review");
    assert_eq!(
        server.cli(&["EXISTS", &claim]),
        "0",
        "and the key is free again, with nothing dispatched"
    );
}

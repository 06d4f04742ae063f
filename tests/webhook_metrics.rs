//! The reference webhook router serves `GET /metrics` in Prometheus text format, with the
//! layer's counters after a few deliveries.
#![cfg(all(feature = "http", feature = "redis", feature = "metrics"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use common::RedisServer;
use webhook_router::RouterConfig;
use webhook_support::{post, send, serve};

#[tokio::test]
async fn the_router_serves_prometheus_metrics_with_the_outcome_counters() {
    let server = RedisServer::start();
    let app = webhook_router::build(&RouterConfig::new(server.url()))
        .await
        .expect("router");
    let addr = serve(app).await;
    let sha = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
    let body = format!(
        r#"{{"action":"completed","repository":{{"id":1,"full_name":"o/r"}},"check_suite":{{"head_sha":"{sha}","conclusion":"success","pull_requests":[{{"number":2,"head":{{"sha":"{sha}"}},"base":{{"repo":{{"id":1}}}}}}]}}}}"#
    );
    for delivery in ["d-1", "d-2", "d-3"] {
        let headers = [
            ("content-type", "application/json"),
            ("x-github-event", "check_suite"),
            ("x-github-delivery", delivery),
        ];
        post(addr, "/webhooks/github", &headers, body.as_bytes()).await;
    }
    let metrics = send(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(
        metrics.head.to_lowercase().contains("content-type: text/plain"),
        "{}",
        metrics.head
    );
    let line = |outcome: &str| {
        metrics
            .body
            .lines()
            .find(|l| l.starts_with("idempotency_outcomes") && l.contains(&format!("outcome=\"{outcome}\"")))
            .map(str::to_owned)
    };
    let claimed = line("claimed").unwrap_or_else(|| panic!("no claimed counter:\n{}", metrics.body));
    assert!(claimed.contains("layer=\"github-webhook\""), "{claimed}");
    assert!(claimed.trim_end().ends_with(" 1"), "{claimed}");
    let count = |outcome: &str| {
        line(outcome).map_or(0.0, |l| {
            l.rsplit(' ')
                .next()
                .and_then(|n| n.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        })
    };
    let duplicates = count("duplicate_in_progress") + count("duplicate_completed");
    assert_eq!(
        duplicates, 2.0,
        "two duplicates, in progress or completed:\n{}",
        metrics.body
    );
    assert!(metrics.body.contains("idempotency_store_duration"), "{}", metrics.body);
}

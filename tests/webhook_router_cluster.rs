//! The reference webhook router's `--redis-cluster URL,URL,…`: claims and the review stream in a
//! real local Redis Cluster (3 primaries), still exactly one dispatch per (repository, PR, SHA).
#![cfg(all(feature = "http", feature = "redis-cluster"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use common::redis_cluster::RedisCluster;
use tower::ServiceExt;
use webhook_router::RouterConfig;
use webhook_support::{github_delivery, status_and_body};

/// An automated trigger: a green check suite of Hello-World's pull request `pr` at `sha`.
fn check_suite(pr: u64, sha: &str) -> String {
    format!(
        r#"{{"action":"completed","repository":{{"id":186853002,"full_name":"Codertocat/Hello-World"}},"check_suite":{{"head_sha":"{sha}","conclusion":"success","pull_requests":[{{"number":{pr},"head":{{"sha":"{sha}"}},"base":{{"repo":{{"id":186853002}}}}}}]}}}}"#
    )
}

#[test]
fn redis_cluster_flag_is_parsed() {
    let cfg = RouterConfig::parse(
        [
            "--redis-cluster".to_string(),
            "redis://127.0.0.1:7000, redis://127.0.0.1:7001".to_string(),
        ],
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        cfg.redis_cluster,
        Some(vec![
            "redis://127.0.0.1:7000".to_string(),
            "redis://127.0.0.1:7001".to_string()
        ])
    );
    assert!(RouterConfig::parse(["--redis-cluster".to_string(), ",".to_string()], None, None).is_err());
}

#[tokio::test]
async fn router_on_a_cluster_dispatches_each_key_once() {
    let cluster = RedisCluster::start();
    let mut cfg = RouterConfig::new("redis://unused.invalid:6379");
    cfg.redis_cluster = Some(cluster.urls());
    let app = webhook_router::build(&cfg).await.expect("router on the cluster");

    let shas = [
        "ec26c3e57ca3a959ca5aad62de7213c562f8c821",
        "3484a3fb816e0859fd6e1cea078d76385ff50625",
    ];
    for (i, sha) in shas.iter().enumerate() {
        let pr = 2 + i as u64;
        let first = app.clone().oneshot(github_delivery(
            "check_suite",
            &format!("d-{i}-a"),
            check_suite(pr, sha),
        ));
        let (status, body) = status_and_body(first.await.unwrap()).await;
        assert_eq!(status, 202, "{body}");
        let again = app.clone().oneshot(github_delivery(
            "check_suite",
            &format!("d-{i}-b"),
            check_suite(pr, sha),
        ));
        let (status, body) = status_and_body(again.await.unwrap()).await;
        assert_eq!((status, body.contains("duplicate")), (200, true), "{body}");
    }
    assert_eq!(cluster.cli(&["XLEN", "reviews"]), "2");
    for (i, sha) in shas.iter().enumerate() {
        let key = format!("github-dispatch:codertocat/hello-world:{}:{sha}", 2 + i);
        assert_eq!(cluster.cli(&["EXISTS", &key]), "1", "claim {key} lives in the cluster");
    }
}

//! The reference GitLab webhook router (`examples/gitlab_webhook.rs`, code in
//! `examples/support/webhook_router.rs`) follows the same contract as the GitHub one, over real
//! HTTP against a real Redis: merge requests opened or updated with new commits dispatch once per
//! (project, merge request, head SHA); merge-request pipelines that succeeded dispatch with
//! `--detached-pipelines` only; `X-Gitlab-Token` is checked from the head; and its command line.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use std::net::SocketAddr;
use std::time::Duration;

use common::RedisServer;
use webhook_router::{ConfigError, Provider, RouterConfig};
use webhook_support::{RawResponse, fixture, post, post_head_only, serve};

const TOKEN: &str = "gitlab secret token";
const HEAD: &str = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7";
const NEXT: &str = "a91957a858320c0e17f3a0eca7cfacbff50ea29a";

fn merge_request(action: &str, iid: u64, sha: &str, oldrev: Option<&str>) -> String {
    let oldrev = oldrev.map_or("null".to_owned(), |rev| format!("\"{rev}\""));
    format!(
        r#"{{"object_kind":"merge_request","project":{{"id":1,"path_with_namespace":"Group/App"}},"object_attributes":{{"iid":{iid},"action":"{action}","oldrev":{oldrev},"last_commit":{{"id":"{sha}"}}}}}}"#
    )
}

fn pipeline(iid: u64, sha: &str, status: &str) -> String {
    format!(
        r#"{{"object_kind":"pipeline","project":{{"id":1,"path_with_namespace":"group/app"}},"object_attributes":{{"id":9,"ref":"feature","sha":"{sha}","source":"merge_request_event","status":"{status}"}},"merge_request":{{"id":1,"iid":{iid},"source_branch":"feature","target_branch":"main"}}}}"#
    )
}

async fn router(server: &RedisServer, tweak: impl FnOnce(&mut RouterConfig)) -> SocketAddr {
    let mut cfg = RouterConfig::gitlab(server.url());
    cfg.secret = Some(TOKEN.as_bytes().to_vec());
    tweak(&mut cfg);
    serve(webhook_router::build(&cfg).await.expect("router")).await
}

async fn deliver(addr: SocketAddr, hook: &str, uuid: &str, body: &str) -> RawResponse {
    let headers = [
        ("content-type", "application/json"),
        ("x-gitlab-event", hook),
        ("x-gitlab-webhook-uuid", uuid),
        ("x-gitlab-token", TOKEN),
    ];
    post(addr, "/webhooks/gitlab", &headers, body.as_bytes()).await
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
async fn an_opened_merge_request_is_202_and_one_xadd_and_its_redelivery_a_200_duplicate() {
    let server = RedisServer::start();
    let addr = router(&server, |_| {}).await;

    let response = deliver(
        addr,
        "Merge Request Hook",
        "uuid-1",
        &merge_request("open", 7, HEAD, None),
    )
    .await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (
            202,
            format!(r#"{{"status":"dispatched","key":"group/app:7:{HEAD}"}}"#).as_str()
        )
    );
    assert_eq!(
        stream_entries(&server, "reviews"),
        vec![
            [
                "project",
                "Group/App",
                "pr",
                "7",
                "sha",
                HEAD,
                "event",
                "merge_request",
                "delivery",
                "uuid-1"
            ]
            .map(String::from)
            .to_vec()
        ]
    );
    let ttl: i64 = server
        .cli(&["TTL", &format!("gitlab-dispatch:group/app:7:{HEAD}")])
        .trim()
        .parse()
        .unwrap();
    assert!((295..=300).contains(&ttl), "claim TTL {ttl}");

    let again = deliver(
        addr,
        "Merge Request Hook",
        "uuid-2",
        &merge_request("open", 7, HEAD, None),
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotency-status"), Some("duplicate"));
    assert_eq!(
        again.body,
        format!(r#"{{"status":"duplicate","key":"group/app:7:{HEAD}"}}"#)
    );
    assert_eq!(stream_entries(&server, "reviews").len(), 1);
}

#[tokio::test]
async fn updates_dispatch_only_when_they_pushed_commits_and_other_events_are_ignored() {
    let server = RedisServer::start();
    let addr = router(&server, |_| {}).await;

    let ignored = [
        ("Merge Request Hook", merge_request("update", 7, HEAD, None)),
        ("Merge Request Hook", merge_request("close", 7, HEAD, None)),
        ("Merge Request Hook", merge_request("approved", 7, HEAD, None)),
        (
            "Merge Request Hook",
            String::from_utf8(fixture("gitlab/merge_request.update_title_only.json")).unwrap(),
        ),
        ("Pipeline Hook", pipeline(7, HEAD, "failed")),
        // A merge-request pipeline that succeeded: without --detached-pipelines, never keyed.
        ("Pipeline Hook", pipeline(7, HEAD, "success")),
        (
            "Pipeline Hook",
            String::from_utf8(fixture("gitlab/pipeline.merged_results.json")).unwrap(),
        ),
        ("Push Hook", r#"{"object_kind":"push"}"#.to_owned()),
        (
            "Note Hook",
            String::from_utf8(fixture("gitlab/note.on_issue.json")).unwrap(),
        ),
    ];
    for (hook, body) in ignored {
        let response = deliver(addr, hook, "u", &body).await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, r#"{"status":"ignored"}"#),
            "{hook}: {body}"
        );
    }
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0", "no claim, no stream entry");

    // An update that pushed a commit: a new head, a new review.
    let pushed = merge_request("update", 7, NEXT, Some(HEAD));
    assert_eq!(deliver(addr, "Merge Request Hook", "u-2", &pushed).await.status, 202);
    let fixture_update = String::from_utf8(fixture("gitlab/merge_request.update_new_commits.json")).unwrap();
    let duplicate = deliver(addr, "Merge Request Hook", "u-3", &fixture_update).await;
    assert_eq!(
        duplicate.header("idempotency-status"),
        Some("duplicate"),
        "the fixture names the same head in upper case and the project in mixed case"
    );
    assert_eq!(stream_entries(&server, "reviews").len(), 1);
}

#[tokio::test]
async fn with_detached_pipelines_a_successful_merge_request_pipeline_shares_the_merge_request_key() {
    let server = RedisServer::start();
    let addr = router(&server, |cfg| cfg.detached_pipelines = true).await;

    assert_eq!(
        deliver(addr, "Merge Request Hook", "u-1", &merge_request("open", 7, HEAD, None))
            .await
            .status,
        202
    );
    // The detached pipeline of the same head: the same key, a duplicate.
    let same_head = deliver(addr, "Pipeline Hook", "u-2", &pipeline(7, HEAD, "success")).await;
    assert_eq!(same_head.header("idempotency-status"), Some("duplicate"));
    // A pipeline of a head the merge request hook has not announced yet dispatches it.
    let new_head = deliver(addr, "Pipeline Hook", "u-3", &pipeline(7, NEXT, "success")).await;
    assert_eq!(
        (new_head.status, new_head.body.as_str()),
        (
            202,
            format!(r#"{{"status":"dispatched","key":"group/app:7:{NEXT}"}}"#).as_str()
        )
    );
    // A merge train pipeline names its train ref: still never keyed.
    let train = String::from_utf8(fixture("gitlab/pipeline.merge_train_ref.json")).unwrap();
    let response = deliver(addr, "Pipeline Hook", "u-4", &train).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, r#"{"status":"ignored"}"#)
    );
    assert_eq!(stream_entries(&server, "reviews").len(), 2);
}

#[tokio::test]
async fn tokens_are_checked_from_the_head_and_bad_ones_are_403_within_a_second() {
    let server = RedisServer::start();
    let addr = router(&server, |_| {}).await;
    for (token, message) in [
        (None, "missing `x-gitlab-token` header"),
        (Some("guess"), "`x-gitlab-token` does not match"),
    ] {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("x-gitlab-event", "Merge Request Hook"),
        ];
        if let Some(token) = token {
            headers.push(("x-gitlab-token", token));
        }
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            post_head_only(addr, "/webhooks/gitlab", &headers, 20_000_000),
        )
        .await
        .expect("answered without reading the 20 MB body");
        assert_eq!(
            (response.status, response.body.as_str()),
            (403, serde_json::json!({ "error": message }).to_string().as_str())
        );
    }
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");
}

#[tokio::test]
async fn at_capacity_the_answer_is_429_and_the_claim_is_released() {
    let server = RedisServer::start();
    let addr = router(&server, |cfg| cfg.capacity = Some(1)).await;
    assert_eq!(
        deliver(addr, "Merge Request Hook", "u-1", &merge_request("open", 1, HEAD, None))
            .await
            .status,
        202
    );
    let blocked = deliver(addr, "Merge Request Hook", "u-2", &merge_request("open", 2, HEAD, None)).await;
    assert_eq!(
        (blocked.status, blocked.body.as_str()),
        (429, r#"{"status":"blocked"}"#)
    );
    assert_eq!(
        server
            .cli(&["EXISTS", &format!("gitlab-dispatch:group/app:2:{HEAD}")])
            .trim(),
        "0",
        "released"
    );
}

#[tokio::test]
async fn bad_input_is_400_or_415_and_health_is_200() {
    let server = RedisServer::start();
    let addr = router(&server, |_| {}).await;
    let malformed = deliver(addr, "Merge Request Hook", "u", "{not json").await;
    assert_eq!(malformed.status, 400);
    assert!(
        malformed
            .body
            .starts_with(r#"{"error":"malformed `merge_request` payload at `.`"#),
        "{}",
        malformed.body
    );
    let headers = [
        ("content-type", "text/plain"),
        ("x-gitlab-event", "Merge Request Hook"),
        ("x-gitlab-token", TOKEN),
    ];
    let body = merge_request("open", 7, HEAD, None);
    let not_json = post(addr, "/webhooks/gitlab", &headers, body.as_bytes()).await;
    assert_eq!(not_json.status, 415, "{}", not_json.body);
    let health = webhook_support::send(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((health.status, health.body.as_str()), (200, r#"{"status":"ok"}"#));
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0");
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn command_line_follows_the_github_router_plus_detached_pipelines() {
    let parse = |list: &[&str], secret: Option<&str>| {
        RouterConfig::parse_for(Provider::GitLab, args(list), None, secret.map(str::to_owned))
    };
    let cfg = parse(&[], None).unwrap();
    assert_eq!(cfg.provider, Provider::GitLab);
    assert_eq!(cfg.listen, "127.0.0.1:3000".parse().unwrap());
    assert_eq!(cfg.namespace, "gitlab-dispatch:");
    assert_eq!(cfg.ttl, Duration::from_secs(300));
    assert_eq!(cfg.stream, "reviews");
    assert_eq!(cfg.capacity, None);
    assert_eq!(cfg.secret, None);
    assert!(!cfg.detached_pipelines);

    let cfg = parse(
        &["--capacity=3", "--detached-pipelines", "--namespace", "gl:"],
        Some("t"),
    )
    .unwrap();
    assert_eq!(cfg.capacity, Some(3));
    assert!(cfg.detached_pipelines);
    assert_eq!(cfg.namespace, "gl:");
    assert_eq!(cfg.secret.as_deref(), Some(&b"t"[..]));
    assert!(!format!("{cfg:?}").contains("\"t\""));

    assert_eq!(
        parse(&[], Some("")).unwrap_err(),
        ConfigError::EmptySecret("GITLAB_WEBHOOK_TOKEN")
    );
    assert_eq!(parse(&["--help"], None).unwrap_err(), ConfigError::Help);
    assert!(Provider::GitLab.usage().contains("--detached-pipelines"));
    assert!(Provider::GitLab.usage().contains("GITLAB_WEBHOOK_TOKEN"));
}

#[tokio::test]
async fn an_empty_token_stops_the_router_with_exit_code_2() {
    let code = webhook_router::run_with(Provider::GitLab, args(&[]), None, Some(String::new())).await;
    assert_eq!(code, std::process::ExitCode::from(2));
}

//! Conformance over every file of the real webhook corpus (`../shared/corpus/github/` and
//! `../shared/corpus/gitlab/`): the exact dispatch key, or pass-through, or rejection, for each
//! file, both from the extractor alone and through the layer in front of a real Redis.
//!
//! Every file in the folders must have an expectation here (a new corpus file fails the test
//! until it is classified), and every expectation must have its file. Files that are not payloads
//! (Markdown, licences, a JSON schema, a header excerpt) are sent as deliveries too, and must be
//! refused (or, when the filter does not dispatch, pass through): they are free malformed input.
//!
//! The corpus is shared material: when it is missing, these tests fail in CI (`CI` set) and skip
//! with a printed reason elsewhere.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

#[path = "../examples/support/webhook_router.rs"]
mod webhook_router;

use std::collections::BTreeSet;
use std::path::Path;

use axum::body::{Body, Bytes};
use axum::http::Request;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes as RawBytes;
use common::RedisServer;
use tower::ServiceExt;
use tower_idempotency::IdempotencyKey;
use tower_idempotency::RedisStore;
use tower_idempotency::http::{
    AllEvents, DispatchTarget, GitHubDispatchKey, GitLabDispatchKey, HttpIdempotencyLayer, HttpKeyExtractor,
    JsonResponses,
};
use webhook_support::{corpus_dir, files_in, status_and_body};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Claims this key; the target has this action.
    Key {
        key: &'static str,
        action: Option<&'static str>,
    },
    /// Passes through unclaimed.
    PassThrough,
    /// Refused with `400`; the error's own message (without its sources).
    Rejected(&'static str),
}

use Expect::{PassThrough, Rejected};

fn key(key: &'static str, action: &'static str) -> Expect {
    Expect::Key {
        key,
        action: Some(action),
    }
}

/// Keys lower-case the repository (GitHub resolves it case-insensitively).
const HELLO_PR2: &str = "codertocat/hello-world:2:ec26c3e57ca3a959ca5aad62de7213c562f8c821";
const NOT_JSON: Expect = Rejected("malformed `check_suite` payload at `.`");

/// (file, `X-GitHub-Event` sent, with every event dispatching, with the reference router's
/// filter). Non-payload files are sent as `check_suite` deliveries.
fn github_cases() -> Vec<(&'static str, &'static str, Expect, Expect)> {
    vec![
        ("JSON_PATHS.md", "check_suite", NOT_JSON, NOT_JSON),
        ("PROVENANCE.md", "check_suite", NOT_JSON, NOT_JSON),
        (
            "check_run.completed.payload.json",
            "check_run",
            key(HELLO_PR2, "completed"),
            PassThrough,
        ),
        // pull_requests is empty and head_branch is "main": no pull request.
        (
            "check_suite.completed.1.payload.json",
            "check_suite",
            PassThrough,
            PassThrough,
        ),
        (
            "check_suite.completed.payload.json",
            "check_suite",
            key(HELLO_PR2, "completed"),
            key(HELLO_PR2, "completed"),
        ),
        // A JSON schema, not a payload: it has no `check_suite` object.
        (
            "check_suite.completed.schema.json",
            "check_suite",
            Rejected("`check_suite` payload has no `check_suite`"),
            PassThrough,
        ),
        // pull_requests is empty and head_branch is "master": no pull request.
        (
            "check_suite.requested.payload.json",
            "check_suite",
            PassThrough,
            PassThrough,
        ),
        (
            "check_suite.rerequested.payload.json",
            "check_suite",
            key(HELLO_PR2, "rerequested"),
            PassThrough,
        ),
        ("github-delivery-headers.excerpt.txt", "check_suite", NOT_JSON, NOT_JSON),
        // A comment on a plain issue; issue_comment is never keyed (no head SHA in the payload).
        (
            "issue_comment.created.payload.json",
            "issue_comment",
            PassThrough,
            PassThrough,
        ),
        ("octokit-webhooks.LICENSE", "check_suite", NOT_JSON, NOT_JSON),
        (
            "pull_request.closed.payload.json",
            "pull_request",
            key(HELLO_PR2, "closed"),
            PassThrough,
        ),
        (
            "pull_request.opened.payload.json",
            "pull_request",
            key(HELLO_PR2, "opened"),
            PassThrough,
        ),
        (
            "pull_request.reopened.payload.json",
            "pull_request",
            key(HELLO_PR2, "reopened"),
            PassThrough,
        ),
        (
            "pull_request.review_requested.payload.json",
            "pull_request",
            key(HELLO_PR2, "review_requested"),
            key(HELLO_PR2, "review_requested"),
        ),
        (
            "pull_request.synchronize.payload.json",
            "pull_request",
            key(HELLO_PR2, "synchronize"),
            PassThrough,
        ),
        (
            "pull_request_review.submitted.payload.json",
            "pull_request_review",
            key(HELLO_PR2, "submitted"),
            PassThrough,
        ),
        ("push.payload.json", "push", PassThrough, PassThrough),
        ("push.with-new-branch.payload.json", "push", PassThrough, PassThrough),
        ("status.payload.json", "status", PassThrough, PassThrough),
        // pull_requests is empty and head_branch is "master": no pull request.
        (
            "workflow_run.completed.payload.json",
            "workflow_run",
            PassThrough,
            PassThrough,
        ),
        // The run is in octo-org/octo-repo (id 300029405); its only listed pull request is
        // Codertocat/Hello-World#2 (base repository id 186853002, another head SHA). Pairing that
        // number with octo-org/octo-repo would dispatch a review of octo-org/octo-repo#2, which
        // this event is not about: it names none of its own repository's pull requests.
        (
            "workflow_run.completed.with-pull-requests.payload.json",
            "workflow_run",
            PassThrough,
            PassThrough,
        ),
    ]
}

/// (file, `X-Gitlab-Event` sent, expectation, expectation with detached merge-request pipelines).
/// Non-payload files are sent as merge request hooks.
fn gitlab_cases() -> Vec<(&'static str, &'static str, Expect, Expect)> {
    const NOT_JSON: Expect = Rejected("malformed `merge_request` payload at `.`");
    let same = |file, hook, expect| (file, hook, expect, expect);
    vec![
        same("PROVENANCE.md", "Merge Request Hook", NOT_JSON),
        same(
            "gitlab.merge_request.json",
            "Merge Request Hook",
            key(
                "gitlabhq/gitlab-test:1:da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
                "open",
            ),
        ),
        same(
            "gitlab.note_merge_request.json",
            "Note Hook",
            key(
                "gitlab-org/gitlab-test:1:562e173be03b8ff2efb05345d12df18815438a4b",
                "create",
            ),
        ),
        // A merge-request pipeline: by default it passes through, since the hook cannot say
        // whether its SHA is the head or a merged-results commit; keyed when the project runs
        // detached merge-request pipelines only.
        (
            "gitlab.pipeline.json",
            "Pipeline Hook",
            PassThrough,
            Expect::Key {
                key: "gitlab-org/gitlab-test:1:bcbb5ec396a2c0f828686f14fac9b80b780504f2",
                action: None,
            },
        ),
        same("gitlab.push.json", "Push Hook", PassThrough),
        same("go-gitlab.LICENSE", "Merge Request Hook", NOT_JSON),
    ]
}

/// Every file in `dir` has a case and every case has a file.
fn assert_covers_every_file(dir: &Path, cased: &[&str]) {
    let on_disk: BTreeSet<String> = files_in(dir).into_iter().map(|(name, _)| name).collect();
    let cased: BTreeSet<String> = cased.iter().map(|s| s.to_string()).collect();
    let unclassified: Vec<_> = on_disk.difference(&cased).collect();
    let missing: Vec<_> = cased.difference(&on_disk).collect();
    assert!(
        unclassified.is_empty() && missing.is_empty(),
        "corpus {} changed: files without an expectation {unclassified:?}, expectations without a file {missing:?}",
        dir.display()
    );
}

/// Runs `extractor` on one delivery and checks the outcome against `expect`.
fn check_extractor<X>(extractor: &X, file: &str, headers: &[(&str, &str)], body: &RawBytes, expect: Expect)
where
    X: HttpKeyExtractor<Error = tower_idempotency::http::ExtractError>,
{
    let mut builder = http::Request::post("/");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let (mut parts, ()) = builder.body(()).unwrap().into_parts();
    let result = extractor.extract(&mut parts, body);
    match (expect, result) {
        (Expect::Key { key, action }, Ok(Some(got))) => {
            assert_eq!(got.as_str(), key, "{file}: key");
            let target = parts
                .extensions
                .get::<DispatchTarget>()
                .unwrap_or_else(|| panic!("{file}: no DispatchTarget"));
            // The key is the target's triple.
            let rebuilt =
                IdempotencyKey::for_pull_request(&target.project, target.pull_request, &target.head_sha).unwrap();
            assert_eq!(rebuilt.as_str(), key, "{file}: target {target:?}");
            assert_eq!(target.action.as_deref(), action, "{file}: action");
            assert_eq!(target.delivery.as_deref(), Some("delivery-1"), "{file}: delivery");
        }
        (PassThrough, Ok(None)) => {
            assert!(
                parts.extensions.get::<DispatchTarget>().is_none(),
                "{file}: target on a pass-through"
            );
        }
        (Rejected(message), Err(error)) => assert_eq!(error.to_string(), message, "{file}: error"),
        (expect, got) => panic!("{file}: expected {expect:?}, got {got:?}"),
    }
}

/// The layer in front of a handler that records what it received.
fn app<X>(store: RedisStore, extractor: X, namespace: &str) -> Router
where
    X: HttpKeyExtractor + Clone + Send + Sync + 'static,
{
    async fn handler(key: Option<Extension<IdempotencyKey>>, body: Bytes) -> (SeenKey, Bytes) {
        let key = key.map(|Extension(k)| k.to_string()).unwrap_or_else(|| "-".into());
        (SeenKey(key), body)
    }
    Router::new().route("/hook", post(handler)).route_layer(
        HttpIdempotencyLayer::new(store, extractor)
            .with_responses(JsonResponses::webhook())
            .with_namespace(namespace),
    )
}

/// `x-seen-key` on the handler's response.
struct SeenKey(String);

impl axum::response::IntoResponseParts for SeenKey {
    type Error = std::convert::Infallible;
    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        res.headers_mut().insert("x-seen-key", self.0.parse().unwrap());
        Ok(res)
    }
}

/// Sends one delivery twice through the layer and checks statuses, bytes and keys.
async fn check_layer(app: &Router, file: &str, headers: &[(&str, &str)], body: &RawBytes, expect: Expect) {
    for attempt in 1..=2 {
        let mut builder = Request::post("/hook");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = app
            .clone()
            .oneshot(builder.body(Body::from(body.clone())).unwrap())
            .await
            .unwrap();
        let seen = response
            .headers()
            .get("x-seen-key")
            .map(|v| v.to_str().unwrap().to_owned());
        let duplicate = response.headers().get("idempotency-status").is_some();
        let raw = response.status();
        let (status, text) = status_and_body(response).await;
        match (expect, attempt) {
            (Expect::Key { key, .. }, 1) => {
                assert_eq!(status, 200, "{file}: {text}");
                assert_eq!(seen.as_deref(), Some(key), "{file}: key in the extensions");
                assert!(text.as_bytes() == &body[..], "{file}: the handler got different bytes");
            }
            (Expect::Key { key, .. }, _) => {
                assert!(duplicate, "{file}: second delivery must be a duplicate");
                assert_eq!(status, 200, "{file}: webhook preset answers duplicates 200");
                assert_eq!(text, format!(r#"{{"status":"duplicate","key":"{key}"}}"#), "{file}");
            }
            (PassThrough, _) => {
                assert_eq!(status, 200, "{file}: {text}");
                assert_eq!(seen.as_deref(), Some("-"), "{file}: no key on a pass-through");
                assert!(text.as_bytes() == &body[..], "{file}: the handler got different bytes");
            }
            (Rejected(message), _) => {
                assert_eq!(raw.as_u16(), 400, "{file}: {text}");
                let json: serde_json::Value = serde_json::from_str(&text).expect("JSON error body");
                let error = json["error"].as_str().expect("error field");
                assert!(error.starts_with(message), "{file}: `{error}` names the problem");
            }
        }
    }
}

#[tokio::test]
async fn every_github_corpus_file_gets_its_exact_key_or_passes_through() {
    let Some(dir) = corpus_dir("github") else { return };
    let cases = github_cases();
    assert_covers_every_file(&dir, &cases.iter().map(|c| c.0).collect::<Vec<_>>());

    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.unwrap();
    let all = GitHubDispatchKey::new().with_filter(AllEvents);
    let routed = GitHubDispatchKey::new().with_filter(webhook_router::dispatch_rules());
    let mut claimed = 0;
    for (i, (file, event, with_all, with_router_rules)) in cases.into_iter().enumerate() {
        let body = RawBytes::from(std::fs::read(dir.join(file)).unwrap());
        let headers = [("x-github-event", event), ("x-github-delivery", "delivery-1")];
        check_extractor(&all, file, &headers, &body, with_all);
        check_extractor(&routed, file, &headers, &body, with_router_rules);
        check_layer(
            &app(store.clone(), all.clone(), &format!("all{i}:")),
            file,
            &headers,
            &body,
            with_all,
        )
        .await;
        check_layer(
            &app(store.clone(), routed.clone(), &format!("routed{i}:")),
            file,
            &headers,
            &body,
            with_router_rules,
        )
        .await;
        claimed += [with_all, with_router_rules]
            .iter()
            .filter(|e| matches!(e, Expect::Key { .. }))
            .count();
    }
    // Exactly the keyed deliveries left a claim; nothing else touched Redis.
    assert_eq!(server.cli(&["DBSIZE"]).trim(), claimed.to_string());
    assert_eq!(claimed, 11, "keyed deliveries in the table");
}

#[tokio::test]
async fn every_gitlab_corpus_file_gets_its_exact_key_or_passes_through() {
    let Some(dir) = corpus_dir("gitlab") else { return };
    let cases = gitlab_cases();
    assert_covers_every_file(&dir, &cases.iter().map(|c| c.0).collect::<Vec<_>>());

    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.unwrap();
    let extractor = GitLabDispatchKey::new().with_filter(AllEvents);
    let detached = extractor.clone().with_detached_pipelines(true);
    let mut claimed = 0;
    for (i, (file, hook, expect, with_detached)) in cases.into_iter().enumerate() {
        let body = RawBytes::from(std::fs::read(dir.join(file)).unwrap());
        let headers = [("x-gitlab-event", hook), ("x-gitlab-webhook-uuid", "delivery-1")];
        check_extractor(&extractor, file, &headers, &body, expect);
        check_extractor(&detached, file, &headers, &body, with_detached);
        check_layer(
            &app(store.clone(), extractor.clone(), &format!("gl{i}:")),
            file,
            &headers,
            &body,
            expect,
        )
        .await;
        check_layer(
            &app(store.clone(), detached.clone(), &format!("gl-detached{i}:")),
            file,
            &headers,
            &body,
            with_detached,
        )
        .await;
        claimed += [expect, with_detached]
            .iter()
            .filter(|e| matches!(e, Expect::Key { .. }))
            .count();
    }
    assert_eq!(server.cli(&["DBSIZE"]).trim(), claimed.to_string());
    assert_eq!(claimed, 5);
}

/// The GitHub extractor with nothing configured claims nothing: the presets never take a claim
/// for an event nobody asked to dispatch.
#[test]
fn with_no_rules_no_corpus_file_takes_a_claim() {
    let Some(dir) = corpus_dir("github") else { return };
    for (file, event, _, _) in github_cases() {
        let body = RawBytes::from(std::fs::read(dir.join(file)).unwrap());
        let (mut parts, ()) = http::Request::post("/")
            .header("x-github-event", event)
            .body(())
            .unwrap()
            .into_parts();
        if let Ok(key) = GitHubDispatchKey::new().extract(&mut parts, &body) {
            assert_eq!(key, None, "{file}");
        }
    }
}

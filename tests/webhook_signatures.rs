//! Signature checks run before the claim: a missing, malformed or wrong `X-Hub-Signature-256` /
//! `X-Gitlab-Token` is answered `403` and never touches Redis, so a forged delivery cannot block
//! the legitimate one that follows. Empty secrets are refused when the verifier is built, several
//! secrets can be accepted at once (rotation), and the presets claim nothing until told what
//! dispatches.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use common::{Calls, RedisServer};
use tower::ServiceExt;
use tower_idempotency::RedisStore;
use tower_idempotency::http::{
    AllEvents, GitHubDispatchKey, GitHubSignature, GitLabDispatchKey, GitLabToken, HttpIdempotencyLayer, JsonResponses,
    SecretError,
};
use webhook_support::{github_delivery, github_signature, serve, signed_github_delivery, status_and_body};

const SECRET: &[u8] = b"It's a Secret to Everybody";
const SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";

fn review_requested() -> Vec<u8> {
    format!(
        r#"{{"action":"review_requested","number":2,"repository":{{"full_name":"Codertocat/Hello-World"}},"pull_request":{{"number":2,"head":{{"sha":"{SHA}"}}}}}}"#
    )
    .into_bytes()
}

fn merge_request() -> Vec<u8> {
    format!(
        r#"{{"object_kind":"merge_request","project":{{"path_with_namespace":"group/app"}},"object_attributes":{{"iid":5,"action":"open","last_commit":{{"id":"{SHA}"}}}}}}"#
    )
    .into_bytes()
}

fn router<L>(layer: L, calls: &Calls) -> Router
where
    L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<Request<Body>, Error = std::convert::Infallible> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<Request<Body>>>::Response: axum::response::IntoResponse + 'static,
    <L::Service as tower::Service<Request<Body>>>::Future: Send + 'static,
{
    Router::new()
        .route(
            "/webhooks/github",
            post(|Extension(calls): Extension<Calls>| async move {
                calls.hit();
                StatusCode::ACCEPTED
            }),
        )
        .route_layer(layer)
        .layer(Extension(calls.clone()))
}

fn dbsize(server: &RedisServer) -> String {
    server.cli(&["DBSIZE"]).trim().to_owned()
}

#[tokio::test]
async fn bad_github_signatures_are_403_and_take_no_claim() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.unwrap();
    let calls = Calls::default();
    let app = router(
        HttpIdempotencyLayer::github_webhook(store, SECRET)
            .expect("a secret")
            .with_extractor(GitHubDispatchKey::new().with_filter(AllEvents)),
        &calls,
    );
    let body = review_requested();

    let with_signature = |value: &str| {
        let mut request = github_delivery("pull_request", "d-1", body.clone());
        request
            .headers_mut()
            .insert("x-hub-signature-256", value.parse().unwrap());
        request
    };
    let good = github_signature(SECRET, &body);
    let cases: Vec<(Request<Body>, &str)> = vec![
        (
            github_delivery("pull_request", "d-1", body.clone()),
            "missing `x-hub-signature-256` header",
        ),
        (
            with_signature(&github_signature(b"another secret", &body)),
            "`x-hub-signature-256` does not match",
        ),
        (
            with_signature(&github_signature(SECRET, b"another body")),
            "`x-hub-signature-256` does not match",
        ),
        (
            with_signature(good.trim_start_matches("sha256=")),
            "malformed `x-hub-signature-256` header",
        ),
        (
            with_signature(&good.replace("sha256=", "sha1=")),
            "malformed `x-hub-signature-256` header",
        ),
        (
            with_signature(&good[..good.len() - 2]),
            "malformed `x-hub-signature-256` header",
        ),
        (
            with_signature(&format!("{good}00")),
            "malformed `x-hub-signature-256` header",
        ),
        (
            with_signature(&format!("{}z", &good[..good.len() - 1])),
            "malformed `x-hub-signature-256` header",
        ),
        (
            with_signature(&good.to_uppercase()),
            "malformed `x-hub-signature-256` header",
        ),
        (
            {
                let mut twice = signed_github_delivery(SECRET, "pull_request", "d-1", body.clone());
                twice.headers_mut().append("x-hub-signature-256", good.parse().unwrap());
                twice
            },
            "missing `x-hub-signature-256` header",
        ),
    ];
    for (request, message) in cases {
        let (status, text) = status_and_body(app.clone().oneshot(request).await.unwrap()).await;
        assert_eq!(status, 403, "{text}");
        assert_eq!(text, serde_json::json!({ "error": message }).to_string());
    }
    assert_eq!(calls.get(), 0);
    assert_eq!(dbsize(&server), "0", "no refused delivery touched Redis");

    // The legitimate delivery is not blocked by any of them.
    let ok = app
        .clone()
        .oneshot(signed_github_delivery(SECRET, "pull_request", "d-1", body.clone()))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    assert_eq!(calls.get(), 1);
    assert_eq!(
        server
            .cli(&["EXISTS", &format!("codertocat/hello-world:2:{SHA}")])
            .trim(),
        "1"
    );
    // A correctly signed redelivery is a duplicate, answered 200 (webhook preset).
    let again = app
        .oneshot(signed_github_delivery(SECRET, "pull_request", "d-2", body))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotency-status"], "duplicate");
}

#[tokio::test]
async fn bad_gitlab_tokens_are_403_and_take_no_claim() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.unwrap();
    let calls = Calls::default();
    let app = router(
        HttpIdempotencyLayer::gitlab_webhook(store, "gl-token")
            .expect("a token")
            .with_extractor(GitLabDispatchKey::new().with_filter(AllEvents)),
        &calls,
    );
    let delivery = |token: Option<&str>| {
        let mut builder = Request::post("/webhooks/github").header("x-gitlab-event", "Merge Request Hook");
        if let Some(token) = token {
            builder = builder.header("x-gitlab-token", token);
        }
        builder.body(Body::from(merge_request())).unwrap()
    };

    for (token, message) in [
        (None, "missing `x-gitlab-token` header"),
        (Some("gl-toke"), "`x-gitlab-token` does not match"),
        (Some("gl-token "), "`x-gitlab-token` does not match"),
        (Some("GL-TOKEN"), "`x-gitlab-token` does not match"),
        (Some(""), "`x-gitlab-token` does not match"),
    ] {
        let (status, text) = status_and_body(app.clone().oneshot(delivery(token)).await.unwrap()).await;
        assert_eq!(status, 403, "{token:?}: {text}");
        assert_eq!(text, serde_json::json!({ "error": message }).to_string());
    }
    assert_eq!(calls.get(), 0);
    assert_eq!(dbsize(&server), "0");

    let ok = app.oneshot(delivery(Some("gl-token"))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    assert_eq!(server.cli(&["EXISTS", &format!("group/app:5:{SHA}")]).trim(), "1");
}

#[tokio::test]
async fn without_a_secret_nothing_is_checked() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.unwrap();
    let calls = Calls::default();
    let layer = HttpIdempotencyLayer::new(store, GitHubDispatchKey::new().with_filter(AllEvents))
        .with_verifier(None::<GitHubSignature>)
        .with_responses(JsonResponses::webhook());
    let app = router(layer, &calls);
    let response = app
        .oneshot(github_delivery("pull_request", "d-1", review_requested()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(calls.get(), 1);
}

#[test]
fn github_documented_example_and_long_secrets() {
    use bytes::Bytes;
    use tower_idempotency::http::VerifyRequest;

    let signed = |value: &str| {
        Request::post("/")
            .header("x-hub-signature-256", value)
            .body(())
            .unwrap()
            .into_parts()
            .0
    };
    // From GitHub's "Validating webhook deliveries".
    let documented = signed("sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17");
    let verifier = GitHubSignature::try_new("It's a Secret to Everybody").unwrap();
    assert!(
        verifier
            .verify(&documented, &Bytes::from_static(b"Hello, World!"))
            .is_ok()
    );
    assert!(
        verifier
            .verify(&documented, &Bytes::from_static(b"Hello, World! "))
            .is_err()
    );

    // A secret longer than SHA-256's block (64 bytes) is hashed first by HMAC.
    let long_secret = "s".repeat(100);
    let body = b"{}";
    let request = signed(&github_signature(long_secret.as_bytes(), body));
    assert!(
        GitHubSignature::try_new(&long_secret)
            .unwrap()
            .verify(&request, &Bytes::from_static(body))
            .is_ok()
    );
    assert!(
        GitHubSignature::try_new(&long_secret[..99])
            .unwrap()
            .verify(&request, &Bytes::from_static(body))
            .is_err()
    );
}

#[test]
fn debug_output_never_shows_secrets() {
    let github = format!("{:?}", GitHubSignature::try_new("hunter2-github").unwrap());
    let gitlab = format!("{:?}", GitLabToken::try_new("hunter2-gitlab").unwrap());
    assert!(!github.contains("hunter2"), "{github}");
    assert!(!gitlab.contains("hunter2"), "{gitlab}");
    assert!(github.contains("redacted") && gitlab.contains("redacted"));
}

#[test]
fn empty_secrets_and_tokens_are_refused_at_construction_with_a_clear_error() {
    let error = GitHubSignature::try_new("").unwrap_err();
    assert_eq!(error, SecretError::Empty { index: 0 });
    assert_eq!(
        error.to_string(),
        "webhook secret #0 is empty: anyone could sign (or send) a matching delivery"
    );
    assert_eq!(
        GitHubSignature::try_from_secrets(["current", ""]).unwrap_err(),
        SecretError::Empty { index: 1 }
    );
    assert_eq!(GitLabToken::try_new("").unwrap_err(), SecretError::Empty { index: 0 });
    assert_eq!(
        GitLabToken::try_from_tokens(Vec::<String>::new()).unwrap_err(),
        SecretError::None
    );
}

/// A GitHub receiver on real HTTP with claims in `server`, dispatching every event that names a
/// pull request.
async fn github_receiver(server: &RedisServer, verifier: GitHubSignature, calls: &Calls) -> std::net::SocketAddr {
    let store = RedisStore::connect(server.url()).await.unwrap();
    let layer = HttpIdempotencyLayer::new(store, GitHubDispatchKey::new().with_filter(AllEvents))
        .with_verifier(verifier)
        .with_responses(JsonResponses::webhook());
    serve(router(layer, calls)).await
}

#[tokio::test]
async fn rotation_accepts_the_old_and_the_new_secret_and_refuses_others_over_http() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let verifier = GitHubSignature::try_from_secrets([&b"new secret"[..], SECRET]).unwrap();
    assert_eq!(verifier.secret_count(), 2);
    let addr = github_receiver(&server, verifier, &calls).await;
    let deliver = |secret: &'static [u8], pr: u64| async move {
        let body = String::from_utf8(review_requested())
            .unwrap()
            .replace(":2", &format!(":{pr}"));
        let signature = github_signature(secret, body.as_bytes());
        let headers = [
            ("content-type", "application/json"),
            ("x-github-event", "pull_request"),
            ("x-github-delivery", "d"),
            ("x-hub-signature-256", signature.as_str()),
        ];
        webhook_support::post(addr, "/webhooks/github", &headers, body.as_bytes())
            .await
            .status
    };
    assert_eq!(deliver(SECRET, 3).await, 202, "the old secret");
    assert_eq!(deliver(b"new secret", 4).await, 202, "the new secret");
    assert_eq!(deliver(b"retired secret", 5).await, 403, "any other");
    assert_eq!(calls.get(), 2);
    assert_eq!(dbsize(&server), "2");
}

#[tokio::test]
async fn gitlab_tokens_are_checked_before_the_body_and_rotate_over_http() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.unwrap();
    let calls = Calls::default();
    let layer = HttpIdempotencyLayer::new(store, GitLabDispatchKey::new().with_filter(AllEvents))
        .with_verifier(GitLabToken::try_from_tokens(["old-token", "new-token"]).unwrap())
        .with_responses(JsonResponses::webhook());
    let addr = serve(router(layer, &calls)).await;
    let headers = |token: &'static str| {
        [
            ("content-type", "application/json"),
            ("x-gitlab-event", "Merge Request Hook"),
            ("x-gitlab-token", token),
        ]
    };
    // A wrong token with a declared 20 MB body: answered from the head, within a second.
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        webhook_support::post_head_only(addr, "/webhooks/github", &headers("guess"), 20_000_000),
    )
    .await
    .expect("answered without reading the body");
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (403, r#"{"error":"`x-gitlab-token` does not match"}"#)
    );
    for token in ["old-token", "new-token"] {
        let response = webhook_support::post(addr, "/webhooks/github", &headers(token), &merge_request()).await;
        assert!([202, 200].contains(&response.status), "{token}: {}", response.body);
    }
    assert_eq!(calls.get(), 1, "the second is a duplicate of the first");
    assert_eq!(dbsize(&server), "1");
}

#[tokio::test]
async fn the_presets_claim_nothing_until_told_what_dispatches() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let store = RedisStore::connect(server.url()).await.unwrap();
    let addr = serve(router(
        HttpIdempotencyLayer::github_webhook(store, SECRET).expect("a secret"),
        &calls,
    ))
    .await;
    let requested = format!(
        r#"{{"action":"requested","repository":{{"id":1,"full_name":"o/r"}},"check_suite":{{"head_sha":"{SHA}","pull_requests":[{{"number":2,"base":{{"repo":{{"id":1}}}}}}]}}}}"#
    );
    for (event, body) in [
        ("check_suite", requested.into_bytes()),
        ("pull_request", review_requested()),
    ] {
        let signature = github_signature(SECRET, &body);
        let headers = [
            ("content-type", "application/json"),
            ("x-github-event", event),
            ("x-github-delivery", "d"),
            ("x-hub-signature-256", signature.as_str()),
        ];
        // Passed through to the handler, unclaimed.
        assert_eq!(
            webhook_support::post(addr, "/webhooks/github", &headers, &body)
                .await
                .status,
            202,
            "{event}"
        );
    }
    assert_eq!(calls.get(), 2);
    assert_eq!(dbsize(&server), "0", "no event took a claim");

    let store = RedisStore::connect(server.url()).await.unwrap();
    let gitlab = HttpIdempotencyLayer::gitlab_webhook(store, "gl-token").expect("a token");
    let addr = serve(router(gitlab, &calls)).await;
    let headers = [
        ("content-type", "application/json"),
        ("x-gitlab-event", "Merge Request Hook"),
        ("x-gitlab-token", "gl-token"),
    ];
    assert_eq!(
        webhook_support::post(addr, "/webhooks/github", &headers, &merge_request())
            .await
            .status,
        202
    );
    assert_eq!(dbsize(&server), "0", "no event took a claim");
}

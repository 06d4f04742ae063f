//! Regression (found by `cargo fuzz run github_webhook`, minimized to 5 bytes): an object key of
//! a malformed payload was copied raw into the error's document path, so `{"\x7f":` put a DEL
//! byte — and `{"a\nb":[` a newline, `{"\u202e":[` a bidi override — into the `400` body and the
//! log line. Keys in the path are now escaped to printable ASCII.
#![cfg(feature = "http")]

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{Request, Response, StatusCode};
use tower::{Layer, ServiceExt};
use tower_idempotency::MemoryStore;
use tower_idempotency::http::{
    ExtractError, GitHubDispatchKey, GitLabDispatchKey, HttpIdempotencyLayer, HttpKeyExtractor, ReplayBody,
};

/// The fuzzer's minimized input: an unterminated object whose only key is DEL.
const MINIMIZED: &[u8] = b"{\"\x7f\":";

fn malformed_path(error: ExtractError) -> String {
    match error {
        ExtractError::MalformedPayload { path, .. } => path,
        other => panic!("expected a malformed payload, got {other}"),
    }
}

fn github(body: &[u8]) -> Result<(), ExtractError> {
    let (mut parts, ()) = Request::post("/")
        .header("x-github-event", "check_suite")
        .body(())
        .unwrap()
        .into_parts();
    GitHubDispatchKey::new()
        .extract(&mut parts, &Bytes::copy_from_slice(body))
        .map(|key| panic!("expected a rejection, got {key:?}"))
}

#[test]
fn object_keys_in_the_error_path_are_escaped() {
    let cases: [(&[u8], &str); 4] = [
        (MINIMIZED, r"\u{7f}"),
        (br#"{"a\nb":["#, r"a\u{a}b"),
        (br#"{"\u202e":["#, r"\u{202e}"),
        // Printable keys are untouched.
        (
            br#"{"check_suite":{"pull_requests":[{"number":"7"}]}}"#,
            "check_suite.pull_requests[0].number",
        ),
    ];
    for (body, expected_path) in cases {
        let path = malformed_path(github(body).unwrap_err());
        assert_eq!(path, expected_path, "body {:?}", String::from_utf8_lossy(body));
    }
    // GitLab shares the parser.
    let (mut parts, ()) = Request::post("/")
        .header("x-gitlab-event", "Merge Request Hook")
        .body(())
        .unwrap()
        .into_parts();
    let error = GitLabDispatchKey::new()
        .extract(&mut parts, &Bytes::from_static(MINIMIZED))
        .unwrap_err();
    assert_eq!(malformed_path(error), r"\u{7f}");
}

#[tokio::test]
async fn the_400_body_of_the_minimized_input_is_printable_and_the_handler_is_not_called() {
    let handler = tower::service_fn(|_req: Request<ReplayBody<Body>>| async {
        panic!("the handler must not run for a malformed payload");
        #[allow(unreachable_code)]
        Ok::<Response<Body>, Infallible>(Response::new(Body::empty()))
    });
    let service = HttpIdempotencyLayer::new(MemoryStore::new(), GitHubDispatchKey::new()).layer(handler);
    let request = Request::post("/")
        .header("x-github-event", "check_suite")
        .body(Body::from(MINIMIZED))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = axum::body::to_bytes(Body::new(response.into_body()), usize::MAX)
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let message = json["error"].as_str().unwrap();
    assert!(
        message.starts_with(r"malformed `check_suite` payload at `\u{7f}`: "),
        "{message}"
    );
    assert!(!message.chars().any(char::is_control), "{message:?}");
}

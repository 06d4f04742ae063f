//! Regression (found by the `github_webhook` fuzz target's message-length invariant): a malformed
//! payload's error quoted the payload without bound — a 10 kB object key as the document path, a
//! 10 kB string in a number field as serde_json's `invalid type: string "…"` — so one request
//! within the body limit (25 MB) could produce a `400` body and a log line of that size. Both are
//! now cut to about 200 bytes; the location (line, column) is kept in the message.
#![cfg(feature = "http")]

use std::error::Error;

use axum::body::Bytes;
use axum::http::Request;
use tower_idempotency::http::{ExtractError, GitHubDispatchKey, HttpKeyExtractor};

/// The error and its sources, as the layer writes them into the `400` body and the log.
fn chain(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn github_error(event: &str, body: String) -> ExtractError {
    let (mut parts, ()) = Request::post("/")
        .header("x-github-event", event)
        .body(())
        .unwrap()
        .into_parts();
    match GitHubDispatchKey::new().extract(&mut parts, &Bytes::from(body)) {
        Ok(key) => panic!("expected a rejection, got {key:?}"),
        Err(error) => error,
    }
}

#[test]
fn a_huge_object_key_does_not_make_a_huge_error() {
    let body = format!(r#"{{"{}":["#, "k".repeat(10_000));
    let location = format!("at line 1 column {}", body.len());
    let error = github_error("check_suite", body);
    let message = chain(&error);
    assert!(message.len() < 600, "{} bytes: {message}", message.len());
    let ExtractError::MalformedPayload { path, .. } = &error else {
        panic!("expected a malformed payload, got {message}");
    };
    assert!(
        path.starts_with("kkkk") && path.contains('…') && path.ends_with("kkkk"),
        "{path}"
    );
    assert!(
        message.ends_with(&format!("EOF while parsing a list {location}")),
        "{message}"
    );
}

#[test]
fn a_huge_string_in_a_number_field_does_not_make_a_huge_error() {
    let prefix = r#"{"pull_request":{"number":""#;
    let body = format!(r#"{prefix}{}"}}}}"#, "7".repeat(10_000));
    // serde_json reports the column just after the string's closing quote.
    let location = format!("at line 1 column {}", prefix.len() + 10_000 + 1);
    let error = github_error("pull_request", body);
    let message = chain(&error);
    assert!(message.len() < 600, "{} bytes: {message}", message.len());
    assert!(
        message.starts_with(r#"malformed `pull_request` payload at `pull_request.number`: invalid type: string "7777"#),
        "{message}"
    );
    // What was expected, and where, survive the cut.
    assert!(message.contains('…'), "{message}");
    assert!(
        message.ends_with(&format!("7777\", expected u64 {location}")),
        "{message}"
    );
}

#[test]
fn short_parser_messages_are_unchanged() {
    let error = github_error("pull_request", r#"{"pull_request":{"number":"7"}}"#.to_owned());
    assert_eq!(
        chain(&error),
        r#"malformed `pull_request` payload at `pull_request.number`: invalid type: string "7", expected u64 at line 1 column 29"#
    );
}

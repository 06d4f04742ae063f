//! Property tests over the HTTP key extractors with hostile input: arbitrary header bytes
//! (obs-text, tabs, enormous values), and GitHub `pull_request` payloads whose PR number is
//! negative, zero, huge, fractional or a string, whose SHA has the wrong shape, and whose
//! repository name is hostile. Every input gives a valid key, a pass-through or an error (a
//! `4xx` through the layer) — never a panic, never a dispatch of an invalid key.
//!
//! Complements tests/webhook_bad_input.rs (fixtures and byte-level mutations of real payloads)
//! with generated, structure-aware cases.
#![cfg(feature = "http")]

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, Response, StatusCode};
use proptest::prelude::*;
use tower::{Layer, ServiceExt};
use tower_idempotency::http::{
    AllEvents, ExtractError, GitHubDispatchKey, HeaderKey, HttpIdempotencyLayer, HttpKeyExtractor, ReplayBody,
};
use tower_idempotency::{IdempotencyKey, MAX_KEY_LEN, MemoryStore};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Through the whole layer (no signature check, memory store): the status, and whether the
/// handler ran.
fn through_layer<X: HttpKeyExtractor + Clone + Send + Sync + 'static>(
    extractor: X,
    request: Request<Body>,
) -> (StatusCode, bool) {
    let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = called.clone();
    let handler = tower::service_fn(move |_req: Request<ReplayBody<Body>>| {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::ACCEPTED)
                    .body(Body::empty())
                    .unwrap(),
            )
        }
    });
    let svc = HttpIdempotencyLayer::new(MemoryStore::new(), extractor).layer(handler);
    let response = runtime().block_on(svc.oneshot(request)).expect("infallible");
    (response.status(), called.load(std::sync::atomic::Ordering::SeqCst))
}

/// Header values the `http` crate accepts: anything but controls other than tab, including
/// obs-text (0x80..=0xFF) and long values.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        proptest::collection::vec(0x20u8..0x7f, 0..80),
        (0usize..5000).prop_map(|n| vec![b'k'; n]),
        (MAX_KEY_LEN - 1..MAX_KEY_LEN + 2).prop_map(|n| vec![b'k'; n]),
    ]
    .prop_filter_map("not a header value", |bytes| HeaderValue::from_bytes(&bytes).ok())
}

/// A JSON fragment for the PR number: well-formed and not.
fn pr_number() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => (1u64..100_000).prop_map(|n| n.to_string()),
        1 => Just("0".to_owned()),
        1 => Just("-1".to_owned()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => Just(u64::MAX.to_string()),
        1 => Just("18446744073709551616".to_owned()), // u64::MAX + 1
        1 => Just("1e400".to_owned()),
        1 => Just("42.0".to_owned()),
        1 => Just("4.2".to_owned()),
        1 => Just("\"42\"".to_owned()),
        1 => Just("\"forty-two\"".to_owned()),
        1 => Just("null".to_owned()),
        1 => Just("true".to_owned()),
        1 => Just("[42]".to_owned()),
        1 => Just("{\"n\":42}".to_owned()),
    ]
}

/// A JSON fragment for the head SHA.
fn head_sha() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => "[0-9a-f]{40}".prop_map(|s| format!("\"{s}\"")),
        1 => "[0-9a-fA-F]{7,64}".prop_map(|s| format!("\"{s}\"")),
        1 => "[0-9a-f]{0,6}".prop_map(|s| format!("\"{s}\"")),
        1 => "[0-9a-f]{65,80}".prop_map(|s| format!("\"{s}\"")),
        1 => "[0-9a-z:\\- ]{1,50}".prop_map(|s| format!("\"{s}\"")),
        1 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => Just("12345678".to_owned()),
        1 => Just("null".to_owned()),
        1 => Just("[\"abcdef1\"]".to_owned()),
    ]
}

/// A JSON fragment for the repository's full name.
fn full_name() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => "[a-zA-Z0-9._-]{1,20}/[a-zA-Z0-9._-]{1,20}".prop_map(|s| format!("\"{s}\"")),
        1 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => (0usize..2000).prop_map(|n| format!("\"o/{}\"", "r".repeat(n))),
        1 => Just("\"\"".to_owned()),
        1 => Just("\"o r/x\"".to_owned()),
        1 => Just("null".to_owned()),
        1 => Just("42".to_owned()),
    ]
}

/// What a fragment means when it is a usable value: a PR number is a positive JSON integer.
fn decoded_pr(fragment: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(fragment).ok()?.as_u64()
}

fn decoded_str(fragment: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(fragment)
        .ok()?
        .as_str()
        .map(str::to_owned)
}

fn pull_request_body(pr: &str, sha: &str, name: &str) -> String {
    format!(
        r#"{{"action":"synchronize","number":{pr},"repository":{{"full_name":{name}}},"pull_request":{{"number":{pr},"head":{{"sha":{sha}}}}}}}"#
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn header_key_gives_a_valid_key_or_a_rejection(value in header_value()) {
        let extractor = HeaderKey::idempotency_key();
        let request = || Request::post("/").header("idempotency-key", value.clone()).body(Body::empty()).unwrap();
        let (mut parts, _) = request().into_parts();
        let extracted = extractor.extract(&mut parts, &Bytes::new());
        let text = value.to_str().ok();
        // The value must be a valid key by itself, and so must the key scoped by method and
        // route (`POST / value`), which may be over the length limit when the value is not.
        let expected = text
            .filter(|t| IdempotencyKey::new(t).is_ok())
            .and_then(|t| IdempotencyKey::new(format!("POST / {t}")).ok());
        match &extracted {
            Ok(Some(key)) => prop_assert_eq!(Some(key), expected.as_ref(), "accepted {:?}", value),
            Ok(None) => prop_assert!(false, "a present header never passes through"),
            Err(ExtractError::InvalidHeader { .. }) => prop_assert!(text.is_none(), "refused visible ASCII {:?}", value),
            Err(ExtractError::InvalidHeaderKey { .. }) => prop_assert!(text.is_some() && expected.is_none()),
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
        // A safe method never claims, whatever the header holds.
        let (mut get, _) = Request::get("/").header("idempotency-key", value.clone()).body(()).unwrap().into_parts();
        prop_assert!(matches!(extractor.extract(&mut get, &Bytes::new()), Ok(None)));
        let (status, called) = through_layer(extractor, request());
        if extracted.is_ok() {
            prop_assert_eq!(status, StatusCode::ACCEPTED);
            prop_assert!(called);
        } else {
            prop_assert!(status.is_client_error(), "status {status} for {value:?}");
            prop_assert!(!called, "an invalid key must never reach the handler");
        }
    }

    #[test]
    fn github_pull_request_payloads_give_the_right_key_or_a_4xx(
        pr in pr_number(),
        sha in head_sha(),
        name in full_name(),
    ) {
        let body = pull_request_body(&pr, &sha, &name);
        let request = || Request::post("/").header("x-github-event", "pull_request").body(Body::from(body.clone())).unwrap();
        let (mut parts, _) = request().into_parts();
        let extractor = GitHubDispatchKey::new().with_filter(AllEvents);
        let extracted = extractor.extract(&mut parts, &Bytes::from(body.clone()));

        let expected = match (decoded_str(&name), decoded_pr(&pr), decoded_str(&sha)) {
            (Some(n), Some(p), Some(s)) => IdempotencyKey::for_pull_request(&n, p, &s).ok(),
            _ => None,
        };
        match &extracted {
            Ok(Some(key)) => prop_assert_eq!(Some(key), expected.as_ref(), "body {}", body),
            Ok(None) => prop_assert!(expected.is_none(), "a valid pull_request event passed through: {}", body),
            Err(e) => {
                prop_assert!(expected.is_none(), "a valid pull_request event was refused ({e}): {}", body);
                let msg = e.to_string();
                prop_assert!(!msg.chars().any(char::is_control), "control character in {msg:?}");
            }
        }
        let (status, called) = through_layer(extractor, request());
        match extracted {
            Ok(_) => {
                prop_assert_eq!(status, StatusCode::ACCEPTED);
                prop_assert!(called);
            }
            Err(_) => {
                prop_assert!(status.is_client_error(), "status {status} for {body}");
                prop_assert!(!called, "an invalid payload must never reach the handler");
            }
        }
    }

    #[test]
    fn github_extractor_survives_arbitrary_bodies_and_event_names(
        event in prop_oneof![
            Just("pull_request".to_owned()), Just("check_suite".to_owned()), Just("check_run".to_owned()),
            Just("workflow_run".to_owned()), Just("pull_request_review".to_owned()), "[a-z_]{0,20}",
        ],
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (1usize..5000).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()),
            (1usize..5000).prop_map(|depth| format!(r#"{{"repository":{}1{}}}"#, r#"{"a":"#.repeat(depth), "}".repeat(depth)).into_bytes()),
        ],
    ) {
        let Ok(value) = HeaderValue::from_str(&event) else { return Ok(()) };
        let (mut parts, _) = Request::post("/").header("x-github-event", value).body(()).unwrap().into_parts();
        if let Ok(Some(key)) = GitHubDispatchKey::new().with_filter(AllEvents).extract(&mut parts, &Bytes::from(body)) {
            prop_assert!(key.as_str().len() <= MAX_KEY_LEN && !key.as_str().is_empty());
        }
    }
}

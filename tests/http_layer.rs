//! `HttpIdempotencyLayer` in an axum router, against a real Redis: every short-circuit is a
//! response with the documented status, header and JSON body; the handler sees the identical
//! bytes and the claimed key; the classifier releases on 429, other 4xx but 409, and `Blocked`;
//! header keys never claim on safe methods and are scoped by method, route and principal.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;
mod webhook_support;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use common::{Calls, RedisServer};
use http::request::Parts;
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_idempotency::http::{
    Blocked, HeaderKey, HttpClassifier, HttpIdempotencyLayer, HttpKeyExtractor, JsonResponses, ReplayBody,
    ShortCircuitResponse,
};
use tower_idempotency::{IdempotencyKey, KeyError, LostClaimPolicy, RedisStore};
use webhook_support::status_and_body;

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(server.url())
        .await
        .expect("connect to the test redis")
}

/// Answers with the status in `x-respond-status` (default 200), marks the response `Blocked`
/// when `x-respond-blocked` is set, and echoes what it received: the key and the body.
async fn echo(
    Extension(calls): Extension<Calls>,
    key: Option<Extension<IdempotencyKey>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    calls.hit();
    let status = headers
        .get("x-respond-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map(|code| StatusCode::from_u16(code).expect("status"))
        .unwrap_or(StatusCode::OK);
    let key = key.map(|Extension(k)| k.to_string()).unwrap_or_else(|| "-".to_owned());
    let mut response = (status, [("x-seen-key", key)], body).into_response();
    if headers.contains_key("x-respond-blocked") {
        response.extensions_mut().insert(Blocked);
    }
    response
}

fn app<L>(layer: L, calls: &Calls) -> Router
where
    L: Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<Request<Body>, Error = Infallible> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<Request<Body>>>::Response: IntoResponse + 'static,
    <L::Service as tower::Service<Request<Body>>>::Future: Send + 'static,
{
    Router::new()
        .route("/jobs", post(echo))
        .route_layer(layer)
        .layer(Extension(calls.clone()))
}

fn request(key: Option<&str>, extra: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::post("/jobs");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    for (name, value) in extra {
        builder = builder.header(*name, *value);
    }
    builder.body(body.into()).expect("request")
}

fn dbsize(server: &RedisServer) -> usize {
    server.cli(&["DBSIZE"]).trim().parse().expect("DBSIZE")
}

#[tokio::test]
async fn duplicate_is_409_with_idempotency_status_header_and_json_body() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let app = app(
        HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key()),
        &calls,
    );

    let first = app.clone().oneshot(request(Some("pay-1"), &[], "a")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.headers()["x-seen-key"],
        "POST /jobs pay-1",
        "the handler sees the claimed key, scoped by method and route"
    );

    let second = app.oneshot(request(Some("pay-1"), &[], "a")).await.unwrap();
    assert_eq!(second.status(), StatusCode::CONFLICT);
    assert_eq!(second.headers()["idempotency-status"], "duplicate");
    assert_eq!(second.headers()["content-type"], "application/json");
    let (_, body) = status_and_body(second).await;
    assert_eq!(body, r#"{"status":"duplicate","key":"POST /jobs pay-1"}"#);
    assert_eq!(calls.get(), 1, "the duplicate never reached the handler");
    assert_eq!(
        server.cli(&["EXISTS", "POST /jobs pay-1"]).trim(),
        "1",
        "the claim is in Redis"
    );
}

#[tokio::test]
async fn webhook_preset_answers_duplicates_200_with_the_same_header_and_body() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let layer = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::github_delivery())
        .with_responses(JsonResponses::webhook());
    let app = app(layer, &calls);
    let delivery = || {
        request(
            None,
            &[
                ("x-github-hook-id", "292430182"),
                ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ],
            "{}",
        )
    };

    assert_eq!(app.clone().oneshot(delivery()).await.unwrap().status(), StatusCode::OK);
    let duplicate = app.oneshot(delivery()).await.unwrap();
    assert_eq!(duplicate.headers()["idempotency-status"], "duplicate");
    let (status, body) = status_and_body(duplicate).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        r#"{"status":"duplicate","key":"POST /jobs x-github-hook-id=292430182 72d3162e-cc78-11e3-81ab-4c9367dc0958"}"#
    );
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn store_unavailable_fails_closed_with_503_and_retry_after() {
    let mut server = RedisServer::start();
    let calls = Calls::default();
    let app = app(
        HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key()),
        &calls,
    );
    server.kill();

    let response = app.oneshot(request(Some("pay-2"), &[], "a")).await.unwrap();
    assert_eq!(response.headers()["retry-after"], "5");
    let (status, body) = status_and_body(response).await;
    assert_eq!(status, 503);
    assert_eq!(body, r#"{"status":"unavailable"}"#);
    assert_eq!(calls.get(), 0, "failed closed: nothing dispatched");
}

#[tokio::test]
async fn invalid_keys_are_400_naming_what_is_wrong_and_take_no_claim() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let app = app(
        HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key().with_required(true)),
        &calls,
    );

    let cases: Vec<(Request<Body>, &str)> = vec![
        (
            request(Some(""), &[], "a"),
            "`idempotency-key` header is not a valid idempotency key: idempotency key is empty",
        ),
        (
            request(Some(&"k".repeat(600)), &[], "a"),
            "`idempotency-key` header is not a valid idempotency key: idempotency key is 600 bytes long; the limit is 512 bytes",
        ),
        (request(None, &[], "a"), "missing `idempotency-key` header"),
    ];
    for (req, message) in cases {
        let (status, body) = status_and_body(app.clone().oneshot(req).await.unwrap()).await;
        assert_eq!(status, 400, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(json, serde_json::json!({ "error": message }));
    }

    let mut non_ascii = request(None, &[], "a");
    non_ascii
        .headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
    let (status, body) = status_and_body(app.oneshot(non_ascii).await.unwrap()).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        r#"{"error":"`idempotency-key` header is not visible ASCII text"}"#
    );

    assert_eq!(calls.get(), 0);
    assert_eq!(dbsize(&server), 0, "no claim was taken");
}

/// Keys on the body's first line, so the layer must buffer the body.
fn first_line_key(_parts: &mut Parts, body: &Bytes) -> Result<Option<IdempotencyKey>, KeyError> {
    let line = body.split(|b| *b == b'\n').next().unwrap_or_default();
    IdempotencyKey::new(String::from_utf8_lossy(line)).map(Some)
}

#[tokio::test]
async fn body_over_the_limit_is_413_and_takes_no_claim() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let layer = HttpIdempotencyLayer::new(store(&server).await, first_line_key).with_body_limit(16);
    let app = app(layer, &calls);

    // Declared by its size (Content-Length): refused without reading it.
    let declared = app.clone().oneshot(request(None, &[], "x".repeat(17))).await.unwrap();
    let (status, body) = status_and_body(declared).await;
    assert_eq!(status, 413);
    assert_eq!(body, r#"{"error":"request body is larger than the limit of 16 bytes"}"#);

    // Streamed with no size announced: refused once the limit is crossed.
    let chunks = ["0123456789", "0123456789"].map(|c| Ok::<_, Infallible>(Bytes::from_static(c.as_bytes())));
    let streamed = Body::from_stream(futures::stream::iter(chunks));
    let (status, _) = status_and_body(app.clone().oneshot(request(None, &[], streamed)).await.unwrap()).await;
    assert_eq!(status, 413);
    assert_eq!(calls.get(), 0);
    assert_eq!(dbsize(&server), 0, "no claim was taken");

    // Exactly at the limit is fine.
    let at_limit = app.oneshot(request(None, &[], "k".repeat(16))).await.unwrap();
    assert_eq!(at_limit.status(), StatusCode::OK);
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn handler_receives_the_identical_bytes_and_the_claimed_key() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let app = app(
        HttpIdempotencyLayer::new(store(&server).await, first_line_key).with_namespace("ns:"),
        &calls,
    );
    // Every byte value, non-UTF-8 included, after a first line that is the key.
    let mut body = b"order-42\n".to_vec();
    for i in 0..300_000u32 {
        body.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
    }

    let response = app.oneshot(request(None, &[], body.clone())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-seen-key"], "order-42");
    let echoed = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    assert!(echoed == body, "the handler received different bytes");
    assert_eq!(server.cli(&["EXISTS", "ns:order-42"]).trim(), "1");
}

#[tokio::test]
async fn requests_without_a_key_pass_through_unclaimed() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let app = app(
        HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key()),
        &calls,
    );
    for _ in 0..2 {
        let response = app.clone().oneshot(request(None, &[], "a")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-seen-key"], "-", "no key in the extensions");
    }
    assert_eq!(calls.get(), 2);
    assert_eq!(dbsize(&server), 0);
}

#[tokio::test]
async fn a_429_or_a_blocked_response_releases_the_claim_other_responses_keep_it() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let app = app(
        HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key()),
        &calls,
    );
    let send = |extra: &'static [(&'static str, &'static str)]| {
        let app = app.clone();
        async move { app.oneshot(request(Some("job-1"), extra, "a")).await.unwrap().status() }
    };

    assert_eq!(
        send(&[("x-respond-status", "429")]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(dbsize(&server), 0, "429 released the claim");
    assert_eq!(
        send(&[("x-respond-status", "503"), ("x-respond-blocked", "1")]).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(dbsize(&server), 0, "Blocked released the claim");
    assert_eq!(
        send(&[("x-respond-status", "500")]).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(dbsize(&server), 1, "a 5xx keeps the claim by default");
    assert_eq!(send(&[]).await, StatusCode::CONFLICT);
    assert_eq!(calls.get(), 3);

    // Opt in to releasing on 5xx.
    let released = app_with_release(&server, &calls).await;
    let status = released
        .clone()
        .oneshot(request(Some("job-2"), &[("x-respond-status", "502")], "a"))
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        server.cli(&["EXISTS", "POST /jobs job-2"]).trim(),
        "0",
        "released on 5xx when asked"
    );
    let again = released.oneshot(request(Some("job-2"), &[], "a")).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK, "a later trigger dispatches");
}

async fn app_with_release(server: &RedisServer, calls: &Calls) -> Router {
    let layer = HttpIdempotencyLayer::new(store(server).await, HeaderKey::idempotency_key())
        .with_classifier(HttpClassifier::new().with_release_on_server_error(true));
    app(layer, calls)
}

#[derive(Debug, PartialEq)]
struct QueueDown;

#[tokio::test]
async fn the_inner_error_type_is_untouched() {
    let server = RedisServer::start();
    let layer = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key());
    let svc = layer.layer(tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
        Err::<http::Response<Full<Bytes>>, QueueDown>(QueueDown)
    }));
    let req = || {
        Request::post("/")
            .header("idempotency-key", "e-1")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // The error is the inner service's own type, not a wrapper.
    let error: QueueDown = svc.clone().oneshot(req()).await.unwrap_err();
    assert_eq!(error, QueueDown);
    // A short-circuit is still a response, whatever the inner error type.
    let duplicate = svc.oneshot(req()).await.expect("a duplicate is a response");
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
}

#[derive(Clone)]
struct SeeOther;

impl ShortCircuitResponse for SeeOther {
    fn duplicate(&self, key: &IdempotencyKey) -> http::Response<bytes::Bytes> {
        http::Response::builder()
            .status(StatusCode::SEE_OTHER)
            // The client's own key is the last part of the scoped key.
            .header(
                "location",
                format!("/jobs/{}", key.as_str().rsplit(' ').next().unwrap_or_default()),
            )
            .body(bytes::Bytes::new())
            .unwrap()
    }
}

#[tokio::test]
async fn short_circuit_responses_are_replaceable() {
    let mut server = RedisServer::start();
    let calls = Calls::default();
    let layer = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key()).with_responses(SeeOther);
    let app = app(layer, &calls);

    app.clone().oneshot(request(Some("r-1"), &[], "a")).await.unwrap();
    let duplicate = app.clone().oneshot(request(Some("r-1"), &[], "a")).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::SEE_OTHER);
    assert_eq!(duplicate.headers()["location"], "/jobs/r-1");

    // Methods not overridden keep the JSON defaults.
    server.kill();
    let down = app.oneshot(request(Some("r-2"), &[], "a")).await.unwrap();
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_claim_lost_while_the_handler_runs_answers_503_with_the_abort_policy() {
    let server = RedisServer::start();
    let layer = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key())
        .with_ttl(Duration::from_secs(30))
        .with_renewal(Duration::from_millis(50))
        .with_lost_claim_policy(LostClaimPolicy::Abort);
    let app = Router::new()
        .route(
            "/jobs",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "finished"
            }),
        )
        .route_layer(layer);

    let call = tokio::spawn(app.oneshot(request(Some("long-1"), &[], "a")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        server.cli(&["DEL", "POST /jobs long-1"]).trim(),
        "1",
        "the claim was there"
    );
    let response = tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .expect("aborted well before the handler finished")
        .unwrap()
        .unwrap();
    let (status, body) = status_and_body(response).await;
    assert_eq!(status, 503);
    assert_eq!(body, r#"{"status":"claim_lost","key":"POST /jobs long-1"}"#);
}

#[tokio::test]
async fn stacked_layers_do_not_claim_each_others_keys() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let outer = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key()).with_namespace("outer:");
    let inner = HttpIdempotencyLayer::new(
        store(&server).await,
        HeaderKey::new(http::HeaderName::from_static("x-other")),
    )
    .with_namespace("inner:");
    let app = Router::new()
        .route("/jobs", post(echo))
        .route_layer(inner)
        .route_layer(outer)
        .layer(Extension(calls.clone()));

    let response = app.oneshot(request(Some("k-1"), &[], "a")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(server.cli(&["EXISTS", "outer:POST /jobs k-1"]).trim(), "1");
    assert_eq!(
        dbsize(&server),
        1,
        "the inner layer found no key of its own and claimed nothing"
    );
}

#[tokio::test]
async fn header_keys_do_not_buffer_the_body() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let extractor = HeaderKey::idempotency_key();
    assert!(!extractor.needs_body());
    let app = app(
        HttpIdempotencyLayer::new(store(&server).await, extractor).with_body_limit(4),
        &calls,
    );
    // The limit applies to buffered bodies only; this one streams through to the handler.
    let response = app.oneshot(request(Some("big-1"), &[], "0123456789")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echoed = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    assert_eq!(&echoed[..], b"0123456789");
}

/// A payments API on real HTTP: `POST /payments` takes a JSON body (axum answers `422` when it
/// does not fit, `415` without a JSON content type), `POST /refunds` echoes, and the handler
/// answers `409` when asked to; `GET /payments` lists.
async fn payments_api(server: &RedisServer, calls: &Calls, extractor: HeaderKey) -> std::net::SocketAddr {
    #[derive(serde::Deserialize)]
    struct Payment {
        amount: u64,
    }
    let layer = HttpIdempotencyLayer::new(store(server).await, extractor);
    let app = Router::new()
        .route(
            "/payments",
            post(
                |Extension(calls): Extension<Calls>, headers: HeaderMap, axum::Json(p): axum::Json<Payment>| async move {
                    calls.hit();
                    if headers.contains_key("x-conflict") {
                        return (StatusCode::CONFLICT, "conflict").into_response();
                    }
                    format!("paid {}", p.amount).into_response()
                },
            )
            .get(|Extension(calls): Extension<Calls>| async move {
                calls.hit();
                "listed"
            }),
        )
        .route(
            "/refunds",
            post(|Extension(calls): Extension<Calls>| async move {
                calls.hit();
                "refunded"
            }),
        )
        .route_layer(layer)
        .layer(Extension(calls.clone()));
    webhook_support::serve(app).await
}

#[tokio::test]
async fn a_4xx_but_409_releases_the_claim_so_the_corrected_retry_is_not_a_duplicate() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let addr = payments_api(&server, &calls, HeaderKey::idempotency_key()).await;
    let json = [("content-type", "application/json"), ("idempotency-key", "pay-7")];

    // A body axum's `Json` rejects: 422, and the claim is given back.
    let rejected = webhook_support::post(addr, "/payments", &json, br#"{"amount":"ten"}"#).await;
    assert_eq!(rejected.status, 422, "{}", rejected.body);
    assert_eq!(dbsize(&server), 0, "422 released the claim");
    // No JSON content type: 415, released too.
    let unsupported = webhook_support::post(addr, "/payments", &[("idempotency-key", "pay-7")], b"{}").await;
    assert_eq!(unsupported.status, 415);
    assert_eq!(dbsize(&server), 0, "415 released the claim");
    // A method the route does not serve: axum's 405 inside `route_layer`, released.
    let not_allowed = webhook_support::send(addr, "PUT", "/payments", &json, br#"{"amount":10}"#).await;
    assert_eq!(not_allowed.status, 405);
    assert_eq!(dbsize(&server), 0, "405 released the claim");

    // The corrected retry runs, and its own retry is the duplicate.
    let paid = webhook_support::post(addr, "/payments", &json, br#"{"amount":10}"#).await;
    assert_eq!((paid.status, paid.body.as_str()), (200, "paid 10"));
    let again = webhook_support::post(addr, "/payments", &json, br#"{"amount":10}"#).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.header("idempotency-status"), Some("duplicate"));

    // 409 from the handler keeps the claim: the request conflicted with what was done.
    let conflict = [
        ("content-type", "application/json"),
        ("idempotency-key", "pay-8"),
        ("x-conflict", "1"),
    ];
    assert_eq!(
        webhook_support::post(addr, "/payments", &conflict, br#"{"amount":1}"#)
            .await
            .status,
        409
    );
    assert_eq!(server.cli(&["EXISTS", "POST /payments pay-8"]).trim(), "1", "kept");
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn safe_methods_never_claim_and_keys_are_scoped_by_method_route_and_principal() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let addr = payments_api(
        &server,
        &calls,
        HeaderKey::idempotency_key().with_principal_header(http::header::AUTHORIZATION),
    )
    .await;
    let alice = [
        ("content-type", "application/json"),
        ("idempotency-key", "k-1"),
        ("authorization", "Bearer alice"),
    ];
    // GET with a key: no claim, every time.
    for _ in 0..2 {
        let listed = webhook_support::send(addr, "GET", "/payments", &alice, b"").await;
        assert_eq!((listed.status, listed.body.as_str()), (200, "listed"));
    }
    assert_eq!(dbsize(&server), 0, "GET took no claim");

    // The same key on two routes: two requests.
    assert_eq!(
        webhook_support::post(addr, "/payments", &alice, br#"{"amount":1}"#)
            .await
            .status,
        200
    );
    assert_eq!(webhook_support::post(addr, "/refunds", &alice, b"").await.status, 200);
    // The same key from another principal: another request.
    let bob = [
        ("content-type", "application/json"),
        ("idempotency-key", "k-1"),
        ("authorization", "Bearer bob"),
    ];
    assert_eq!(
        webhook_support::post(addr, "/payments", &bob, br#"{"amount":1}"#)
            .await
            .status,
        200
    );
    // Alice's retry is the duplicate.
    assert_eq!(
        webhook_support::post(addr, "/payments", &alice, br#"{"amount":1}"#)
            .await
            .status,
        409
    );
    assert_eq!(calls.get(), 5);
    assert_eq!(dbsize(&server), 3);
    let keys = server.cli(&["KEYS", "*"]);
    assert!(
        !keys.contains("alice") && !keys.contains("Bearer"),
        "credentials never reach Redis: {keys}"
    );
    // A request with a key but no principal is refused, naming the header.
    let anonymous = webhook_support::post(addr, "/refunds", &[("idempotency-key", "k-1")], b"").await;
    assert_eq!(
        (anonymous.status, anonymous.body.as_str()),
        (400, r#"{"error":"missing `authorization` header"}"#)
    );
}

#[tokio::test]
async fn github_delivery_keys_are_scoped_by_hook_and_gitlab_idempotency_keys_by_instance() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let github = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::github_delivery())
        .with_responses(JsonResponses::webhook());
    let gitlab = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::gitlab_idempotency_key())
        .with_responses(JsonResponses::webhook());
    let addr = webhook_support::serve(
        Router::new()
            .route("/webhooks/github", post(echo).route_layer(github))
            .route("/webhooks/gitlab", post(echo).route_layer(gitlab))
            .layer(Extension(calls.clone())),
    )
    .await;
    const GUID: &str = "72d3162e-cc78-11e3-81ab-4c9367dc0958";
    let github_delivery = |hook: &'static str| [("x-github-hook-id", hook), ("x-github-delivery", GUID)];
    // One event, one GUID, two hooks: two deliveries.
    for hook in ["101", "202"] {
        let response = webhook_support::post(addr, "/webhooks/github", &github_delivery(hook), b"{}").await;
        assert_eq!(
            response.header("x-seen-key"),
            Some(format!("POST /webhooks/github x-github-hook-id={hook} {GUID}").as_str())
        );
    }
    // A redelivery to one hook is the duplicate.
    let redelivery = webhook_support::post(addr, "/webhooks/github", &github_delivery("101"), b"{}").await;
    assert_eq!(redelivery.header("idempotency-status"), Some("duplicate"));
    // Without the hook's id the key cannot be scoped: refused.
    let unscoped = webhook_support::post(addr, "/webhooks/github", &[("x-github-delivery", GUID)], b"{}").await;
    assert_eq!(
        (unscoped.status, unscoped.body.as_str()),
        (400, r#"{"error":"missing `x-github-hook-id` header"}"#)
    );

    // GitLab's Idempotency-Key, the same across retries of one delivery.
    let gitlab_delivery = |instance: &'static str| {
        [
            ("x-gitlab-instance", instance),
            ("idempotency-key", "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"),
        ]
    };
    let first = webhook_support::post(
        addr,
        "/webhooks/gitlab",
        &gitlab_delivery("https://gitlab.example.com"),
        b"{}",
    )
    .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("idempotency-status"), None);
    let retry = webhook_support::post(
        addr,
        "/webhooks/gitlab",
        &gitlab_delivery("https://gitlab.example.com"),
        b"{}",
    )
    .await;
    assert_eq!(retry.header("idempotency-status"), Some("duplicate"));
    let other = webhook_support::post(
        addr,
        "/webhooks/gitlab",
        &gitlab_delivery("https://gitlab.other.org"),
        b"{}",
    )
    .await;
    assert_eq!(other.header("idempotency-status"), None);
    assert_eq!(calls.get(), 4);
}

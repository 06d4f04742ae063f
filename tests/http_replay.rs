//! Replay in the HTTP layer, in process (MemoryStore): what is stored, what is not, and the
//! bounded wait for an original in flight.

mod webhook_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use tower_idempotency::MemoryStore;
use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, Replay};
use webhook_support::{RawResponse, serve};

async fn call(addr: std::net::SocketAddr, key: &str) -> RawResponse {
    webhook_support::post(addr, "/p", &[("idempotency-key", key)], b"{}").await
}

#[tokio::test]
async fn a_500_is_not_stored_and_the_retry_runs_the_handler_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().route(
        "/p",
        post(move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    (StatusCode::INTERNAL_SERVER_ERROR, "boom")
                } else {
                    (StatusCode::CREATED, "made")
                }
            }
        })
        .route_layer(
            HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key()).with_replay(Replay::new()),
        ),
    );
    let addr = serve(app).await;
    assert_eq!(call(addr, "k").await.status, 500);
    let retry = call(addr, "k").await;
    assert_eq!(
        (retry.status, retry.body.as_str()),
        (201, "made"),
        "the handler ran again"
    );
    assert_eq!(retry.header("idempotency-replayed"), None);
    let replay = call(addr, "k").await;
    assert_eq!(
        (replay.status, replay.header("idempotency-replayed")),
        (201, Some("true"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_response_over_the_size_limit_is_not_replayed_nor_run_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().route(
        "/p",
        post(move || {
            c.fetch_add(1, Ordering::SeqCst);
            async { (StatusCode::OK, "x".repeat(2048)) }
        })
        .route_layer(
            HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key())
                .with_replay(Replay::new())
                .with_max_outcome_size(1024),
        ),
    );
    let addr = serve(app).await;
    let first = call(addr, "k").await;
    assert_eq!(
        (first.status, first.body.len()),
        (200, 2048),
        "the client still gets the whole body"
    );
    let retry = call(addr, "k").await;
    assert_eq!(retry.status, 409, "{retry:?}");
    assert!(retry.body.contains("response-not-stored"), "{}", retry.body);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_flight_waits_for_the_original_and_replays_it() {
    let app = Router::new().route(
        "/p",
        post(|| async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            (StatusCode::CREATED, "made once")
        })
        .route_layer(
            HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key())
                .with_replay(Replay::new().with_wait(Duration::from_secs(10))),
        ),
    );
    let addr = serve(app).await;
    let first = tokio::spawn(async move { call(addr, "k").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = call(addr, "k").await;
    assert_eq!((second.status, second.body.as_str()), (201, "made once"), "{second:?}");
    assert_eq!(second.header("idempotency-replayed"), Some("true"));
    assert_eq!(first.await.unwrap().status, 201);
}

/// The layer alone (no outer layer): a client that disconnects 100 ms into a 1 s request does
/// not cancel the handler; its response is stored, and the retry 2 s later replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_disconnected_clients_handler_runs_to_completion_and_the_retry_replays_it() {
    use tokio::io::AsyncWriteExt;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let layer = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key()).with_replay(Replay::new());
    let handlers = layer.handlers().expect("run to completion is the default");
    let app = Router::new().route(
        "/p",
        post(move || {
            let c = c.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                (StatusCode::CREATED, format!("payment {n}"))
            }
        })
        .route_layer(layer),
    );
    let addr = serve(app).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /p HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(handlers.running(), 0, "the handler finished");
    let retry = call(addr, "k").await;
    assert_eq!((retry.status, retry.body.as_str()), (201, "payment 1"), "{retry:?}");
    assert_eq!(retry.header("idempotency-replayed"), Some("true"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Opted out, the handler is cancelled with its client (and its claim kept until the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_run_to_completion_off_a_disconnect_cancels_the_handler() {
    use tokio::io::AsyncWriteExt;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new().route(
        "/p",
        post(move || {
            let c = c.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                c.fetch_add(1, Ordering::SeqCst);
                StatusCode::CREATED
            }
        })
        .route_layer(
            HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key())
                .with_replay(Replay::new())
                .with_run_to_completion(false),
        ),
    );
    let addr = serve(app).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /p HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0, "cancelled with its client");
}

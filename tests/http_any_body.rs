//! `HttpIdempotencyLayer` takes any `http_body::Body`, as tower-http's middleware does: served by
//! a plain hyper 1.x server (no axum) over `hyper::body::Incoming`, and stacked with tower-http's
//! `CompressionLayer` and `RequestBodyLimitLayer`. Every request goes over real TCP with hyper's
//! client, and every claim into a real `redis-server` this test starts.
#![cfg(all(feature = "http", feature = "redis"))]

mod common;

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;

use bytes::Bytes;
use common::{Calls, RedisServer};
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, ReplayBody, ResponseBody};
use tower_idempotency::{IdempotencyKey, KeyError, RedisStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The limit tower-http's `RequestBodyLimitLayer` is given in these tests.
const LIMIT: usize = 64;

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(server.url())
        .await
        .expect("connect to the test redis")
}

/// How many keys the test's Redis holds: `0` means nothing was claimed (or it was released).
fn keys_in(server: &RedisServer) -> String {
    server.cli(&["DBSIZE"])
}

/// Serves `svc` with hyper's own HTTP/1 server (no axum) on a free port of 127.0.0.1, one task
/// per connection, until the test's runtime ends; its address.
async fn serve<S, ResBody>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                // A client that hangs up early ends its connection; nothing to report.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Sends `req` with hyper's client on a fresh connection; the status, headers and whole body
/// (as sent: not decompressed).
async fn send<B>(addr: SocketAddr, req: Request<B>) -> (StatusCode, HeaderMap, Bytes)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(conn);
    let (parts, body) = sender.send_request(req).await.expect("a response").into_parts();
    let body = body.collect().await.expect("the whole response body").to_bytes();
    (parts.status, parts.headers, body)
}

/// A POST with `Idempotency-Key: key` and a body of known length (hyper sends `content-length`).
fn post(addr: SocketAddr, key: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("host", addr.to_string())
        .header("idempotency-key", key)
        .header("accept-encoding", "gzip")
        .body(Full::new(Bytes::from_static(body)))
        .expect("valid request")
}

/// A body streamed frame by frame, with no size hint.
type Chunked = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A POST whose body is streamed in `chunks` of unknown total length (sent chunked, no
/// `content-length`), so a limit can only be found by reading it.
fn post_chunked(addr: SocketAddr, chunks: Vec<&'static [u8]>) -> Request<Chunked> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .into_iter()
        .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk))))
        .collect();
    Request::post("/orders")
        .header("host", addr.to_string())
        .body(StreamBody::new(futures::stream::iter(frames)))
        .expect("valid request")
}

/// The key is the body's first line: an extractor that makes the layer buffer the body.
fn first_line_key(_parts: &mut Parts, body: &Bytes) -> Result<Option<IdempotencyKey>, KeyError> {
    let line = body.split(|b| *b == b'\n').next().unwrap_or_default();
    IdempotencyKey::new(String::from_utf8_lossy(line)).map(Some)
}

/// The handler, over any body: counts its calls, reads the whole body and answers
/// `dispatched: <body>`, long enough (over 32 bytes) for the compression layer to compress it.
fn dispatcher<B>(
    calls: Calls,
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send> + Clone + Send + 'static
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    tower::service_fn(move |req: Request<B>| {
        let calls = calls.clone();
        async move {
            calls.hit();
            let body = req.into_body().collect().await.map_err(Into::into)?.to_bytes();
            let answer = format!(
                "dispatched: the job for this order is on its way: {}",
                String::from_utf8_lossy(&body)
            );
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(answer))))
        }
    })
}

/// Compile-time: both bodies are `Body<Data = Bytes>` with a boxed error, `Send + 'static`, over
/// hyper's body as over a handler's `Full<Bytes>`: what hyper, axum and tower-http's layers take.
const _: fn() = || {
    fn fits<B: Body<Data = Bytes, Error = BoxError> + Send + 'static>() {}
    fits::<ReplayBody<Incoming>>();
    fits::<ResponseBody<Full<Bytes>>>();
    fits::<ResponseBody<ReplayBody<Incoming>>>();
};

fn gunzip(body: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut text)
        .expect("a gzip body");
    text
}

#[tokio::test]
async fn plain_hyper_server_over_incoming_dispatches_once_then_answers_409() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let handler_calls = calls.clone();
    // The inner service takes hyper's own request body, as the layer hands it on.
    let handler = tower::service_fn(move |req: Request<ReplayBody<Incoming>>| {
        let calls = handler_calls.clone();
        async move {
            calls.hit();
            let body = req.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(format!(
                "dispatched {}",
                String::from_utf8_lossy(&body)
            )))))
        }
    });
    let svc = HttpIdempotencyLayer::new(store(&server).await, HeaderKey::idempotency_key()).layer(handler);
    let addr = serve(svc).await;

    let (status, _, body) = send(addr, post(addr, "order-1", b"job")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "dispatched job");

    let (status, headers, body) = send(addr, post(addr, "order-1", b"job")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["idempotency-status"], "duplicate");
    assert!(
        String::from_utf8_lossy(&body).contains(r#""status":"duplicate""#),
        "{body:?}"
    );
    assert_eq!(calls.get(), 1, "the same key dispatched twice");
    assert_eq!(keys_in(&server), "1");
}

#[tokio::test]
async fn plain_hyper_server_hands_a_buffered_body_on_byte_for_byte() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = HttpIdempotencyLayer::new(store(&server).await, first_line_key)
        .layer(dispatcher::<ReplayBody<Incoming>>(calls.clone()));
    let addr = serve(svc).await;

    // Chunked: the layer reads the key from the body, then the handler reads the same bytes.
    let (status, _, body) = send(addr, post_chunked(addr, vec![b"order-2\n", b"first ", b"delivery"])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.ends_with(b"order-2\nfirst delivery"), "{body:?}");

    let (status, _, _) = send(addr, post_chunked(addr, vec![b"order-2\nsecond delivery"])).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn behind_compression_the_response_and_a_duplicates_answer_are_gzipped_and_readable() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(CompressionLayer::new())
        .layer(HttpIdempotencyLayer::new(
            store(&server).await,
            HeaderKey::idempotency_key(),
        ))
        .service(dispatcher::<ReplayBody<Incoming>>(calls.clone()));
    let addr = serve(svc).await;

    let (status, headers, body) = send(addr, post(addr, "order-3-with-a-long-enough-key", b"job")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(gunzip(&body), "dispatched: the job for this order is on its way: job");

    let (status, headers, body) = send(addr, post(addr, "order-3-with-a-long-enough-key", b"job")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["idempotency-status"], "duplicate");
    assert_eq!(headers["content-encoding"], "gzip");
    let json: serde_json::Value = serde_json::from_str(&gunzip(&body)).expect("the duplicate's JSON");
    assert_eq!(json["status"], "duplicate");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn body_limit_outside_refuses_a_declared_oversize_body_with_413_before_any_claim() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(RequestBodyLimitLayer::new(LIMIT))
        .layer(HttpIdempotencyLayer::new(
            store(&server).await,
            HeaderKey::idempotency_key(),
        ))
        .service(dispatcher(calls.clone()));
    let addr = serve(svc).await;

    let (status, _, _) = send(addr, post(addr, "order-4", &[b'x'; LIMIT + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(keys_in(&server), "0", "an oversize request took a claim");
    assert_eq!(calls.get(), 0);

    // Nothing holds the key: the same key within the limit dispatches.
    let (status, _, _) = send(addr, post(addr, "order-4", b"job")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn body_limit_outside_stops_a_streamed_oversize_body_while_the_key_is_read_413_no_claim() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(RequestBodyLimitLayer::new(LIMIT))
        .layer(HttpIdempotencyLayer::new(store(&server).await, first_line_key))
        .service(dispatcher(calls.clone()));
    let addr = serve(svc).await;

    // No content-length: tower-http's limit trips while our layer buffers the body for its key.
    let (status, _, body) = send(addr, post_chunked(addr, vec![b"order-5\n", &[b'x'; LIMIT]])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body:?}");
    // Our layer's own 413 (tower-http could not know the size before the body was read).
    assert!(
        String::from_utf8_lossy(&body).contains("larger than the limit"),
        "{body:?}"
    );
    assert_eq!(keys_in(&server), "0", "an oversize request took a claim");
    assert_eq!(calls.get(), 0);

    let (status, _, _) = send(addr, post_chunked(addr, vec![b"order-5\n", b"small"])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn body_limit_inside_answers_413_and_the_claim_is_released() {
    let server = RedisServer::start();
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(HttpIdempotencyLayer::new(
            store(&server).await,
            HeaderKey::idempotency_key(),
        ))
        .layer(RequestBodyLimitLayer::new(LIMIT))
        .service(dispatcher(calls.clone()));
    let addr = serve(svc).await;

    // Our claim comes first; tower-http's 413 is a 4xx, so the classifier releases it.
    let (status, _, _) = send(addr, post(addr, "order-6", &[b'x'; LIMIT + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.get(), 0);
    assert_eq!(keys_in(&server), "0", "the 413 kept its claim");

    let (status, _, _) = send(addr, post(addr, "order-6", b"job")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(addr, post(addr, "order-6", b"job")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(calls.get(), 1);
}

//! The contract of `examples/payments_api.rs`, run as processes against a real Redis: replay,
//! 422 for another payload, 409 while in flight, 400 without a key, and a disconnect that
//! does not lose (or repeat) the payment.

mod common;
mod webhook_support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::RedisServer;
use tokio::io::AsyncWriteExt;
use webhook_support::{RawResponse, post, send};

struct Api {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(server: &RedisServer, delay_ms: u64) -> Api {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let child = Command::new(common::example_binary("payments_api"))
        .args(["--listen", &addr.to_string(), "--redis", &server.url()])
        .args(["--handler-delay-ms", &delay_ms.to_string()])
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start payments_api");
    let api = Api { child, addr };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), async {
            tokio::net::TcpStream::connect(addr).await?;
            Ok::<_, std::io::Error>(send(addr, "GET", "/healthz", &[], b"").await)
        })
        .await
            && r.status == 200
        {
            return api;
        }
        assert!(Instant::now() < deadline, "payments_api did not answer /healthz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pay(api: &Api, key: Option<&str>, body: &str) -> RawResponse {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = key {
        headers.push(("idempotency-key", key));
    }
    post(api.addr, "/payments", &headers, body.as_bytes()).await
}

fn created(server: &RedisServer) -> u64 {
    server.cli(&["GET", "payments:created"]).trim().parse().unwrap_or(0)
}

fn is_problem(r: &RawResponse) -> bool {
    r.header("content-type") == Some("application/problem+json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_replays_the_identical_response_also_in_a_second_process() {
    let server = RedisServer::start();
    let (a, b) = (start(&server, 0).await, start(&server, 0).await);
    let body = r#"{"amount":1200,"currency":"EUR"}"#;
    let first = pay(&a, Some("pay-1"), body).await;
    assert_eq!(first.status, 201, "{first:?}");
    let json: serde_json::Value = serde_json::from_str(&first.body).expect("JSON");
    assert_eq!(
        (json["amount"].as_i64(), json["currency"].as_str()),
        (Some(1200), Some("EUR"))
    );
    assert!(json["id"].is_string());
    assert_eq!(first.header("idempotency-replayed"), None);
    for (api, name) in [(&a, "same process"), (&b, "second process")] {
        let retry = pay(api, Some("pay-1"), body).await;
        assert_eq!(retry.status, 201, "{name}: {retry:?}");
        assert_eq!(retry.body, first.body, "{name}: identical body");
        assert_eq!(retry.header("idempotency-replayed"), Some("true"), "{name}");
        assert_eq!(retry.header("content-type"), first.header("content-type"), "{name}");
    }
    assert_eq!(created(&server), 1, "replays created nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_is_422() {
    let server = RedisServer::start();
    let api = start(&server, 0).await;
    assert_eq!(
        pay(&api, Some("pay-2"), r#"{"amount":1,"currency":"EUR"}"#)
            .await
            .status,
        201
    );
    let other = pay(&api, Some("pay-2"), r#"{"amount":2,"currency":"EUR"}"#).await;
    assert_eq!(other.status, 422, "{other:?}");
    assert!(is_problem(&other), "{other:?}");
    assert!(other.body.contains("different"), "{}", other.body);
    assert_eq!(created(&server), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_request_while_the_first_is_in_flight_is_409_with_retry_after() {
    let server = RedisServer::start();
    let api = start(&server, 1500).await;
    let body = r#"{"amount":5,"currency":"USD"}"#;
    let addr = api.addr;
    let first = tokio::spawn(async move {
        post(
            addr,
            "/payments",
            &[("content-type", "application/json"), ("idempotency-key", "pay-3")],
            body.as_bytes(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = pay(&api, Some("pay-3"), body).await;
    assert_eq!(second.status, 409, "{second:?}");
    assert!(is_problem(&second), "{second:?}");
    let retry_after: u64 = second
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1, "{retry_after}");
    let first = first.await.expect("first request");
    assert_eq!(first.status, 201, "{first:?}");
    let after = pay(&api, Some("pay-3"), body).await;
    assert_eq!((after.status, after.body.as_str()), (201, first.body.as_str()));
    assert_eq!(created(&server), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_is_400_problem_json() {
    let server = RedisServer::start();
    let api = start(&server, 0).await;
    let r = pay(&api, None, r#"{"amount":5,"currency":"USD"}"#).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(is_problem(&r), "{r:?}");
    assert!(r.body.contains("idempotency-key"), "{}", r.body);
    assert_eq!(created(&server), 0, "nothing ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_payment_gets_the_stored_201_on_retry() {
    let server = RedisServer::start();
    let api = start(&server, 1000).await;
    let body = r#"{"amount":9,"currency":"GBP"}"#;
    let head = format!(
        "POST /payments HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nidempotency-key: pay-4\r\ncontent-length: {}\r\n\r\n",
        api.addr,
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(api.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(body.as_bytes()).await.expect("body");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream); // the client goes away 100 ms into a 1 s payment
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retry = pay(&api, Some("pay-4"), body).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(retry.header("idempotency-replayed"), Some("true"), "{retry:?}");
    assert_eq!(created(&server), 1, "one payment exists");
}

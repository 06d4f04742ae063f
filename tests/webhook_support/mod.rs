//! Helpers shared by the `http_*` and `webhook_*` tests: the webhook corpus, fixtures, GitHub
//! signatures, request builders and a minimal HTTP/1.1 client.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};

use axum::body::Body;
use hmac::{Hmac, Mac};
use http::Request;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `../shared/corpus/<provider>/`, or `None` (with the reason printed) when it is missing on a
/// developer's machine. In CI (`CI` set) a missing corpus fails the test.
pub fn corpus_dir(provider: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/corpus")
        .join(provider);
    if dir.is_dir() {
        return Some(dir);
    }
    let reason = format!(
        "the webhook corpus {} is missing; it is part of the project's shared material (../shared/corpus/)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{reason}; CI must run the corpus conformance tests");
    }
    eprintln!("SKIPPED: {reason}. Set up ../shared/ to run this test (it fails instead of skipping when CI is set).");
    None
}

/// Every file in `dir`, sorted by name.
pub fn files_in(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .map(|path| (path.file_name().unwrap().to_string_lossy().into_owned(), path))
        .collect();
    files.sort();
    files
}

/// A fixture from `tests/fixtures/`.
pub fn fixture(relative: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// A payload from the GitHub corpus, or `None` when the corpus is missing (see [`corpus_dir`]).
pub fn github_payload(name: &str) -> Option<Vec<u8>> {
    let dir = corpus_dir("github")?;
    Some(std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("cannot read corpus file {name}: {e}")))
}

/// `sha256=<hex HMAC-SHA256 of body>`, as GitHub signs deliveries.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A GitHub delivery to `/webhooks/github`.
pub fn github_delivery(event: &str, delivery: &str, body: impl Into<Vec<u8>>) -> Request<Body> {
    Request::post("/webhooks/github")
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", delivery)
        .body(Body::from(body.into()))
        .expect("request")
}

/// The same, signed with `secret`.
pub fn signed_github_delivery(secret: &[u8], event: &str, delivery: &str, body: impl Into<Vec<u8>>) -> Request<Body> {
    let body = body.into();
    let signature = github_signature(secret, &body);
    let mut request = github_delivery(event, delivery, body);
    request
        .headers_mut()
        .insert("x-hub-signature-256", signature.parse().expect("header value"));
    request
}

/// A response's status and body (as text).
pub async fn status_and_body(response: http::Response<Body>) -> (u16, String) {
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("response body");
    (status, String::from_utf8(bytes.to_vec()).expect("UTF-8 response body"))
}

/// A parsed HTTP/1.1 response from [`post`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// POSTs `body` to `http://addr/path` on a fresh connection (`connection: close`) and reads
/// the whole response.
pub async fn post(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> RawResponse {
    send(addr, "POST", path, headers, body).await
}

/// Sends a `method` request with `body` to `http://addr/path` on a fresh connection
/// (`connection: close`) and reads the whole response.
pub async fn send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to router");
    stream
        .write_all(request_head(addr, method, path, headers, body.len() as u64).as_bytes())
        .await
        .expect("write request head");
    stream.write_all(body).await.expect("write request body");
    read_response(&mut stream).await
}

/// Sends only the head of a POST that declares `content_length` body bytes, never sends the
/// body, and reads the response: what a client that makes the server wait (or buffer) sees.
pub async fn post_head_only(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    content_length: u64,
) -> RawResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to router");
    stream
        .write_all(request_head(addr, "POST", path, headers, content_length).as_bytes())
        .await
        .expect("write request head");
    read_response(&mut stream).await
}

fn request_head(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    content_length: u64,
) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {content_length}\r\nconnection: close\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Reads one response: its head, then as many body bytes as its `content-length` says (or to
/// the end of the stream without one), so it returns as soon as the answer is complete, whether
/// or not the server closes the connection.
async fn read_response(stream: &mut tokio::net::TcpStream) -> RawResponse {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(raw[..end].to_vec()).expect("UTF-8 response head");
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())
                    .flatten()
            });
            if length.is_some_and(|len| raw.len() >= end + 4 + len) {
                break;
            }
        }
        let n = stream.read(&mut buf).await.expect("read response");
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("response head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Serves `app` on a free port of 127.0.0.1 until the test's runtime ends; its address.
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

impl RawResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, value) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

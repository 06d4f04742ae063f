//! Replaying the stored response of a completed request, for HTTP APIs keyed by
//! `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header), and the draft's error
//! scenarios as `application/problem+json` (RFC 9457).
//!
//! See [`Replay`] for every answer.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::IdempotencyKey;
use crate::store::{Record, RecordState};

/// Set on every replayed response.
pub const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");

/// Where the problem types of this crate are documented.
const PROBLEM_BASE: &str = "https://docs.rs/tower-idempotency/latest/tower_idempotency/http/struct.Replay.html";

type Fingerprint = Arc<dyn Fn(&Parts, &Bytes) -> String + Send + Sync>;

/// Replay of completed requests' responses.
///
/// With [`Replay`] on a layer ([`HttpIdempotencyLayer::with_replay`](super::HttpIdempotencyLayer::with_replay)):
///
/// | the key's record | answer |
/// |---|---|
/// | none (first request) | the handler runs; a `2xx`/`3xx` response is stored with the completed record (status, allow-listed headers, body); a `4xx`/`5xx` is **not** stored and the claim is released, so a retry runs the handler again |
/// | completed, response stored | the stored status, headers and body, plus `idempotency-replayed: true` |
/// | completed, response not stored (over [`with_max_outcome_size`](super::HttpIdempotencyLayer::with_max_outcome_size)) | `409`, problem type `…#response-not-stored`: the request ran once; it is neither run again nor replayed |
/// | in progress | after the optional bounded wait ([`with_wait`](Replay::with_wait)): as above once it completed; else `409` with `Retry-After` (the lease's time left, at least 1 s) |
/// | another payload under the same key (its fingerprint differs) | `422`, whatever the state |
///
/// A missing key, when the extractor requires one ([`HeaderKey::with_required`](super::HeaderKey::with_required)),
/// is the extractor's `400`. The fingerprint is, by default, a SHA-256 of the method, the path
/// (with query) and the body; [`Replay::with_fingerprint`] replaces it.
///
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::MemoryStore;
/// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, ProblemResponses, Replay};
///
/// let layer = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key().with_required(true))
///     .with_replay(Replay::new().with_wait(Duration::from_secs(2)))
///     .with_responses(ProblemResponses::new())
///     .build()
///     .expect("valid settings");
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct Replay {
    headers: Vec<HeaderName>,
    wait: Option<Duration>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("headers", &self.headers)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl Default for Replay {
    fn default() -> Self {
        Self::new()
    }
}

impl Replay {
    /// Stores `content-type`, `location` and `content-location` with the body; no wait; the
    /// default fingerprint.
    pub fn new() -> Self {
        Self {
            headers: vec![CONTENT_TYPE, http::header::LOCATION, http::header::CONTENT_LOCATION],
            wait: None,
            fingerprint: Arc::new(default_fingerprint),
        }
    }

    /// The response headers stored and replayed (others are dropped: a replay must not repeat
    /// a `set-cookie` or a date).
    pub fn with_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.headers = headers.into_iter().collect();
        self
    }

    /// A duplicate of a request in progress waits up to `wait` for it to complete — in any
    /// process; the record is polled in the store — and then replays its response (or runs, if
    /// the original was released); after `wait`, `409`.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The request fingerprint: requests with the same key and a different fingerprint are
    /// refused with `422`. The default digests the method, path with query, and body.
    pub fn with_fingerprint(mut self, fingerprint: impl Fn(&Parts, &Bytes) -> String + Send + Sync + 'static) -> Self {
        self.fingerprint = Arc::new(fingerprint);
        self
    }

    pub(crate) fn wait(&self) -> Option<Duration> {
        self.wait
    }

    /// The request's fingerprint, made safe to store (hex of a SHA-256 when the function's
    /// output contains the record separators).
    pub(crate) fn fingerprint(&self, parts: &Parts, body: &Bytes) -> String {
        let fp = (self.fingerprint)(parts, body);
        if fp.contains(['\u{1e}', '\u{1f}']) {
            hex::encode(Sha256::digest(fp.as_bytes()))
        } else {
            fp
        }
    }

    /// The stored form of a response: `<status>\n` + `<name>: <value>\n` per allowed header +
    /// `\n` + body.
    pub(crate) fn encode(&self, status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 64);
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b'\n');
        for name in &self.headers {
            for value in headers.get_all(name) {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.push(b'\n');
            }
        }
        out.push(b'\n');
        out.extend_from_slice(body);
        out
    }

    /// The answer to a duplicate, from its record; `None` when it carries no decodable response.
    pub(crate) fn answer(&self, key: &IdempotencyKey, record: &Record, fingerprint: Option<&str>) -> Response<Bytes> {
        if let (Some(ours), Some(theirs)) = (fingerprint, record.fingerprint())
            && ours != theirs
        {
            tracing::info!(key = %key, outcome = "fingerprint_mismatch", "same key, different request; refused");
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "fingerprint-mismatch",
                "Idempotency-Key reused with a different request",
                &format!(
                    "key `{key}` was first used for a request with a different method, path or body; use a new key for a new request"
                ),
            );
        }
        match record.state() {
            RecordState::Completed { outcome: Some(stored) } => match decode(stored) {
                Some(mut response) => {
                    tracing::info!(key = %key, outcome = "replayed", "completed; replaying the stored response");
                    response
                        .headers_mut()
                        .insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
                    response
                }
                None => not_stored(key),
            },
            RecordState::Completed { outcome: None } => not_stored(key),
            RecordState::InProgress { lease_left } => {
                let secs = lease_left.map_or(1, |left| left.as_secs() + u64::from(left.subsec_nanos() > 0));
                let mut response = problem(
                    StatusCode::CONFLICT,
                    "in-progress",
                    "A request with this Idempotency-Key is in progress",
                    &format!("the original request for key `{key}` has not completed yet; retry after it"),
                );
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
                response
            }
        }
    }
}

fn not_stored(key: &IdempotencyKey) -> Response<Bytes> {
    problem(
        StatusCode::CONFLICT,
        "response-not-stored",
        "The original request completed, but its response was not stored",
        &format!(
            "the request for key `{key}` ran once; its response was too large to store, so it is neither replayed nor run again"
        ),
    )
}

/// `sha256(method SP path-and-query LF body)`, hex.
fn default_fingerprint(parts: &Parts, body: &Bytes) -> String {
    let mut digest = Sha256::new();
    digest.update(parts.method.as_str().as_bytes());
    digest.update(b" ");
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    digest.update(path.as_bytes());
    digest.update(b"\n");
    digest.update(body);
    hex::encode(digest.finalize())
}

fn decode(stored: &[u8]) -> Option<Response<Bytes>> {
    let mut rest = stored;
    let mut line = || {
        let end = rest.iter().position(|&b| b == b'\n')?;
        let (l, r) = rest.split_at(end);
        rest = &r[1..];
        Some(l)
    };
    let status = StatusCode::from_bytes(line()?).ok()?;
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = status;
    loop {
        let header = line()?;
        if header.is_empty() {
            break;
        }
        let i = header.windows(2).position(|w| w == b": ")?;
        let name = HeaderName::from_bytes(&header[..i]).ok()?;
        let value = HeaderValue::from_bytes(&header[i + 2..]).ok()?;
        response.headers_mut().append(name, value);
    }
    *response.body_mut() = Bytes::copy_from_slice(rest);
    Some(response)
}

/// An `application/problem+json` response (RFC 9457).
pub(crate) fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response<Bytes> {
    let body = serde_json::json!({
        "type": format!("{PROBLEM_BASE}#{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_response_decodes_to_the_same_status_headers_and_body() {
        let replay = Replay::new();
        let mut headers = http::HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("set-cookie", HeaderValue::from_static("s=1"));
        let stored = replay.encode(StatusCode::CREATED, &headers, b"{\"id\":\"p1\"}\n\nx");
        let response = decode(&stored).expect("decodes");
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert!(response.headers().get("set-cookie").is_none(), "not allow-listed");
        assert_eq!(response.body().as_ref(), b"{\"id\":\"p1\"}\n\nx");
    }
}

//! What the caller receives when the layer answers instead of the handler.
//!
//! An HTTP middleware that rejects a request must answer with a response, not an error, or it
//! cannot be dropped into an axum router without a `HandleErrorLayer`. The answers are
//! application-facing (a payments API wants `409`, a webhook receiver must answer `200` to a
//! duplicate or the sender records a failed delivery), so they are pluggable.

use std::error::Error;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};

use crate::IdempotencyKey;
use crate::future::Chain;

/// The header set on a duplicate's response: `idempotency-status: duplicate`.
pub const IDEMPOTENCY_STATUS: HeaderName = HeaderName::from_static("idempotency-status");

/// Default `Retry-After` of the store-unavailable response.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Builds the responses the layer answers with when it short-circuits.
///
/// Every method has a default, the answer of [`JsonResponses::new()`], so an implementation
/// overrides only what it wants to change:
///
/// ```
/// use bytes::Bytes;
/// use http::{Response, StatusCode};
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::http::ShortCircuitResponse;
///
/// /// Duplicates answer `303 See Other` pointing at the original resource.
/// #[derive(Clone)]
/// struct SeeOther;
///
/// impl ShortCircuitResponse for SeeOther {
///     fn duplicate(&self, key: &IdempotencyKey) -> Response<Bytes> {
///         Response::builder()
///             .status(StatusCode::SEE_OTHER)
///             .header("location", format!("/payments/{key}"))
///             .body(Bytes::new())
///             .unwrap()
///     }
/// }
///
/// let key = IdempotencyKey::new("pay-7").unwrap();
/// assert_eq!(SeeOther.duplicate(&key).status(), StatusCode::SEE_OTHER);
/// assert_eq!(SeeOther.unavailable().status(), StatusCode::SERVICE_UNAVAILABLE);
/// ```
pub trait ShortCircuitResponse {
    /// Someone else holds the claim on `key`; the handler was not called.
    fn duplicate(&self, key: &IdempotencyKey) -> Response<Bytes> {
        JsonResponses::new().duplicate(key)
    }

    /// The store could not answer and the layer failed closed; the handler was not called.
    fn unavailable(&self) -> Response<Bytes> {
        JsonResponses::new().unavailable()
    }

    /// The claim on `key` was lost while the handler ran and the layer is configured to abort
    /// (see [`LostClaimPolicy::Abort`](crate::LostClaimPolicy::Abort)).
    fn claim_lost(&self, key: &IdempotencyKey) -> Response<Bytes> {
        JsonResponses::new().claim_lost(key)
    }

    /// No valid key could be extracted: a malformed body, a missing field, an invalid key, an
    /// unreadable body. `error` says what is wrong.
    fn invalid(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        JsonResponses::new().invalid(error)
    }

    /// The body was larger than `limit` bytes.
    fn too_large(&self, limit: usize) -> Response<Bytes> {
        JsonResponses::new().too_large(limit)
    }

    /// The signature was missing or wrong; nothing was claimed. The default answers
    /// `403 Forbidden` (see [the signature module](super::VerifyRequest) for why not `401`).
    fn unauthorized(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        JsonResponses::new().unauthorized(error)
    }

    /// The body's content type is not one the extractor reads (e.g. a form-encoded webhook
    /// delivery); nothing was claimed.
    fn unsupported_media_type(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        JsonResponses::new().unsupported_media_type(error)
    }

    /// A [pre-claim check](super::PreClaimCheck) deferred the request for `key`: nothing was
    /// claimed, the handler was not called.
    fn deferred(&self, key: &IdempotencyKey) -> Response<Bytes> {
        JsonResponses::new().deferred(key)
    }
}

/// The default responses, JSON bodies:
///
/// | short-circuit | status | body |
/// |---|---|---|
/// | duplicate | `409 Conflict` (webhook presets: `200 OK`), header `idempotency-status: duplicate` | `{"status":"duplicate","key":"…"}` |
/// | store unavailable | `503`, header `Retry-After` | `{"status":"unavailable"}` |
/// | claim lost (abort policy) | `503`, header `Retry-After` | `{"status":"claim_lost","key":"…"}` |
/// | invalid key or body | `400` | `{"error":"…"}` |
/// | body over the limit | `413` | `{"error":"…"}` |
/// | bad signature or token (missing, malformed, wrong) | `403` | `{"error":"…"}` |
/// | body not JSON by its content type (e.g. form-encoded) | `415` | `{"error":"…"}`, naming the content type to set |
/// | deferred by a pre-claim check | `200` | `{"status":"deferred","key":"…"}` |
///
/// ```
/// use http::StatusCode;
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::http::{JsonResponses, ShortCircuitResponse};
///
/// let key = IdempotencyKey::new("o/r:2:ec26c3e").unwrap();
/// let api = JsonResponses::new().duplicate(&key);
/// assert_eq!(api.status(), StatusCode::CONFLICT);
/// assert_eq!(api.headers()["idempotency-status"], "duplicate");
/// assert_eq!(api.body().as_ref(), br#"{"status":"duplicate","key":"o/r:2:ec26c3e"}"#);
///
/// let webhook = JsonResponses::webhook().duplicate(&key);
/// assert_eq!(webhook.status(), StatusCode::OK);
///
/// let down = JsonResponses::new().unavailable();
/// assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
/// assert_eq!(down.headers()["retry-after"], "5");
///
/// let error = std::io::Error::other("`x-hub-signature-256` does not match");
/// let refused = JsonResponses::new().unauthorized(&error);
/// assert_eq!(refused.status(), StatusCode::FORBIDDEN);
/// assert!(!refused.headers().contains_key("www-authenticate"));
/// assert_eq!(JsonResponses::new().unsupported_media_type(&error).status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonResponses {
    duplicate_status: StatusCode,
    retry_after: Duration,
}

impl JsonResponses {
    /// Duplicates answer `409 Conflict`; `Retry-After` is [`DEFAULT_RETRY_AFTER`].
    pub const fn new() -> Self {
        Self {
            duplicate_status: StatusCode::CONFLICT,
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }

    /// For webhook receivers: duplicates answer `200 OK` (same header and body), because a
    /// webhook sender treats any other status as a failed delivery.
    pub const fn webhook() -> Self {
        Self::new().with_duplicate_status(StatusCode::OK)
    }

    /// The status of a duplicate's response.
    pub const fn with_duplicate_status(mut self, status: StatusCode) -> Self {
        self.duplicate_status = status;
        self
    }

    /// The `Retry-After` of the `503` responses, in whole seconds (at least 1).
    pub const fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    fn retry_after_secs(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

impl Default for JsonResponses {
    fn default() -> Self {
        Self::new()
    }
}

impl ShortCircuitResponse for JsonResponses {
    fn duplicate(&self, key: &IdempotencyKey) -> Response<Bytes> {
        let mut response = json(
            self.duplicate_status,
            format!(r#"{{"status":"duplicate","key":{}}}"#, quoted(key.as_str())),
        );
        response
            .headers_mut()
            .insert(IDEMPOTENCY_STATUS, HeaderValue::from_static("duplicate"));
        response
    }

    fn unavailable(&self) -> Response<Bytes> {
        let mut response = json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"unavailable"}"#.to_owned(),
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(self.retry_after_secs()));
        response
    }

    fn claim_lost(&self, key: &IdempotencyKey) -> Response<Bytes> {
        let mut response = json(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(r#"{{"status":"claim_lost","key":{}}}"#, quoted(key.as_str())),
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(self.retry_after_secs()));
        response
    }

    fn invalid(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        json(StatusCode::BAD_REQUEST, error_body(&Chain(error).to_string()))
    }

    fn too_large(&self, limit: usize) -> Response<Bytes> {
        json(
            StatusCode::PAYLOAD_TOO_LARGE,
            error_body(&format!("request body is larger than the limit of {limit} bytes")),
        )
    }

    fn unauthorized(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        json(StatusCode::FORBIDDEN, error_body(&Chain(error).to_string()))
    }

    fn unsupported_media_type(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        json(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            error_body(&Chain(error).to_string()),
        )
    }

    fn deferred(&self, key: &IdempotencyKey) -> Response<Bytes> {
        json(
            StatusCode::OK,
            format!(r#"{{"status":"deferred","key":{}}}"#, quoted(key.as_str())),
        )
    }
}

/// A JSON string literal for `s`, escaped.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `{"error":"…"}`.
fn error_body(message: &str) -> String {
    format!(r#"{{"error":{}}}"#, quoted(message))
}

/// Bodies are written by hand so the field order is exactly the documented one.
fn json(status: StatusCode, body: String) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Every short-circuit as `application/problem+json` (RFC 9457), for HTTP APIs: the same
/// statuses and headers as [`JsonResponses::new`], with a problem document
/// (`type`, `title`, `status`, `detail`) naming what is wrong.
///
/// ```
/// use http::StatusCode;
/// use tower_idempotency::http::{ProblemResponses, ShortCircuitResponse};
///
/// let error = std::io::Error::other("missing header `idempotency-key`");
/// let response = ProblemResponses::new().invalid(&error);
/// assert_eq!(response.status(), StatusCode::BAD_REQUEST);
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
/// assert_eq!(body["status"], 400);
/// assert!(body["detail"].as_str().unwrap().contains("idempotency-key"));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProblemResponses {
    json: JsonResponses,
}

impl ProblemResponses {
    /// Problem documents with [`JsonResponses::new`]'s statuses.
    pub const fn new() -> Self {
        Self {
            json: JsonResponses::new(),
        }
    }

    /// The `Retry-After` of the `503` responses.
    pub const fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.json = self.json.with_retry_after(retry_after);
        self
    }

    fn with_retry_after_header(&self, mut response: Response<Bytes>) -> Response<Bytes> {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(self.json.retry_after_secs()));
        response
    }
}

impl ShortCircuitResponse for ProblemResponses {
    fn duplicate(&self, key: &IdempotencyKey) -> Response<Bytes> {
        let mut response = super::replay::problem(
            StatusCode::CONFLICT,
            "duplicate",
            "Duplicate request",
            &format!("key `{key}` is already claimed"),
        );
        response
            .headers_mut()
            .insert(IDEMPOTENCY_STATUS, HeaderValue::from_static("duplicate"));
        response
    }

    fn unavailable(&self) -> Response<Bytes> {
        self.with_retry_after_header(super::replay::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-unavailable",
            "Idempotency store unavailable",
            "the request was not run, to avoid running it twice; retry later",
        ))
    }

    fn claim_lost(&self, key: &IdempotencyKey) -> Response<Bytes> {
        self.with_retry_after_header(super::replay::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "claim-lost",
            "Claim lost while the request ran",
            &format!("the claim on key `{key}` was lost; the request was aborted"),
        ))
    }

    fn invalid(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        super::replay::problem(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            "Invalid or missing idempotency key",
            &Chain(error).to_string(),
        )
    }

    fn too_large(&self, limit: usize) -> Response<Bytes> {
        super::replay::problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Request body too large",
            &format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    fn unauthorized(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        super::replay::problem(
            StatusCode::FORBIDDEN,
            "unauthorized",
            "Signature check failed",
            &Chain(error).to_string(),
        )
    }

    fn unsupported_media_type(&self, error: &(dyn Error + 'static)) -> Response<Bytes> {
        super::replay::problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported content type",
            &Chain(error).to_string(),
        )
    }

    fn deferred(&self, key: &IdempotencyKey) -> Response<Bytes> {
        self.json.deferred(key)
    }
}

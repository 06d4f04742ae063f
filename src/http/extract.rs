//! Pulling an idempotency key out of an HTTP request: its head and, when needed, its body.
//!
//! The core [`KeyExtractor`](crate::KeyExtractor) sees a request whose body has not been read.
//! Webhook keys live in the JSON body, so the HTTP layer reads the body first (up to a limit) and
//! hands the extractor the head and the complete bytes. The extractor may also add extensions
//! (e.g. [`DispatchTarget`](super::DispatchTarget)) for the handler.

use std::error::Error;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method};
use sha2::{Digest, Sha256};

use crate::extract::BoxError;
use crate::{IdempotencyKey, KeyError};

/// Extracts the key of an HTTP request from its head and complete body.
///
/// - `Ok(Some(key))`: the request takes a claim on `key` before the handler runs.
/// - `Ok(None)`: the request passes through unclaimed (e.g. a webhook event that names no pull
///   request, or one the dispatch filter does not dispatch).
/// - `Err(_)`: the request is answered `400` with the error; the handler is not called.
///
/// `parts` is mutable so the extractor can add extensions for the handler.
/// Closures `Fn(&mut Parts, &Bytes) -> Result<Option<IdempotencyKey>, E>` implement it:
///
/// ```
/// use bytes::Bytes;
/// use http::request::Parts;
/// use tower_idempotency::{IdempotencyKey, KeyError};
/// use tower_idempotency::http::HttpKeyExtractor;
///
/// // Key on the tenant header and the body's first line.
/// let extractor = |parts: &mut Parts, body: &Bytes| -> Result<Option<IdempotencyKey>, KeyError> {
///     let Some(tenant) = parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()) else {
///         return Ok(None);
///     };
///     let first_line = body.split(|b| *b == b'\n').next().unwrap_or_default();
///     IdempotencyKey::new(format!("{tenant}:{}", String::from_utf8_lossy(first_line))).map(Some)
/// };
/// let (mut parts, ()) = http::Request::post("/").header("x-tenant", "acme").body(()).unwrap().into_parts();
/// let key = extractor.extract(&mut parts, &Bytes::from_static(b"order-9\nrest")).unwrap();
/// assert_eq!(key.unwrap().as_str(), "acme:order-9");
/// ```
pub trait HttpKeyExtractor {
    /// Why no key could be extracted; shown to the caller in the `400` response.
    type Error: Error + Send + Sync + 'static;

    /// Extracts the key of the request with head `parts` and body `body`.
    fn extract(&self, parts: &mut Parts, body: &Bytes) -> Result<Option<IdempotencyKey>, Self::Error>;

    /// Whether [`extract`](Self::extract) reads the body. When neither the extractor nor the
    /// signature check does, the layer does not buffer the body (and `body` is empty).
    /// Default: `true`.
    fn needs_body(&self) -> bool {
        true
    }
}

impl<F, E> HttpKeyExtractor for F
where
    F: Fn(&mut Parts, &Bytes) -> Result<Option<IdempotencyKey>, E>,
    E: Error + Send + Sync + 'static,
{
    type Error = E;

    fn extract(&self, parts: &mut Parts, body: &Bytes) -> Result<Option<IdempotencyKey>, E> {
        self(parts, body)
    }
}

/// Why the built-in extractors refused a request. Each message names what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// A required header was absent.
    #[error("missing `{name}` header")]
    MissingHeader {
        /// The header.
        name: HeaderName,
    },
    /// A header was not visible ASCII text.
    #[error("`{name}` header is not visible ASCII text")]
    InvalidHeader {
        /// The header.
        name: HeaderName,
    },
    /// A header's value is not a valid key.
    #[error("`{name}` header is not a valid idempotency key")]
    InvalidHeaderKey {
        /// The header.
        name: HeaderName,
        /// Why the key was refused.
        #[source]
        source: KeyError,
    },
    /// The body could not be read (the connection failed, or the body stream errored).
    #[error("could not read the request body")]
    UnreadableBody {
        /// The body's error.
        #[source]
        source: BoxError,
    },
    /// The body was sent with a content type the extractor does not read (e.g. GitHub's
    /// `application/x-www-form-urlencoded`, where the JSON is in a `payload` form field). Answered
    /// `415 Unsupported Media Type`.
    #[error(
        "unsupported content type `{content_type}`: the payload must be JSON; set the webhook's content type to `application/json`"
    )]
    UnsupportedContentType {
        /// The `Content-Type` sent (escaped to printable ASCII, and cut when long).
        content_type: String,
    },
    /// The body is not UTF-8, so it is not JSON.
    #[error("request body is not valid UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The body is not JSON, or a needed field has the wrong type.
    #[error("malformed `{event}` payload at `{path}`")]
    MalformedPayload {
        /// The event (e.g. `check_suite`, `merge_request`).
        event: String,
        /// Where in the document (e.g. `check_suite.pull_requests[0].number`; `.` for the root).
        /// Object keys come from the payload: anything but printable ASCII is escaped, and a
        /// long path is cut (ending in `…`).
        path: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A field needed for the key is absent or `null`.
    #[error("`{event}` payload has no `{field}`")]
    MissingField {
        /// The event.
        event: String,
        /// The field's path in the document.
        field: &'static str,
    },
    /// The fields are present but do not make a valid key (e.g. a head SHA that is not hex).
    #[error("`{event}` payload does not make a valid key")]
    InvalidKey {
        /// The event.
        event: String,
        /// Why the key was refused.
        #[source]
        source: KeyError,
    },
}

/// Reads the key from one request header, e.g. `Idempotency-Key` or `X-GitHub-Delivery`.
///
/// The value must be visible ASCII and make a valid [`IdempotencyKey`]; otherwise the request is
/// answered `400`. A request without the header passes through unclaimed, unless the header is
/// [required](Self::with_required) (then: `400`). The body is not read.
///
/// **Safe methods never claim.** `GET`, `HEAD` and `OPTIONS` do not change anything, so
/// retrying them is harmless and a claim would only turn a retry into a `409`: they pass through
/// unclaimed, header or not.
///
/// **Keys are scoped.** The same client-chosen value sent to two routes, or with two methods, is
/// two different requests. So the key claimed is `METHOD PATH [NAME=VALUE …] VALUE`: the method,
/// the request's path (without the query), the [scope headers](Self::with_scope_header), an
/// optional [principal](Self::with_principal_header), then the header's value. Only the last part
/// may contain spaces, so two different requests never share a key. E.g. `POST /payments pay-7`.
///
/// What it trusts: the client. Any client can pick any key, so a header key suits APIs where the
/// client owns the idempotency of its own requests (payments; scope them by
/// [principal](Self::with_principal_header) so clients cannot collide), or a sender whose
/// identity was checked first (a webhook with a [signature check](super::VerifyRequest)).
///
/// ```
/// use bytes::Bytes;
/// use tower_idempotency::http::{HeaderKey, HttpKeyExtractor};
///
/// let extractor = HeaderKey::github_delivery();
/// let (mut parts, ()) = http::Request::post("/webhooks/github")
///     .header("x-github-hook-id", "292430182")
///     .header("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
///     .body(()).unwrap().into_parts();
/// let key = extractor.extract(&mut parts, &Bytes::new()).unwrap().unwrap();
/// assert_eq!(key.as_str(), "POST /webhooks/github x-github-hook-id=292430182 72d3162e-cc78-11e3-81ab-4c9367dc0958");
///
/// let (mut none, ()) = http::Request::post("/").body(()).unwrap().into_parts();
/// assert!(extractor.extract(&mut none, &Bytes::new()).unwrap().is_none());
/// assert!(extractor.clone().with_required(true).extract(&mut none, &Bytes::new()).is_err());
///
/// let (mut get, ()) = http::Request::get("/payments").header("idempotency-key", "k").body(()).unwrap().into_parts();
/// assert!(HeaderKey::idempotency_key().extract(&mut get, &Bytes::new()).unwrap().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderKey {
    name: HeaderName,
    required: bool,
    scope: Vec<HeaderName>,
    principal: Option<HeaderName>,
}

impl HeaderKey {
    /// The key from header `name`; a request without it passes through.
    pub fn new(name: HeaderName) -> Self {
        Self {
            name,
            required: false,
            scope: Vec::new(),
            principal: None,
        }
    }

    /// The `Idempotency-Key` header (IETF draft `draft-ietf-httpapi-idempotency-key-header`).
    pub fn idempotency_key() -> Self {
        Self::new(HeaderName::from_static("idempotency-key"))
    }

    /// GitHub's `X-GitHub-Delivery`, scoped by `X-GitHub-Hook-ID`: GitHub sends one delivery GUID
    /// to *every* hook that receives an event, so without the hook's id two hooks pointed at the
    /// same route would share keys. A delivery without `X-GitHub-Hook-ID` is answered `400`. Note
    /// that distinct deliveries about the same commit have distinct GUIDs; to dispatch once per
    /// (repository, pull request, head SHA), use [`GitHubDispatchKey`](super::GitHubDispatchKey).
    pub fn github_delivery() -> Self {
        Self::new(HeaderName::from_static("x-github-delivery"))
            .with_scope_header(HeaderName::from_static("x-github-hook-id"))
    }

    /// GitLab's `Idempotency-Key`, which GitLab sends with webhook deliveries and keeps across
    /// retries of the same delivery, scoped by `X-Gitlab-Instance` (the sending GitLab). A
    /// delivery without `X-Gitlab-Instance` is answered `400`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_idempotency::http::{HeaderKey, HttpKeyExtractor};
    ///
    /// let (mut parts, ()) = http::Request::post("/webhooks/gitlab")
    ///     .header("x-gitlab-instance", "https://gitlab.example.com")
    ///     .header("idempotency-key", "f5d4a1c2-0b7e-4f0e-9d53-2a3c4e5f6a7b")
    ///     .body(()).unwrap().into_parts();
    /// let key = HeaderKey::gitlab_idempotency_key().extract(&mut parts, &Bytes::new()).unwrap().unwrap();
    /// assert_eq!(
    ///     key.as_str(),
    ///     "POST /webhooks/gitlab x-gitlab-instance=https://gitlab.example.com f5d4a1c2-0b7e-4f0e-9d53-2a3c4e5f6a7b"
    /// );
    /// ```
    pub fn gitlab_idempotency_key() -> Self {
        Self::idempotency_key().with_scope_header(HeaderName::from_static("x-gitlab-instance"))
    }

    /// Whether a request without the header is refused with `400` (default: it passes through).
    #[must_use]
    pub fn with_required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// Adds header `name` to the key's scope, as `name=value`. A request that has the key header
    /// but not this one, or whose value has spaces or is not visible ASCII, is answered `400`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::HeaderName;
    /// use tower_idempotency::http::{HeaderKey, HttpKeyExtractor};
    ///
    /// let extractor = HeaderKey::idempotency_key().with_scope_header(HeaderName::from_static("x-tenant"));
    /// let (mut parts, ()) = http::Request::post("/orders").header("x-tenant", "acme").header("idempotency-key", "o-1").body(()).unwrap().into_parts();
    /// assert_eq!(extractor.extract(&mut parts, &Bytes::new()).unwrap().unwrap().as_str(), "POST /orders x-tenant=acme o-1");
    /// ```
    #[must_use]
    pub fn with_scope_header(mut self, name: HeaderName) -> Self {
        self.scope.push(name);
        self
    }

    /// Scopes keys by principal: the value of header `name` (e.g. `Authorization`, or an API key
    /// header), of which only the first 16 hex digits of its SHA-256 enter the key, so credentials
    /// never reach the store or the logs. Two clients that pick the same key then do not collide.
    /// A request that has the key header but not this one is answered `400`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::header::AUTHORIZATION;
    /// use tower_idempotency::http::{HeaderKey, HttpKeyExtractor};
    ///
    /// let extractor = HeaderKey::idempotency_key().with_principal_header(AUTHORIZATION);
    /// let key = |token: &str| {
    ///     let (mut parts, ()) = http::Request::post("/payments").header("authorization", token).header("idempotency-key", "pay-7").body(()).unwrap().into_parts();
    ///     extractor.extract(&mut parts, &Bytes::new()).unwrap().unwrap()
    /// };
    /// assert_ne!(key("Bearer alice"), key("Bearer bob"));
    /// assert!(!key("Bearer alice").as_str().contains("alice"));
    /// ```
    #[must_use]
    pub fn with_principal_header(mut self, name: HeaderName) -> Self {
        self.principal = Some(name);
        self
    }

    /// The header read.
    pub fn header_name(&self) -> &HeaderName {
        &self.name
    }

    /// `METHOD PATH [NAME=VALUE …] [principal=DIGEST] `: what precedes the value in the key.
    fn scope(&self, parts: &Parts) -> Result<String, ExtractError> {
        let mut scope = format!("{} {} ", parts.method, parts.uri.path());
        for name in &self.scope {
            let value = parts
                .headers
                .get(name)
                .ok_or_else(|| ExtractError::MissingHeader { name: name.clone() })?;
            let text = value
                .to_str()
                .ok()
                .filter(|t| !t.is_empty() && !t.contains(' '))
                .ok_or_else(|| ExtractError::InvalidHeader { name: name.clone() })?;
            scope.push_str(&format!("{name}={text} "));
        }
        if let Some(name) = &self.principal {
            let value = parts
                .headers
                .get(name)
                .ok_or_else(|| ExtractError::MissingHeader { name: name.clone() })?;
            let digest = Sha256::digest(value.as_bytes());
            scope.push_str(&format!("principal={} ", hex::encode(&digest[..8])));
        }
        Ok(scope)
    }
}

impl HttpKeyExtractor for HeaderKey {
    type Error = ExtractError;

    fn extract(&self, parts: &mut Parts, _body: &Bytes) -> Result<Option<IdempotencyKey>, ExtractError> {
        if matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
            tracing::debug!(method = %parts.method, outcome = "pass_through", "safe method; passing through unclaimed");
            return Ok(None);
        }
        let Some(value) = parts.headers.get(&self.name) else {
            if self.required {
                return Err(ExtractError::MissingHeader {
                    name: self.name.clone(),
                });
            }
            tracing::debug!(header = %self.name, outcome = "pass_through", "no key header; passing through unclaimed");
            return Ok(None);
        };
        let text = value.to_str().map_err(|_| ExtractError::InvalidHeader {
            name: self.name.clone(),
        })?;
        // The value alone must be a valid key (not empty, no control characters), whatever the
        // scope adds.
        IdempotencyKey::new(text).map_err(|source| ExtractError::InvalidHeaderKey {
            name: self.name.clone(),
            source,
        })?;
        let scoped = format!("{}{text}", self.scope(parts)?);
        IdempotencyKey::new(scoped)
            .map(Some)
            .map_err(|source| ExtractError::InvalidHeaderKey {
                name: self.name.clone(),
                source,
            })
    }

    fn needs_body(&self) -> bool {
        false
    }
}

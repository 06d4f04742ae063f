//! Short-circuits as HTTP responses: at capacity is `429 Too Many Requests` with `Retry-After`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use super::error::LimitError;
use crate::error::Chain;
use crate::http::DEFAULT_RETRY_AFTER;

/// The HTTP answer to a short-circuit of the limit, or `None` for the inner service's own
/// error (which is the application's to answer). Bodies are `application/problem+json`
/// (RFC 9457):
///
/// | error | status | `Retry-After` |
/// |---|---|---|
/// | [`AtCapacity`](LimitError::AtCapacity) | `429 Too Many Requests` | the error's `retry_after`, whole seconds rounded up (at least 1) |
/// | [`StoreUnavailable`](LimitError::StoreUnavailable), [`LeaseLost`](LimitError::LeaseLost) | `503 Service Unavailable` | 5 |
/// | [`InvalidKey`](LimitError::InvalidKey) | `400 Bad Request` | — |
/// | [`Misconfigured`](LimitError::Misconfigured) | `500 Internal Server Error` | — |
///
/// With axum, answer the layer's errors in a `HandleErrorLayer` (the limit's service has an
/// error type, which an axum route does not accept):
///
/// ```
/// use std::time::Duration;
/// use http::StatusCode;
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::limit::{LimitError, http_response};
///
/// let err: LimitError<std::convert::Infallible> = LimitError::AtCapacity {
///     key: IdempotencyKey::new("project-1:work-item-42:review").unwrap(),
///     limit: 2,
///     retry_after: Duration::from_millis(1200),
/// };
/// let response = http_response(&err).unwrap();
/// assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(response.headers()["retry-after"], "2");
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// ```
pub fn http_response<E>(error: &LimitError<E>) -> Option<Response<Bytes>> {
    let (status, retry_after, body) = match error {
        LimitError::AtCapacity {
            key,
            limit,
            retry_after,
        } => (
            StatusCode::TOO_MANY_REQUESTS,
            Some(*retry_after),
            serde_json::json!({
                "type": "about:blank",
                "title": "Too Many Requests",
                "status": 429,
                "detail": format!("`{key}` already has {limit} concurrent runs; retry later"),
                "key": key.as_str(),
                "limit": limit,
                "retry_after_ms": u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
            }),
        ),
        LimitError::StoreUnavailable { key, source } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(DEFAULT_RETRY_AFTER),
            serde_json::json!({
                "type": "about:blank",
                "title": "Service Unavailable",
                "status": 503,
                "detail": format!("the concurrency-limit store is unavailable: {}", Chain(source)),
                "key": key.as_str(),
            }),
        ),
        LimitError::LeaseLost { key } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(DEFAULT_RETRY_AFTER),
            serde_json::json!({
                "type": "about:blank",
                "title": "Service Unavailable",
                "status": 503,
                "detail": "the run's slot was lost while it ran; it was aborted",
                "key": key.as_str(),
            }),
        ),
        LimitError::InvalidKey { source } => (
            StatusCode::BAD_REQUEST,
            None,
            serde_json::json!({
                "type": "about:blank",
                "title": "Bad Request",
                "status": 400,
                "detail": Chain(&**source).to_string(),
            }),
        ),
        LimitError::Misconfigured { source } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            serde_json::json!({
                "type": "about:blank",
                "title": "Internal Server Error",
                "status": 500,
                "detail": source.to_string(),
            }),
        ),
        LimitError::Inner(_) => return None,
    };
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    if let Some(after) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
    }
    Some(response)
}

/// Whole seconds, rounded up, at least 1: `Retry-After` has no fractions, and `0` would invite
/// an immediate retry that is still over the limit.
fn retry_after_secs(after: Duration) -> u64 {
    (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::retry_after_secs;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }
}

/// Answers the limit's short-circuits with [`http_response`] instead of an error, so a
/// [`ConcurrencyLimit`](super::ConcurrencyLimit) drops into an axum router (whose services must
/// not fail) without a `HandleErrorLayer`: put it **outside** the limit layer. The inner
/// service's own errors pass through unchanged.
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower::ServiceBuilder;
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::limit::{ConcurrencyLimitLayer, LimitResponseLayer, MemoryLimitStore};
///
/// // In production, a `RedisStore` shared by every instance.
/// let limit = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |req: &http::Request<axum::body::Body>| {
///     IdempotencyKey::new(req.uri().path()).map(Some)
/// })
/// .with_limit(2)
/// .with_lease(Duration::from_secs(60))
/// .build()
/// .expect("valid settings");
/// let app: Router = Router::new()
///     .route("/runs/{item}", post(|| async { "started" }))
///     .layer(ServiceBuilder::new().layer(LimitResponseLayer::new()).layer(limit));
/// # let _ = app;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitResponseLayer {
    _private: (),
}

impl LimitResponseLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> tower::Layer<S> for LimitResponseLayer {
    type Service = LimitResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitResponse { inner }
    }
}

/// The service of [`LimitResponseLayer`].
#[derive(Debug, Clone)]
pub struct LimitResponse<S> {
    inner: S,
}

impl<S> LimitResponse<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, ResBody, E> tower::Service<Req> for LimitResponse<S>
where
    S: tower::Service<Req, Response = Response<ResBody>, Error = LimitError<E>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = E;
    type Future = LimitResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), E>> {
        // `ConcurrencyLimit::poll_ready` fails only with the inner service's error; the
        // short-circuits are decided per call, and answered by the call's future. (Another
        // variant here, from some other service, is treated as ready: the call then answers.)
        match self.inner.poll_ready(cx) {
            std::task::Poll::Ready(Err(LimitError::Inner(e))) => std::task::Poll::Ready(Err(e)),
            std::task::Poll::Ready(_) => std::task::Poll::Ready(Ok(())),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        LimitResponseFuture {
            fut: self.inner.call(req),
        }
    }
}

/// Response future of [`LimitResponse`].
#[pin_project::pin_project]
#[derive(Debug)]
pub struct LimitResponseFuture<F> {
    #[pin]
    fut: F,
}

impl<F, ResBody, E> std::future::Future for LimitResponseFuture<F>
where
    F: std::future::Future<Output = Result<Response<ResBody>, LimitError<E>>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let answer = std::task::ready!(self.project().fut.poll(cx));
        std::task::Poll::Ready(match answer {
            Ok(response) => Ok(response),
            Err(LimitError::Inner(e)) => Err(e),
            Err(short_circuit) => Ok(match http_response(&short_circuit) {
                Some(response) => response.map(ResBody::from),
                // Unreachable: only the inner error has no response.
                None => {
                    let mut response = Response::new(ResBody::from(Bytes::new()));
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    response
                }
            }),
        })
    }
}

//! Keep or release the claim, decided from an HTTP response.
//!
//! A handler that could not dispatch (a capacity gate said "not now") must give the claim back,
//! or the next trigger for the same job is short-circuited as a duplicate until the TTL ends. An
//! HTTP handler says so in its response: with `429 Too Many Requests`, or, for any status, with the
//! [`Blocked`] marker in the response's extensions.

use http::{Response, StatusCode};

use crate::{ClassifyOutcome, Settle};

/// Marker a handler puts in its response's extensions to say that the job was blocked, not
/// dispatched: [`HttpClassifier`] then releases the claim, whatever the status code.
///
/// ```
/// use axum::{Extension, Json, http::StatusCode, response::IntoResponse};
/// use tower_idempotency::http::Blocked;
///
/// // E.g. the dispatch queue could not be reached: nothing was dispatched, give the claim back.
/// let response = (StatusCode::SERVICE_UNAVAILABLE, Extension(Blocked), "queue unavailable").into_response();
/// assert!(response.extensions().get::<Blocked>().is_some());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Blocked;

/// The default outcome classifier of [`HttpIdempotencyLayer`](super::HttpIdempotencyLayer).
///
/// - `429 Too Many Requests`, or any response carrying [`Blocked`]: **release** the claim.
/// - A `5xx` response: keep (default) or release, see
///   [`with_release_on_server_error`](Self::with_release_on_server_error). Keeping is the safe
///   default: a handler that failed halfway may already have dispatched.
/// - Every other response, and an error of the inner service: **keep** the claim until its TTL.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_idempotency::{ClassifyOutcome, Settle};
/// use tower_idempotency::http::{Blocked, HttpClassifier};
///
/// let c = HttpClassifier::new();
/// let status = |s: StatusCode| Ok::<_, ()>(Response::builder().status(s).body(()).unwrap());
/// assert_eq!(c.classify(&status(StatusCode::ACCEPTED)), Settle::Keep);
/// assert_eq!(c.classify(&status(StatusCode::TOO_MANY_REQUESTS)), Settle::Release);
/// assert_eq!(c.classify(&status(StatusCode::BAD_GATEWAY)), Settle::Keep);
///
/// let mut blocked = Response::new(());
/// blocked.extensions_mut().insert(Blocked);
/// assert_eq!(c.classify(&Ok::<_, ()>(blocked)), Settle::Release);
///
/// let c = c.with_release_on_server_error(true);
/// assert_eq!(c.classify(&status(StatusCode::BAD_GATEWAY)), Settle::Release);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HttpClassifier {
    release_on_server_error: bool,
}

impl HttpClassifier {
    /// Release on `429` and [`Blocked`]; keep otherwise.
    pub const fn new() -> Self {
        Self {
            release_on_server_error: false,
        }
    }

    /// Whether a `5xx` response releases the claim (default: no, it is kept).
    pub const fn with_release_on_server_error(mut self, release: bool) -> Self {
        self.release_on_server_error = release;
        self
    }
}

impl<B, E> ClassifyOutcome<Response<B>, E> for HttpClassifier {
    fn classify(&self, result: &Result<Response<B>, E>) -> Settle {
        match result {
            Ok(response) => {
                let status = response.status();
                if status == StatusCode::TOO_MANY_REQUESTS
                    || response.extensions().get::<Blocked>().is_some()
                    || (self.release_on_server_error && status.is_server_error())
                {
                    Settle::Release
                } else {
                    Settle::Keep
                }
            }
            Err(_) => Settle::Keep,
        }
    }
}

//! Keep or release the claim, decided from an HTTP response.
//!
//! A handler that could not dispatch (a capacity gate said "not now") must give the claim back,
//! or the next trigger for the same job is short-circuited as a duplicate until the TTL ends. An
//! HTTP handler says so in its response: with `429 Too Many Requests` (or any other `4xx` but
//! `409`: the request was refused before it did anything), or, for any status, with the
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
/// - Any other `4xx` except `409 Conflict`: **release** (default; see
///   [`with_release_on_client_error`](Self::with_release_on_client_error)). A `4xx` says the
///   request was refused *before* it did anything — a `405` from the router, a `422` from a body
///   extractor, a `400` from validation — so the corrected retry must not be a duplicate for the
///   whole TTL. `409` is kept: it says the request conflicted with what a first attempt did.
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
/// assert_eq!(c.classify(&status(StatusCode::UNPROCESSABLE_ENTITY)), Settle::Release);
/// assert_eq!(c.classify(&status(StatusCode::METHOD_NOT_ALLOWED)), Settle::Release);
/// assert_eq!(c.classify(&status(StatusCode::CONFLICT)), Settle::Keep);
/// assert_eq!(c.classify(&status(StatusCode::BAD_GATEWAY)), Settle::Keep);
///
/// let mut blocked = Response::new(());
/// blocked.extensions_mut().insert(Blocked);
/// assert_eq!(c.classify(&Ok::<_, ()>(blocked)), Settle::Release);
///
/// let c = c.with_release_on_server_error(true).with_release_on_client_error(false);
/// assert_eq!(c.classify(&status(StatusCode::BAD_GATEWAY)), Settle::Release);
/// assert_eq!(c.classify(&status(StatusCode::UNPROCESSABLE_ENTITY)), Settle::Keep);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpClassifier {
    release_on_server_error: bool,
    release_on_client_error: bool,
}

impl Default for HttpClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClassifier {
    /// Release on `429`, on any other `4xx` but `409`, and on [`Blocked`]; keep otherwise.
    pub const fn new() -> Self {
        Self {
            release_on_server_error: false,
            release_on_client_error: true,
        }
    }

    /// Whether a `5xx` response releases the claim (default: no, it is kept).
    #[must_use]
    pub const fn with_release_on_server_error(mut self, release: bool) -> Self {
        self.release_on_server_error = release;
        self
    }

    /// Whether a `4xx` response other than `409` and `429` releases the claim (default: yes).
    /// `429` always releases; `409` never does.
    #[must_use]
    pub const fn with_release_on_client_error(mut self, release: bool) -> Self {
        self.release_on_client_error = release;
        self
    }
}

impl<B, E> ClassifyOutcome<Response<B>, E> for HttpClassifier {
    fn classify(&self, result: &Result<Response<B>, E>) -> Settle {
        match result {
            Ok(response) => {
                let status = response.status();
                let refused = status.is_client_error() && status != StatusCode::CONFLICT;
                if status == StatusCode::TOO_MANY_REQUESTS
                    || response.extensions().get::<Blocked>().is_some()
                    || (self.release_on_client_error && refused)
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

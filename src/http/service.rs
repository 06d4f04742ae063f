//! The HTTP service: read the body, check the signature, extract the key, then run the core
//! claim state machine with the key handed over in the request's extensions.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::Service;

use super::classify::HttpClassifier;
use super::future::ResponseFuture;
use super::response::JsonResponses;
use super::signature::NoVerification;
use super::{HttpKeyExtractor, ShortCircuitResponse, VerifyRequest};
use crate::extract::BoxError;
use crate::{ClassifyOutcome, Idempotency, IdempotencyKey, KeyExtractor};

/// The key the HTTP front found, handed to the core service. Private, so nothing outside this
/// module can make a request claim a key.
#[derive(Clone)]
pub(crate) struct PendingClaim(pub(crate) IdempotencyKey);

/// The core service's extractor: reads [`PendingClaim`] from the request's extensions.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ClaimFromExtensions;

impl<B> KeyExtractor<Request<B>> for ClaimFromExtensions {
    type Error = Infallible;

    fn extract(&mut self, req: &Request<B>) -> Result<Option<IdempotencyKey>, Infallible> {
        Ok(req.extensions().get::<PendingClaim>().map(|claim| claim.0.clone()))
    }
}

/// What the HTTP service needs besides the core service, shared by its clones and futures.
pub(crate) struct Front<X, V, R> {
    pub(crate) extractor: X,
    pub(crate) verifier: V,
    pub(crate) responses: R,
    pub(crate) body_limit: usize,
}

impl<X: HttpKeyExtractor, V: VerifyRequest, R> Front<X, V, R> {
    pub(crate) fn needs_body(&self) -> bool {
        self.extractor.needs_body() || self.verifier.needs_body()
    }
}

/// The service produced by [`HttpIdempotencyLayer`](super::HttpIdempotencyLayer).
///
/// Its error is the inner service's error: every short-circuit is a response.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::{Layer, ServiceExt};
/// use tower_idempotency::MemoryStore;
/// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key());
/// let svc = layer.layer(tower::service_fn(|_req: Request<Full<Bytes>>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
/// }));
/// let req = || Request::post("/").header("idempotency-key", "k1").body(Full::new(Bytes::new())).unwrap();
/// assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), StatusCode::OK);
/// // The error type is still `Infallible`: a duplicate is a response.
/// let dup: Result<Response<Full<Bytes>>, Infallible> = svc.oneshot(req()).await;
/// assert_eq!(dup.unwrap().status(), StatusCode::CONFLICT);
/// # }
/// ```
pub struct HttpIdempotency<S, X, V = NoVerification, C = HttpClassifier, R = JsonResponses> {
    core: Idempotency<S, ClaimFromExtensions, C>,
    front: Arc<Front<X, V, R>>,
}

impl<S: Clone, X, V, C: Clone, R> Clone for HttpIdempotency<S, X, V, C, R> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            front: self.front.clone(),
        }
    }
}

impl<S: fmt::Debug, X, V, C: fmt::Debug, R> fmt::Debug for HttpIdempotency<S, X, V, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpIdempotency")
            .field("core", &self.core)
            .field("body_limit", &self.front.body_limit)
            .finish_non_exhaustive()
    }
}

impl<S, X, V, C, R> HttpIdempotency<S, X, V, C, R> {
    pub(crate) fn from_parts(core: Idempotency<S, ClaimFromExtensions, C>, front: Arc<Front<X, V, R>>) -> Self {
        Self { core, front }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.core.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.core.get_mut()
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.core.into_inner()
    }
}

impl<S, X, V, C, R, B, ResBody> Service<Request<B>> for HttpIdempotency<S, X, V, C, R>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    B: Body + From<Bytes>,
    B::Error: Into<BoxError>,
    ResBody: From<Bytes>,
    X: HttpKeyExtractor,
    V: VerifyRequest,
    R: ShortCircuitResponse,
    C: ClassifyOutcome<Response<ResBody>, S::Error> + Clone,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, C, X, V, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The core's readiness is its inner service's readiness (it only wraps the error), so
        // poll the inner service directly and keep its error type.
        self.core.get_mut().poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone for the next call.
        let clone = self.core.clone();
        let core = std::mem::replace(&mut self.core, clone);
        ResponseFuture::new(req, core, self.front.clone())
    }
}

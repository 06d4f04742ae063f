//! The HTTP service: read the body, check the signature, extract the key, then drive the claim
//! protocol directly (the same response future as the core layer).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::Service;

use super::body::{ReplayBody, ResponseBody};
use super::classify::HttpClassifier;
use super::future::ResponseFuture;
use super::response::JsonResponses;
use super::signature::NoVerification;
use super::{HttpKeyExtractor, ShortCircuitResponse, VerifyRequest};
use crate::ClassifyOutcome;
use crate::extract::BoxError;
use crate::protocol::Protocol;

/// What the HTTP service needs besides the core service, shared by its clones and futures.
pub(crate) struct Front<X, V, R> {
    pub(crate) extractor: X,
    pub(crate) verifier: V,
    pub(crate) responses: R,
    pub(crate) body_limit: usize,
    pub(crate) pre_claim: Option<Arc<dyn super::PreClaimCheck>>,
    pub(crate) replay: Option<Arc<super::Replay>>,
    /// Where claimed requests run to completion; `None`: in the caller's future.
    pub(crate) handlers: Option<super::Handlers>,
}

impl<X: HttpKeyExtractor, V: VerifyRequest, R> Front<X, V, R> {
    pub(crate) fn needs_body(&self) -> bool {
        self.extractor.needs_body() || self.verifier.needs_body() || self.replay.is_some()
    }
}

/// The service produced by [`HttpIdempotencyLayer`](super::HttpIdempotencyLayer).
///
/// Its error is the inner service's error: every short-circuit is a response.
///
/// Like tower-http's middleware it takes any request body `B` ([`http_body::Body`], e.g.
/// `hyper::body::Incoming` or `axum::body::Body`): the inner service receives a
/// `Request<`[`ReplayBody<B>`](super::ReplayBody)`>` (the body as sent, or the bytes the layer
/// buffered to read the key or check the signature), and the layered service answers a
/// `Response<`[`ResponseBody<ResBody>`](super::ResponseBody)`>` (the inner service's body, or a
/// short-circuit's bytes). Both are `Body<Data = Bytes>` with a boxed error when `B` and
/// `ResBody` are `Body<Data = Bytes>`, so the layer fits axum routers, hyper servers and
/// tower-http's layers.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tower::{Layer, ServiceExt};
/// use tower_idempotency::MemoryStore;
/// use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, ReplayBody, ResponseBody};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key());
/// let svc = layer.layer(tower::service_fn(|_req: Request<ReplayBody<Full<Bytes>>>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
/// }));
/// let req = || Request::post("/").header("idempotency-key", "k1").body(Full::new(Bytes::new())).unwrap();
/// assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), StatusCode::OK);
/// // The error type is still `Infallible`: a duplicate is a response.
/// let dup: Result<Response<ResponseBody<Full<Bytes>>>, Infallible> = svc.oneshot(req()).await;
/// assert_eq!(dup.unwrap().status(), StatusCode::CONFLICT);
/// # }
/// ```
pub struct HttpIdempotency<S, X, V = NoVerification, C = HttpClassifier, R = JsonResponses> {
    inner: S,
    protocol: Arc<Protocol>,
    classifier: C,
    front: Arc<Front<X, V, R>>,
}

impl<S: Clone, X, V, C: Clone, R> Clone for HttpIdempotency<S, X, V, C, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            protocol: self.protocol.clone(),
            classifier: self.classifier.clone(),
            front: self.front.clone(),
        }
    }
}

impl<S: fmt::Debug, X, V, C: fmt::Debug, R> fmt::Debug for HttpIdempotency<S, X, V, C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpIdempotency")
            .field("inner", &self.inner)
            .field("settings", &self.protocol.settings)
            .field("classifier", &self.classifier)
            .field("body_limit", &self.front.body_limit)
            .finish_non_exhaustive()
    }
}

impl<S, X, V, C, R> HttpIdempotency<S, X, V, C, R> {
    pub(crate) fn from_parts(inner: S, protocol: Arc<Protocol>, classifier: C, front: Arc<Front<X, V, R>>) -> Self {
        Self {
            inner,
            protocol,
            classifier,
            front,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Background jobs of this service's layer still pending (see
    /// [`IdempotencyLayer::background_tasks`](crate::IdempotencyLayer::background_tasks)).
    pub fn background_tasks(&self) -> usize {
        self.protocol.settings.background.pending()
    }
}

impl<S, X, V, C, R, B, ResBody> Service<Request<B>> for HttpIdempotency<S, X, V, C, R>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone,
    ResBody: Body,
    // A claimed request runs to completion in its own task (see `with_run_to_completion`).
    S: Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
    ResBody::Data: Send,
    B: Send + 'static,
    C: Send + 'static,
    B: Body,
    B::Error: Into<BoxError>,
    X: HttpKeyExtractor,
    V: VerifyRequest,
    R: ShortCircuitResponse,
    C: ClassifyOutcome<Response<ResBody>, S::Error> + Clone,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, C, X, V, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(
            req,
            inner,
            self.protocol.clone(),
            self.classifier.clone(),
            self.front.clone(),
        )
    }
}

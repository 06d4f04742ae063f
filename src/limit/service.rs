//! The service: extract a key, choose its limit, hand the rest to the response future.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::error::{LimitConfigError, LimitError};
use super::future::ResponseFuture;
use super::layer::ChooseLimit;
use super::permit::Shared;
use crate::extract::KeyExtractor;

/// The service produced by [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer).
///
/// Its error is [`LimitError`], which tells an at-capacity short-circuit, a fail-closed store
/// error, a lost lease and an invalid key apart from the inner service's own error.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Layer, ServiceExt};
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::limit::{ConcurrencyLimitLayer, MemoryLimitStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |n: &u32| IdempotencyKey::new(n.to_string()).map(Some));
/// let svc = layer.layer(tower::service_fn(|n: u32| async move { Ok::<_, Infallible>(n * 2) }));
/// // One call at a time per key; calls one after the other all run.
/// assert_eq!(svc.clone().oneshot(21).await.unwrap(), 42);
/// assert_eq!(svc.oneshot(21).await.unwrap(), 42);
/// # }
/// ```
pub struct ConcurrencyLimit<S, X, L = usize> {
    inner: S,
    shared: Arc<Shared>,
    extractor: X,
    limit: L,
}

impl<S: Clone, X: Clone, L: Clone> Clone for ConcurrencyLimit<S, X, L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            extractor: self.extractor.clone(),
            limit: self.limit.clone(),
        }
    }
}

impl<S: fmt::Debug, X, L> fmt::Debug for ConcurrencyLimit<S, X, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl<S, X, L> ConcurrencyLimit<S, X, L> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, extractor: X, limit: L) -> Self {
        Self {
            inner,
            shared,
            extractor,
            limit,
        }
    }

    /// Owner-checked releases and cleanups still running in the background, for this service
    /// and its clones.
    pub fn background_tasks(&self) -> usize {
        self.shared.pending()
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
}

impl<S, X, L, Req> Service<Req> for ConcurrencyLimit<S, X, L>
where
    S: Service<Req> + Clone,
    X: KeyExtractor<Req>,
    L: ChooseLimit<Req>,
{
    type Response = S::Response;
    type Error = LimitError<S::Error>;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(LimitError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        if let Some(source) = &self.shared.invalid {
            return ResponseFuture::refused(LimitError::Misconfigured { source: source.clone() });
        }
        match self.extractor.extract(&req) {
            Ok(Some(key)) => match self.limit.limit(&req) {
                0 => ResponseFuture::refused(LimitError::Misconfigured {
                    source: LimitConfigError::ZeroLimit,
                }),
                limit => ResponseFuture::acquire(inner, req, key, limit, &self.shared),
            },
            Ok(None) => ResponseFuture::pass_through(inner, req),
            Err(e) => ResponseFuture::refused(LimitError::InvalidKey { source: Box::new(e) }),
        }
    }
}

//! The service: extract a key, start the claim, hand the rest to the response future.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use crate::classify::{ClassifyOutcome, DefaultClassifier};
use crate::error::IdempotencyError;
use crate::extract::KeyExtractor;
use crate::future::ResponseFuture;
use crate::protocol::Protocol;

/// The service produced by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// Its error is [`IdempotencyError`], which tells a duplicate, a fail-closed store error, an
/// invalid key and a lost claim apart from the inner service's own error.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Layer, ServiceExt};
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |n: &u32| -> Result<_, KeyError> {
///     IdempotencyKey::new(n.to_string()).map(Some)
/// });
/// let svc = layer.layer(tower::service_fn(|n: u32| async move { Ok::<_, Infallible>(n * 2) }));
/// assert_eq!(svc.clone().oneshot(21).await.unwrap(), 42);
/// assert!(svc.oneshot(21).await.unwrap_err().is_duplicate());
/// # }
/// ```
pub struct Idempotency<S, X, C = DefaultClassifier> {
    inner: S,
    protocol: Arc<Protocol>,
    extractor: X,
    classifier: C,
}

impl<S: Clone, X: Clone, C: Clone> Clone for Idempotency<S, X, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            protocol: self.protocol.clone(),
            extractor: self.extractor.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, X, C: fmt::Debug> fmt::Debug for Idempotency<S, X, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("settings", &self.protocol.settings)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl<S, X, C> Idempotency<S, X, C> {
    pub(crate) fn from_parts(inner: S, protocol: Arc<Protocol>, extractor: X, classifier: C) -> Self {
        Self {
            inner,
            protocol,
            extractor,
            classifier,
        }
    }

    /// Background jobs of this service's layer still pending (see
    /// [`IdempotencyLayer::background_tasks`](crate::IdempotencyLayer::background_tasks)).
    pub fn background_tasks(&self) -> usize {
        self.protocol.settings.background.pending()
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

impl<S, X, C, Req> Service<Req> for Idempotency<S, X, C>
where
    S: Service<Req> + Clone,
    X: KeyExtractor<Req>,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = IdempotencyError<S::Error>;
    type Future = ResponseFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(IdempotencyError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let classifier = self.classifier.clone();
        if let Some(source) = &self.protocol.invalid {
            return ResponseFuture::refused(IdempotencyError::Misconfigured { source: source.clone() }, classifier);
        }
        match self.extractor.extract(&req) {
            Ok(Some(key)) => {
                let owner = self.extractor.owner(&req);
                let takeover = self.extractor.takeover(&req);
                let follow_up = self.extractor.follow_up(&req);
                ResponseFuture::claim(inner, req, key, owner, takeover.as_deref(), &self.protocol, classifier)
                    .with_follow_up(follow_up)
            }
            Ok(None) => ResponseFuture::pass_through(inner, req, classifier),
            Err(e) => ResponseFuture::rejected(e.into(), classifier),
        }
    }
}

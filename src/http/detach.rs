//! Handlers that run to completion: a client that disconnects does not cancel the work it
//! started, so the claim is settled and the outcome recorded (a retry then gets the replay).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::sync::{Notify, Semaphore};
use tower::{Layer, Service};

/// Runs every call of the wrapped service in its own Tokio task, so it finishes even when the
/// caller's future is dropped (an HTTP client that went away): put it **outside**
/// [`HttpIdempotencyLayer`](super::HttpIdempotencyLayer), and the claim is completed and the
/// response stored for the retry. [`Handlers`] counts the calls in flight, lets a graceful
/// shutdown wait for them, and caps how many run at once.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Layer, ServiceExt};
/// use tower_idempotency::http::RunToCompletionLayer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = RunToCompletionLayer::new().with_max_in_flight(64);
/// let handlers = layer.handlers();
/// let svc = layer.layer(tower::service_fn(|n: u32| async move { Ok::<_, Infallible>(n + 1) }));
/// assert_eq!(svc.oneshot(1).await.unwrap(), 2);
/// handlers.wait().await; // e.g. after the server stopped accepting
/// assert_eq!(handlers.running(), 0);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct RunToCompletionLayer {
    handlers: Handlers,
}

/// The calls of a [`RunToCompletionLayer`] in flight.
#[derive(Debug, Clone, Default)]
pub struct Handlers {
    inner: Arc<HandlersInner>,
}

#[derive(Debug, Default)]
struct HandlersInner {
    running: AtomicUsize,
    idle: Notify,
    limit: Option<Arc<Semaphore>>,
}

impl RunToCompletionLayer {
    /// No cap on calls in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `max` calls run at once; the others wait for a slot (in their own task, so they
    /// too run to completion once started).
    pub fn with_max_in_flight(self, max: usize) -> Self {
        Self {
            handlers: Handlers::with_limit(Some(max)),
        }
    }

    /// The calls in flight, for a graceful shutdown.
    pub fn handlers(&self) -> Handlers {
        self.handlers.clone()
    }
}

impl Handlers {
    /// Handlers with at most `max` running at once (`None`: no cap).
    pub(crate) fn with_limit(max: Option<usize>) -> Self {
        Self {
            inner: Arc::new(HandlersInner {
                limit: max.map(|max| Arc::new(Semaphore::new(max.max(1)))),
                ..Default::default()
            }),
        }
    }

    /// Runs `fut` in its own task, counted (and capped) here.
    pub(crate) fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let state = self.inner.clone();
        state.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(state.clone());
        tokio::spawn(async move {
            let _running = running;
            let _slot = match &state.limit {
                Some(limit) => limit.clone().acquire_owned().await.ok(),
                None => None,
            };
            fut.await
        })
    }

    /// How many calls are running (or waiting for a slot).
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Waits until no call is running.
    pub async fn wait(&self) {
        loop {
            let idle = self.inner.idle.notified();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Decrements the count when a task ends, however it ends.
struct Running(Arc<HandlersInner>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl<S> Layer<S> for RunToCompletionLayer {
    type Service = RunToCompletion<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RunToCompletion {
            inner,
            handlers: self.handlers.clone(),
        }
    }
}

/// The service of [`RunToCompletionLayer`].
#[derive(Debug, Clone)]
pub struct RunToCompletion<S> {
    inner: S,
    handlers: Handlers,
}

impl<S, Req> Service<Req> for RunToCompletion<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let task = self.handlers.spawn(async move { inner.call(req).await });
        Box::pin(async move {
            match task.await {
                Ok(result) => result,
                // The handler panicked: the panic is the caller's, as without this layer.
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                // Cancelled: the runtime is shutting down; nobody is left to answer.
                Err(_) => std::future::pending().await,
            }
        })
    }
}

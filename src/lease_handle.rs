//! What a running job can know about its own claim: whether it has been lost, and its fencing
//! token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use crate::IdempotencyKey;

tokio::task_local! {
    static CURRENT: LeaseHandle;
}

/// The claim of the job that is running: a signal that fires when renewal finds the claim
/// **lost** (expired or taken over — someone else may now run the same job), and the claim's
/// **fencing token**, when the layer has fencing on
/// ([`with_fencing`](crate::IdempotencyLayer::with_fencing)), for downstream writes to reject a
/// stale holder.
///
/// The inner service reaches it with [`LeaseHandle::current`] while the layer calls or polls it
/// (clone it there to keep it, e.g. into a spawned task); an HTTP handler also finds it in the
/// request's extensions.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Layer, ServiceExt};
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, LeaseHandle, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &String| -> Result<_, KeyError> {
///     IdempotencyKey::new(job).map(Some)
/// })
/// .with_fencing(true);
/// let svc = layer.layer(tower::service_fn(|_: String| async {
///     let lease = LeaseHandle::current().expect("called under a claim");
///     assert!(!lease.is_lost());
///     Ok::<_, Infallible>(lease.fencing_token())
/// }));
/// let fence = svc.oneshot("job-1".to_owned()).await.unwrap();
/// assert!(fence.is_some());
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct LeaseHandle {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    key: IdempotencyKey,
    fencing_token: Option<u64>,
    lost: AtomicBool,
    notify: Notify,
}

impl LeaseHandle {
    pub(crate) fn new(key: IdempotencyKey, fencing_token: Option<u64>) -> Self {
        Self {
            inner: Arc::new(Shared {
                key,
                fencing_token,
                lost: AtomicBool::new(false),
                notify: Notify::new(),
            }),
        }
    }

    /// The claim of the job being called or polled by the layer on this task, if any.
    pub fn current() -> Option<LeaseHandle> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// The key the claim is for.
    pub fn key(&self) -> &IdempotencyKey {
        &self.inner.key
    }

    /// The fencing token: greater than the token of every earlier holder of this key (as long
    /// as the store's clock does not step back; see
    /// [`with_fencing`](crate::IdempotencyLayer::with_fencing)). `None` when fencing is off.
    pub fn fencing_token(&self) -> Option<u64> {
        self.inner.fencing_token
    }

    /// Whether renewal found the claim lost.
    pub fn is_lost(&self) -> bool {
        self.inner.lost.load(Ordering::Acquire)
    }

    /// Resolves when renewal finds the claim lost (at once if it already has): the job should
    /// stop, or at least stop writing.
    pub async fn lost(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_lost() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn mark_lost(&self) {
        self.inner.lost.store(true, Ordering::Release);
        self.inner.notify.notify_waiters();
    }

    /// Runs `f` with this handle as [`current`](Self::current).
    pub(crate) fn scope<R>(&self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self.clone(), f)
    }
}

//! The store side of the limit: a small trait, its answers, and the object-safe form the layer
//! holds so its types do not carry the store type.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::StoreError;
use crate::store::{BoxFuture, ClaimToken};

/// The answer to an acquire that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Acquire {
    /// The holder is now one of the key's at most `limit` holders (or already was: a resent
    /// acquire whose first copy landed is granted, not counted twice).
    Granted,
    /// The key already has `limit` live holders. `retry_after` is how long until the earliest
    /// of their leases expires (by the store's clock): the latest a slot frees if that holder
    /// died; a holder that finishes frees it sooner, one that renews keeps it longer.
    AtCapacity {
        /// Time until the earliest live lease expires.
        retry_after: Duration,
    },
}

/// Where the holders of limited keys are kept: at most `limit` holders per key, each with a
/// lease that expires unless renewed.
///
/// Every method receives the full key (the layer's namespace already applied) and must be atomic
/// with respect to other callers, including other processes when the store is shared. Lease
/// expiry is decided by **the store's clock** alone: callers never compare clocks.
///
/// Implemented by [`RedisStore`](crate::RedisStore) (feature `redis`; one sorted set per key,
/// see [the module docs](crate::limit)) and [`MemoryLimitStore`](crate::limit::MemoryLimitStore).
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::limit::{Acquire, LimitStore, MemoryLimitStore};
/// use tower_idempotency::store::ClaimToken;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryLimitStore::new();
/// let (a, b) = (ClaimToken::generate(), ClaimToken::generate());
/// let lease = Duration::from_secs(30);
/// assert_eq!(store.acquire("work-item-42", &a, 1, lease).await?, Acquire::Granted);
/// assert!(matches!(store.acquire("work-item-42", &b, 1, lease).await?, Acquire::AtCapacity { .. }));
/// assert!(!store.release("work-item-42", &b).await?, "b holds nothing: nothing to release");
/// assert!(store.release("work-item-42", &a).await?);
/// assert_eq!(store.acquire("work-item-42", &b, 1, lease).await?, Acquire::Granted);
/// # Ok(()) }
/// ```
pub trait LimitStore: Send + Sync + 'static {
    /// Makes `holder` one of `key`'s holders for `lease`, if fewer than `limit` live holders
    /// hold it; expired holders do not count. Idempotent per holder: when `holder` already
    /// holds `key` (a resend after a lost reply), the answer is [`Acquire::Granted`] and its
    /// lease is extended to `lease` from now.
    fn acquire(
        &self,
        key: &str,
        holder: &ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Acquire, StoreError>> + Send;

    /// Extends `holder`'s lease on `key` to `lease` from now if, and only if, it is still live.
    /// An expired lease is **never revived**: its slot may already be someone else's. Returns
    /// whether it was extended.
    fn renew(
        &self,
        key: &str,
        holder: &ClaimToken,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Removes `holder` from `key`'s holders; nobody else's lease is touched. Returns whether
    /// `holder` was there.
    fn release(&self, key: &str, holder: &ClaimToken) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The longest lease this store can express; the layer refuses a longer one when it is
    /// built. The default is 100 years.
    fn max_lease(&self) -> Duration {
        Duration::from_secs(100 * 365 * 24 * 3600)
    }
}

impl<T: LimitStore> LimitStore for Arc<T> {
    fn acquire(
        &self,
        key: &str,
        holder: &ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Acquire, StoreError>> + Send {
        (**self).acquire(key, holder, limit, lease)
    }

    fn renew(
        &self,
        key: &str,
        holder: &ClaimToken,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).renew(key, holder, lease)
    }

    fn release(&self, key: &str, holder: &ClaimToken) -> impl Future<Output = Result<bool, StoreError>> + Send {
        (**self).release(key, holder)
    }

    fn max_lease(&self) -> Duration {
        (**self).max_lease()
    }
}

/// Object-safe form of [`LimitStore`], with owned arguments so the futures are `'static`.
pub(crate) trait ErasedLimitStore: Send + Sync + 'static {
    fn acquire(
        self: Arc<Self>,
        key: Arc<str>,
        holder: ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<Result<Acquire, StoreError>>;
    fn renew(
        self: Arc<Self>,
        key: Arc<str>,
        holder: ClaimToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, StoreError>>;
    fn release(self: Arc<Self>, key: Arc<str>, holder: ClaimToken) -> BoxFuture<Result<bool, StoreError>>;
    fn max_lease(&self) -> Duration;
}

impl<T: LimitStore> ErasedLimitStore for T {
    fn acquire(
        self: Arc<Self>,
        key: Arc<str>,
        holder: ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> BoxFuture<Result<Acquire, StoreError>> {
        Box::pin(async move { LimitStore::acquire(&*self, &key, &holder, limit, lease).await })
    }
    fn renew(
        self: Arc<Self>,
        key: Arc<str>,
        holder: ClaimToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, StoreError>> {
        Box::pin(async move { LimitStore::renew(&*self, &key, &holder, lease).await })
    }
    fn release(self: Arc<Self>, key: Arc<str>, holder: ClaimToken) -> BoxFuture<Result<bool, StoreError>> {
        Box::pin(async move { LimitStore::release(&*self, &key, &holder).await })
    }
    fn max_lease(&self) -> Duration {
        LimitStore::max_lease(self)
    }
}

//! Why a limited call did not run (or did not finish), as a typed error.

use std::fmt;
use std::time::Duration;

use crate::extract::BoxError;
use crate::{IdempotencyKey, StoreError};

/// The error of a [`ConcurrencyLimit`](super::ConcurrencyLimit) service: a short-circuit the
/// layer decided, or the inner service's own error.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::limit::LimitError;
///
/// let err: LimitError<std::io::Error> = LimitError::AtCapacity {
///     key: IdempotencyKey::new("project-1:work-item-42:review").unwrap(),
///     limit: 2,
///     retry_after: Duration::from_millis(1500),
/// };
/// assert!(err.is_at_capacity());
/// assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));
/// assert_eq!(
///     err.to_string(),
///     "at capacity: key `project-1:work-item-42:review` already has 2 holders; retry after 1.5s"
/// );
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum LimitError<E> {
    /// The key already has `limit` live holders; the inner service was not called. A queue
    /// consumer should leave the job for a retry (after `retry_after`), not drop it.
    AtCapacity {
        /// The key (without namespace).
        key: IdempotencyKey,
        /// The limit that applied to this call.
        limit: usize,
        /// Time until the earliest live lease expires, by the store's clock: an upper bound on
        /// the wait when that holder died, a hint otherwise.
        retry_after: Duration,
    },
    /// The store could not answer and the layer fails closed (the default); the inner service
    /// was not called. Retry later.
    StoreUnavailable {
        /// The key (without namespace).
        key: IdempotencyKey,
        /// What went wrong.
        source: StoreError,
    },
    /// The call's lease was lost while the inner service ran (renewal found it expired or gone,
    /// or could not reach the store before the lease ran out), so its slot may be someone
    /// else's; the inner future was dropped (the default [`LostLeasePolicy::Abort`](super::LostLeasePolicy)).
    LeaseLost {
        /// The key (without namespace).
        key: IdempotencyKey,
    },
    /// No valid key could be extracted; the inner service was not called.
    InvalidKey {
        /// The extractor's error.
        source: BoxError,
    },
    /// The settings cannot work (the layer was used without `build()`, or a per-request limit
    /// chose 0); nothing was acquired or called.
    Misconfigured {
        /// What is wrong.
        source: LimitConfigError,
    },
    /// The inner service failed.
    Inner(E),
}

impl<E: fmt::Display> fmt::Display for LimitError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::AtCapacity {
                key,
                limit,
                retry_after,
            } => write!(
                f,
                "at capacity: key `{key}` already has {limit} holder{}; retry after {retry_after:?}",
                if *limit == 1 { "" } else { "s" }
            ),
            LimitError::StoreUnavailable { key, source } => write!(
                f,
                "concurrency-limit store unavailable for key `{key}` ({source}); failed closed, nothing ran"
            ),
            LimitError::LeaseLost { key } => write!(
                f,
                "lease on key `{key}` was lost while the call ran; the call was aborted"
            ),
            LimitError::InvalidKey { source } => write!(f, "invalid limit key: {source}"),
            LimitError::Misconfigured { source } => write!(f, "concurrency limit misconfigured: {source}"),
            LimitError::Inner(e) => write!(f, "inner service failed: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for LimitError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LimitError::StoreUnavailable { source, .. } => Some(source),
            LimitError::InvalidKey { source } => Some(&**source),
            LimitError::Misconfigured { source } => Some(source),
            _ => None,
        }
    }
}

impl<E> LimitError<E> {
    /// Whether the key was at capacity.
    pub fn is_at_capacity(&self) -> bool {
        matches!(self, LimitError::AtCapacity { .. })
    }

    /// Whether the store was unavailable and the call failed closed.
    pub fn is_store_unavailable(&self) -> bool {
        matches!(self, LimitError::StoreUnavailable { .. })
    }

    /// Whether the lease was lost while the call ran.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, LimitError::LeaseLost { .. })
    }

    /// How long to wait before retrying an at-capacity call.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LimitError::AtCapacity { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The key this error concerns, when one was extracted.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        match self {
            LimitError::AtCapacity { key, .. }
            | LimitError::StoreUnavailable { key, .. }
            | LimitError::LeaseLost { key } => Some(key),
            LimitError::InvalidKey { .. } | LimitError::Misconfigured { .. } | LimitError::Inner(_) => None,
        }
    }

    /// The inner service's error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            LimitError::Inner(e) => Some(e),
            _ => None,
        }
    }
}

/// A limit setting that cannot work, refused by
/// [`ConcurrencyLimitLayer::build`](super::ConcurrencyLimitLayer::build) with what to change.
///
/// ```
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::limit::{ConcurrencyLimitLayer, LimitConfigError, MemoryLimitStore};
///
/// let err = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |k: &String| IdempotencyKey::new(k).map(Some))
///     .with_limit(0)
///     .build()
///     .unwrap_err();
/// assert_eq!(err, LimitConfigError::ZeroLimit);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitConfigError {
    /// A limit of zero lets nobody run.
    #[error("limit is 0: nobody could ever run; set `with_limit` to at least 1")]
    ZeroLimit,
    /// The lease is under a millisecond: every holder would expire at once.
    #[error("lease is zero: every holder would expire at once; set `with_lease` to at least 1 ms (default 30 s)")]
    ZeroLease,
    /// The lease is longer than the store can express.
    #[error("lease {lease:?} is longer than the store can express ({max:?})")]
    LeaseTooLong {
        /// The lease asked for.
        lease: Duration,
        /// The store's maximum.
        max: Duration,
    },
    /// A renewal interval of zero would renew in a busy loop.
    #[error("renewal interval is zero; renew every third of the lease ({suggested:?})")]
    ZeroRenewal {
        /// A third of the lease.
        suggested: Duration,
    },
    /// Renewing no more often than the lease lasts lets the lease expire between renewals.
    #[error(
        "renewal every {every:?} is not shorter than the lease {lease:?}: leases would expire between renewals; renew every {suggested:?}"
    )]
    RenewalNotBelowLease {
        /// The renewal interval asked for.
        every: Duration,
        /// The lease.
        lease: Duration,
        /// A third of the lease.
        suggested: Duration,
    },
}

//! Why a call was short-circuited, as a typed error for non-HTTP services.

use crate::extract::BoxError;
use crate::{IdempotencyKey, StoreError};

/// The error of an [`Idempotency`](crate::Idempotency) service: either a short-circuit the
/// layer decided, or the inner service's own error.
///
/// ```
/// use tower_idempotency::{IdempotencyError, IdempotencyKey};
///
/// let err: IdempotencyError<std::io::Error> =
///     IdempotencyError::Duplicate { key: IdempotencyKey::new("k").unwrap() };
/// assert!(err.is_duplicate());
/// assert_eq!(err.to_string(), "duplicate: key `k` is already claimed");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError<E> {
    /// Someone else holds the claim on this key; the inner service was not called.
    #[error("duplicate: key `{key}` is already claimed")]
    Duplicate {
        /// The key (without namespace).
        key: IdempotencyKey,
    },
    /// The store could not be reached, so the call failed closed; the inner service was not
    /// called. Retry later.
    #[error("idempotency store unavailable for key `{key}`; failed closed, nothing was dispatched")]
    StoreUnavailable {
        /// The key (without namespace).
        key: IdempotencyKey,
        /// What went wrong.
        #[source]
        source: StoreError,
    },
    /// No valid key could be extracted; the inner service was not called.
    #[error("invalid idempotency key: {source}")]
    InvalidKey {
        /// The extractor's error.
        #[source]
        source: BoxError,
    },
    /// Renewal found the claim lost while the job ran, and the layer is configured to abort.
    #[error("claim on key `{key}` was lost while the job ran; the job was aborted")]
    ClaimLost {
        /// The key (without namespace).
        key: IdempotencyKey,
    },
    /// The inner service failed.
    #[error("inner service failed")]
    Inner(#[source] E),
}

impl<E> IdempotencyError<E> {
    /// Whether this is a duplicate short-circuit.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, IdempotencyError::Duplicate { .. })
    }

    /// Whether the store was unavailable and the call failed closed.
    pub fn is_store_unavailable(&self) -> bool {
        matches!(self, IdempotencyError::StoreUnavailable { .. })
    }

    /// The key this error concerns, when one was extracted.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        match self {
            IdempotencyError::Duplicate { key }
            | IdempotencyError::StoreUnavailable { key, .. }
            | IdempotencyError::ClaimLost { key } => Some(key),
            IdempotencyError::InvalidKey { .. } | IdempotencyError::Inner(_) => None,
        }
    }

    /// The inner service's error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            IdempotencyError::Inner(e) => Some(e),
            _ => None,
        }
    }
}

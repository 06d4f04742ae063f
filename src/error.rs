//! Why a call was short-circuited, as a typed error for non-HTTP services.

use std::fmt;

use crate::extract::BoxError;
use crate::settings::ConfigError;
use crate::store::Record;
use crate::{IdempotencyKey, StoreError};

/// The error of an [`Idempotency`](crate::Idempotency) service: either a short-circuit the
/// layer decided, or the inner service's own error.
///
/// ```
/// use tower_idempotency::store::{ClaimToken, Record};
/// use tower_idempotency::{IdempotencyError, IdempotencyKey};
///
/// let err: IdempotencyError<std::io::Error> = IdempotencyError::Duplicate {
///     key: IdempotencyKey::new("k").unwrap(),
///     record: Record::completed(&ClaimToken::generate(), None),
/// };
/// assert!(err.is_duplicate());
/// assert!(err.is_duplicate_completed());
/// assert_eq!(err.to_string(), "duplicate: key `k` is already claimed (completed)");
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum IdempotencyError<E> {
    /// Someone else holds the claim on this key; the inner service was not called. The record
    /// says whether the original is still **in progress** (a queue consumer should leave the
    /// message pending: if the original is blocked or fails, the retry dispatches) or
    /// **completed** (ack it), with its stored outcome.
    Duplicate {
        /// The key (without namespace).
        key: IdempotencyKey,
        /// The record that made this call a duplicate.
        record: Record,
    },
    /// The store could not be reached, so the call failed closed; the inner service was not
    /// called. Retry later.
    StoreUnavailable {
        /// The key (without namespace).
        key: IdempotencyKey,
        /// What went wrong.
        source: StoreError,
    },
    /// No valid key could be extracted; the inner service was not called.
    InvalidKey {
        /// The extractor's error.
        source: BoxError,
    },
    /// Renewal found the claim lost while the job ran, and the layer is configured to abort.
    ClaimLost {
        /// The key (without namespace).
        key: IdempotencyKey,
    },
    /// The job was classified blocked, but its claim could not be released: **the claim still
    /// stands**. The layer retries the (token-checked) release in the background until it
    /// succeeds or the claim expires. A queue consumer should leave the job pending, not ack it:
    /// its retry dispatches once the claim is gone.
    ReleaseFailed {
        /// The key (without namespace).
        key: IdempotencyKey,
        /// Why the release failed.
        source: StoreError,
    },
    /// The layer's settings cannot work (it was used without `build()`, which would have refused
    /// them); nothing was claimed or dispatched.
    Misconfigured {
        /// What is wrong with the settings.
        source: ConfigError,
    },
    /// The inner service failed.
    Inner(E),
}

impl<E: fmt::Display> fmt::Display for IdempotencyError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdempotencyError::Duplicate { key, record } => write!(
                f,
                "duplicate: key `{key}` is already claimed ({})",
                if record.state().is_completed() {
                    "completed"
                } else {
                    "in progress"
                }
            ),
            IdempotencyError::StoreUnavailable { key, .. } => write!(
                f,
                "idempotency store unavailable for key `{key}`; failed closed, nothing was dispatched"
            ),
            IdempotencyError::InvalidKey { source } => write!(f, "invalid idempotency key: {source}"),
            IdempotencyError::ClaimLost { key } => {
                write!(
                    f,
                    "claim on key `{key}` was lost while the job ran; the job was aborted"
                )
            }
            IdempotencyError::ReleaseFailed { key, .. } => write!(
                f,
                "claim on key `{key}` could not be released after a blocked job; retrying in the background"
            ),
            IdempotencyError::Misconfigured { .. } => {
                f.write_str("idempotency layer misconfigured; nothing was dispatched")
            }
            // The inner error's own text, so `%e` in a log line shows the cause whatever `E` is.
            IdempotencyError::Inner(e) => write!(f, "inner service failed: {e}"),
        }
    }
}

/// An `Error` for any inner error that can be shown, `BoxError` included, so the layer composes
/// with tower's `BoxError` stacks (`Buffer`, `Timeout`, `BoxCloneService<_, _, BoxError>`).
/// The short-circuits keep their `source()` chain; an inner error is shown by `Display` (its
/// `source()` cannot be reached generically, since `Box<dyn Error>` is not itself an `Error`).
impl<E: fmt::Debug + fmt::Display> std::error::Error for IdempotencyError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IdempotencyError::StoreUnavailable { source, .. } | IdempotencyError::ReleaseFailed { source, .. } => {
                Some(source)
            }
            IdempotencyError::InvalidKey { source } => Some(&**source),
            IdempotencyError::Misconfigured { source } => Some(source),
            _ => None,
        }
    }
}

impl<E> IdempotencyError<E> {
    /// Whether this is a duplicate short-circuit.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, IdempotencyError::Duplicate { .. })
    }

    /// Whether this is a duplicate of an original that is still in progress.
    pub fn is_duplicate_in_progress(&self) -> bool {
        self.record().is_some_and(|r| r.state().is_in_progress())
    }

    /// Whether this is a duplicate of an original that completed.
    pub fn is_duplicate_completed(&self) -> bool {
        self.record().is_some_and(|r| r.state().is_completed())
    }

    /// The record behind a duplicate short-circuit.
    pub fn record(&self) -> Option<&Record> {
        match self {
            IdempotencyError::Duplicate { record, .. } => Some(record),
            _ => None,
        }
    }

    /// Whether the store was unavailable and the call failed closed.
    pub fn is_store_unavailable(&self) -> bool {
        matches!(self, IdempotencyError::StoreUnavailable { .. })
    }

    /// Whether a blocked job's claim could not be released (it still stands; see
    /// [`ReleaseFailed`](Self::ReleaseFailed)).
    pub fn is_release_failed(&self) -> bool {
        matches!(self, IdempotencyError::ReleaseFailed { .. })
    }

    /// The key this error concerns, when one was extracted.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        match self {
            IdempotencyError::Duplicate { key, .. }
            | IdempotencyError::StoreUnavailable { key, .. }
            | IdempotencyError::ClaimLost { key }
            | IdempotencyError::ReleaseFailed { key, .. } => Some(key),
            IdempotencyError::InvalidKey { .. }
            | IdempotencyError::Misconfigured { .. }
            | IdempotencyError::Inner(_) => None,
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

/// Renders an error with its `source()` chain: `a: b: c`.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            // Some errors (redis-rs among them) display their source's text themselves; don't
            // repeat it.
            let text = s.to_string();
            if !shown.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn chain_renders_sources_once() {
        let e = E(
            "outer",
            Some(Box::new(E("middle: inner", Some(Box::new(E("inner", None)))))),
        );
        assert_eq!(Chain(&e).to_string(), "outer: middle: inner");
        let plain = E("a", Some(Box::new(E("b", None))));
        assert_eq!(Chain(&plain).to_string(), "a: b");
    }
}

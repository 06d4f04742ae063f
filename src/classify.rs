//! Outcome classification: after the inner service answers, keep the claim or release it.
//!
//! A claim that is kept makes every later trigger a duplicate until the TTL ends. That is right
//! when the job was dispatched, and wrong when it was *blocked* (a capacity gate said "not now"):
//! then the claim must be released so the next trigger can dispatch. Only the application can tell
//! the two apart, so the decision is pluggable.

/// What to do with a claim once the inner service has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settle {
    /// The job was dispatched: keep the claim until its TTL ends.
    Keep,
    /// The job was not dispatched (blocked): delete the claim so a later trigger may dispatch.
    Release,
}

/// Decides [`Settle`] from the inner service's result.
///
/// Closures `Fn(&Result<Res, E>) -> Settle` implement it:
///
/// ```
/// use tower_idempotency::{ClassifyOutcome, Settle};
///
/// enum Dispatch { Sent, Blocked }
///
/// let classifier = |result: &Result<Dispatch, std::io::Error>| match result {
///     Ok(Dispatch::Blocked) => Settle::Release,
///     _ => Settle::Keep,
/// };
/// assert_eq!(classifier.classify(&Ok(Dispatch::Blocked)), Settle::Release);
/// assert_eq!(classifier.classify(&Ok(Dispatch::Sent)), Settle::Keep);
/// ```
pub trait ClassifyOutcome<Res, E> {
    /// Classifies one result.
    fn classify(&self, result: &Result<Res, E>) -> Settle;

    /// The outcome to store with the completed record of a kept result, which duplicates then
    /// receive ([`RecordState::Completed`](crate::RecordState::Completed)). Storing is opt-in:
    /// the default stores nothing. See
    /// [`IdempotencyLayer::with_stored_outcome`](crate::IdempotencyLayer::with_stored_outcome).
    fn outcome(&self, result: &Result<Res, E>) -> Option<Vec<u8>> {
        let _ = result;
        None
    }
}

/// A classifier that also stores an outcome: `classifier` decides keep or release, `store`
/// what a kept result leaves in its completed record. Made by
/// [`IdempotencyLayer::with_stored_outcome`](crate::IdempotencyLayer::with_stored_outcome).
///
/// ```
/// use tower_idempotency::{ClassifyOutcome, DefaultClassifier, StoredOutcome};
///
/// let c = StoredOutcome::new(DefaultClassifier::new(), |r: &Result<u32, ()>| r.as_ref().ok().map(|n| n.to_string().into_bytes()));
/// assert_eq!(c.outcome(&Ok(7)), Some(b"7".to_vec()));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct StoredOutcome<C, F> {
    classifier: C,
    store: F,
}

impl<C, F> StoredOutcome<C, F> {
    /// `classifier`, storing what `store` returns.
    pub const fn new(classifier: C, store: F) -> Self {
        Self { classifier, store }
    }
}

impl<C, F, Res, E> ClassifyOutcome<Res, E> for StoredOutcome<C, F>
where
    C: ClassifyOutcome<Res, E>,
    F: Fn(&Result<Res, E>) -> Option<Vec<u8>>,
{
    fn classify(&self, result: &Result<Res, E>) -> Settle {
        self.classifier.classify(result)
    }

    fn outcome(&self, result: &Result<Res, E>) -> Option<Vec<u8>> {
        (self.store)(result)
    }
}

impl<F, Res, E> ClassifyOutcome<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> Settle,
{
    fn classify(&self, result: &Result<Res, E>) -> Settle {
        self(result)
    }
}

/// The default classifier: success keeps the claim, and so does an inner error (a failed run
/// keeps its claim; the TTL is the backstop). Both are configurable.
///
/// ```
/// use tower_idempotency::{ClassifyOutcome, DefaultClassifier, Settle};
///
/// let c = DefaultClassifier::new().on_error(Settle::Release);
/// assert_eq!(ClassifyOutcome::<(), ()>::classify(&c, &Err(())), Settle::Release);
/// assert_eq!(ClassifyOutcome::<(), ()>::classify(&c, &Ok(())), Settle::Keep);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultClassifier {
    on_success: Settle,
    on_error: Settle,
}

impl DefaultClassifier {
    /// Keep on success, keep on error.
    pub const fn new() -> Self {
        Self {
            on_success: Settle::Keep,
            on_error: Settle::Keep,
        }
    }

    /// What to do when the inner service succeeds.
    pub const fn on_success(mut self, settle: Settle) -> Self {
        self.on_success = settle;
        self
    }

    /// What to do when the inner service fails.
    pub const fn on_error(mut self, settle: Settle) -> Self {
        self.on_error = settle;
        self
    }
}

impl Default for DefaultClassifier {
    fn default() -> Self {
        Self::new()
    }
}

impl<Res, E> ClassifyOutcome<Res, E> for DefaultClassifier {
    fn classify(&self, result: &Result<Res, E>) -> Settle {
        match result {
            Ok(_) => self.on_success,
            Err(_) => self.on_error,
        }
    }
}

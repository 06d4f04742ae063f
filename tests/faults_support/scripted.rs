//! A store wrapper that plays a script of faults, for paths a healthy server never takes:
//! replies lost after the command applied, errors before it reached the store, slow answers.
//! It wraps a real store (memory or Redis), so everything it does not fake is real.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower_idempotency::StoreError;
use tower_idempotency::store::{ClaimOutcome, ClaimReply, ClaimToken, IdempotencyStore};

/// What one store call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passed to the wrapped store.
    Pass,
    /// Refused before reaching the store: nothing applied (`may_have_applied() == false`).
    Refused,
    /// Nothing applied; after `d`, a timeout (the client gave up; the command may be in flight).
    TimeoutBeforeApply(Duration),
    /// Applied, then the reply is lost: after `d`, a timeout.
    TimeoutAfterApply(Duration),
    /// Applied and answered, after `d`.
    Slow(Duration),
}

/// The wrapped store, a script per operation (consumed front to back, then `Pass`), and counts.
pub struct ScriptedStore<S> {
    pub inner: S,
    claims: Mutex<VecDeque<Fault>>,
    releases: Mutex<VecDeque<Fault>>,
    pub claim_calls: AtomicUsize,
    pub release_calls: AtomicUsize,
    pub renew_calls: AtomicUsize,
    /// Every token a claim was attempted with, in order.
    pub tokens: Mutex<Vec<ClaimToken>>,
}

impl<S> ScriptedStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            claims: Mutex::new(VecDeque::new()),
            releases: Mutex::new(VecDeque::new()),
            claim_calls: AtomicUsize::new(0),
            release_calls: AtomicUsize::new(0),
            renew_calls: AtomicUsize::new(0),
            tokens: Mutex::new(Vec::new()),
        }
    }

    /// The next claims do `faults`, in order.
    pub fn claims(self, faults: impl IntoIterator<Item = Fault>) -> Self {
        self.claims.lock().unwrap().extend(faults);
        self
    }

    /// The next releases do `faults`, in order.
    pub fn releases(self, faults: impl IntoIterator<Item = Fault>) -> Self {
        self.releases.lock().unwrap().extend(faults);
        self
    }

    pub fn claim_calls(&self) -> usize {
        self.claim_calls.load(Ordering::SeqCst)
    }

    pub fn release_calls(&self) -> usize {
        self.release_calls.load(Ordering::SeqCst)
    }

    fn next(script: &Mutex<VecDeque<Fault>>) -> Fault {
        script.lock().unwrap().pop_front().unwrap_or(Fault::Pass)
    }
}

fn timeout(operation: &'static str, after: Duration) -> StoreError {
    StoreError::Timeout { operation, after }
}

fn refused(operation: &'static str) -> StoreError {
    StoreError::UnexpectedReply {
        operation,
        reply: "refused by the script".into(),
    }
}

async fn play<T>(
    fault: Fault,
    operation: &'static str,
    apply: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match fault {
        Fault::Pass => apply.await,
        Fault::Refused => Err(refused(operation)),
        Fault::TimeoutBeforeApply(d) => {
            tokio::time::sleep(d).await;
            Err(timeout(operation, d))
        }
        Fault::TimeoutAfterApply(d) => {
            let _ = apply.await;
            tokio::time::sleep(d).await;
            Err(timeout(operation, d))
        }
        Fault::Slow(d) => {
            let answer = apply.await;
            tokio::time::sleep(d).await;
            answer
        }
    }
}

impl<S: IdempotencyStore> IdempotencyStore for ScriptedStore<S> {
    async fn claim(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        Ok(match self.claim_record(key, token, ttl).await? {
            ClaimReply::Acquired => ClaimOutcome::Acquired,
            ClaimReply::Held(_) => ClaimOutcome::AlreadyClaimed,
        })
    }

    async fn claim_record(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimReply, StoreError> {
        self.claim_calls.fetch_add(1, Ordering::SeqCst);
        self.tokens.lock().unwrap().push(token.clone());
        let fault = Self::next(&self.claims);
        play(fault, "claim", self.inner.claim_record(key, token, ttl)).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: Option<&[u8]>,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.complete(key, token, outcome, retention).await
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<bool, StoreError> {
        self.release_calls.fetch_add(1, Ordering::SeqCst);
        let fault = Self::next(&self.releases);
        play(fault, "release", self.inner.release(key, token)).await
    }

    async fn renew(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        self.renew_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.renew(key, token, ttl).await
    }

    fn max_ttl(&self) -> Duration {
        self.inner.max_ttl()
    }

    async fn take_over(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.take_over(key, token, ttl).await
    }
}

//! A [`MemoryStore`] behind a plan of faults, bounding its own latency as `RedisStore` does.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
use tower_idempotency::{MemoryStore, StoreError};

/// One store call's fate. The plan is consumed in order by every store call (claims, releases,
/// renewals, background cleanups alike), so which call meets which fault depends on timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The request is held before it reaches the store. Longer than the store's timeout: the
    /// command is **not** applied and the call fails with `StoreError::Timeout` at the timeout.
    Delay(Duration),
    /// The store refuses the command; certainly not applied (`StoreError::UnexpectedReply`).
    ErrBeforeApply,
    /// The command is applied and its reply lost (`StoreError::Backend`: may have applied).
    ErrAfterApply,
    /// The command is applied at once and its reply held. Longer than the timeout: the command
    /// **is** applied and the call fails with `StoreError::Timeout` at the timeout.
    SlowReply(Duration),
}

/// Names of the fault kinds, by [`Fault::kind`].
pub const FAULT_KINDS: [&str; 4] = ["delay", "err_before_apply", "err_after_apply", "slow_reply"];

impl Fault {
    pub fn kind(&self) -> Option<usize> {
        match self {
            Fault::None => None,
            Fault::Delay(_) => Some(0),
            Fault::ErrBeforeApply => Some(1),
            Fault::ErrAfterApply => Some(2),
            Fault::SlowReply(_) => Some(3),
        }
    }
}

/// The error of a reply lost after the command was applied.
#[derive(Debug, thiserror::Error)]
#[error("injected fault: the reply to `{0}` was lost after the command was applied")]
struct ReplyLost(&'static str);

/// Claim answers the layer received for one key (what the fault store returned, not what the
/// memory store decided).
#[derive(Debug, Default, Clone, Copy)]
pub struct Answers {
    pub acquired: usize,
    pub already_claimed: usize,
    pub errors: usize,
}

/// A [`MemoryStore`] behind a fault plan. Like `RedisStore`, it bounds its own latency: no call
/// takes longer than `timeout`.
#[derive(Debug)]
pub struct FaultStore {
    inner: MemoryStore,
    timeout: Duration,
    plan: Mutex<VecDeque<Fault>>,
    enabled: AtomicBool,
    injected: [AtomicUsize; 4],
    operations: AtomicUsize,
    answers: Mutex<HashMap<String, Answers>>,
    /// Replaces the TTL of every claim and renewal in the memory store, when set.
    keep_claims_for: Option<Duration>,
    /// Every call, for the report of a violated invariant.
    log: Mutex<Vec<Logged>>,
    created: Instant,
}

/// One store call, as the log shows it.
#[derive(Debug, Clone)]
struct Logged {
    key: String,
    line: String,
}

impl FaultStore {
    pub fn new(timeout: Duration, plan: impl IntoIterator<Item = Fault>) -> Self {
        Self {
            inner: MemoryStore::new(),
            timeout,
            plan: Mutex::new(plan.into_iter().collect()),
            enabled: AtomicBool::new(true),
            injected: Default::default(),
            operations: AtomicUsize::new(0),
            answers: Mutex::default(),
            keep_claims_for: None,
            log: Mutex::default(),
            created: Instant::now(),
        }
    }

    /// Keeps every claim for `hold` instead of the TTL the layer asked for. With `hold` far
    /// beyond the run, no claim expires during it, so whatever frees a key was the protocol's
    /// own release or cleanup, never the TTL; a claim the protocol forgot stays and is found.
    pub fn keeping_claims_for(mut self, hold: Duration) -> Self {
        self.keep_claims_for = Some(hold);
        self
    }

    /// From now on every call is answered at once, without faults.
    pub fn disable_faults(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }

    /// Faults injected so far, by kind (see [`FAULT_KINDS`]).
    pub fn injected(&self) -> [usize; 4] {
        std::array::from_fn(|i| self.injected[i].load(Ordering::SeqCst))
    }

    /// Store calls so far (claims, releases, renewals).
    pub fn operations(&self) -> usize {
        self.operations.load(Ordering::SeqCst)
    }

    /// Claim answers returned so far, per key.
    pub fn answers(&self) -> HashMap<String, Answers> {
        self.answers.lock().unwrap().clone()
    }

    pub fn memory(&self) -> &MemoryStore {
        &self.inner
    }

    /// The calls on `key` so far, one a line: when (ms since the store was made), what, whose
    /// token, which fault, and the answer (`dropped` when the caller went away first).
    pub fn log_for(&self, key: &str) -> String {
        let log = self.log.lock().unwrap();
        let lines: Vec<&str> = log.iter().filter(|l| l.key == key).map(|l| l.line.as_str()).collect();
        lines.join("\n")
    }

    fn next_fault(&self) -> Fault {
        self.operations.fetch_add(1, Ordering::SeqCst);
        if !self.enabled.load(Ordering::SeqCst) {
            return Fault::None;
        }
        let fault = self.plan.lock().unwrap().pop_front().unwrap_or(Fault::None);
        if let Some(kind) = fault.kind() {
            self.injected[kind].fetch_add(1, Ordering::SeqCst);
        }
        fault
    }

    async fn faulty<T: std::fmt::Debug>(
        &self,
        operation: &'static str,
        key: &str,
        token: &ClaimToken,
        apply: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let fault = self.next_fault();
        let started = self.created.elapsed();
        let mut entry = LogOnDrop {
            store: self,
            key,
            line: format!(
                "{:>4}ms {operation} {} {fault:?}",
                started.as_millis(),
                token.as_str().rsplit('-').next().unwrap_or_default()
            ),
            answer: None,
        };
        let answer = self.with_fault(operation, fault, apply).await;
        entry.answer = Some(match &answer {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error {}", e.kind()),
        });
        answer
    }

    async fn with_fault<T>(
        &self,
        operation: &'static str,
        fault: Fault,
        apply: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timed_out = || StoreError::Timeout {
            operation,
            after: self.timeout,
        };
        match fault {
            Fault::None => apply.await,
            Fault::Delay(d) if d >= self.timeout => {
                tokio::time::sleep(self.timeout).await;
                Err(timed_out())
            }
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                apply.await
            }
            Fault::ErrBeforeApply => Err(StoreError::UnexpectedReply {
                operation,
                reply: "injected fault: refused before applying".to_owned(),
            }),
            Fault::ErrAfterApply => {
                let _ = apply.await;
                Err(StoreError::Backend(Arc::new(ReplyLost(operation))))
            }
            Fault::SlowReply(d) => {
                let answer = apply.await;
                tokio::time::sleep(d.min(self.timeout)).await;
                if d >= self.timeout { Err(timed_out()) } else { answer }
            }
        }
    }
}

/// Logs a call when it ends, answered or dropped.
struct LogOnDrop<'a> {
    store: &'a FaultStore,
    key: &'a str,
    line: String,
    answer: Option<String>,
}

impl Drop for LogOnDrop<'_> {
    fn drop(&mut self) {
        let ended = self.store.created.elapsed().as_millis();
        let answer = self.answer.take().unwrap_or_else(|| "dropped".to_owned());
        let line = format!("{} -> {answer} at {ended}ms", self.line);
        let key = self.key.to_owned();
        self.store.log.lock().unwrap().push(Logged { key, line });
    }
}

impl IdempotencyStore for FaultStore {
    async fn claim(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        let ttl = self.keep_claims_for.unwrap_or(ttl);
        let answer = self
            .faulty("claim", key, token, self.inner.claim(key, token, ttl))
            .await;
        let mut answers = self.answers.lock().unwrap();
        let seen = answers.entry(key.to_owned()).or_default();
        match answer {
            Ok(ClaimOutcome::Acquired) => seen.acquired += 1,
            Ok(ClaimOutcome::AlreadyClaimed) => seen.already_claimed += 1,
            Err(_) => seen.errors += 1,
        }
        answer
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<bool, StoreError> {
        self.faulty("release", key, token, self.inner.release(key, token)).await
    }

    async fn renew(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        let ttl = self.keep_claims_for.unwrap_or(ttl);
        self.faulty("renew", key, token, self.inner.renew(key, token, ttl))
            .await
    }
}

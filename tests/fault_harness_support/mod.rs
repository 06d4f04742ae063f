//! The fault-injection harness's parts: a fault-injecting store over [`MemoryStore`], a worker
//! that records every dispatch, a driver that runs one schedule of calls against a layer, the
//! invariant checks, and the proptest strategies that generate schedules.
//!
//! Included by `tests/fault_harness.rs` with `mod fault_harness_support;` (a folder, so Cargo
//! does not build it as a test of its own).
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
use tower_idempotency::{
    Idempotency, IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, Settle, StoreError,
    StoreErrorPolicy,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------------
// The fault store
// ---------------------------------------------------------------------------------------------

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
        }
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

    async fn faulty<T>(
        &self,
        operation: &'static str,
        apply: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let timed_out = || StoreError::Timeout {
            operation,
            after: self.timeout,
        };
        match self.next_fault() {
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

impl IdempotencyStore for FaultStore {
    async fn claim(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        let answer = self.faulty("claim", self.inner.claim(key, token, ttl)).await;
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
        self.faulty("release", self.inner.release(key, token)).await
    }

    async fn renew(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<bool, StoreError> {
        self.faulty("renew", self.inner.renew(key, token, ttl)).await
    }
}

// ---------------------------------------------------------------------------------------------
// The worker: the inner service, recording every dispatch
// ---------------------------------------------------------------------------------------------

/// What the inner service answers: the job ran, or a capacity gate blocked it (the classifier
/// releases the claim, so a later trigger may dispatch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Dispatched,
    Blocked,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: usize,
    pub key: String,
    pub outcome: JobOutcome,
    pub run: Duration,
}

/// One entry into the inner service.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub id: usize,
    pub key: String,
    pub entered: Instant,
    /// When the inner service answered, and what; `None` if its future was dropped first.
    pub finished: Option<(Instant, JobOutcome)>,
}

#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Dispatch>>>);

impl Recorder {
    pub fn dispatches(&self) -> Vec<Dispatch> {
        self.0.lock().unwrap().clone()
    }

    pub fn entered(&self, id: usize) -> Option<Instant> {
        self.0.lock().unwrap().iter().find(|d| d.id == id).map(|d| d.entered)
    }
}

#[derive(Debug, Clone)]
pub struct Worker(Recorder);

impl Service<Job> for Worker {
    type Response = JobOutcome;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<JobOutcome, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, job: Job) -> Self::Future {
        self.0.0.lock().unwrap().push(Dispatch {
            id: job.id,
            key: job.key.clone(),
            entered: Instant::now(),
            finished: None,
        });
        let recorder = self.0.clone();
        Box::pin(async move {
            if !job.run.is_zero() {
                tokio::time::sleep(job.run).await;
            }
            let mut all = recorder.0.lock().unwrap();
            if let Some(d) = all.iter_mut().find(|d| d.id == job.id) {
                d.finished = Some((Instant::now(), job.outcome));
            }
            Ok(job.outcome)
        })
    }
}

pub type Extract = fn(&Job) -> Result<Option<IdempotencyKey>, KeyError>;
pub type Classify = fn(&Result<JobOutcome, Infallible>) -> Settle;
pub type HarnessLayer = IdempotencyLayer<Extract, Classify>;
pub type HarnessService = Idempotency<Worker, Extract, Classify>;

fn key_of(job: &Job) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(&job.key).map(Some)
}

fn release_when_blocked(result: &Result<JobOutcome, Infallible>) -> Settle {
    match result {
        Ok(JobOutcome::Blocked) => Settle::Release,
        _ => Settle::Keep,
    }
}

// ---------------------------------------------------------------------------------------------
// Schedules and their runs
// ---------------------------------------------------------------------------------------------

/// The layer settings a schedule runs under (coalescing is run both ways by the harness).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub policy: StoreErrorPolicy,
    pub shadow: bool,
    pub renewal: bool,
}

impl Settings {
    /// Whether invariant (a), at most one dispatch per claim lifetime, applies.
    pub fn exactly_once(&self) -> bool {
        self.policy == StoreErrorPolicy::FailClosed && !self.shadow
    }
}

/// One call of a schedule.
#[derive(Debug, Clone)]
pub struct CallSpec {
    /// Index into the run's keys.
    pub key: usize,
    /// When the call starts, from the start of the schedule.
    pub start: Duration,
    /// The caller goes away (drops the response future) this long after calling.
    pub drop_after: Option<Duration>,
    pub outcome: JobOutcome,
    /// How long the inner service takes.
    pub run: Duration,
}

/// Timing of a harness run.
#[derive(Debug, Clone)]
pub struct Params {
    pub ttl: Duration,
    /// The store's own bound on each call.
    pub store_timeout: Duration,
    pub renew_every: Duration,
    /// Allowance for scheduling noise on a loaded machine.
    pub margin: Duration,
    pub namespace: String,
}

impl Params {
    /// Invariant (b): every call is decided (the inner service entered, or the future resolved)
    /// within two store timeouts (a coalescing follower may wait for its leader, then claim
    /// itself) plus the margin.
    pub fn decision_bound(&self) -> Duration {
        self.store_timeout * 2 + self.margin
    }
}

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallResult {
    Ok(JobOutcome),
    Duplicate,
    StoreUnavailable(&'static str),
    ReleaseFailed,
    ClaimLost,
    Other(String),
    /// The caller dropped the future before it resolved.
    Dropped,
}

impl CallResult {
    fn of(result: Result<JobOutcome, IdempotencyError<Infallible>>) -> Self {
        match result {
            Ok(outcome) => CallResult::Ok(outcome),
            Err(IdempotencyError::Duplicate { .. }) => CallResult::Duplicate,
            Err(IdempotencyError::StoreUnavailable { source, .. }) => CallResult::StoreUnavailable(source.kind()),
            Err(IdempotencyError::ClaimLost { .. }) => CallResult::ClaimLost,
            Err(other) => CallResult::Other(other.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallRecord {
    pub id: usize,
    pub key: String,
    pub started: Instant,
    pub drop_after: Option<Duration>,
    /// The earlier of: the inner service entered, the future resolved.
    pub decided: Option<Instant>,
    pub result: CallResult,
}

/// One layer (with its service and dispatch recorder) under test.
pub struct Run {
    pub layer: HarnessLayer,
    pub svc: HarnessService,
    pub recorder: Recorder,
    next_id: AtomicUsize,
}

impl Run {
    pub fn new<St: IdempotencyStore>(store: St, settings: &Settings, coalescing: bool, params: &Params) -> Self {
        let layer = IdempotencyLayer::new(store, key_of as Extract)
            .with_classifier(release_when_blocked as Classify)
            .with_namespace(params.namespace.clone())
            .with_ttl(params.ttl)
            .with_coalescing(coalescing)
            .with_store_error_policy(settings.policy)
            .with_shadow_mode(settings.shadow);
        let layer = if settings.renewal {
            layer.with_renewal(params.renew_every)
        } else {
            layer
        };
        let layer = layer.build().expect("the harness's layer settings are valid");
        let recorder = Recorder::default();
        let svc = layer.layer(Worker(recorder.clone()));
        Self {
            layer,
            svc,
            recorder,
            next_id: AtomicUsize::new(0),
        }
    }

    /// Runs the calls (each at its start offset, concurrently) and waits for all of them.
    pub async fn calls(&self, calls: &[CallSpec], keys: &[String]) -> Vec<CallRecord> {
        let base = Instant::now();
        let tasks: Vec<_> = calls
            .iter()
            .map(|call| {
                let job = Job {
                    id: self.next_id.fetch_add(1, Ordering::SeqCst),
                    key: keys[call.key].clone(),
                    outcome: call.outcome,
                    run: call.run,
                };
                let (svc, start, drop_after) = (self.svc.clone(), base + call.start, call.drop_after);
                tokio::spawn(async move {
                    tokio::time::sleep_until(start).await;
                    let (id, key, started) = (job.id, job.key.clone(), Instant::now());
                    let fut = svc.oneshot(job);
                    let (result, resolved) = match drop_after {
                        Some(after) => match tokio::time::timeout(after, fut).await {
                            Ok(r) => (CallResult::of(r), Some(Instant::now())),
                            Err(_) => (CallResult::Dropped, None),
                        },
                        None => {
                            let r = fut.await;
                            (CallResult::of(r), Some(Instant::now()))
                        }
                    };
                    (id, key, started, drop_after, result, resolved)
                })
            })
            .collect();
        let mut records = Vec::with_capacity(tasks.len());
        for task in tasks {
            let (id, key, started, drop_after, result, resolved) = task.await.expect("a call task panicked");
            let decided = match (self.recorder.entered(id), resolved) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            records.push(CallRecord {
                id,
                key,
                started,
                drop_after,
                decided,
                result,
            });
        }
        records
    }

    /// One more trigger for `key` whose job dispatches, run to completion.
    pub async fn trigger(&self, key: &str) -> CallResult {
        let job = Job {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            key: key.to_owned(),
            outcome: JobOutcome::Dispatched,
            run: Duration::ZERO,
        };
        CallResult::of(self.svc.clone().oneshot(job).await)
    }

    /// Invariant (d): polls `background_tasks()` until it is 0; how long that took, or an error
    /// after `limit`.
    pub async fn drain_background(&self, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let pending = self.layer.background_tasks();
            if pending == 0 {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "(d) {pending} background task(s) still pending {limit:?} after the schedule (ttl + 1 s), with the store answering"
                ));
            }
            tokio::time::sleep(ms(5)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Invariants
// ---------------------------------------------------------------------------------------------

/// (a) Under fail-closed without shadow mode, at most one dispatch per key per claim lifetime.
///
/// A claim lifetime ends only when a job classified blocked has its claim released, which the
/// layer does after the inner service answered (the TTL is longer than the schedule). So, in
/// the order the inner service was entered, each dispatch needs a licence: the key's first
/// dispatch has one, and each blocked dispatch that *finished before* a later dispatch entered
/// grants one more. (Release failures retried in the background only free the key later, so
/// this never flags a correct run.)
pub fn check_one_dispatch_per_claim(dispatches: &[Dispatch]) -> Vec<String> {
    let mut by_key: BTreeMap<&str, Vec<&Dispatch>> = BTreeMap::new();
    for d in dispatches {
        by_key.entry(&d.key).or_default().push(d);
    }
    let mut violations = Vec::new();
    for (key, mut list) in by_key {
        list.sort_by_key(|d| d.entered);
        for (i, d) in list.iter().enumerate() {
            let released_before = list[..i]
                .iter()
                .filter(|p| matches!(p.finished, Some((t, JobOutcome::Blocked)) if t <= d.entered))
                .count();
            if i > released_before {
                violations.push(format!(
                    "(a) key {key}: dispatch #{} (call {}) entered while an earlier claim was kept; dispatches so far: {:?}",
                    i + 1,
                    d.id,
                    list[..=i]
                        .iter()
                        .map(|p| (p.id, p.finished.map(|(_, o)| o)))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    violations
}

/// (b) Every call was decided within the bound. A caller that went away undecided is a
/// violation only if it waited longer than the bound.
pub fn check_decisions(records: &[CallRecord], bound: Duration) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| {
            let waited = match r.decided {
                Some(at) => at.duration_since(r.started),
                None => match r.drop_after {
                    Some(after) if after > bound => after,
                    _ => return None,
                },
            };
            (waited > bound).then(|| {
                format!(
                    "(b) call {} on key {} was decided after {waited:?} (bound {bound:?}; result {:?})",
                    r.id, r.key, r.result
                )
            })
        })
        .collect()
}

/// (c) The keys that must dispatch on one more trigger once the store answers: called in the
/// schedule, and no dispatch of theirs kept a claim (every one finished blocked). Keys that
/// nobody dispatched are included: a call that failed closed may leave a phantom claim, which
/// the layer must clean up, or the caller's retry would be lost too.
pub fn keys_needing_dispatch(records: &[CallRecord], dispatches: &[Dispatch]) -> Vec<String> {
    let called: BTreeSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    called
        .into_iter()
        .filter(|key| {
            dispatches
                .iter()
                .filter(|d| d.key == *key)
                .all(|d| matches!(d.finished, Some((_, JobOutcome::Blocked))))
        })
        .map(str::to_owned)
        .collect()
}

/// (e) With coalescing, a key is dispatched at most as many times as the store gave an answer
/// that allows a dispatch: `Acquired`, and under fail-open also an error. A follower must not
/// turn one answer into several dispatches. Not for shadow mode (which dispatches everything).
pub fn check_coalescing_bound(
    dispatches: &[Dispatch],
    answers: &HashMap<String, Answers>,
    namespace: &str,
    policy: StoreErrorPolicy,
) -> Vec<String> {
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for d in dispatches {
        *per_key.entry(&d.key).or_default() += 1;
    }
    per_key
        .into_iter()
        .filter_map(|(key, n)| {
            let a = answers.get(&format!("{namespace}{key}")).copied().unwrap_or_default();
            let allowing = a.acquired
                + if policy == StoreErrorPolicy::FailOpen {
                    a.errors
                } else {
                    0
                };
            (n > allowing).then(|| {
                format!(
                    "(e) key {key}: {n} dispatches from {allowing} store answers that allow one ({a:?}, {policy:?})"
                )
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct Stats {
    pub schedules: usize,
    pub runs: usize,
    pub calls: usize,
    pub dispatches: usize,
    /// Faults injected, by kind name.
    pub faults: BTreeMap<&'static str, usize>,
    pub results: BTreeMap<String, usize>,
    pub slowest_drain: Duration,
}

impl Stats {
    pub fn add_faults(&mut self, kind: &'static str, n: usize) {
        if n > 0 {
            *self.faults.entry(kind).or_default() += n;
        }
    }

    pub fn add_results(&mut self, records: &[CallRecord]) {
        self.calls += records.len();
        for r in records {
            let name = match &r.result {
                CallResult::Ok(o) => format!("{o:?}"),
                CallResult::StoreUnavailable(_) => "StoreUnavailable".to_owned(),
                CallResult::Other(_) => "Other".to_owned(),
                other => format!("{other:?}"),
            };
            *self.results.entry(name).or_default() += 1;
        }
    }

    /// `fault harness: N schedules, M calls, F faults injected (k kinds)`.
    pub fn summary(&self) -> String {
        format!(
            "fault harness: {} schedules, {} calls, {} faults injected ({} kinds)",
            self.schedules,
            self.calls,
            self.faults.values().sum::<usize>(),
            self.faults.len()
        )
    }
}

/// The number of cases from `var`, else `default`.
pub fn cases_from_env(var: &str, default: u32) -> u32 {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var} must be a number of cases, got {v:?}")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

pub fn fault_strategy(timeout: Duration) -> impl Strategy<Value = Fault> {
    let t = u64::try_from(timeout.as_millis()).expect("small timeout");
    prop_oneof![
        4 => Just(Fault::None),
        1 => (0..2 * t).prop_map(|n| Fault::Delay(ms(n))),
        1 => Just(Fault::ErrBeforeApply),
        1 => Just(Fault::ErrAfterApply),
        1 => (0..2 * t).prop_map(|n| Fault::SlowReply(ms(n))),
    ]
}

/// Calls on `keys` keys in four bursts spread over `spread_ms` (a few ms of jitter within a
/// burst, so coalescing has company), a third of them dropped at a random point.
pub fn call_strategy(keys: usize, spread_ms: u64, max_run_ms: u64) -> impl Strategy<Value = CallSpec> {
    (
        0..keys,
        0..4u64,
        0..3u64,
        prop::option::weighted(0.3, 0..spread_ms + max_run_ms),
        prop_oneof![Just(JobOutcome::Dispatched), Just(JobOutcome::Blocked)],
        0..max_run_ms,
    )
        .prop_map(move |(key, burst, jitter, drop_ms, outcome, run_ms)| CallSpec {
            key,
            start: ms(burst * spread_ms / 4 + jitter),
            drop_after: drop_ms.map(ms),
            outcome,
            run: ms(run_ms),
        })
}

pub fn settings_strategy() -> impl Strategy<Value = Settings> {
    (
        prop_oneof![3 => Just(StoreErrorPolicy::FailClosed), 2 => Just(StoreErrorPolicy::FailOpen)],
        prop::bool::weighted(0.15),
        any::<bool>(),
    )
        .prop_map(|(policy, shadow, renewal)| Settings {
            policy,
            shadow,
            renewal,
        })
}

// COMPAT-STUB: the old API lacks these; removed before the final commit.
pub trait Compat: Sized {
    fn build(self) -> Result<Self, Infallible> {
        Ok(self)
    }
    fn background_tasks(&self) -> usize {
        0
    }
}
impl<X, C> Compat for IdempotencyLayer<X, C> {}

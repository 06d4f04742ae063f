//! One schedule of calls against one layer: settings, timing, what each call ended with.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_idempotency::store::IdempotencyStore;
use tower_idempotency::{IdempotencyError, IdempotencyLayer, StoreErrorPolicy};

use super::worker::{
    Classify, Extract, HarnessLayer, HarnessService, Job, JobOutcome, Recorder, Worker, key_of, release_when_blocked,
};

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
    /// Neither dropped nor resolved within [`HUNG_AFTER`]: the harness gave up waiting.
    Hung,
}

/// How long the harness waits for a call nobody drops, so a protocol that hangs fails (b)
/// instead of hanging the test.
pub const HUNG_AFTER: Duration = Duration::from_secs(5);

impl CallResult {
    fn of(result: Result<JobOutcome, IdempotencyError<Infallible>>) -> Self {
        match result {
            Ok(outcome) => CallResult::Ok(outcome),
            Err(IdempotencyError::Duplicate { .. }) => CallResult::Duplicate,
            Err(IdempotencyError::StoreUnavailable { source, .. }) => CallResult::StoreUnavailable(source.kind()),
            Err(IdempotencyError::ReleaseFailed { .. }) => CallResult::ReleaseFailed,
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
        let svc = layer.layer(Worker::new(recorder.clone()));
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
                    let (result, resolved) = match tokio::time::timeout(drop_after.unwrap_or(HUNG_AFTER), fut).await {
                        Ok(r) => (CallResult::of(r), Some(Instant::now())),
                        Err(_) if drop_after.is_some() => (CallResult::Dropped, None),
                        Err(_) => (CallResult::Hung, None),
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
        match tokio::time::timeout(HUNG_AFTER, self.svc.clone().oneshot(job)).await {
            Ok(result) => CallResult::of(result),
            Err(_) => CallResult::Hung,
        }
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
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

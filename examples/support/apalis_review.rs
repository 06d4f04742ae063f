//! An [apalis](https://docs.rs/apalis) worker (Redis backend, `apalis-redis`) whose review
//! dispatch is wrapped in `IdempotencyLayer` through apalis's own `WorkerBuilder::layer`.
//!
//! Shared by `examples/apalis_worker.rs` and `tests/apalis_worker.rs` (included with `#[path]`),
//! so the test runs the example's code.
//!
//! # Where the layer sits, and why an adapter is needed
//!
//! apalis 1.0 composes a worker's service as (outermost first): the backend's middleware
//! (`TaskPersistLayer`: locks the task, and when the call returns reports the task's *status* to
//! Redis), then the layers given to `.layer(..)` in the order given, then apalis's
//! `LifecycleService`, then the handler. Two consequences:
//!
//! 1. The layer sees `Task<ReviewJob>` (the decoded job in `task.args`, apalis's execution
//!    context behind it), and its inner service's error is apalis's
//!    `BoxDynError = Box<dyn Error + Send + Sync>`. `IdempotencyError<BoxDynError>` is an
//!    `Error` (its `Display` shows the inner cause), so the worker's bound
//!    `Error: Into<BoxDynError>` holds and no error conversion is needed.
//! 2. A task's status (`Done`, `Failed`, `Killed`) is set by `LifecycleService`, which sits
//!    *inside* the layer. When the layer short-circuits (duplicate, store unavailable, invalid key)
//!    the lifecycle service never runs, the status stays what it was when fetched (`Pending`, or
//!    `Failed` for a retry), and apalis-redis reschedules both: without the adapter a duplicate is
//!    re-run forever (measured: 957 re-runs of one duplicate task in 5 s, handler never called).
//!
//! [`ApalisOutcomeLayer`], added just outside `IdempotencyLayer`, fixes the second: it sets the
//! status apalis should record for each short-circuit. apalis gives a layer no other way to do
//! that, so this adapter stays; the error passes through unchanged.
//!
//! # What happens to a task
//!
//! What apalis-redis 1.0 does with a status (`lua/handle_results.lua`): `Done` → the
//! `{queue}:done` set, never run again; `Failed` or `Pending` with fewer than 25 attempts →
//! `{queue}:scheduled`, due `attempts` seconds later, moved back to the queue by a later fetch;
//! `Killed`, or 25 attempts → `{queue}:dead`, never run again.
//!
//! | outcome | claim | apalis status | task |
//! |---|---|---|---|
//! | dispatched | kept until its TTL | `Done` (lifecycle) | done |
//! | duplicate, original completed | someone else's, untouched | `Done` (adapter); `Ok(Handled::Duplicate)` | done: the job ran elsewhere |
//! | duplicate, original in progress | someone else's, untouched | `Failed` (adapter), after `store_retry_delay` | retried: dispatches if the original is blocked or fails, done once it completed |
//! | store unavailable (fail closed) | none taken | `Failed` (adapter), after `store_retry_delay` | retried until the store answers: nothing is lost |
//! | invalid key | none taken | `Killed` (adapter) | dead: it can never succeed |
//! | inner error | released (classifier) | `Failed` (lifecycle) | retried with apalis's backoff; the retry can claim again |
//! | claim lost, `LostClaimPolicy::Abort` only | someone else's | `Killed` (adapter) | dead: the run was aborted |
//!
//! A short-circuited task never reaches apalis's lifecycle service, so apalis does not count an
//! attempt for it (its attempt counter can only be incremented inside apalis-core): a task
//! failed closed keeps its attempt count, is due again at once, and is never moved to the dead
//! set for "too many attempts". `store_retry_delay` is what paces those retries while the store is
//! down.
//!
//! A job whose JSON does not decode into [`ReviewJob`] never reaches the layer: apalis-core's
//! backend reports a decoding error and the worker stops (`run` returns
//! `WorkerError::BackendError`); the task stays in the worker's in-flight set.
//!
//! apalis-redis has its own task idempotency key (`TaskBuilder::idempotency_key`): it refuses a
//! second *push* of the same key into the same queue. That does not cover a review that the
//! webhook router or another queue already dispatched; this layer does, for every process that
//! shares its Redis and namespace.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{BackendExt, BoxDynError, Data, ExecutionContext, Status, Task, WorkerBuilder, WorkerError};
use apalis_redis::{ConnectionManager, RedisStorage};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};
use tower_idempotency::store::IdempotencyStore;
use tower_idempotency::{DefaultClassifier, IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, Settle};

/// One review to dispatch: the apalis job's arguments, stored as JSON by apalis-redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewJob {
    pub project: String,
    pub pr: u64,
    pub sha: String,
    /// Who asked (a webhook delivery id, a hook name); not part of the key.
    pub trigger: String,
}

/// The key extractor: (project, PR, head SHA) from the job's arguments. An invalid triple is an
/// error, so the job is rejected instead of being dispatched without deduplication.
pub fn review_key(task: &Task<ReviewJob>) -> Result<Option<IdempotencyKey>, KeyError> {
    let job = &task.args;
    IdempotencyKey::for_pull_request(&job.project, job.pr, &job.sha).map(Some)
}

/// Where reviews are dispatched: `XADD <stream> * project … trigger …`.
#[derive(Clone)]
pub struct ReviewDispatcher {
    pub conn: ConnectionManager,
    pub stream: String,
}

/// The handler's answer: the dispatched review's stream entry id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatched {
    pub entry_id: String,
}

/// The apalis handler: dispatches one review. Runs only when the layer got the claim.
pub async fn dispatch_review(job: ReviewJob, dispatcher: Data<ReviewDispatcher>) -> Result<Dispatched, BoxDynError> {
    let mut conn = dispatcher.conn.clone();
    let fields = [
        ("project", job.project),
        ("pr", job.pr.to_string()),
        ("sha", job.sha),
        ("trigger", job.trigger),
    ];
    let entry_id: String = conn.xadd(&dispatcher.stream, "*", &fields).await?;
    tracing::info!(stream = %dispatcher.stream, entry_id, outcome = "dispatched", "review dispatched");
    Ok(Dispatched { entry_id })
}

/// What a task handled through [`ApalisOutcome`] answers; persisted by apalis as the task's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handled<R> {
    /// The handler ran.
    Ran(R),
    /// Someone else holds the claim on `key`; the handler did not run. Recorded as `Done`.
    Duplicate { key: String },
}

/// Converts `IdempotencyError<BoxDynError>` into apalis's `BoxDynError` and records the apalis
/// status of each short-circuit (see the table in the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ApalisOutcomeLayer {
    store_retry_delay: Duration,
}

impl ApalisOutcomeLayer {
    /// `store_retry_delay`: how long a task that failed closed (store unavailable) is held before
    /// it is reported `Failed` and rescheduled; bounds the retry rate while the store is down.
    pub fn new(store_retry_delay: Duration) -> Self {
        Self { store_retry_delay }
    }
}

impl<S> Layer<S> for ApalisOutcomeLayer {
    type Service = ApalisOutcome<S>;

    fn layer(&self, inner: S) -> ApalisOutcome<S> {
        ApalisOutcome {
            inner,
            store_retry_delay: self.store_retry_delay,
        }
    }
}

/// The service of [`ApalisOutcomeLayer`].
#[derive(Debug, Clone)]
pub struct ApalisOutcome<S> {
    inner: S,
    store_retry_delay: Duration,
}

impl<S, Args, R> Service<Task<Args>> for ApalisOutcome<S>
where
    S: Service<Task<Args>, Response = R, Error = IdempotencyError<BoxDynError>>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = Handled<R>;
    type Error = BoxDynError;
    type Future = Pin<Box<dyn Future<Output = Result<Handled<R>, BoxDynError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(into_box)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let ctx: Arc<ExecutionContext> = task.ctx().clone();
        let store_retry_delay = self.store_retry_delay;
        let call = self.inner.call(task);
        Box::pin(async move {
            let err = match call.await {
                Ok(response) => return Ok(Handled::Ran(response)),
                // The handler ran: apalis's lifecycle service has set the status already.
                Err(IdempotencyError::Inner(e)) => return Err(e),
                Err(err) => err,
            };
            let (status, outcome) = match &err {
                // The original still runs: retry later (it may yet be blocked and release).
                IdempotencyError::Duplicate { .. } if err.is_duplicate_in_progress() => {
                    tokio::time::sleep(store_retry_delay).await;
                    (Status::Failed, "duplicate_in_progress")
                }
                IdempotencyError::Duplicate { .. } => (Status::Done, "duplicate"),
                IdempotencyError::StoreUnavailable { .. } => {
                    tokio::time::sleep(store_retry_delay).await;
                    (Status::Failed, "store_unavailable")
                }
                IdempotencyError::InvalidKey { .. } => (Status::Killed, "invalid_key"),
                IdempotencyError::ClaimLost { .. } => (Status::Killed, "claim_lost"),
                // Blocked and the claim still stands (released in the background): retry later.
                IdempotencyError::ReleaseFailed { .. } => (Status::Failed, "release_failed"),
                _ => (Status::Failed, "short_circuit"),
            };
            tracing::info!(
                key = err.key().map(|k| k.as_str()),
                outcome,
                apalis_status = %status,
                error = %err,
                "short-circuited task"
            );
            ctx.raw_status().store(status);
            match err {
                IdempotencyError::Duplicate { .. } if err.is_duplicate_in_progress() => Err(into_box(err)),
                IdempotencyError::Duplicate { key, .. } => Ok(Handled::Duplicate { key: key.to_string() }),
                err => Err(into_box(err)),
            }
        })
    }
}

/// The layer's error as apalis's `BoxDynError`: `IdempotencyError<BoxDynError>` is an `Error`,
/// so it is boxed as it is (an inner error keeps its own text in `Display`).
fn into_box(err: IdempotencyError<BoxDynError>) -> BoxDynError {
    match err {
        IdempotencyError::Inner(e) => e,
        err => Box::new(err),
    }
}

/// How one review worker runs.
#[derive(Debug, Clone)]
pub struct ReviewWorkerOptions {
    /// The apalis worker name; unique per worker process (apalis-redis tracks tasks in flight per
    /// worker name).
    pub name: String,
    /// Prefix of the claim keys; share it with every process that dispatches the same reviews.
    pub namespace: String,
    /// How often the worker polls the queue when idle (apalis-redis otherwise only polls again on
    /// its heartbeat, 30 s by default).
    pub poll_interval: Duration,
    /// See [`ApalisOutcomeLayer::new`].
    pub store_retry_delay: Duration,
}

/// Runs one apalis worker over `storage` until `shutdown` completes: each job is claimed in
/// `store` under `namespace` before `dispatch_review` runs.
pub async fn run_review_worker<St, F>(
    options: ReviewWorkerOptions,
    storage: RedisStorage<ReviewJob>,
    store: St,
    dispatcher: ReviewDispatcher,
    shutdown: F,
) -> Result<(), WorkerError>
where
    St: IdempotencyStore,
    F: Future<Output = ()> + Send + 'static,
{
    let extractor: fn(&Task<ReviewJob>) -> Result<Option<IdempotencyKey>, KeyError> = review_key;
    let idempotency = IdempotencyLayer::new(store, extractor)
        .with_namespace(options.namespace)
        // A failed dispatch releases its claim, so apalis's retry of the task can claim again
        // (the default keeps it, and the retry would be a duplicate of itself).
        .with_classifier(DefaultClassifier::new().on_error(Settle::Release));
    WorkerBuilder::new(options.name)
        .backend(storage.poll_with_interval(options.poll_interval))
        .data(dispatcher)
        .layer(ApalisOutcomeLayer::new(options.store_retry_delay))
        .layer(idempotency)
        .build(dispatch_review)
        .run_until(async move {
            shutdown.await;
            Ok::<(), std::io::Error>(())
        })
        .await
}

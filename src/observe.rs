//! What the layer reports besides logs: outcome counts, store latency, hold time and pending
//! background work — to an [`Observer`] of your own, and (feature `metrics`) through the
//! [`metrics`](https://docs.rs/metrics) facade to whatever recorder the application installed
//! (Prometheus, OpenTelemetry, statsd, …).
//!
//! | metric (OpenTelemetry naming) | kind | unit | labels | what it counts |
//! |---|---|---|---|---|
//! | `idempotency.outcomes` | counter | `{outcome}` | `layer`, `outcome` | every decision and settlement, by [`Outcome`] |
//! | `idempotency.store.duration` | histogram | `s` | `layer`, `operation` (`claim`, `complete`, `release`, `renew`, `take_over`, `cleanup`), `result` (`ok`, `error`) | latency of each store round trip |
//! | `idempotency.hold.duration` | histogram | `s` | `layer` | how long a dispatched job held its claim (acquired → kept, released, lost or dropped) |
//! | `idempotency.background.pending` | gauge | `{claim}` | `layer` | claims the background owner is still removing or releasing |
//!
//! Labels are low-cardinality: the layer's name ([`with_name`](crate::IdempotencyLayer::with_name),
//! default `default`) and the outcome — never the key. A Prometheus exporter renders the names
//! with underscores (`idempotency_outcomes`, `idempotency_store_duration`, …).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Every outcome the layer counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The claim was acquired: dispatching.
    Claimed,
    /// Someone else holds the key and the original is still in progress: short-circuited.
    DuplicateInProgress,
    /// The key's original completed: short-circuited.
    DuplicateCompleted,
    /// A finished job's record was completed (kept for the retention).
    Completed,
    /// A finished job's record could not be completed; its claim stays in progress until its
    /// TTL.
    CompleteFailed,
    /// A human override took the key over.
    Override,
    /// A blocked job's claim was released.
    Released,
    /// A blocked job's claim could not be released (retried in the background).
    ReleaseFailed,
    /// The store could not answer: failed closed, nothing dispatched.
    FailedClosed,
    /// The store could not answer: failed open, dispatched anyway.
    FailedOpen,
    /// Shadow mode: would have been short-circuited (duplicate or store error); dispatched.
    ShadowWouldSkip,
    /// Renewal found the claim lost while the job ran.
    LeaseLost,
    /// Renewal stopped at the maximum hold.
    MaxHold,
}

impl Outcome {
    /// The label value, `snake_case`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Claimed => "claimed",
            Outcome::DuplicateInProgress => "duplicate_in_progress",
            Outcome::DuplicateCompleted => "duplicate_completed",
            Outcome::Completed => "completed",
            Outcome::CompleteFailed => "complete_failed",
            Outcome::Override => "override",
            Outcome::Released => "released",
            Outcome::ReleaseFailed => "release_failed",
            Outcome::FailedClosed => "failed_closed",
            Outcome::FailedOpen => "failed_open",
            Outcome::ShadowWouldSkip => "shadow_would_skip",
            Outcome::LeaseLost => "lease_lost",
            Outcome::MaxHold => "max_hold",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A hook for systems the `metrics` facade does not reach. Every method has a no-op default;
/// implement the ones you need. Called inline on the request path: keep them cheap.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
/// use tower_idempotency::observe::{Observer, Outcome};
///
/// #[derive(Default)]
/// struct Duplicates(AtomicU64);
///
/// impl Observer for Duplicates {
///     fn outcome(&self, _layer: &str, outcome: Outcome) {
///         if matches!(outcome, Outcome::DuplicateInProgress | Outcome::DuplicateCompleted) {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
///
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &String| -> Result<_, KeyError> {
///     IdempotencyKey::new(job).map(Some)
/// })
/// .with_name("review")
/// .with_observer(Duplicates::default());
/// # let _ = layer;
/// ```
pub trait Observer: Send + Sync + 'static {
    /// A decision or settlement of the layer named `layer`.
    fn outcome(&self, layer: &str, outcome: Outcome) {
        let _ = (layer, outcome);
    }

    /// One store round trip took `elapsed`; `ok` is whether the store answered.
    fn store_call(&self, layer: &str, operation: &'static str, elapsed: Duration, ok: bool) {
        let _ = (layer, operation, elapsed, ok);
    }

    /// A dispatched job held its claim for `held`.
    fn hold(&self, layer: &str, held: Duration) {
        let _ = (layer, held);
    }

    /// The background owner now looks after `pending` claims.
    fn background_pending(&self, layer: &str, pending: usize) {
        let _ = (layer, pending);
    }
}

/// An observer shared with the application (e.g. to read what it counted).
impl<O: Observer> Observer for Arc<O> {
    fn outcome(&self, layer: &str, outcome: Outcome) {
        (**self).outcome(layer, outcome);
    }

    fn store_call(&self, layer: &str, operation: &'static str, elapsed: Duration, ok: bool) {
        (**self).store_call(layer, operation, elapsed, ok);
    }

    fn hold(&self, layer: &str, held: Duration) {
        (**self).hold(layer, held);
    }

    fn background_pending(&self, layer: &str, pending: usize) {
        (**self).background_pending(layer, pending);
    }
}

/// Describes the metrics to the installed recorder (units and help text), for exporters that
/// show them. Call once after installing a recorder; optional.
///
/// ```
/// tower_idempotency::observe::describe_metrics();
/// ```
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    use metrics::Unit;
    metrics::describe_counter!(
        "idempotency.outcomes",
        "decisions and settlements of the idempotency layer, by outcome"
    );
    metrics::describe_histogram!(
        "idempotency.store.duration",
        Unit::Seconds,
        "latency of idempotency store round trips, by operation"
    );
    metrics::describe_histogram!(
        "idempotency.hold.duration",
        Unit::Seconds,
        "how long dispatched jobs held their claim"
    );
    metrics::describe_gauge!(
        "idempotency.background.pending",
        "claims the idempotency layer's background owner is still removing or releasing"
    );
}

/// Every outcome, in declaration order (indexes the cached counters).
#[cfg(feature = "metrics")]
const ALL_OUTCOMES: [Outcome; 13] = [
    Outcome::Claimed,
    Outcome::DuplicateInProgress,
    Outcome::DuplicateCompleted,
    Outcome::Completed,
    Outcome::CompleteFailed,
    Outcome::Override,
    Outcome::Released,
    Outcome::ReleaseFailed,
    Outcome::FailedClosed,
    Outcome::FailedOpen,
    Outcome::ShadowWouldSkip,
    Outcome::LeaseLost,
    Outcome::MaxHold,
];

/// The store operations timed.
#[cfg(feature = "metrics")]
const OPERATIONS: [&str; 6] = ["claim", "complete", "release", "renew", "take_over", "cleanup"];

/// Metric handles registered once per service (when the layer makes it), so the request path
/// only increments: install the recorder before the layer wraps its services.
#[cfg(feature = "metrics")]
struct Handles {
    outcomes: Vec<metrics::Counter>,
    /// `(operation, ok)` → histogram, in `OPERATIONS` × [ok, error] order.
    store: Vec<metrics::Histogram>,
    hold: metrics::Histogram,
    pending: metrics::Gauge,
}

#[cfg(feature = "metrics")]
impl Handles {
    fn register(layer: &Arc<str>) -> Self {
        let label = || metrics::SharedString::from_shared(layer.clone());
        Self {
            outcomes: ALL_OUTCOMES
                .iter()
                .map(|o| metrics::counter!("idempotency.outcomes", "layer" => label(), "outcome" => o.as_str()))
                .collect(),
            store: OPERATIONS
                .iter()
                .flat_map(|op| {
                    ["ok", "error"].map(|result| {
                        metrics::histogram!("idempotency.store.duration", "layer" => label(), "operation" => *op, "result" => result)
                    })
                })
                .collect(),
            hold: metrics::histogram!("idempotency.hold.duration", "layer" => label()),
            pending: metrics::gauge!("idempotency.background.pending", "layer" => label()),
        }
    }
}

/// The layer's observers and name, shared by its services, futures and background owner. With
/// the `metrics` feature it also reports through the `metrics` facade.
#[derive(Clone)]
pub(crate) struct Observers {
    pub(crate) layer: Arc<str>,
    list: Vec<Arc<dyn Observer>>,
    #[cfg(feature = "metrics")]
    handles: Option<Arc<Handles>>,
}

impl fmt::Debug for Observers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observers")
            .field("layer", &self.layer)
            .field("observers", &self.list.len())
            .finish()
    }
}

impl Default for Observers {
    fn default() -> Self {
        Self {
            layer: Arc::from("default"),
            list: Vec::new(),
            #[cfg(feature = "metrics")]
            handles: None,
        }
    }
}

impl Observers {
    pub(crate) fn push(&mut self, observer: Arc<dyn Observer>) {
        self.list.push(observer);
    }

    /// Registers the metric handles with the recorder installed now.
    pub(crate) fn bind(&mut self) {
        #[cfg(feature = "metrics")]
        {
            self.handles = Some(Arc::new(Handles::register(&self.layer)));
        }
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles
            && let Some(i) = ALL_OUTCOMES.iter().position(|o| *o == outcome)
        {
            h.outcomes[i].increment(1);
        }
        self.list.iter().for_each(|o| o.outcome(&self.layer, outcome));
    }

    pub(crate) fn store_call(&self, operation: &'static str, elapsed: Duration, ok: bool) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles
            && let Some(i) = OPERATIONS.iter().position(|op| *op == operation)
        {
            h.store[2 * i + usize::from(!ok)].record(elapsed.as_secs_f64());
        }
        self.list
            .iter()
            .for_each(|o| o.store_call(&self.layer, operation, elapsed, ok));
    }

    pub(crate) fn hold(&self, held: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles {
            h.hold.record(held.as_secs_f64());
        }
        self.list.iter().for_each(|o| o.hold(&self.layer, held));
    }

    pub(crate) fn background_pending(&self, pending: usize) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles {
            h.pending.set(pending as f64);
        }
        self.list
            .iter()
            .for_each(|o| o.background_pending(&self.layer, pending));
    }

    /// `fut`, timed as a store call named `operation`.
    pub(crate) fn timed<T: Send + 'static>(
        self: &Arc<Self>,
        operation: &'static str,
        fut: crate::store::BoxFuture<Result<T, crate::StoreError>>,
    ) -> crate::store::BoxFuture<Result<T, crate::StoreError>> {
        let observers = self.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let answer = fut.await;
            observers.store_call(operation, started.elapsed(), answer.is_ok());
            answer
        })
    }
}

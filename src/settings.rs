//! Settings shared by the core and HTTP layers: what they hold, their defaults, and the checks
//! that refuse bad values when a layer is built.

use std::sync::Arc;
use std::time::Duration;

use crate::observe::Observers;
use crate::protocol::Background;
use crate::protocol::Coalescer;
use crate::report::{DEFAULT_REPORT_INTERVAL, DEFAULT_SENTRY_TAG, Reporter};
use crate::store::{ErasedStore, IdempotencyStore};

/// Default lifetime of a claim.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// Default bound on how long renewal keeps a claim alive, in TTLs: 12 × the TTL (one hour with
/// the default TTL). See [`IdempotencyLayer::with_max_hold`](crate::IdempotencyLayer::with_max_hold).
pub const DEFAULT_MAX_HOLD_TTLS: u32 = 12;

/// What a store error (Redis down, timed out, refused) means for the call.
///
/// ```
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, StoreErrorPolicy};
///
/// // Availability over exactly-once: dispatch when the store cannot answer (logged at `warn`).
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &String| -> Result<_, KeyError> {
///     IdempotencyKey::new(job).map(Some)
/// })
/// .with_store_error_policy(StoreErrorPolicy::FailOpen);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreErrorPolicy {
    /// Treat the call as a duplicate: the inner service is not called. Skipping one dispatch is
    /// better than running it twice. The default.
    #[default]
    FailClosed,
    /// Dispatch anyway, logged at `warn`: availability over exactly-once. Concurrent callers of
    /// the same key that share one store answer (coalescing) dispatch once, not once each.
    FailOpen,
}

/// What to do when renewal finds that a running job's claim has been lost.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, LostClaimPolicy, MemoryStore};
///
/// // A job may run longer than the TTL: renew every third of it, and stop the job if the claim
/// // is lost anyway (someone else may be running it).
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &String| -> Result<_, KeyError> {
///     IdempotencyKey::new(job).map(Some)
/// })
/// .with_ttl(Duration::from_secs(30))
/// .with_renewal(Duration::from_secs(10))
/// .with_lost_claim_policy(LostClaimPolicy::Abort)
/// .build()
/// .expect("valid settings");
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LostClaimPolicy {
    /// Log and report, and let the job finish. The default.
    #[default]
    Continue,
    /// Log and report, drop the inner future and return
    /// [`IdempotencyError::ClaimLost`](crate::IdempotencyError::ClaimLost).
    Abort,
}

/// A layer setting that cannot work, refused by `build()` with what to change.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{ConfigError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
///
/// let err = IdempotencyLayer::new(MemoryStore::new(), |job: &String| -> Result<_, KeyError> {
///     IdempotencyKey::new(job).map(Some)
/// })
/// .with_ttl(Duration::ZERO)
/// .build()
/// .unwrap_err();
/// assert_eq!(err, ConfigError::ZeroTtl);
/// assert!(err.to_string().contains("with_ttl"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TTL is zero (or under a millisecond, which stores round to nothing).
    #[error(
        "ttl is zero: a claim that expires at once turns deduplication off; set `with_ttl` to how long duplicates are short-circuited (at least 1 ms; the default is 300 s)"
    )]
    ZeroTtl,
    /// The TTL is longer than the store can express.
    #[error("ttl {ttl:?} is longer than the store can express ({max:?}); set a shorter `with_ttl`")]
    TtlTooLong {
        /// The TTL asked for.
        ttl: Duration,
        /// The store's maximum.
        max: Duration,
    },
    /// The renewal interval is zero.
    #[error(
        "renewal interval is zero: it would renew in a busy loop; set `with_renewal` to about a third of the ttl ({suggested:?})"
    )]
    ZeroRenewal {
        /// A third of the TTL.
        suggested: Duration,
    },
    /// The renewal interval is not shorter than the TTL.
    #[error(
        "renewal every {every:?} is not shorter than the ttl {ttl:?}: the claim would expire between renewals; set `with_renewal` below the ttl, e.g. {suggested:?}"
    )]
    RenewalNotBelowTtl {
        /// The renewal interval asked for.
        every: Duration,
        /// The TTL.
        ttl: Duration,
        /// A third of the TTL.
        suggested: Duration,
    },
    /// The maximum hold is zero.
    #[error(
        "max hold is zero: renewal would stop at once; set `with_max_hold` to the longest a job may keep its key, or leave the default"
    )]
    ZeroMaxHold,
    /// The retention of completed records is zero or longer than the store can express.
    #[error(
        "retention {retention:?} is not between 1 ms and the store's maximum {max:?}: a completed record must be kept for a while for duplicates to see it; set `with_retention`"
    )]
    BadRetention {
        /// The retention asked for.
        retention: Duration,
        /// The store's maximum.
        max: Duration,
    },
}

/// Default largest outcome stored with a completed record: 64 KiB.
pub const DEFAULT_MAX_OUTCOME_SIZE: usize = 64 * 1024;

/// Everything a layer captures at construction, shared with every service it makes.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) store: Arc<dyn ErasedStore>,
    pub(crate) ttl: Duration,
    pub(crate) namespace: Arc<str>,
    pub(crate) store_error_policy: StoreErrorPolicy,
    pub(crate) shadow: bool,
    pub(crate) renewal: Option<Duration>,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) lost_claim: LostClaimPolicy,
    pub(crate) reporter: Arc<Reporter>,
    pub(crate) coalescer: Option<Arc<Coalescer>>,
    pub(crate) background: Arc<Background>,
    pub(crate) observers: Observers,
    /// Complete the record of a finished job (one more round trip), or leave its claim in
    /// progress until the TTL.
    pub(crate) records: bool,
    /// How long a completed record is kept; `None`: the TTL.
    pub(crate) retention: Option<Duration>,
    /// The largest outcome stored with a record.
    pub(crate) max_outcome_size: usize,
    /// How long a duplicate of an original in progress waits for it before answering.
    pub(crate) wait: Option<Duration>,
    /// Claims hand out fencing tokens.
    pub(crate) fencing: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("ttl", &self.ttl)
            .field("namespace", &self.namespace)
            .field("store_error_policy", &self.store_error_policy)
            .field("shadow", &self.shadow)
            .field("renewal", &self.renewal)
            .field("max_hold", &self.max_hold())
            .field("lost_claim", &self.lost_claim)
            .field("coalesce", &self.coalescer.is_some())
            .field("records", &self.records)
            .field("retention", &self.retention())
            .field("max_outcome_size", &self.max_outcome_size)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub(crate) fn new<St: IdempotencyStore>(store: St) -> Self {
        let store: Arc<dyn ErasedStore> = Arc::new(store);
        Self {
            background: Arc::new(Background::new(store.clone())),
            store,
            ttl: DEFAULT_TTL,
            namespace: Arc::from(""),
            store_error_policy: StoreErrorPolicy::FailClosed,
            shadow: false,
            renewal: None,
            max_hold: None,
            lost_claim: LostClaimPolicy::Continue,
            reporter: Arc::new(Reporter::new(DEFAULT_SENTRY_TAG.to_owned(), DEFAULT_REPORT_INTERVAL)),
            coalescer: None,
            observers: Observers::default(),
            records: true,
            retention: None,
            max_outcome_size: DEFAULT_MAX_OUTCOME_SIZE,
            wait: None,
            fencing: false,
        }
    }

    /// How long a completed record is kept: the configured retention, else the TTL.
    pub(crate) fn retention(&self) -> Duration {
        self.retention.unwrap_or(self.ttl)
    }

    /// The maximum hold in force: the configured one, else [`DEFAULT_MAX_HOLD_TTLS`] TTLs.
    pub(crate) fn max_hold(&self) -> Duration {
        self.max_hold
            .unwrap_or_else(|| self.ttl.saturating_mul(DEFAULT_MAX_HOLD_TTLS))
    }

    /// Refuses settings that cannot work.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl < Duration::from_millis(1) {
            return Err(ConfigError::ZeroTtl);
        }
        let max = self.store.max_ttl();
        if self.ttl > max {
            return Err(ConfigError::TtlTooLong { ttl: self.ttl, max });
        }
        let suggested = self.ttl / 3;
        if let Some(every) = self.renewal {
            if every.is_zero() {
                return Err(ConfigError::ZeroRenewal { suggested });
            }
            if every >= self.ttl {
                return Err(ConfigError::RenewalNotBelowTtl {
                    every,
                    ttl: self.ttl,
                    suggested,
                });
            }
        }
        if self.max_hold.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::ZeroMaxHold);
        }
        let retention = self.retention();
        if retention < Duration::from_millis(1) || retention > max {
            return Err(ConfigError::BadRetention { retention, max });
        }
        Ok(())
    }
}

/// The `with_*` methods every layer shares, written once: the core layer and the HTTP layer
/// each expand this inside their `impl` block, over their `settings` field.
macro_rules! settings_builders {
    () => {
        /// How long a claim lives (default 300 s). Duplicates are short-circuited for this long
        /// after a dispatch; a crashed job's claim expires after it. Zero, or longer than the
        /// store can express, is refused by `build()`.
        pub fn with_ttl(mut self, ttl: std::time::Duration) -> Self {
            self.settings.ttl = ttl;
            self
        }

        /// A prefix added to every key in the store, e.g. `"review-dispatch:"`.
        pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
            self.settings.namespace = std::sync::Arc::from(namespace.into().as_str());
            self
        }

        /// What a store error means: fail closed (default) or fail open.
        pub fn with_store_error_policy(mut self, policy: $crate::StoreErrorPolicy) -> Self {
            self.settings.store_error_policy = policy;
            self
        }

        /// Shadow mode: claims are taken as usual, but every call is dispatched; what would have
        /// been short-circuited (duplicates, fail-closed store errors) is logged at `info`/`warn`
        /// with `shadow = true`. For rolling the layer out safely.
        pub fn with_shadow_mode(mut self, shadow: bool) -> Self {
            self.settings.shadow = shadow;
            self
        }

        /// Renews a running job's claim every `every` (token-checked `PEXPIRE` to the full TTL),
        /// so a job longer than the TTL stays deduplicated. A third of the TTL is a good value;
        /// zero, or not shorter than the TTL, is refused by `build()`. Renewal stops after the
        /// maximum hold ([`with_max_hold`](Self::with_max_hold)).
        pub fn with_renewal(mut self, every: std::time::Duration) -> Self {
            self.settings.renewal = Some(every);
            self
        }

        /// The longest renewal keeps a claim alive (default 12 × the TTL): after `max_hold`,
        /// renewal stops (logged at `warn`) and the claim expires normally, at most one TTL
        /// later, so a hung job cannot keep its key forever. Zero is refused by `build()`.
        pub fn with_max_hold(mut self, max_hold: std::time::Duration) -> Self {
            self.settings.max_hold = Some(max_hold);
            self
        }

        /// What to do when renewal finds the claim lost (default: continue).
        pub fn with_lost_claim_policy(mut self, policy: $crate::LostClaimPolicy) -> Self {
            self.settings.lost_claim = policy;
            self
        }

        /// The Sentry tag set on store-error events (default `idempotency_store_down`); its
        /// value is the error kind unless set with
        /// [`with_sentry_tag_value`](Self::with_sentry_tag_value). The kind is always in the
        /// `idempotency_error_kind` tag too. Without the `sentry` feature nothing is sent.
        pub fn with_sentry_tag(mut self, tag: impl Into<String>) -> Self {
            let reporter = &self.settings.reporter;
            self.settings.reporter = std::sync::Arc::new($crate::report::Reporter::with_value(
                tag.into(),
                reporter.tag_value.clone(),
                reporter.interval,
            ));
            self
        }

        /// A fixed value for the Sentry tag, e.g. `with_sentry_tag("source")` and
        /// `with_sentry_tag_value("review_dedup_redis_down")` tag every store-error event
        /// `source=review_dedup_redis_down`, as the system this crate replaces did.
        pub fn with_sentry_tag_value(mut self, value: impl Into<String>) -> Self {
            let reporter = &self.settings.reporter;
            self.settings.reporter = std::sync::Arc::new($crate::report::Reporter::with_value(
                reporter.tag.clone(),
                Some(value.into()),
                reporter.interval,
            ));
            self
        }

        /// At most one Sentry event per store-error kind per `interval` (default 10 s); the next
        /// event counts the ones suppressed. `Duration::ZERO` reports every error.
        pub fn with_report_interval(mut self, interval: std::time::Duration) -> Self {
            let reporter = &self.settings.reporter;
            self.settings.reporter = std::sync::Arc::new($crate::report::Reporter::with_value(
                reporter.tag.clone(),
                reporter.tag_value.clone(),
                interval,
            ));
            self
        }

        /// Concurrent calls with the same key in this process share one store round trip: one
        /// claim is sent, whichever caller polls drives it, and at most one caller dispatches
        /// on its answer — never more than without coalescing, under every store-error policy.
        /// Saves Redis work under webhook bursts.
        pub fn with_coalescing(mut self, coalesce: bool) -> Self {
            self.settings.coalescer = coalesce.then(|| std::sync::Arc::new($crate::protocol::Coalescer::default()));
            self
        }

        /// The layer's name in metrics and observer calls (default `default`): a low-cardinality
        /// label such as `review-dispatch`, never a key.
        pub fn with_name(mut self, name: impl Into<String>) -> Self {
            self.settings.observers.layer = std::sync::Arc::from(name.into().as_str());
            self
        }

        /// Also reports outcomes, store latency, hold time and pending background work to
        /// `observer` (see [`observe`](crate::observe)); with the `metrics` feature they go to
        /// the `metrics` facade as well.
        pub fn with_observer(mut self, observer: impl $crate::observe::Observer) -> Self {
            self.settings.observers.push(std::sync::Arc::new(observer));
            self
        }

        /// Whether a finished job's record is **completed** (default `true`): one more store
        /// round trip after the job, so a later duplicate learns that the original finished
        /// (and its stored outcome) rather than that it is still in progress. With `false` the
        /// claim is left in progress until its TTL (one round trip per dispatch); duplicates
        /// then always report "in progress".
        pub fn with_records(mut self, records: bool) -> Self {
            self.settings.records = records;
            self
        }

        /// How long a completed record is kept (default: the TTL), separately from the lease
        /// of a job in progress (the TTL, renewed). Duplicates within it are answered
        /// "completed" (with the stored outcome). Zero, or longer than the store can express,
        /// is refused by `build()`.
        pub fn with_retention(mut self, retention: std::time::Duration) -> Self {
            self.settings.retention = Some(retention);
            self
        }

        /// The largest outcome stored with a completed record (default
        /// [`DEFAULT_MAX_OUTCOME_SIZE`](crate::DEFAULT_MAX_OUTCOME_SIZE), 64 KiB); a
        /// larger one is not stored — the record is completed without it (logged at `warn`).
        pub fn with_max_outcome_size(mut self, bytes: usize) -> Self {
            self.settings.max_outcome_size = bytes;
            self
        }

        /// A duplicate of an original **in progress** waits up to `wait` for it before it
        /// answers, claiming again every twentieth of `wait` (10 ms to 250 ms): across
        /// processes, since it asks the store. When the original completes within the wait,
        /// the duplicate answers "completed" (with its stored outcome); when it was released
        /// (blocked, failed), the duplicate claims the key and runs. Default: no wait.
        pub fn with_wait_for_original(mut self, wait: std::time::Duration) -> Self {
            self.settings.wait = Some(wait);
            self
        }

        /// Hands every claim a **fencing token** (default off): a number greater than every
        /// earlier holder's of the same key, kept in the record and given to the job through
        /// [`LeaseHandle::fencing_token`](crate::LeaseHandle::fencing_token), so downstream
        /// writes can reject a holder whose claim was lost. With `RedisStore` the token is the
        /// server's clock in microseconds (`TIME`, inside the claim script — a script instead
        /// of one `SET`, so claims cost more server time); it increases across holders as long
        /// as that clock does not step back (e.g. a failover to a server whose clock is
        /// behind).
        pub fn with_fencing(mut self, fencing: bool) -> Self {
            self.settings.fencing = fencing;
            self
        }

        /// The claim TTL.
        pub fn ttl(&self) -> std::time::Duration {
            self.settings.ttl
        }

        /// The key namespace.
        pub fn namespace(&self) -> &str {
            &self.settings.namespace
        }

        /// Background jobs still pending: removals of claims whose reply was lost or whose
        /// caller went away, and retried releases. Each has a deadline no later than its
        /// claim's expiry; the count is shared by every service this layer made.
        pub fn background_tasks(&self) -> usize {
            self.settings.background.pending()
        }
    };
}

pub(crate) use settings_builders;

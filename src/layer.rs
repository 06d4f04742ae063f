//! The layer: configuration captured once, applied to every wrapped service.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use crate::classify::DefaultClassifier;
use crate::report::{DEFAULT_REPORT_INTERVAL, DEFAULT_SENTRY_TAG, Reporter};
use crate::service::Idempotency;
use crate::store::{ErasedStore, IdempotencyStore};

/// Default lifetime of a claim.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

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
    /// Dispatch anyway, logged at `warn`: availability over exactly-once.
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
/// .with_lost_claim_policy(LostClaimPolicy::Abort);
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

/// Everything a service needs besides the inner service, shared by its clones.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn ErasedStore>,
    pub(crate) ttl: Duration,
    pub(crate) namespace: Arc<str>,
    pub(crate) store_error_policy: StoreErrorPolicy,
    pub(crate) shadow: bool,
    pub(crate) renewal: Option<Duration>,
    pub(crate) lost_claim: LostClaimPolicy,
    pub(crate) reporter: Arc<Reporter>,
    pub(crate) coalescer: Option<Arc<crate::coalesce::Coalescer>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("ttl", &self.ttl)
            .field("namespace", &self.namespace)
            .field("store_error_policy", &self.store_error_policy)
            .field("shadow", &self.shadow)
            .field("renewal", &self.renewal)
            .field("lost_claim", &self.lost_claim)
            .field("coalesce", &self.coalescer.is_some())
            .finish_non_exhaustive()
    }
}

/// Claims a key in a shared store before the inner service runs; short-circuits duplicates;
/// releases the claim when the outcome says the job was blocked.
///
/// Required parameters go in [`new`](Self::new); everything else has a default and a `with_*`
/// method: TTL 300 s, no namespace, fail closed, keep the claim on success and on error, no
/// shadow mode, no renewal.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tower_idempotency::{IdempotencyError, IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
///
/// #[derive(Clone)]
/// struct Job { project: String, pr: u64, sha: String }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = IdempotencyLayer::new(MemoryStore::new(), |job: &Job| -> Result<_, KeyError> {
///     IdempotencyKey::for_pull_request(&job.project, job.pr, &job.sha).map(Some)
/// })
/// .with_namespace("review:")
/// .with_ttl(std::time::Duration::from_secs(600));
///
/// let mut svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|_job: Job| async { Ok::<_, Infallible>("dispatched") });
///
/// let job = Job { project: "o/r".into(), pr: 1, sha: "abcdef1".into() };
/// let first = svc.ready().await.unwrap().call(job.clone()).await;
/// assert_eq!(first.unwrap(), "dispatched");
/// let second = svc.ready().await.unwrap().call(job).await;
/// assert!(matches!(second, Err(IdempotencyError::Duplicate { .. })));
/// # }
/// ```
pub struct IdempotencyLayer<X, C = DefaultClassifier> {
    config: Config,
    extractor: X,
    classifier: C,
}

impl<X: Clone, C: Clone> Clone for IdempotencyLayer<X, C> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            extractor: self.extractor.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<X, C: fmt::Debug> fmt::Debug for IdempotencyLayer<X, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.config)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl<X> IdempotencyLayer<X> {
    /// A layer that claims keys from `extractor` in `store`.
    pub fn new<St: IdempotencyStore>(store: St, extractor: X) -> Self {
        Self {
            config: Config {
                store: Arc::new(store),
                ttl: DEFAULT_TTL,
                namespace: Arc::from(""),
                store_error_policy: StoreErrorPolicy::FailClosed,
                shadow: false,
                renewal: None,
                lost_claim: LostClaimPolicy::Continue,
                reporter: Arc::new(Reporter::new(DEFAULT_SENTRY_TAG.to_owned(), DEFAULT_REPORT_INTERVAL)),
                coalescer: None,
            },
            extractor,
            classifier: DefaultClassifier::new(),
        }
    }
}

impl<X, C> IdempotencyLayer<X, C> {
    /// How long a claim lives (default 300 s). Duplicates are short-circuited for this long
    /// after a dispatch; a crashed job's claim expires after it.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// A prefix added to every key in the store, e.g. `"review-dispatch:"`.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.config.namespace = Arc::from(namespace.into().as_str());
        self
    }

    /// What a store error means: fail closed (default) or fail open.
    pub fn with_store_error_policy(mut self, policy: StoreErrorPolicy) -> Self {
        self.config.store_error_policy = policy;
        self
    }

    /// Shadow mode: claims are taken as usual, but every call is dispatched; what would have
    /// been short-circuited (duplicates, fail-closed store errors) is logged at `info`/`warn`
    /// with `shadow = true`. For rolling the layer out safely.
    pub fn with_shadow_mode(mut self, shadow: bool) -> Self {
        self.config.shadow = shadow;
        self
    }

    /// Renews a running job's claim every `every` (token-checked `PEXPIRE` to the full TTL), so
    /// a job longer than the TTL stays deduplicated. A third of the TTL is a good value.
    pub fn with_renewal(mut self, every: Duration) -> Self {
        self.config.renewal = Some(every);
        self
    }

    /// What to do when renewal finds the claim lost (default: continue).
    pub fn with_lost_claim_policy(mut self, policy: LostClaimPolicy) -> Self {
        self.config.lost_claim = policy;
        self
    }

    /// The Sentry tag set on store-error events (default `idempotency_store_down`); its value
    /// is the error kind. Without the `sentry` feature nothing is sent and this has no effect.
    pub fn with_sentry_tag(mut self, tag: impl Into<String>) -> Self {
        self.config.reporter = Arc::new(Reporter::new(tag.into(), self.config.reporter.interval));
        self
    }

    /// At most one Sentry event per store-error kind per `interval` (default 10 s); the next
    /// event counts the ones suppressed. `Duration::ZERO` reports every error.
    pub fn with_report_interval(mut self, interval: Duration) -> Self {
        self.config.reporter = Arc::new(Reporter::new(self.config.reporter.tag.clone(), interval));
        self
    }

    /// Concurrent calls with the same key in this process share one store round trip: the
    /// first claims, the others wait for its answer and are duplicates (or fail with its store
    /// error). Saves Redis work under webhook bursts; never lets two callers dispatch.
    pub fn with_coalescing(mut self, coalesce: bool) -> Self {
        self.config.coalescer = coalesce.then(|| Arc::new(crate::coalesce::Coalescer::default()));
        self
    }

    /// Replaces the outcome classifier, which decides keep or release after the inner service
    /// answers.
    pub fn with_classifier<C2>(self, classifier: C2) -> IdempotencyLayer<X, C2> {
        IdempotencyLayer {
            config: self.config,
            extractor: self.extractor,
            classifier,
        }
    }

    /// Replaces the key extractor.
    pub fn with_extractor<X2>(self, extractor: X2) -> IdempotencyLayer<X2, C> {
        IdempotencyLayer {
            config: self.config,
            extractor,
            classifier: self.classifier,
        }
    }

    /// The claim TTL.
    pub fn ttl(&self) -> Duration {
        self.config.ttl
    }

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }
}

impl<S, X: Clone, C: Clone> Layer<S> for IdempotencyLayer<X, C> {
    type Service = Idempotency<S, X, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_parts(
            inner,
            Arc::new(self.config.clone()),
            self.extractor.clone(),
            self.classifier.clone(),
        )
    }
}

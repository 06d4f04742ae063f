//! The layer: configuration captured once, applied to every wrapped service.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::error::LimitConfigError;
use super::permit::Shared;
use super::service::ConcurrencyLimit;
use super::store::{ErasedLimitStore, LimitStore};
use crate::StoreErrorPolicy;

/// Default lease of a holder: 30 s. A holder that dies frees its slot at most this long after
/// its last renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How many concurrent holders a request's key may have: a fixed number, or chosen per request.
///
/// Implemented by `usize` (a fixed limit) and by closures `Fn(&Req) -> usize`:
///
/// ```
/// use tower_idempotency::limit::ChooseLimit;
///
/// struct Run { agent: &'static str }
/// let per_agent = |run: &Run| if run.agent == "review" { 2 } else { 5 };
/// assert_eq!(per_agent.limit(&Run { agent: "review" }), 2);
/// assert_eq!(ChooseLimit::<Run>::limit(&3usize, &Run { agent: "fix" }), 3);
/// ```
pub trait ChooseLimit<Req> {
    /// The limit for `req`'s key. Zero refuses the call with
    /// [`LimitError::Misconfigured`](super::LimitError::Misconfigured).
    fn limit(&self, req: &Req) -> usize;
}

impl<Req> ChooseLimit<Req> for usize {
    fn limit(&self, _req: &Req) -> usize {
        *self
    }
}

impl<Req, F> ChooseLimit<Req> for F
where
    F: Fn(&Req) -> usize,
{
    fn limit(&self, req: &Req) -> usize {
        self(req)
    }
}

/// What to do when a running call's lease is lost (renewal found it expired or gone, or could
/// not reach the store before it ran out): its slot may now be someone else's, so more than
/// `limit` calls may run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostLeasePolicy {
    /// Drop the inner future and return [`LimitError::LeaseLost`](super::LimitError::LeaseLost):
    /// the limit holds. The default.
    #[default]
    Abort,
    /// Log it and let the call finish: the limit may be exceeded until it does.
    Continue,
}

#[derive(Clone)]
pub(crate) struct LimitSettings {
    pub(crate) store: Arc<dyn ErasedLimitStore>,
    pub(crate) namespace: Arc<str>,
    pub(crate) lease: Duration,
    /// `None`: a third of the lease. `Some(None)`: no renewal.
    pub(crate) renewal: Option<Option<Duration>>,
    pub(crate) store_error_policy: StoreErrorPolicy,
    pub(crate) lost_lease: LostLeasePolicy,
    pub(crate) name: Arc<str>,
}

impl fmt::Debug for LimitSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitSettings")
            .field("namespace", &self.namespace)
            .field("lease", &self.lease)
            .field("renewal", &self.renewal_every())
            .field("store_error_policy", &self.store_error_policy)
            .field("lost_lease", &self.lost_lease)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl LimitSettings {
    pub(crate) fn renewal_every(&self) -> Option<Duration> {
        match self.renewal {
            None => Some(self.lease / 3).filter(|d| !d.is_zero()),
            Some(every) => every,
        }
    }

    pub(crate) fn validate(&self, fixed_limit: Option<usize>) -> Result<(), LimitConfigError> {
        if fixed_limit == Some(0) {
            return Err(LimitConfigError::ZeroLimit);
        }
        if self.lease < Duration::from_millis(1) {
            return Err(LimitConfigError::ZeroLease);
        }
        let max = self.store.max_lease();
        if self.lease > max {
            return Err(LimitConfigError::LeaseTooLong { lease: self.lease, max });
        }
        let suggested = self.lease / 3;
        if let Some(Some(every)) = self.renewal {
            if every.is_zero() {
                return Err(LimitConfigError::ZeroRenewal { suggested });
            }
            if every >= self.lease {
                return Err(LimitConfigError::RenewalNotBelowLease {
                    every,
                    lease: self.lease,
                    suggested,
                });
            }
        }
        Ok(())
    }
}

/// At most N concurrent calls per key, **across processes**: each call acquires one of the key's
/// N slots in a shared store before the inner service runs, renews its lease while it runs, and
/// releases it (owner-checked) when it is done. A call over the limit is short-circuited with
/// [`LimitError::AtCapacity`](super::LimitError::AtCapacity); the inner service is not called.
///
/// Required parameters go in [`new`](Self::new) (the store and the key extractor); everything
/// else has a default and a `with_*` method: limit 1 (a distributed lock), lease
/// [`DEFAULT_LEASE`], renewal every third of the lease, no namespace, fail closed on store
/// errors, abort a call whose lease is lost. [`build`](Self::build) refuses settings that cannot
/// work; a layer used without it answers every call with
/// [`LimitError::Misconfigured`](super::LimitError::Misconfigured) instead.
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::limit::{ConcurrencyLimitLayer, LimitError, MemoryLimitStore};
///
/// struct AgentRun { project: String, work_item: u64, agent: String }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // In production: `RedisStore::connect("redis://127.0.0.1:6379").await?`.
/// let layer = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |run: &AgentRun| {
///     IdempotencyKey::new(format!("{}:{}:{}", run.project, run.work_item, run.agent)).map(Some)
/// })
/// .with_limit(2)
/// .with_lease(Duration::from_secs(60))
/// .with_namespace("agent-runs:")
/// .build()
/// .expect("valid settings");
///
/// let mut svc = ServiceBuilder::new()
///     .layer(layer)
///     .service_fn(|run: AgentRun| async move { Ok::<_, Infallible>(format!("ran {}", run.agent)) });
///
/// let run = AgentRun { project: "project-1".into(), work_item: 42, agent: "review".into() };
/// assert_eq!(svc.ready().await.unwrap().call(run).await.unwrap(), "ran review");
/// # }
/// ```
pub struct ConcurrencyLimitLayer<X, L = usize> {
    pub(crate) settings: LimitSettings,
    extractor: X,
    limit: L,
    /// The limit when it is fixed (checked by `build`).
    fixed_limit: Option<usize>,
}

impl<X: Clone, L: Clone> Clone for ConcurrencyLimitLayer<X, L> {
    fn clone(&self) -> Self {
        Self {
            settings: self.settings.clone(),
            extractor: self.extractor.clone(),
            limit: self.limit.clone(),
            fixed_limit: self.fixed_limit,
        }
    }
}

impl<X, L> fmt::Debug for ConcurrencyLimitLayer<X, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("settings", &self.settings)
            .field(
                "limit",
                &self.fixed_limit.map_or("per request".to_owned(), |n| n.to_string()),
            )
            .finish_non_exhaustive()
    }
}

impl<X> ConcurrencyLimitLayer<X> {
    /// A layer that limits the keys from `extractor` (the crate's
    /// [`KeyExtractor`](crate::KeyExtractor): `Ok(None)` passes a request through unlimited)
    /// with holders kept in `store`. The limit is 1 until [`with_limit`](Self::with_limit).
    pub fn new<St: LimitStore>(store: St, extractor: X) -> Self {
        Self {
            settings: LimitSettings {
                store: Arc::new(store),
                namespace: Arc::from(""),
                lease: DEFAULT_LEASE,
                renewal: None,
                store_error_policy: StoreErrorPolicy::FailClosed,
                lost_lease: LostLeasePolicy::Abort,
                name: Arc::from("default"),
            },
            extractor,
            limit: 1,
            fixed_limit: Some(1),
        }
    }
}

impl<X, L> ConcurrencyLimitLayer<X, L> {
    /// At most `limit` concurrent holders per key. Zero is refused by `build()`.
    pub fn with_limit(self, limit: usize) -> ConcurrencyLimitLayer<X, usize> {
        ConcurrencyLimitLayer {
            settings: self.settings,
            extractor: self.extractor,
            limit,
            fixed_limit: Some(limit),
        }
    }

    /// The limit chosen per request by `choose` (see [`ChooseLimit`]), e.g. by agent type. All
    /// callers of one key should agree on its limit: a call is let in when fewer holders than
    /// **its own** limit hold the key.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    /// use tower_idempotency::limit::{ConcurrencyLimitLayer, MemoryLimitStore};
    ///
    /// struct Run { key: String, agent: &'static str }
    ///
    /// let layer = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |r: &Run| IdempotencyKey::new(&r.key).map(Some))
    ///     .with_limit_per_request(|r: &Run| if r.agent == "review" { 2 } else { 4 })
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    pub fn with_limit_per_request<L2>(self, choose: L2) -> ConcurrencyLimitLayer<X, L2> {
        ConcurrencyLimitLayer {
            settings: self.settings,
            extractor: self.extractor,
            limit: choose,
            fixed_limit: None,
        }
    }

    /// How long a holder's slot lives without renewal (default [`DEFAULT_LEASE`]): a holder
    /// that dies (`kill -9`, a lost network) frees its slot at most this long after its last
    /// renewal. Measured by the store's clock. Zero, or longer than the store can express, is
    /// refused by `build()`.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease;
        self
    }

    /// Renews a running call's lease every `every` (default: a third of the lease), so calls
    /// longer than the lease keep their slot. Zero, or not shorter than the lease, is refused by
    /// `build()`.
    pub fn with_renewal(mut self, every: Duration) -> Self {
        self.settings.renewal = Some(Some(every));
        self
    }

    /// No renewal: a call longer than the lease loses its slot when the lease runs out, and is
    /// aborted (or let finish: see [`with_lost_lease_policy`](Self::with_lost_lease_policy)).
    /// For calls known to be shorter than the lease; saves the renewal round trips.
    pub fn without_renewal(mut self) -> Self {
        self.settings.renewal = Some(None);
        self
    }

    /// A prefix added to every key in the store, e.g. `"agent-runs:"`.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.settings.namespace = Arc::from(namespace.into().as_str());
        self
    }

    /// What a store error on acquire means: fail closed (default: the call is refused with
    /// [`LimitError::StoreUnavailable`](super::LimitError::StoreUnavailable)) or fail open (the
    /// call runs without a slot, logged at `warn`).
    pub fn with_store_error_policy(mut self, policy: StoreErrorPolicy) -> Self {
        self.settings.store_error_policy = policy;
        self
    }

    /// What to do when a running call's lease is lost (default [`LostLeasePolicy::Abort`]).
    pub fn with_lost_lease_policy(mut self, policy: LostLeasePolicy) -> Self {
        self.settings.lost_lease = policy;
        self
    }

    /// The layer's name in metrics (default `default`): a low-cardinality label, never a key.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = Arc::from(name.into().as_str());
        self
    }

    /// Replaces the key extractor.
    pub fn with_extractor<X2>(self, extractor: X2) -> ConcurrencyLimitLayer<X2, L> {
        ConcurrencyLimitLayer {
            settings: self.settings,
            extractor,
            limit: self.limit,
            fixed_limit: self.fixed_limit,
        }
    }

    /// The lease.
    pub fn lease(&self) -> Duration {
        self.settings.lease
    }

    /// The renewal interval, if renewal is on.
    pub fn renewal(&self) -> Option<Duration> {
        self.settings.renewal_every()
    }

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    /// Checks the settings: a limit of 0, a zero lease or one beyond what the store can express,
    /// and a renewal interval of zero or not shorter than the lease are refused, with a message
    /// that says what to change.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::IdempotencyKey;
    /// use tower_idempotency::limit::{ConcurrencyLimitLayer, LimitConfigError, MemoryLimitStore};
    ///
    /// let layer = || ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |k: &String| IdempotencyKey::new(k).map(Some));
    /// assert!(layer().with_lease(Duration::from_secs(30)).with_renewal(Duration::from_secs(10)).build().is_ok());
    /// let err = layer().with_lease(Duration::from_secs(30)).with_renewal(Duration::from_secs(30)).build().unwrap_err();
    /// assert!(matches!(err, LimitConfigError::RenewalNotBelowLease { .. }));
    /// assert_eq!(layer().with_lease(Duration::ZERO).build().unwrap_err(), LimitConfigError::ZeroLease);
    /// ```
    pub fn build(self) -> Result<Self, LimitConfigError> {
        self.settings.validate(self.fixed_limit)?;
        Ok(self)
    }
}

impl<S, X: Clone, L: Clone> Layer<S> for ConcurrencyLimitLayer<X, L> {
    type Service = ConcurrencyLimit<S, X, L>;

    fn layer(&self, inner: S) -> Self::Service {
        let invalid = self.settings.validate(self.fixed_limit).err();
        if let Some(error) = &invalid {
            tracing::error!(error = %error, "concurrency limit has invalid settings; every call will be refused (call `build()` to catch this at startup)");
        }
        ConcurrencyLimit::from_parts(
            inner,
            Shared::new(self.settings.clone(), invalid),
            self.extractor.clone(),
            self.limit.clone(),
        )
    }
}

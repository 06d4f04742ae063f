//! A holder's life: acquire → (renew while the call runs)* → release, and what happens on every
//! path in between — a lost reply, a dropped caller, a failed release. The response future only
//! moves between these states.
//!
//! Whatever a caller leaves unfinished is handed to a small background task of its own, bounded
//! in number ([`MAX_PENDING`]) and in time (the holder's lease, after which the store drops the
//! holder by itself anyway).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::error::LimitConfigError;
use super::layer::{LimitSettings, LostLeasePolicy};
use super::store::Acquire;
use crate::IdempotencyKey;
use crate::error::Chain;
use crate::store::{BoxFuture, ClaimToken};
use crate::{StoreError, StoreErrorPolicy};

/// At most this many background releases and cleanups per layer; beyond it a holder is left to
/// its lease (logged at `warn`).
pub(crate) const MAX_PENDING: usize = 10_000;
/// How long a possibly landed acquire is watched for after the store first answers "not a
/// holder": a command still buffered on the connection can land after that answer.
const PHANTOM_WATCH: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// What the layer counts and logs, as `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitOutcome {
    Granted,
    AtCapacity,
    Released,
    ReleaseFailed,
    LeaseLost,
    StoreUnavailable,
    FailedOpen,
}

impl LimitOutcome {
    #[cfg(feature = "metrics")]
    const ALL: [LimitOutcome; 7] = [
        LimitOutcome::Granted,
        LimitOutcome::AtCapacity,
        LimitOutcome::Released,
        LimitOutcome::ReleaseFailed,
        LimitOutcome::LeaseLost,
        LimitOutcome::StoreUnavailable,
        LimitOutcome::FailedOpen,
    ];

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitOutcome::Granted => "granted",
            LimitOutcome::AtCapacity => "at_capacity",
            LimitOutcome::Released => "released",
            LimitOutcome::ReleaseFailed => "release_failed",
            LimitOutcome::LeaseLost => "lease_lost",
            LimitOutcome::StoreUnavailable => "store_unavailable",
            LimitOutcome::FailedOpen => "failed_open",
        }
    }
}

/// One layer's settings, validated, shared by its services and futures.
pub(crate) struct Shared {
    pub(crate) settings: LimitSettings,
    pub(crate) invalid: Option<LimitConfigError>,
    renewal: Option<Duration>,
    pending: AtomicUsize,
    #[cfg(feature = "metrics")]
    outcomes: Vec<metrics::Counter>,
}

impl Shared {
    pub(crate) fn new(settings: LimitSettings, invalid: Option<LimitConfigError>) -> Arc<Self> {
        #[cfg(feature = "metrics")]
        let outcomes = LimitOutcome::ALL
            .iter()
            .map(|o| {
                metrics::counter!(
                    "idempotency.limit.outcomes",
                    "layer" => metrics::SharedString::from_shared(settings.name.clone()),
                    "outcome" => o.as_str()
                )
            })
            .collect();
        Arc::new(Self {
            renewal: settings.renewal_every(),
            settings,
            invalid,
            pending: AtomicUsize::new(0),
            #[cfg(feature = "metrics")]
            outcomes,
        })
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn count(&self, outcome: LimitOutcome) {
        #[cfg(feature = "metrics")]
        if let Some(i) = LimitOutcome::ALL.iter().position(|o| *o == outcome)
            && let Some(counter) = self.outcomes.get(i)
        {
            counter.increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }

    fn full_key(&self, key: &IdempotencyKey) -> Arc<str> {
        if self.settings.namespace.is_empty() {
            key.shared()
        } else {
            Arc::from(format!("{}{}", self.settings.namespace, key).as_str())
        }
    }

    /// Runs `work` in the background if a Tokio runtime is there and fewer than
    /// [`MAX_PENDING`] jobs are; otherwise the holder is left to its lease.
    fn spawn_bounded<F>(self: &Arc<Self>, key: &str, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %key, outcome = "left_to_expire", "no Tokio runtime for the release; the holder expires after its lease");
            return;
        };
        if self.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(key = %key, outcome = "left_to_expire", "too many background releases pending; the holder expires after its lease");
            return;
        }
        let shared = self.clone();
        runtime.spawn(async move {
            work.await;
            shared.pending.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Owner-checked release of `holder` on `key`, retried until it is answered or `deadline`
    /// (after which the store has dropped the holder anyway).
    fn release_in_background(self: &Arc<Self>, key: Arc<str>, holder: ClaimToken, deadline: Instant) {
        let store = self.settings.store.clone();
        let shown = key.clone();
        self.spawn_bounded(&shown, async move {
            let mut delay = FIRST_RETRY;
            loop {
                match store.clone().release(key.clone(), holder.clone()).await {
                    Ok(_) => return,
                    Err(e) if Instant::now() + delay < deadline => {
                        tracing::debug!(key = %key, error = %Chain(&e), "background release failed; retrying");
                    }
                    Err(e) => {
                        tracing::warn!(key = %key, error = %Chain(&e), outcome = "left_to_expire", "could not release; the holder expires after its lease");
                        return;
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY);
            }
        });
    }

    /// Removes a holder whose acquire may have landed without our knowing (a lost reply, a
    /// dropped caller): owner-checked, and watched for a while in case the acquire lands late.
    fn clean_up_in_background(self: &Arc<Self>, key: Arc<str>, holder: ClaimToken, deadline: Instant) {
        let store = self.settings.store.clone();
        let shown = key.clone();
        self.spawn_bounded(&shown, async move { clean_up(store, key, holder, deadline).await });
    }

    /// The same, after the acquire still in flight answers.
    fn clean_up_after(
        self: &Arc<Self>,
        acquiring: BoxFuture<Result<Acquire, StoreError>>,
        key: Arc<str>,
        holder: ClaimToken,
    ) {
        let store = self.settings.store.clone();
        let lease = self.settings.lease;
        let shown = key.clone();
        self.spawn_bounded(&shown, async move {
            let answer = acquiring.await;
            let deadline = Instant::now() + lease;
            match answer {
                Ok(Acquire::AtCapacity { .. }) => {}
                Err(e) if !may_have_applied(&e) => {}
                Ok(Acquire::Granted) | Err(_) => clean_up(store, key, holder, deadline).await,
            }
        });
    }
}

/// Whether a failed acquire may have landed: the store's own judgement, plus a connection that
/// dropped with the command in flight (the command may have reached the server first).
fn may_have_applied(error: &StoreError) -> bool {
    #[cfg(feature = "redis")]
    if let StoreError::Redis { source, .. } = error
        && source.is_connection_dropped()
    {
        return true;
    }
    error.may_have_applied()
}

async fn clean_up(
    store: Arc<dyn super::store::ErasedLimitStore>,
    key: Arc<str>,
    holder: ClaimToken,
    deadline: Instant,
) {
    let mut delay = FIRST_RETRY;
    let mut first_absent: Option<Instant> = None;
    loop {
        match store.clone().release(key.clone(), holder.clone()).await {
            Ok(true) => {
                tracing::info!(key = %key, outcome = "released", "removed a holder whose acquire was not answered");
                return;
            }
            Ok(false) => {
                let since = *first_absent.get_or_insert_with(Instant::now);
                if since.elapsed() >= PHANTOM_WATCH {
                    return;
                }
            }
            Err(e) => tracing::debug!(key = %key, error = %Chain(&e), "cleanup release failed; retrying"),
        }
        if Instant::now() + delay >= deadline {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

/// What an acquire decided.
pub(crate) enum Decision {
    /// Run the call; with a permit, unless the store failed and the layer fails open.
    Run(Option<Permit>),
    AtCapacity {
        retry_after: Duration,
    },
    Unavailable(StoreError),
}

/// An acquire in flight.
pub(crate) struct Acquiring {
    shared: Arc<Shared>,
    key: IdempotencyKey,
    full_key: Arc<str>,
    holder: ClaimToken,
    limit: usize,
    sent_at: Instant,
    fut: Option<BoxFuture<Result<Acquire, StoreError>>>,
}

impl Acquiring {
    pub(crate) fn start(shared: &Arc<Shared>, key: IdempotencyKey, limit: usize) -> Self {
        let full_key = shared.full_key(&key);
        let holder = ClaimToken::generate();
        let fut = shared
            .settings
            .store
            .clone()
            .acquire(full_key.clone(), holder.clone(), limit, shared.settings.lease);
        Self {
            shared: shared.clone(),
            key,
            full_key,
            holder,
            limit,
            sent_at: Instant::now(),
            fut: Some(fut),
        }
    }

    pub(crate) fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn poll_decision(&mut self, cx: &mut Context<'_>) -> Poll<Decision> {
        let Some(fut) = self.fut.as_mut() else {
            crate::future::polled_after_completion()
        };
        let answer = ready!(fut.as_mut().poll(cx));
        self.fut = None;
        let shared = &self.shared;
        let key = &self.key;
        Poll::Ready(match answer {
            Ok(Acquire::Granted) => {
                shared.count(LimitOutcome::Granted);
                tracing::debug!(key = %key, outcome = "granted", limit = self.limit, "slot acquired");
                Decision::Run(Some(Permit::new(self)))
            }
            Ok(Acquire::AtCapacity { retry_after }) => {
                shared.count(LimitOutcome::AtCapacity);
                tracing::info!(key = %key, outcome = "at_capacity", limit = self.limit, retry_after_ms = retry_after.as_millis() as u64, "at capacity; not run");
                Decision::AtCapacity { retry_after }
            }
            Err(error) => {
                if may_have_applied(&error) {
                    // The holder may exist: bounded by its lease, and removed sooner when the
                    // store answers again.
                    shared.clean_up_in_background(
                        self.full_key.clone(),
                        self.holder.clone(),
                        Instant::now() + shared.settings.lease,
                    );
                }
                match shared.settings.store_error_policy {
                    StoreErrorPolicy::FailClosed => {
                        shared.count(LimitOutcome::StoreUnavailable);
                        tracing::error!(key = %key, outcome = "store_unavailable", error = %Chain(&error), "limit store unavailable; failed closed, not run");
                        Decision::Unavailable(error)
                    }
                    StoreErrorPolicy::FailOpen => {
                        shared.count(LimitOutcome::FailedOpen);
                        tracing::warn!(key = %key, outcome = "failed_open", error = %Chain(&error), "limit store unavailable; failing open, running without a slot");
                        Decision::Run(None)
                    }
                }
            }
        })
    }
}

impl Drop for Acquiring {
    fn drop(&mut self) {
        if let Some(fut) = self.fut.take() {
            // Dropped with the acquire in flight: it may land; release it once it answers.
            self.shared
                .clean_up_after(fut, self.full_key.clone(), self.holder.clone());
        }
    }
}

/// A held slot. Dropped without being released (the caller went away, the release failed), it
/// is released in the background.
pub(crate) struct Permit {
    shared: Arc<Shared>,
    key: IdempotencyKey,
    full_key: Arc<str>,
    holder: ClaimToken,
    /// Fires when the lease runs out without a confirmed renewal: the send time of the last
    /// acquire or renewal the store confirmed, plus the lease — never later than the store's
    /// own expiry, which counted from when the command ran.
    deadline: Pin<Box<Sleep>>,
    renewal: Option<Renewal>,
    /// The lease was lost (and the policy let the call go on).
    lost: bool,
    released: bool,
}

struct Renewal {
    every: Duration,
    next: Pin<Box<Sleep>>,
    in_flight: Option<(BoxFuture<Result<bool, StoreError>>, Instant)>,
}

impl Permit {
    fn new(acquiring: &Acquiring) -> Self {
        let shared = acquiring.shared.clone();
        let renewal = shared.renewal.map(|every| Renewal {
            every,
            next: Box::pin(tokio::time::sleep_until(acquiring.sent_at + every)),
            in_flight: None,
        });
        Self {
            deadline: Box::pin(tokio::time::sleep_until(acquiring.sent_at + shared.settings.lease)),
            shared,
            key: acquiring.key.clone(),
            full_key: acquiring.full_key.clone(),
            holder: acquiring.holder.clone(),
            renewal,
            lost: false,
            released: false,
        }
    }

    pub(crate) fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// Drives renewal and watches the lease; ready when the lease is lost and the policy says
    /// to abort.
    pub(crate) fn poll_abort(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.lost {
            return Poll::Pending;
        }
        let lease = self.shared.settings.lease;
        let lost = loop {
            if let Some(renewal) = self.renewal.as_mut()
                && let Some((fut, sent_at)) = renewal.in_flight.as_mut()
            {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(true)) => {
                        let (expires, next) = (*sent_at + lease, *sent_at + renewal.every);
                        self.deadline.as_mut().reset(expires);
                        renewal.next.as_mut().reset(next);
                        renewal.in_flight = None;
                    }
                    Poll::Ready(Ok(false)) => break "the store no longer lists this holder (its lease expired)",
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(key = %self.key, error = %Chain(&e), "lease renewal failed; retrying until the lease runs out");
                        renewal.in_flight = None;
                        let retry = Instant::now() + (renewal.every / 4).max(Duration::from_millis(1));
                        renewal.next.as_mut().reset(retry);
                    }
                    Poll::Pending => {}
                }
            }
            if self.deadline.as_mut().poll(cx).is_ready() {
                break if self.renewal.is_some() {
                    "the lease ran out before a renewal was confirmed"
                } else {
                    "the lease ran out (renewal is off)"
                };
            }
            if let Some(renewal) = self.renewal.as_mut()
                && renewal.in_flight.is_none()
                && renewal.next.as_mut().poll(cx).is_ready()
            {
                let fut = self
                    .shared
                    .settings
                    .store
                    .clone()
                    .renew(self.full_key.clone(), self.holder.clone(), lease);
                renewal.in_flight = Some((fut, Instant::now()));
                continue;
            }
            return Poll::Pending;
        };
        // Lost: stop renewing either way.
        self.lost = true;
        self.renewal = None;
        self.shared.count(LimitOutcome::LeaseLost);
        match self.shared.settings.lost_lease {
            LostLeasePolicy::Abort => {
                tracing::warn!(key = %self.key, outcome = "lease_lost", why = lost, "lease lost while the call ran; aborting the call");
                Poll::Ready(())
            }
            LostLeasePolicy::Continue => {
                tracing::warn!(key = %self.key, outcome = "lease_lost", why = lost, "lease lost while the call ran; letting it finish (the limit may be exceeded)");
                Poll::Pending
            }
        }
    }

    /// The call is over: release the slot.
    pub(crate) fn release(self) -> Releasing {
        let fut = self
            .shared
            .settings
            .store
            .clone()
            .release(self.full_key.clone(), self.holder.clone());
        Releasing { permit: self, fut }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.released {
            // An upper bound of the lease's expiry: the last renewal landed before now.
            let deadline = Instant::now() + self.shared.settings.lease;
            self.shared
                .release_in_background(self.full_key.clone(), self.holder.clone(), deadline);
        }
    }
}

/// A release in flight. Dropped before it answers, or answered with an error, the permit's own
/// drop hands the release to the background.
pub(crate) struct Releasing {
    permit: Permit,
    fut: BoxFuture<Result<bool, StoreError>>,
}

impl Releasing {
    pub(crate) fn poll_released(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let answer = ready!(self.fut.as_mut().poll(cx));
        let key = &self.permit.key;
        match answer {
            Ok(was_held) => {
                self.permit.released = true;
                self.permit.shared.count(LimitOutcome::Released);
                tracing::debug!(key = %key, outcome = "released", was_held, "slot released");
            }
            Err(e) => {
                self.permit.shared.count(LimitOutcome::ReleaseFailed);
                tracing::warn!(key = %key, outcome = "release_failed", error = %Chain(&e), "could not release the slot; retrying in the background");
            }
        }
        Poll::Ready(())
    }
}

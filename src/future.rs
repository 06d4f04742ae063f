//! The response future: claim, then call the inner service, then settle the claim.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project::{pin_project, pinned_drop};
use tokio::time::{Instant, Sleep};
use tower::Service;
use tracing::Span;

use crate::IdempotencyKey;
use crate::classify::{ClassifyOutcome, Settle};
use crate::coalesce::{LeaderGuard, Role, follow};
use crate::error::IdempotencyError;
use crate::extract::BoxError;
use crate::layer::{Config, LostClaimPolicy, StoreErrorPolicy};
use crate::store::{BoxFuture, ClaimOutcome, ClaimToken, ErasedStore, StoreError};

/// Response future of [`Idempotency`](crate::Idempotency).
///
/// A state machine: `Claiming` (store round trip) → `Calling` (inner service, with optional
/// renewal) → `Releasing` (only when the classifier says the job was blocked).
///
/// **Dropped early?** If it is dropped while claiming, the claim may still land in the store, and
/// nothing was dispatched: a token-checked release is spawned so the key is not blocked. If it
/// is dropped while the inner service runs, the claim is **kept** until its TTL ends: the inner
/// call may already have had its effect, and a second dispatch is the failure this crate exists
/// to prevent. If it is dropped while releasing, the release is finished in the background.
/// Background work needs a Tokio runtime; without one, the claim simply expires after its TTL.
///
/// # Panics
/// Like every future, if polled again after it returned `Ready`.
#[pin_project(PinnedDrop)]
pub struct ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    #[pin]
    state: State<S, Req>,
    /// Our claim, while we may own one; `None` once settled (or when there never was one).
    held: Option<Held>,
    /// Present for calls that took (or tried to take) a claim.
    ctx: Option<(Arc<Config>, C)>,
    span: Span,
}

#[pin_project(project = StateProj)]
enum State<S, Req>
where
    S: Service<Req>,
{
    Claiming {
        claim: Claim,
        parts: Option<(S, Req)>,
    },
    Calling {
        #[pin]
        fut: S::Future,
        renewal: Option<Renewal>,
    },
    Releasing {
        release: BoxFuture<Result<bool, StoreError>>,
        result: Option<Result<S::Response, S::Error>>,
    },
    Ready {
        result: Option<Result<S::Response, IdempotencyError<S::Error>>>,
    },
}

struct Held {
    key: IdempotencyKey,
    full_key: Arc<str>,
    token: ClaimToken,
    phase: Phase,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Claiming,
    Running,
    Releasing,
}

struct Renewal {
    every: Duration,
    sleep: Pin<Box<Sleep>>,
    in_flight: Option<BoxFuture<Result<bool, StoreError>>>,
}

impl<S, Req, C> fmt::Debug for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("key", &self.held.as_ref().map(|h| &h.key))
            .field("phase", &self.held.as_ref().map(|h| h.phase))
            .finish_non_exhaustive()
    }
}

/// Renders an error with its `source()` chain: `a: b: c`.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            // Some errors (redis-rs among them) display their source's text themselves; don't
            // repeat it.
            let text = s.to_string();
            if !shown.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            source = s.source();
        }
        Ok(())
    }
}

/// The claim in flight: straight to the store, as the coalescing leader, or as a follower.
/// Resolves to the answer and whether the claim sent was ours (so a failure may have left our
/// token behind). One allocation per call: the store's future, or the follower's.
pub(crate) enum Claim {
    Direct(BoxFuture<Result<ClaimOutcome, StoreError>>),
    Leader(BoxFuture<Result<ClaimOutcome, StoreError>>, Option<LeaderGuard>),
    Follower(BoxFuture<(Result<ClaimOutcome, StoreError>, bool)>),
}

impl Future for Claim {
    type Output = (Result<ClaimOutcome, StoreError>, bool);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Claim::Direct(claim) => claim.as_mut().poll(cx).map(|result| (result, true)),
            Claim::Leader(claim, guard) => {
                let result = ready!(claim.as_mut().poll(cx));
                if let Some(guard) = guard.take() {
                    guard.publish(&result);
                }
                Poll::Ready((result, true))
            }
            Claim::Follower(follow) => follow.as_mut().poll(cx),
        }
    }
}

/// Starts the claim: through the coalescer when enabled, else straight to the store.
fn start_claim(config: &Arc<Config>, full_key: &Arc<str>, token: &ClaimToken) -> Claim {
    let store = config.store.clone();
    let (key, token, ttl) = (full_key.clone(), token.clone(), config.ttl);
    match config.coalescer.as_ref().map(|c| c.join(full_key)) {
        None => Claim::Direct(store.claim(key, token, ttl)),
        Some(Role::Leader(guard)) => Claim::Leader(store.claim(key, token, ttl), Some(guard)),
        Some(Role::Follower(rx)) => Claim::Follower(Box::pin(async move {
            match follow(rx).await {
                Some(answer) => (answer, false),
                // The leader went away without an answer: claim for ourselves.
                None => (store.claim(key, token, ttl).await, true),
            }
        })),
    }
}

/// Deletes our claim in the background if it is still there: for a claim whose reply was lost
/// (it may have landed after we gave up) and for a future dropped before it settled.
///
/// It retries until the store answers or the claim would have expired anyway, and checks twice,
/// a little apart, because a command stuck on a broken connection can land late.
pub(crate) fn spawn_cleanup(store: Arc<dyn ErasedStore>, full_key: Arc<str>, token: ClaimToken, ttl: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(key = %full_key, "no Tokio runtime to remove a claim that may have landed; it expires after its TTL");
        return;
    };
    handle.spawn(async move {
        let give_up = Instant::now() + ttl;
        let mut delay = Duration::from_millis(50);
        let mut answers = 0;
        loop {
            match store.clone().release(full_key.clone(), token.clone()).await {
                Ok(true) => {
                    tracing::info!(key = %full_key, "removed a claim whose reply was lost or whose caller went away");
                    return;
                }
                Ok(false) => {
                    answers += 1;
                    if answers >= 2 {
                        return;
                    }
                }
                Err(e) => tracing::debug!(key = %full_key, error = %Chain(&e), "cleanup of a possibly landed claim failed; retrying"),
            }
            if Instant::now() + delay >= give_up {
                tracing::warn!(key = %full_key, "gave up removing a possibly landed claim; it expires after its TTL");
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    });
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    pub(crate) fn claim(inner: S, req: Req, key: IdempotencyKey, config: Arc<Config>, classifier: C) -> Self {
        let span = tracing::info_span!("idempotency", key = %key, outcome = tracing::field::Empty);
        let full_key: Arc<str> = if config.namespace.is_empty() {
            key.shared()
        } else {
            Arc::from(format!("{}{}", config.namespace, key).as_str())
        };
        let token = ClaimToken::generate();
        let claim = start_claim(&config, &full_key, &token);
        Self {
            state: State::Claiming {
                claim,
                parts: Some((inner, req)),
            },
            held: Some(Held {
                key,
                full_key,
                token,
                phase: Phase::Claiming,
            }),
            ctx: Some((config, classifier)),
            span,
        }
    }

    pub(crate) fn pass_through(mut inner: S, req: Req) -> Self {
        let span = tracing::info_span!("idempotency", key = tracing::field::Empty, outcome = "pass_through");
        span.in_scope(|| tracing::debug!("no idempotency key; passing through unclaimed"));
        let fut = inner.call(req);
        Self {
            state: State::Calling { fut, renewal: None },
            held: None,
            ctx: None,
            span,
        }
    }

    pub(crate) fn rejected(error: BoxError) -> Self {
        let span = tracing::info_span!("idempotency", key = tracing::field::Empty, outcome = "invalid_key");
        span.in_scope(|| tracing::info!(error = %Chain(&*error), "rejected: no valid idempotency key"));
        Self {
            state: State::Ready {
                result: Some(Err(IdempotencyError::InvalidKey { source: error })),
            },
            held: None,
            ctx: None,
            span,
        }
    }
}

impl<S, Req, C> Future for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
    C: ClassifyOutcome<S::Response, S::Error>,
{
    type Output = Result<S::Response, IdempotencyError<S::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Claiming { claim, parts } => {
                    let (result, ours) = ready!(Pin::new(claim).poll(cx));
                    let Some((mut svc, req)) = parts.take() else {
                        polled_after_completion()
                    };
                    let (Some(held), Some((config, _))) = (this.held.as_mut(), this.ctx.as_ref()) else {
                        polled_after_completion()
                    };
                    let key = held.key.clone();
                    match result {
                        Ok(ClaimOutcome::Acquired) => {
                            tracing::debug!("claimed; dispatching");
                            held.phase = Phase::Running;
                            let renewal = config.renewal.map(|every| Renewal {
                                every,
                                sleep: Box::pin(tokio::time::sleep(every)),
                                in_flight: None,
                            });
                            this.state.set(State::Calling {
                                fut: svc.call(req),
                                renewal,
                            });
                        }
                        Ok(ClaimOutcome::AlreadyClaimed) => {
                            *this.held = None;
                            if config.shadow {
                                tracing::info!(
                                    shadow = true,
                                    "shadow mode: would have short-circuited a duplicate; dispatching"
                                );
                                this.span.record("outcome", "shadow_duplicate");
                                this.state.set(State::Calling {
                                    fut: svc.call(req),
                                    renewal: None,
                                });
                            } else {
                                tracing::info!(outcome = "duplicate", "duplicate; short-circuited");
                                this.span.record("outcome", "duplicate");
                                return Poll::Ready(Err(IdempotencyError::Duplicate { key }));
                            }
                        }
                        Err(error) => {
                            if ours && error.may_have_applied() {
                                spawn_cleanup(
                                    config.store.clone(),
                                    held.full_key.clone(),
                                    held.token.clone(),
                                    config.ttl,
                                );
                            }
                            let full_key = held.full_key.clone();
                            *this.held = None;
                            let fail_closed = config.store_error_policy == StoreErrorPolicy::FailClosed;
                            if fail_closed && !config.shadow {
                                tracing::error!(outcome = "store_unavailable", error = %Chain(&error), "idempotency store error; failing closed, nothing dispatched");
                                this.span.record("outcome", "store_unavailable");
                                config.reporter.store_error(&full_key, &error, true);
                                return Poll::Ready(Err(IdempotencyError::StoreUnavailable { key, source: error }));
                            }
                            if config.shadow {
                                tracing::warn!(shadow = true, error = %Chain(&error), "shadow mode: store error would have failed closed; dispatching");
                                this.span.record("outcome", "shadow_store_error");
                            } else {
                                tracing::warn!(outcome = "fail_open", error = %Chain(&error), "idempotency store error; failing open, dispatching unclaimed");
                                this.span.record("outcome", "fail_open");
                            }
                            config.reporter.store_error(&full_key, &error, false);
                            this.state.set(State::Calling {
                                fut: svc.call(req),
                                renewal: None,
                            });
                        }
                    }
                }
                StateProj::Calling { fut, renewal } => {
                    let result = match fut.poll(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            if let (Some(r), Some(held), Some((config, _))) =
                                (renewal.as_mut(), this.held.as_ref(), this.ctx.as_ref())
                                && poll_renewal(r, cx, config, held)
                            {
                                tracing::error!(
                                    outcome = "claim_lost",
                                    "claim lost while the job ran; another trigger may dispatch"
                                );
                                config.reporter.claim_lost(&held.full_key);
                                *renewal = None;
                                if config.lost_claim == LostClaimPolicy::Abort {
                                    let key = held.key.clone();
                                    *this.held = None;
                                    this.span.record("outcome", "claim_lost");
                                    let err = IdempotencyError::ClaimLost { key };
                                    this.state.set(State::Ready { result: Some(Err(err)) });
                                    continue;
                                }
                            }
                            return Poll::Pending;
                        }
                    };
                    let (Some(held), Some((config, classifier))) = (this.held.as_mut(), this.ctx.as_ref()) else {
                        // Pass-through, duplicate in shadow mode, or failed open: no claim to settle.
                        return Poll::Ready(result.map_err(IdempotencyError::Inner));
                    };
                    match classifier.classify(&result) {
                        Settle::Keep => {
                            tracing::debug!(outcome = "dispatched", "dispatched; claim kept until its TTL");
                            this.span.record("outcome", "dispatched");
                            *this.held = None;
                            return Poll::Ready(result.map_err(IdempotencyError::Inner));
                        }
                        Settle::Release => {
                            held.phase = Phase::Releasing;
                            let release = config.store.clone().release(held.full_key.clone(), held.token.clone());
                            this.state.set(State::Releasing {
                                release,
                                result: Some(result),
                            });
                        }
                    }
                }
                StateProj::Releasing { release, result } => {
                    let released = ready!(release.as_mut().poll(cx));
                    match released {
                        Ok(true) => tracing::info!(outcome = "released", "blocked; claim released"),
                        Ok(false) => tracing::warn!(
                            outcome = "released",
                            "blocked, but the claim was already gone (expired or taken over)"
                        ),
                        Err(e) => {
                            tracing::warn!(outcome = "released", error = %Chain(&e), "blocked; releasing the claim failed, it expires after its TTL")
                        }
                    }
                    this.span.record("outcome", "released");
                    *this.held = None;
                    let Some(result) = result.take() else {
                        polled_after_completion()
                    };
                    return Poll::Ready(result.map_err(IdempotencyError::Inner));
                }
                StateProj::Ready { result } => {
                    let Some(result) = result.take() else {
                        polled_after_completion()
                    };
                    return Poll::Ready(result);
                }
            }
        }
    }
}

/// Drives renewal while the inner future is pending. Returns `true` when the claim was found lost.
fn poll_renewal(r: &mut Renewal, cx: &mut Context<'_>, config: &Arc<Config>, held: &Held) -> bool {
    loop {
        if let Some(in_flight) = r.in_flight.as_mut() {
            let Poll::Ready(answer) = in_flight.as_mut().poll(cx) else {
                return false;
            };
            r.in_flight = None;
            match answer {
                Ok(true) => tracing::debug!("claim renewed"),
                Ok(false) => return true,
                // Not proof of loss: the store may be briefly unreachable. Try again next tick.
                Err(e) => tracing::warn!(error = %Chain(&e), "renewing the claim failed; will retry"),
            }
            r.sleep.as_mut().reset(Instant::now() + r.every);
        }
        if r.sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        r.in_flight = Some(
            config
                .store
                .clone()
                .renew(held.full_key.clone(), held.token.clone(), config.ttl),
        );
    }
}

fn polled_after_completion() -> ! {
    // The only panic in the crate: a caller broke the `Future` contract, as `async fn` also
    // panics when resumed after completion.
    panic!("tower_idempotency::ResponseFuture polled after completion")
}

#[pinned_drop]
impl<S, Req, C> PinnedDrop for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        let (Some(held), Some((config, _))) = (this.held.take(), this.ctx.as_ref()) else {
            return;
        };
        let _entered = this.span.enter();
        match held.phase {
            Phase::Running => {
                tracing::info!(
                    outcome = "dropped",
                    "response future dropped while the inner service ran; claim kept until its TTL"
                );
            }
            Phase::Claiming | Phase::Releasing => {
                tracing::debug!(outcome = "dropped", phase = ?held.phase, "response future dropped before the claim settled; releasing in the background");
                spawn_cleanup(config.store.clone(), held.full_key, held.token, config.ttl);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn chain_renders_sources_once() {
        let e = E(
            "outer",
            Some(Box::new(E("middle: inner", Some(Box::new(E("inner", None)))))),
        );
        assert_eq!(Chain(&e).to_string(), "outer: middle: inner");
        let plain = E("a", Some(Box::new(E("b", None))));
        assert_eq!(Chain(&plain).to_string(), "a: b");
    }
}

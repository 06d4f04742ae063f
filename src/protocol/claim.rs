//! Claiming a key: one store round trip, shared by every caller of the same key at once when
//! coalescing is on, and turned into a [`Decision`] under the layer's policies.
//!
//! A claim in flight is an `Attempt`. Without coalescing each caller has its own; with it,
//! concurrent callers of one key join the same attempt as members. The rules that keep
//! coalescing from ever dispatching more than no coalescing would:
//!
//! - **Whoever polls drives.** The store call lives in the attempt, not in one caller's future:
//!   any member's poll advances it, and its wake-up reaches every member. A member never waits
//!   on another member being polled, so it decides within the store's own bound.
//! - **One lease per attempt.** An `Acquired` answer is taken by exactly one member (the first
//!   to see it); the others are duplicates. If the member that sent the claim went away, the
//!   claim still goes to a member that is there — it is not deleted under their feet.
//! - **One fail-open dispatch per attempt.** Under fail-open or shadow mode, a store error lets
//!   one member dispatch (holding the claim, if it may have landed); the others are duplicates.
//!   Under fail-closed, every member fails closed.
//! - **Cleanup only for what was sent.** When the last member goes away and nobody holds a claim
//!   that may have landed, the attempt hands it to the background owner; an attempt whose
//!   command was never sent, or was refused before reaching the store, leaves nothing behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};

use tokio::time::Instant;

use super::Protocol;
use super::background::Work;
use super::lease::Lease;
use crate::IdempotencyKey;
use crate::error::Chain;
use crate::observe::Outcome;
use crate::settings::StoreErrorPolicy;
use crate::store::{BoxFuture, ClaimReply, ClaimToken, Record, StoreError};

/// What the protocol decided for one caller.
pub(crate) enum Decision {
    /// Call the inner service. With a lease when a claim protects the call (acquired, or adopted
    /// after a store error that may have applied); without one in shadow mode or when failing
    /// open on a claim that certainly did not land.
    Dispatch(Option<Lease>),
    /// Someone else holds the key: the record says in progress or completed.
    Duplicate(Record),
    /// The store could not answer; failed closed.
    Unavailable(StoreError),
}

/// The claims in flight per key, for coalescing.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    inflight: Mutex<HashMap<Arc<str>, Weak<Attempt>>>,
}

impl Coalescer {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Weak<Attempt>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes `key`'s entry if it is `attempt`'s.
    fn forget(&self, key: &Arc<str>, attempt: *const Attempt) {
        let mut inflight = self.lock();
        if inflight.get(key).is_some_and(|w| std::ptr::eq(w.as_ptr(), attempt)) {
            inflight.remove(key);
        }
    }
}

struct Attempt {
    protocol: Arc<Protocol>,
    key: IdempotencyKey,
    /// The key the claim is held on: the request's key, or an override's identity key.
    full_key: Arc<str>,
    /// An override's other key: the request's key, taken over from its holder.
    also: Option<Arc<str>>,
    token: ClaimToken,
    coalesced: bool,
    state: Mutex<AttemptState>,
    /// Members still there (coalesced attempts).
    members: AtomicUsize,
    /// The next member id.
    next_member: AtomicU64,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

struct AttemptState {
    progress: Progress,
    /// A member holds the claim (acquired, or adopted after an error that may have applied).
    lease_taken: bool,
    /// A member dispatched on a store error (fail-open or shadow mode).
    dispatch_taken: bool,
    /// The waker of the one member that polled while it was alone, so a member joining later
    /// can hand it to the fan-out.
    solo: Option<(u64, Waker)>,
    /// The fan-out, made when a second member polls.
    fanout: Option<Arc<Wakers>>,
}

enum Progress {
    Sending {
        claim: BoxFuture<Result<(ClaimReply, Option<u64>), StoreError>>,
        /// When it was first polled: from then on the command may have reached the store.
        sent: Option<std::time::Instant>,
    },
    /// The store's answer, and when it came (when an acquired claim's hold starts).
    Answered(Result<(ClaimReply, Option<u64>), StoreError>, std::time::Instant),
}

/// The members' wakers, once a second member has polled: the store call is then polled with a
/// waker that wakes them all, so the answer reaches every member whoever polled last. A caller
/// alone on its attempt (every uncoalesced caller, most coalesced ones) polls with its own
/// waker and allocates none of this.
#[derive(Default)]
struct Wakers {
    members: Mutex<Vec<(u64, Waker)>>,
}

impl Wakers {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, Waker)>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, member: u64, waker: &Waker) {
        let mut members = self.lock();
        match members.iter_mut().find(|(id, _)| *id == member) {
            Some((_, w)) if w.will_wake(waker) => {}
            Some((_, w)) => w.clone_from(waker),
            None => members.push((member, waker.clone())),
        }
    }

    fn unregister(&self, member: u64) {
        self.lock().retain(|(id, _)| *id != member);
    }
}

impl Wake for Wakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let wakers: Vec<Waker> = self.lock().iter().map(|(_, w)| w.clone()).collect();
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl Attempt {
    fn new(
        protocol: &Arc<Protocol>,
        key: IdempotencyKey,
        full_key: Arc<str>,
        owner: Option<ClaimToken>,
        coalesced: bool,
    ) -> Self {
        let token = owner.unwrap_or_else(ClaimToken::generate);
        let settings = &protocol.settings;
        let claim = settings
            .store
            .clone()
            .claim(full_key.clone(), token.clone(), settings.ttl, settings.fencing);
        Self::with_claim(protocol, key, full_key, None, token, claim, coalesced)
    }

    /// A human override: claims its own identity key (so the same override delivered twice
    /// dispatches once), then takes the request's key over from whoever holds it (one
    /// `SET … XX GET`), so later automated triggers are duplicates and the previous holder's
    /// release and renewal fail their token check. A free key is left free: an override never
    /// stops the automated trigger from dispatching once.
    fn takeover(protocol: &Arc<Protocol>, key: IdempotencyKey, main_key: Arc<str>, identity: &str) -> Self {
        let token = ClaimToken::generate();
        let identity_key: Arc<str> = Arc::from(format!("{main_key}:override:{identity}").as_str());
        let (store, ttl) = (protocol.settings.store.clone(), protocol.settings.ttl);
        let (id_key, main, tok, shown) = (identity_key.clone(), main_key.clone(), token.clone(), key.clone());
        let claim: BoxFuture<Result<(ClaimReply, Option<u64>), StoreError>> = Box::pin(async move {
            if let (ClaimReply::Held(record), _) = store.clone().claim(id_key, tok.clone(), ttl, false).await? {
                return Ok((ClaimReply::Held(record), None));
            }
            let took_over = store.take_over(main, tok, ttl).await?;
            tracing::info!(key = %shown, outcome = "override", took_over, "override: claim taken over");
            Ok((ClaimReply::Acquired, None))
        });
        Self::with_claim(protocol, key, identity_key, Some(main_key), token, claim, false)
    }

    fn with_claim(
        protocol: &Arc<Protocol>,
        key: IdempotencyKey,
        full_key: Arc<str>,
        also: Option<Arc<str>>,
        token: ClaimToken,
        claim: BoxFuture<Result<(ClaimReply, Option<u64>), StoreError>>,
        coalesced: bool,
    ) -> Self {
        Self {
            protocol: protocol.clone(),
            key,
            full_key,
            also,
            token,
            coalesced,
            state: Mutex::new(AttemptState {
                progress: Progress::Sending { claim, sent: None },
                lease_taken: false,
                dispatch_taken: false,
                solo: None,
                fanout: None,
            }),
            members: AtomicUsize::new(1),
            next_member: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, AttemptState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease(&self, confirmed: bool, acquired_at: std::time::Instant, fence: Option<u64>) -> Lease {
        Lease::new(
            self.protocol.clone(),
            self.key.clone(),
            self.full_key.clone(),
            self.also.clone(),
            self.token.clone(),
            confirmed,
            acquired_at,
            fence,
        )
    }

    /// The decision for one member, once the store answered.
    fn decide(&self, state: &mut AttemptState) -> Decision {
        let AttemptState {
            progress,
            lease_taken,
            dispatch_taken,
            ..
        } = state;
        let Progress::Answered(answer, answered_at) = progress else {
            return Decision::Unavailable(StoreError::UnexpectedReply {
                operation: "claim",
                reply: "no answer yet".into(),
            });
        };
        let settings = &self.protocol.settings;
        let key = &self.key;
        match answer {
            Ok((ClaimReply::Acquired, fence)) if !*lease_taken => {
                *lease_taken = true;
                let observers = &self.protocol.observers;
                if self.also.is_some() {
                    observers.outcome(Outcome::Override);
                }
                observers.outcome(Outcome::Claimed);
                tracing::info!(key = %key, outcome = "claimed", "claimed; dispatching");
                Decision::Dispatch(Some(self.lease(true, *answered_at, *fence)))
            }
            // Another member of this attempt took the lease: its claim is in progress.
            Ok((ClaimReply::Acquired, _)) => self.duplicate(Record::in_progress(&self.token, Some(settings.ttl))),
            Ok((ClaimReply::Held(record), _)) => self.duplicate(record.clone()),
            Err(error) if settings.store_error_policy == StoreErrorPolicy::FailClosed && !settings.shadow => {
                self.protocol.observers.outcome(Outcome::FailedClosed);
                tracing::error!(key = %key, outcome = "store_unavailable", error = %Chain(error), "idempotency store error; failing closed, nothing dispatched");
                settings.reporter.store_error(&self.full_key, error, true);
                Decision::Unavailable(error.clone())
            }
            // Another member dispatched on this error, under this attempt's token.
            Err(_) if *dispatch_taken => self.duplicate(Record::in_progress(&self.token, None)),
            Err(error) => {
                *dispatch_taken = true;
                // If the claim may have landed, it protects this dispatch: keep it, never clean
                // it up under the running job.
                let lease = (error.may_have_applied() && !*lease_taken).then(|| {
                    *lease_taken = true;
                    self.lease(false, *answered_at, None)
                });
                self.protocol.observers.outcome(if settings.shadow {
                    Outcome::ShadowWouldSkip
                } else {
                    Outcome::FailedOpen
                });
                if settings.shadow {
                    tracing::warn!(key = %key, outcome = "shadow_store_error", shadow = true, error = %Chain(error), "shadow mode: store error would have failed closed; dispatching");
                } else {
                    tracing::warn!(key = %key, outcome = "fail_open", error = %Chain(error), "idempotency store error; failing open, dispatching");
                }
                settings.reporter.store_error(&self.full_key, error, false);
                Decision::Dispatch(lease)
            }
        }
    }

    fn duplicate(&self, record: Record) -> Decision {
        let completed = record.state().is_completed();
        self.protocol.observers.outcome(if self.protocol.settings.shadow {
            Outcome::ShadowWouldSkip
        } else if completed {
            Outcome::DuplicateCompleted
        } else {
            Outcome::DuplicateInProgress
        });
        let state = if completed { "completed" } else { "in_progress" };
        if self.protocol.settings.shadow {
            tracing::info!(key = %self.key, outcome = "shadow_duplicate", state, shadow = true, "shadow mode: would have skipped a duplicate; dispatching");
            Decision::Dispatch(None)
        } else {
            tracing::info!(key = %self.key, outcome = "duplicate", state, "duplicate; skipping");
            Decision::Duplicate(record)
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let maybe_landed = match &state.progress {
            Progress::Sending { sent, .. } => sent.is_some(),
            Progress::Answered(Ok((ClaimReply::Acquired, _)), _) => true,
            Progress::Answered(Ok((ClaimReply::Held(_), _)), _) => false,
            Progress::Answered(Err(error), _) => error.may_have_applied(),
        };
        if maybe_landed && !state.lease_taken {
            tracing::debug!(key = %self.key, outcome = "cleanup", "a claim that may have landed has no holder; removing it in the background");
            let settings = &self.protocol.settings;
            for key in std::iter::once(&self.full_key).chain(&self.also) {
                settings.background.submit(
                    key.clone(),
                    self.token.clone(),
                    Work::Cleanup,
                    Instant::now() + settings.ttl,
                );
            }
        }
        // An answered attempt already left the map when its answer came.
        let answered = matches!(state.progress, Progress::Answered(..));
        if self.coalesced
            && !answered
            && let Some(coalescer) = &self.protocol.settings.coalescer
        {
            coalescer.forget(&self.full_key, self);
        }
    }
}

/// The attempt a caller belongs to: its own (uncoalesced, no allocation of its own), or one
/// shared with the concurrent callers of its key.
// `Own` keeps an uncoalesced caller's attempt inline, saving an allocation per call on the
// hot path; the size difference is the point.
#[allow(clippy::large_enum_variant)]
enum AttemptRef {
    Own(Attempt),
    Shared(Arc<Attempt>),
}

impl std::ops::Deref for AttemptRef {
    type Target = Attempt;

    fn deref(&self) -> &Attempt {
        match self {
            AttemptRef::Own(attempt) => attempt,
            AttemptRef::Shared(attempt) => attempt,
        }
    }
}

/// One caller's claim in flight: a member of an attempt. Resolves to a [`Decision`].
pub(crate) struct Claiming {
    attempt: AttemptRef,
    member: u64,
}

impl std::fmt::Debug for Claiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claiming")
            .field("key", &self.attempt.key)
            .finish_non_exhaustive()
    }
}

impl Claiming {
    pub(super) fn start(
        protocol: &Arc<Protocol>,
        key: IdempotencyKey,
        owner: Option<ClaimToken>,
        takeover: Option<&str>,
    ) -> Self {
        let full_key = protocol.full_key(&key);
        if let Some(identity) = takeover {
            return Self {
                attempt: AttemptRef::Own(Attempt::takeover(protocol, key, full_key, identity)),
                member: 0,
            };
        }
        let Some(coalescer) = &protocol.settings.coalescer else {
            return Self {
                attempt: AttemptRef::Own(Attempt::new(protocol, key, full_key, owner, false)),
                member: 0,
            };
        };
        let mut inflight = coalescer.lock();
        // A caller with its own stable identity joins only an attempt under that identity: its
        // own earlier claim answers `Acquired` to it, which another token's attempt would not.
        if let Some(attempt) = inflight.get(&full_key).and_then(Weak::upgrade)
            && owner.as_ref().is_none_or(|owner| *owner == attempt.token)
        {
            attempt.members.fetch_add(1, Ordering::AcqRel);
            let member = attempt.next_member.fetch_add(1, Ordering::Relaxed);
            return Self {
                attempt: AttemptRef::Shared(attempt),
                member,
            };
        }
        let attempt = Arc::new(Attempt::new(protocol, key, full_key.clone(), owner, true));
        inflight.insert(full_key, Arc::downgrade(&attempt));
        Self {
            attempt: AttemptRef::Shared(attempt),
            member: 0,
        }
    }

    /// The key being claimed.
    pub(crate) fn key(&self) -> &IdempotencyKey {
        &self.attempt.key
    }

    /// The layer's protocol.
    pub(crate) fn protocol(&self) -> &Arc<Protocol> {
        &self.attempt.protocol
    }

    /// Drives the claim (whoever polls drives it) and decides for this caller.
    pub(crate) fn poll_decision(&mut self, cx: &mut Context<'_>) -> Poll<Decision> {
        let attempt = &*self.attempt;
        let mut state = attempt.lock();
        let mut answered_now = false;
        let AttemptState {
            progress, solo, fanout, ..
        } = &mut *state;
        if let Progress::Sending { claim, sent } = progress {
            let started = *sent.get_or_insert_with(std::time::Instant::now);
            let alone = fanout.is_none() && attempt.members.load(Ordering::Acquire) <= 1;
            let polled = if !attempt.coalesced {
                claim.as_mut().poll(cx)
            } else if alone {
                // Remember our waker, so a member joining later can wake us through the fan-out.
                match solo {
                    Some((id, w)) if *id == self.member && w.will_wake(cx.waker()) => {}
                    _ => *solo = Some((self.member, cx.waker().clone())),
                }
                claim.as_mut().poll(cx)
            } else {
                let wakers = fanout.get_or_insert_with(Arc::default).clone();
                if let Some((id, waker)) = solo.take() {
                    wakers.register(id, &waker);
                }
                wakers.register(self.member, cx.waker());
                let waker = Waker::from(wakers);
                claim.as_mut().poll(&mut Context::from_waker(&waker))
            };
            let Poll::Ready(answer) = polled else {
                return Poll::Pending;
            };
            let operation = if attempt.also.is_some() { "take_over" } else { "claim" };
            let now = std::time::Instant::now();
            attempt
                .protocol
                .observers
                .store_call(operation, now.duration_since(started), answer.is_ok());
            *progress = Progress::Answered(answer, now);
            answered_now = true;
        }
        let decision = attempt.decide(&mut state);
        let fanout = state.fanout.clone();
        drop(state);
        if answered_now && attempt.coalesced {
            // Callers from now on go to the store (and find the claim there).
            if let Some(coalescer) = &attempt.protocol.settings.coalescer {
                coalescer.forget(&attempt.full_key, attempt);
            }
            if let Some(wakers) = fanout {
                wakers.unregister(self.member);
                Wake::wake_by_ref(&wakers);
            }
        }
        Poll::Ready(decision)
    }
}

impl Drop for Claiming {
    fn drop(&mut self) {
        if self.attempt.coalesced {
            self.attempt.members.fetch_sub(1, Ordering::AcqRel);
            let mut state = self.attempt.lock();
            if state.solo.as_ref().is_some_and(|(id, _)| *id == self.member) {
                state.solo = None;
            }
            if let Some(wakers) = &state.fanout {
                wakers.unregister(self.member);
            }
        }
    }
}

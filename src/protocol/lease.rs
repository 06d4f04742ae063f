//! A held claim: renewed while the job runs (up to the maximum hold), then kept or released.
//!
//! Drop semantics, which the futures inherit:
//! - dropped while the job runs ([`Running`]): the claim is **kept** until its TTL — the job may
//!   already have had its effect, and a second dispatch is what this crate prevents;
//! - dropped while releasing ([`Settling`]): the release is finished by the background owner;
//!   dropped while completing: the claim stays in progress until its TTL (never re-dispatched).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::Protocol;
use super::background::Work;
use crate::IdempotencyKey;
use crate::classify::Settle;
use crate::error::Chain;
use crate::lease_handle::LeaseHandle;
use crate::observe::Outcome;
use crate::settings::LostClaimPolicy;
use crate::store::{BoxFuture, ClaimToken, StoreError};

/// The claim protecting one dispatch.
pub(crate) struct Lease {
    protocol: Arc<Protocol>,
    key: IdempotencyKey,
    full_key: Arc<str>,
    /// An override's taken-over key, released with the claim (token-checked).
    also: Option<Arc<str>>,
    token: ClaimToken,
    /// The store confirmed the claim. `false`: adopted after a store error that may have
    /// applied (fail-open, shadow mode); it may not exist, so it is not renewed.
    confirmed: bool,
    acquired_at: std::time::Instant,
    /// Latest time the claim can still exist, once renewed; before that, an upper bound is
    /// "now + TTL" whenever it is asked.
    renewed_until: Option<Instant>,
    settled: bool,
    /// The fencing token the store handed out with the claim, when fencing is on.
    fence: Option<u64>,
}

impl Lease {
    #[allow(clippy::too_many_arguments)] // one call site per way a claim is granted; all are named
    pub(crate) fn new(
        protocol: Arc<Protocol>,
        key: IdempotencyKey,
        full_key: Arc<str>,
        also: Option<Arc<str>>,
        token: ClaimToken,
        confirmed: bool,
        acquired_at: std::time::Instant,
        fence: Option<u64>,
    ) -> Self {
        Self {
            protocol,
            key,
            full_key,
            also,
            token,
            confirmed,
            acquired_at,
            renewed_until: None,
            settled: false,
            fence,
        }
    }

    /// Latest time the claim can still exist (an upper bound).
    fn expires_at(&self) -> Instant {
        self.renewed_until
            .unwrap_or_else(|| Instant::now() + self.protocol.settings.ttl)
    }

    /// The job starts: renew while it runs, if renewal is on and the claim is confirmed.
    pub(crate) fn run(self) -> Running {
        let settings = &self.protocol.settings;
        let renewal = settings.renewal.filter(|_| self.confirmed).map(|every| {
            let now = Instant::now();
            Renewal {
                every,
                hold_until: now + settings.max_hold(),
                sleep: Box::pin(tokio::time::sleep(every)),
                in_flight: None,
                sent_at: now,
            }
        });
        let handle = LeaseHandle::new(self.key.clone(), self.fence);
        Running {
            lease: self,
            renewal,
            handle,
        }
    }
}

impl Lease {
    /// Hands the release of this claim (and an override's taken-over key) to the background
    /// owner, which retries until it is released or expires.
    fn release_in_background(&self) {
        let deadline = self.expires_at();
        for key in std::iter::once(&self.full_key).chain(&self.also) {
            self.protocol
                .settings
                .background
                .submit(key.clone(), self.token.clone(), Work::Release, deadline);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settled {
            tracing::info!(key = %self.key, outcome = "dropped", "dropped while the job ran; claim kept until its TTL");
        }
        self.protocol.observers.hold(self.acquired_at.elapsed());
    }
}

/// The claim while the job runs.
pub(crate) struct Running {
    lease: Lease,
    renewal: Option<Renewal>,
    /// What the job can see of its claim (lost signal, fencing token).
    handle: LeaseHandle,
}

struct Renewal {
    every: Duration,
    hold_until: Instant,
    sleep: Pin<Box<Sleep>>,
    in_flight: Option<BoxFuture<Result<bool, StoreError>>>,
    sent_at: Instant,
}

enum RenewalEnd {
    Lost,
    MaxHold,
}

impl Running {
    /// The key the job runs for.
    pub(crate) fn key(&self) -> &IdempotencyKey {
        &self.lease.key
    }

    /// What the job can see of its claim.
    pub(crate) fn handle(&self) -> &LeaseHandle {
        &self.handle
    }

    /// The key, stored key and token of the claim (for a follow-up run under it).
    pub(crate) fn claim(&self) -> (IdempotencyKey, Arc<str>, ClaimToken) {
        (
            self.lease.key.clone(),
            self.lease.full_key.clone(),
            self.lease.token.clone(),
        )
    }

    /// Drives renewal while the job runs. Ready when the claim was found lost and the
    /// lost-claim policy says to abort the job.
    pub(crate) fn poll_abort(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(renewal) = self.renewal.as_mut() else {
            return Poll::Pending;
        };
        let end = ready!(renewal.poll(cx, &mut self.lease));
        self.renewal = None;
        let lease = &mut self.lease;
        let settings = &lease.protocol.settings;
        match end {
            RenewalEnd::MaxHold => {
                lease.protocol.observers.outcome(Outcome::MaxHold);
                tracing::warn!(key = %lease.key, outcome = "max_hold", max_hold = ?settings.max_hold(), "maximum hold reached; renewal stopped, the claim expires within its TTL");
                Poll::Pending
            }
            RenewalEnd::Lost => {
                lease.protocol.observers.outcome(Outcome::LeaseLost);
                self.handle.mark_lost();
                tracing::error!(key = %lease.key, outcome = "claim_lost", "claim lost while the job ran; another trigger may dispatch");
                settings.reporter.claim_lost(&lease.full_key);
                if settings.lost_claim == LostClaimPolicy::Abort {
                    // Not ours any more: nothing to keep or release.
                    lease.settled = true;
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
        }
    }

    /// The job finished: keep the claim (completing its record with `outcome`, when records are
    /// on), or start releasing it.
    pub(crate) fn settle(mut self, settle: Settle, outcome: Option<Vec<u8>>) -> Option<Settling> {
        let settings = &self.lease.protocol.settings;
        match settle {
            Settle::Keep if !settings.records => {
                tracing::info!(key = %self.lease.key, outcome = "dispatched", "dispatched; claim kept until its TTL");
                self.lease.settled = true;
                None
            }
            Settle::Keep => {
                let outcome = outcome.filter(|bytes| {
                    let fits = bytes.len() <= settings.max_outcome_size;
                    if !fits {
                        tracing::warn!(key = %self.lease.key, size = bytes.len(), max = settings.max_outcome_size, "outcome larger than the maximum; the record is completed without it");
                    }
                    fits
                });
                let lease = self.lease;
                let (store, retention) = (
                    lease.protocol.settings.store.clone(),
                    lease.protocol.settings.retention(),
                );
                let observers = lease.protocol.observers.clone();
                let (key, also, token) = (lease.full_key.clone(), lease.also.clone(), lease.token.clone());
                let complete: BoxFuture<Result<bool, StoreError>> = Box::pin(async move {
                    if let Some(also) = also {
                        // An override completes the key it took over too.
                        let main = store.clone().complete(also, token.clone(), outcome.clone(), retention);
                        observers.timed("complete", main).await?;
                    }
                    observers
                        .timed("complete", store.complete(key, token, outcome, retention))
                        .await
                });
                Some(Settling {
                    lease: Some(lease),
                    call: complete,
                    releasing: false,
                })
            }
            Settle::Release => {
                let lease = self.lease;
                let store = lease.protocol.settings.store.clone();
                let observers = lease.protocol.observers.clone();
                let (key, also, token) = (lease.full_key.clone(), lease.also.clone(), lease.token.clone());
                let release: BoxFuture<Result<bool, StoreError>> = Box::pin(async move {
                    let released = observers
                        .timed("release", store.clone().release(key, token.clone()))
                        .await?;
                    if let Some(also) = also {
                        // The taken-over key goes too, if it is still ours.
                        observers.timed("release", store.release(also, token)).await?;
                    }
                    Ok(released)
                });
                Some(Settling {
                    lease: Some(lease),
                    call: release,
                    releasing: true,
                })
            }
        }
    }
}

impl Renewal {
    fn poll(&mut self, cx: &mut Context<'_>, lease: &mut Lease) -> Poll<RenewalEnd> {
        loop {
            if let Some(in_flight) = self.in_flight.as_mut() {
                let answer = ready!(in_flight.as_mut().poll(cx));
                self.in_flight = None;
                match answer {
                    Ok(true) => {
                        lease.renewed_until = Some(self.sent_at + lease.protocol.settings.ttl);
                        tracing::debug!(key = %lease.key, "claim renewed");
                    }
                    Ok(false) => return Poll::Ready(RenewalEnd::Lost),
                    // Not proof of loss: the store may be briefly unreachable. Retry next tick.
                    Err(error) => {
                        tracing::warn!(key = %lease.key, error = %Chain(&error), "renewing the claim failed; will retry")
                    }
                }
                self.sleep.as_mut().reset(Instant::now() + self.every);
            }
            ready!(self.sleep.as_mut().poll(cx));
            let now = Instant::now();
            if now >= self.hold_until {
                return Poll::Ready(RenewalEnd::MaxHold);
            }
            self.sent_at = now;
            let settings = &lease.protocol.settings;
            let renew = settings
                .store
                .clone()
                .renew(lease.full_key.clone(), lease.token.clone(), settings.ttl);
            self.in_flight = Some(lease.protocol.observers.timed("renew", renew));
        }
    }
}

/// Settling a finished job's claim: releasing it (blocked) or completing its record (kept).
pub(crate) struct Settling {
    /// `None` once the call has finished (or been handed to the background owner).
    lease: Option<Lease>,
    call: BoxFuture<Result<bool, StoreError>>,
    releasing: bool,
}

impl Settling {
    /// Ready with `Ok` when settled, or with the key and error when a blocked job's claim could
    /// not be released: the claim still stands, and the background owner retries until it is
    /// released or expires. A record that could not be completed is not an error of the call
    /// (the job ran): its claim stays in progress until its TTL, logged at `error`.
    pub(crate) fn poll_settled(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), (IdempotencyKey, StoreError)>> {
        let answer = ready!(self.call.as_mut().poll(cx));
        let Some(mut lease) = self.lease.take() else {
            return Poll::Ready(Ok(()));
        };
        lease.settled = true;
        if !self.releasing {
            lease.protocol.observers.outcome(if answer.is_ok() {
                Outcome::Completed
            } else {
                Outcome::CompleteFailed
            });
            match answer {
                Ok(true) => tracing::info!(key = %lease.key, outcome = "completed", "dispatched; record completed"),
                Ok(false) => {
                    tracing::warn!(key = %lease.key, outcome = "completed", "dispatched, but the key is held by someone else now (taken over, or claimed after the lease expired); record left as it is")
                }
                Err(error) => {
                    tracing::error!(key = %lease.key, outcome = "complete_failed", error = %Chain(&error), "dispatched, but completing the record failed; the claim stays in progress until its TTL")
                }
            }
            return Poll::Ready(Ok(()));
        }
        lease.protocol.observers.outcome(if answer.is_ok() {
            Outcome::Released
        } else {
            Outcome::ReleaseFailed
        });
        match answer {
            Ok(true) => tracing::info!(key = %lease.key, outcome = "released", "blocked; claim released"),
            Ok(false) => {
                tracing::warn!(key = %lease.key, outcome = "released", "blocked, but the claim was already gone (expired or taken over)")
            }
            Err(error) => {
                tracing::error!(key = %lease.key, outcome = "release_failed", error = %Chain(&error), "blocked, but releasing the claim failed; retrying in the background until it is released or expires");
                lease.release_in_background();
                return Poll::Ready(Err((lease.key.clone(), error)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            lease.settled = true;
            if self.releasing {
                tracing::debug!(key = %lease.key, outcome = "dropped", "dropped while releasing; the release is finished in the background");
                lease.release_in_background();
            } else {
                tracing::info!(key = %lease.key, outcome = "dropped", "dropped while completing the record; the claim stays in progress until its TTL");
            }
        }
    }
}

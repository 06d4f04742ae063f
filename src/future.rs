//! The response future: drives the claim protocol's states around the inner service's call.
//! Every decision is the protocol's; this file only moves between states.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project::pin_project;
use tower::Service;
use tracing::Span;

pub(crate) use crate::error::Chain;

use crate::IdempotencyKey;
use crate::classify::{ClassifyOutcome, Settle};
use crate::error::IdempotencyError;
use crate::extract::BoxError;
use crate::extract::{Decode, FollowUp};
use crate::protocol::follow_up::{self, Recheck};
use crate::protocol::{Claiming, Decision, Lease, Protocol, Running, Settling};
use crate::store::ClaimToken;
use crate::store::{BoxFuture, Record, StoreError};

/// Response future of [`Idempotency`](crate::Idempotency).
///
/// A state machine over the claim protocol: `Claiming` (one store round trip, possibly shared
/// with concurrent callers of the same key) → `Calling` (the inner service, with renewal when
/// configured) → `Settling` (completing the record of a kept job, or releasing the claim of a
/// blocked one).
///
/// **Dropped early?** Dropped while claiming: if the claim may have reached the store and no
/// other caller holds it, a token-checked removal is handed to the layer's background owner
/// (nothing at all if the claim was never sent). Dropped while the inner service runs: the claim
/// is **kept** until its TTL — the inner call may already have had its effect, and a second
/// dispatch is the failure this crate exists to prevent. Dropped while releasing: the release is
/// finished in the background. Background work needs a Tokio runtime; without one, the claim
/// expires after its TTL.
///
/// # Panics
/// Like every future, if polled again after it returned `Ready`.
#[pin_project]
pub struct ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    #[pin]
    state: State<S, Req>,
    classifier: C,
    span: Span,
    /// What a duplicate of an original in progress needs to claim again after waiting.
    wait: Option<Box<Wait>>,
    /// The run-once-more strategy, when on.
    follow_up: Option<Box<FollowUps<S, Req>>>,
}

/// The run-once-more strategy of one call (see `protocol::follow_up`).
struct FollowUps<S: Service<Req>, Req> {
    protocol: Arc<Protocol>,
    /// This request, encoded: recorded as the follow-up when its key is in progress.
    payload: Option<Vec<u8>>,
    decode: Decode<Req>,
    /// The inner service, kept to run follow-ups.
    inner: Option<S>,
    /// The key, stored key and token of the run in progress, drained when it settles.
    claim: Option<(IdempotencyKey, Arc<str>, ClaimToken)>,
    /// The answer for this call: its own run's (or its recorded follow-up's); later runs are
    /// only logged.
    answer: Option<Result<S::Response, IdempotencyError<S::Error>>>,
}

/// A bounded wait for an original in progress: claim again every `every` until `until`.
struct Wait {
    protocol: Arc<Protocol>,
    owner: Option<ClaimToken>,
    until: tokio::time::Instant,
    every: std::time::Duration,
}

#[pin_project(project = StateProj)]
enum State<S, Req>
where
    S: Service<Req>,
{
    Claiming {
        claiming: Claiming,
        parts: Option<(S, Req)>,
    },
    Waiting {
        sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
        key: IdempotencyKey,
        parts: Option<(S, Req)>,
    },
    /// A duplicate recording itself as the follow-up of the run in progress.
    Recording {
        recording: BoxFuture<Result<Recheck, StoreError>>,
        key: IdempotencyKey,
        record: Option<Record>,
        parts: Option<(S, Req)>,
    },
    /// A run settled: taking its follow-up, if any.
    Draining {
        draining: BoxFuture<Result<Option<Vec<u8>>, StoreError>>,
        key: IdempotencyKey,
    },
    /// A follow-up run waits for the inner service to be ready.
    Readying { req: Option<Req>, running: Option<Running> },
    Calling {
        #[pin]
        fut: S::Future,
        running: Option<Running>,
    },
    Settling {
        settling: Settling,
        result: Option<Result<S::Response, S::Error>>,
    },
    Done {
        result: Option<Result<S::Response, IdempotencyError<S::Error>>>,
    },
}

impl<S, Req, C> fmt::Debug for ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Claiming { .. } => "claiming",
            State::Waiting { .. } => "waiting",
            State::Recording { .. } => "recording_follow_up",
            State::Draining { .. } => "draining_follow_up",
            State::Readying { .. } => "readying_follow_up",
            State::Calling { .. } => "calling",
            State::Settling { .. } => "settling",
            State::Done { .. } => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S, Req, C> ResponseFuture<S, Req, C>
where
    S: Service<Req>,
{
    /// Claims `key` (as `owner`, when the caller has a stable identity for the job; as an
    /// override with identity `takeover`), then calls `inner` if the protocol says so.
    pub(crate) fn claim(
        inner: S,
        req: Req,
        key: IdempotencyKey,
        owner: Option<ClaimToken>,
        takeover: Option<&str>,
        protocol: &Arc<Protocol>,
        classifier: C,
    ) -> Self {
        let span = tracing::info_span!("idempotency", key = %key);
        // Overrides never wait: they take the key over.
        let wait = protocol.settings.wait.filter(|_| takeover.is_none()).map(|wait| {
            Box::new(Wait {
                protocol: protocol.clone(),
                owner: owner.clone(),
                until: tokio::time::Instant::now() + wait,
                every: (wait / 20).clamp(
                    std::time::Duration::from_millis(10),
                    std::time::Duration::from_millis(250),
                ),
            })
        });
        let claiming = span.in_scope(|| protocol.begin(key, owner, takeover));
        Self {
            state: State::Claiming {
                claiming,
                parts: Some((inner, req)),
            },
            classifier,
            span,
            wait,
            follow_up: None,
        }
    }

    /// Turns the run-once-more strategy on for this call.
    pub(crate) fn with_follow_up(mut self, follow_up: Option<FollowUp<Req>>) -> Self {
        let Some(FollowUp { payload, decode }) = follow_up else {
            return self;
        };
        let protocol = match &self.state {
            State::Claiming { claiming, .. } => claiming.protocol().clone(),
            _ => return self,
        };
        self.follow_up = Some(Box::new(FollowUps {
            protocol,
            payload,
            decode,
            inner: None,
            claim: None,
            answer: None,
        }));
        self
    }

    /// Calls `inner` without a claim: the request has no key.
    pub(crate) fn pass_through(mut inner: S, req: Req, classifier: C) -> Self {
        let span = tracing::info_span!("idempotency", key = tracing::field::Empty);
        span.in_scope(|| {
            tracing::debug!(
                outcome = "pass_through",
                "no idempotency key; passing through unclaimed"
            )
        });
        Self {
            state: State::Calling {
                fut: inner.call(req),
                running: None,
            },
            classifier,
            span,
            wait: None,
            follow_up: None,
        }
    }

    /// Answers at once with `error`: nothing was claimed or dispatched.
    pub(crate) fn refused(error: IdempotencyError<S::Error>, classifier: C) -> Self {
        let span = tracing::info_span!("idempotency", key = tracing::field::Empty);
        Self {
            state: State::Done {
                result: Some(Err(error)),
            },
            classifier,
            span,
            wait: None,
            follow_up: None,
        }
    }

    /// Answers at once: the extractor could not produce a valid key.
    pub(crate) fn rejected(error: BoxError, classifier: C) -> Self {
        let span = tracing::info_span!("idempotency", key = tracing::field::Empty);
        span.in_scope(
            || tracing::info!(outcome = "invalid_key", error = %Chain(&*error), "rejected: no valid idempotency key"),
        );
        Self {
            state: State::Done {
                result: Some(Err(IdempotencyError::InvalidKey { source: error })),
            },
            classifier,
            span,
            wait: None,
            follow_up: None,
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
                StateProj::Claiming { claiming, parts } => {
                    let decision = ready!(claiming.poll_decision(cx));
                    let key = claiming.key().clone();
                    if let (Decision::Duplicate(record), Some(wait)) = (&decision, this.wait.as_ref())
                        && record.state().is_in_progress()
                        && tokio::time::Instant::now() + wait.every <= wait.until
                    {
                        tracing::debug!(key = %key, outcome = "waiting", "the original is in progress; waiting for it");
                        let sleep = Box::pin(tokio::time::sleep(wait.every));
                        let parts = parts.take();
                        this.state.set(State::Waiting { sleep, key, parts });
                        continue;
                    }
                    if let (Decision::Duplicate(record), Some(follow)) = (&decision, this.follow_up.as_mut())
                        && record.state().is_in_progress()
                        && let Some(payload) = follow.payload.take()
                    {
                        let full_key = follow.protocol.full_key(&key);
                        let recording = follow_up::record(&follow.protocol, full_key, payload);
                        let (record, parts) = (Some(record.clone()), parts.take());
                        this.state.set(State::Recording {
                            recording,
                            key,
                            record,
                            parts,
                        });
                        continue;
                    }
                    let Some((mut inner, req)) = parts.take() else {
                        polled_after_completion()
                    };
                    let next = match decision {
                        Decision::Dispatch(lease) => {
                            let running = lease.map(Lease::run);
                            // The job can reach its claim (lost signal, fencing token) while it
                            // is called and polled.
                            let fut = match &running {
                                Some(run) => run.handle().scope(|| inner.call(req)),
                                None => inner.call(req),
                            };
                            if let (Some(follow), Some(run)) = (this.follow_up.as_mut(), running.as_ref()) {
                                follow.inner = Some(inner);
                                follow.claim = Some(run.claim());
                            }
                            State::Calling { fut, running }
                        }
                        Decision::Duplicate(record) => State::Done {
                            result: Some(Err(IdempotencyError::Duplicate { key, record })),
                        },
                        Decision::Unavailable(source) => State::Done {
                            result: Some(Err(IdempotencyError::StoreUnavailable { key, source })),
                        },
                    };
                    this.state.set(next);
                }
                StateProj::Waiting { sleep, key, parts } => {
                    ready!(sleep.as_mut().poll(cx));
                    let Some(wait) = this.wait.as_ref() else {
                        polled_after_completion()
                    };
                    let claiming = wait.protocol.begin(key.clone(), wait.owner.clone(), None);
                    let parts = parts.take();
                    this.state.set(State::Claiming { claiming, parts });
                }
                StateProj::Calling { mut fut, running } => {
                    let polled = match running.as_ref() {
                        Some(run) => run.handle().scope(|| fut.as_mut().poll(cx)),
                        None => fut.as_mut().poll(cx),
                    };
                    let result = match polled {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            if let Some(run) = running.as_mut()
                                && run.poll_abort(cx).is_ready()
                            {
                                let key = run.key().clone();
                                this.state.set(State::Done {
                                    result: Some(Err(IdempotencyError::ClaimLost { key })),
                                });
                                continue;
                            }
                            return Poll::Pending;
                        }
                    };
                    let Some(run) = running.take() else {
                        // Pass-through, shadow duplicate, or failed open on a claim that did not
                        // land: nothing to settle.
                        return Poll::Ready(result.map_err(IdempotencyError::Inner));
                    };
                    let settle = this.classifier.classify(&result);
                    let outcome = match settle {
                        Settle::Keep => this.classifier.outcome(&result),
                        Settle::Release => None,
                    };
                    match run.settle(settle, outcome) {
                        None => {
                            let result = result.map_err(IdempotencyError::Inner);
                            match after_run(this.follow_up, result) {
                                Ok(next) => this.state.set(next),
                                Err(result) => return Poll::Ready(result),
                            }
                        }
                        Some(settling) => this.state.set(State::Settling {
                            settling,
                            result: Some(result),
                        }),
                    }
                }
                StateProj::Settling { settling, result } => {
                    let released = ready!(settling.poll_settled(cx));
                    let Some(result) = result.take() else {
                        polled_after_completion()
                    };
                    let result = match released {
                        Ok(()) => result.map_err(IdempotencyError::Inner),
                        Err((key, source)) => Err(IdempotencyError::ReleaseFailed { key, source }),
                    };
                    match after_run(this.follow_up, result) {
                        Ok(next) => this.state.set(next),
                        Err(result) => return Poll::Ready(result),
                    }
                }
                StateProj::Recording {
                    recording,
                    key,
                    record,
                    parts,
                } => {
                    let recheck = ready!(recording.as_mut().poll(cx));
                    let (Some(follow), Some(record), Some((inner, _))) =
                        (this.follow_up.as_mut(), record.take(), parts.take())
                    else {
                        polled_after_completion()
                    };
                    let key = key.clone();
                    let next = match recheck {
                        Ok(Recheck::Run { payload, token }) => {
                            tracing::info!(key = %key, outcome = "follow_up", "the run settled meanwhile; running the latest follow-up here");
                            follow.inner = Some(inner);
                            follow_up_run(follow, key, token, &payload)
                        }
                        Ok(_) => {
                            tracing::info!(key = %key, outcome = "follow_up_recorded", "in progress; recorded as its follow-up");
                            State::Done {
                                result: Some(Err(IdempotencyError::Duplicate { key, record })),
                            }
                        }
                        Err(source) => {
                            tracing::error!(key = %key, outcome = "store_unavailable", error = %Chain(&source), "recording the follow-up failed");
                            State::Done {
                                result: Some(Err(IdempotencyError::StoreUnavailable { key, source })),
                            }
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Draining { draining, key } => {
                    let drained = ready!(draining.as_mut().poll(cx));
                    let Some(follow) = this.follow_up.as_mut() else {
                        polled_after_completion()
                    };
                    let key = key.clone();
                    match (drained, follow.claim.take()) {
                        (Ok(Some(payload)), Some((_, _, token))) => {
                            tracing::info!(key = %key, outcome = "follow_up", "running the follow-up recorded during the run");
                            let next = follow_up_run(follow, key, token, &payload);
                            this.state.set(next);
                        }
                        (drained, _) => {
                            if let Err(error) = drained {
                                tracing::error!(key = %key, error = %Chain(&error), "taking the follow-up failed; it stays recorded until its TTL");
                            }
                            let Some(answer) = follow.answer.take() else {
                                polled_after_completion()
                            };
                            return Poll::Ready(answer);
                        }
                    }
                }
                StateProj::Readying { req, running } => {
                    let Some(follow) = this.follow_up.as_mut() else {
                        polled_after_completion()
                    };
                    let Some(inner) = follow.inner.as_mut() else {
                        polled_after_completion()
                    };
                    match ready!(inner.poll_ready(cx)) {
                        Ok(()) => {
                            let (Some(req), Some(run)) = (req.take(), running.take()) else {
                                polled_after_completion()
                            };
                            follow.claim = Some(run.claim());
                            let fut = run.handle().scope(|| inner.call(req));
                            this.state.set(State::Calling {
                                fut,
                                running: Some(run),
                            });
                        }
                        Err(error) => {
                            let result = Err(IdempotencyError::Inner(error));
                            let key = running.as_ref().map(|r| r.key().clone());
                            tracing::error!(key = ?key.as_ref().map(|k| k.as_str()), "the inner service failed before the follow-up run; its claim stays until its TTL");
                            let answer = follow.answer.take().unwrap_or(result);
                            return Poll::Ready(answer);
                        }
                    }
                }
                StateProj::Done { result } => {
                    let Some(result) = result.take() else {
                        polled_after_completion()
                    };
                    return Poll::Ready(result);
                }
            }
        }
    }
}

/// A run settled: with the run-once-more strategy, keep its answer (the first for this call)
/// and take its follow-up; without, answer.
#[allow(clippy::type_complexity)]
fn after_run<S: Service<Req>, Req>(
    follow_up: &mut Option<Box<FollowUps<S, Req>>>,
    result: Result<S::Response, IdempotencyError<S::Error>>,
) -> Result<State<S, Req>, Result<S::Response, IdempotencyError<S::Error>>> {
    let Some(follow) = follow_up.as_mut() else {
        return Err(result);
    };
    let Some((key, full_key, token)) = follow.claim.clone() else {
        return Err(follow.answer.take().unwrap_or(result));
    };
    match &follow.answer {
        None => follow.answer = Some(result),
        Some(_) => {
            tracing::info!(key = %key, outcome = "follow_up_done", ok = result.is_ok(), "follow-up run finished")
        }
    }
    Ok(State::Draining {
        draining: follow_up::drain(&follow.protocol, full_key, token),
        key,
    })
}

/// Starts a follow-up run of `payload` under the claim `token` holds on `key`.
fn follow_up_run<S: Service<Req>, Req>(
    follow: &mut FollowUps<S, Req>,
    key: IdempotencyKey,
    token: ClaimToken,
    payload: &[u8],
) -> State<S, Req> {
    let full_key = follow.protocol.full_key(&key);
    let lease = Lease::new(
        follow.protocol.clone(),
        key.clone(),
        full_key,
        None,
        token,
        true,
        std::time::Instant::now(),
        None,
    );
    match (follow.decode)(payload) {
        Some(req) => State::Readying {
            req: Some(req),
            running: Some(lease.run()),
        },
        None => {
            tracing::error!(key = %key, outcome = "follow_up_undecodable", "a recorded follow-up could not be decoded; dropped, its claim stays until its TTL");
            let answer = follow.answer.take().unwrap_or_else(|| {
                Err(IdempotencyError::Duplicate {
                    record: Record::in_progress(&ClaimToken::from_string(""), None),
                    key,
                })
            });
            State::Done { result: Some(answer) }
        }
    }
}

/// A caller broke the `Future` contract, as `async fn` also panics when resumed after
/// completion. The only panic in the crate; shared by every future in it.
pub(crate) fn polled_after_completion() -> ! {
    panic!("tower_idempotency: response future polled after completion")
}

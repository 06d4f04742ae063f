//! The response future: acquiring → calling (renewing) → releasing. Every decision is the
//! permit's; this file only moves between states.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project::pin_project;
use tower::Service;
use tracing::Span;

use super::error::LimitError;
use super::permit::{Acquiring, Decision, Permit, Releasing, Shared};
use crate::IdempotencyKey;
use crate::future::polled_after_completion;

/// Response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).
///
/// A state machine: `Acquiring` (one store round trip) → `Calling` (the inner service, with
/// lease renewal) → `Releasing` (one round trip, owner-checked). The inner service's result is
/// returned whether or not the release succeeded (a failed release is retried in the background).
///
/// **Dropped early?** While acquiring: once the acquire answers, a granted (or possibly
/// applied) slot is released in the background. While the inner call runs or while releasing:
/// the call is over, so its slot is released in the background. Background work needs a Tokio
/// runtime; without one, the slot frees when its lease expires.
///
/// # Panics
/// Like every future, if polled again after it returned `Ready`.
#[pin_project]
pub struct ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    #[pin]
    state: State<S, Req>,
    span: Span,
}

#[pin_project(project = StateProj)]
enum State<S, Req>
where
    S: Service<Req>,
{
    Acquiring {
        acquiring: Acquiring,
        parts: Option<(S, Req)>,
    },
    Calling {
        #[pin]
        fut: S::Future,
        permit: Option<Permit>,
    },
    Releasing {
        releasing: Releasing,
        result: Option<Result<S::Response, S::Error>>,
    },
    Done {
        result: Option<Result<S::Response, LimitError<S::Error>>>,
    },
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Acquiring { .. } => "acquiring",
            State::Calling { .. } => "calling",
            State::Releasing { .. } => "releasing",
            State::Done { .. } => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    pub(crate) fn acquire(inner: S, req: Req, key: IdempotencyKey, limit: usize, shared: &Arc<Shared>) -> Self {
        let span = tracing::info_span!("concurrency_limit", key = %key, limit);
        let acquiring = span.in_scope(|| Acquiring::start(shared, key, limit));
        Self {
            state: State::Acquiring {
                acquiring,
                parts: Some((inner, req)),
            },
            span,
        }
    }

    pub(crate) fn pass_through(mut inner: S, req: Req) -> Self {
        Self {
            state: State::Calling {
                fut: inner.call(req),
                permit: None,
            },
            span: Span::none(),
        }
    }

    pub(crate) fn refused(error: LimitError<S::Error>) -> Self {
        Self {
            state: State::Done {
                result: Some(Err(error)),
            },
            span: Span::none(),
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    type Output = Result<S::Response, LimitError<S::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquiring { acquiring, parts } => {
                    let decision = ready!(acquiring.poll_decision(cx));
                    let Some((mut inner, req)) = parts.take() else {
                        polled_after_completion()
                    };
                    let key = acquiring.key().clone();
                    let next = match decision {
                        Decision::Run(permit) => State::Calling {
                            fut: inner.call(req),
                            permit,
                        },
                        Decision::AtCapacity { retry_after } => State::Done {
                            result: Some(Err(LimitError::AtCapacity {
                                key,
                                limit: acquiring.limit(),
                                retry_after,
                            })),
                        },
                        Decision::Unavailable(source) => State::Done {
                            result: Some(Err(LimitError::StoreUnavailable { key, source })),
                        },
                    };
                    this.state.set(next);
                }
                StateProj::Calling { fut, permit } => {
                    let result = match fut.poll(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            if let Some(held) = permit.as_mut()
                                && held.poll_abort(cx).is_ready()
                            {
                                let key = held.key().clone();
                                // Dropping the permit (with the inner future) releases it in the
                                // background: owner-checked, so a slot now someone else's is
                                // left alone.
                                this.state.set(State::Done {
                                    result: Some(Err(LimitError::LeaseLost { key })),
                                });
                                continue;
                            }
                            return Poll::Pending;
                        }
                    };
                    match permit.take() {
                        None => return Poll::Ready(result.map_err(LimitError::Inner)),
                        Some(held) => this.state.set(State::Releasing {
                            releasing: held.release(),
                            result: Some(result),
                        }),
                    }
                }
                StateProj::Releasing { releasing, result } => {
                    ready!(releasing.poll_released(cx));
                    let Some(result) = result.take() else {
                        polled_after_completion()
                    };
                    return Poll::Ready(result.map_err(LimitError::Inner));
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

//! The HTTP response future: check the head, buffer the body, check, extract, then drive the
//! core future and turn its short-circuits into responses.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use pin_project::pin_project;
use tower::Service;

use super::body::{ReplayBody, ResponseBody};
use super::collect::{Classified, Collecting, FromCollected, HttpResponse, Settled};
use super::extract::ExtractError;
use super::pre_claim::{PreClaim, PreClaimFuture};
use super::replay::Replay;
use super::service::Front;
use super::webhook::OverrideTrigger;
use super::{HttpKeyExtractor, ShortCircuitResponse, VerifyRequest};
use crate::extract::BoxError;
use crate::future::{Chain, polled_after_completion};
use crate::protocol::Protocol;
use crate::store::ClaimToken;
use crate::{ClassifyOutcome, IdempotencyError, IdempotencyKey};

/// Response future of [`HttpIdempotency`](super::HttpIdempotency).
///
/// A state machine: the head is checked first (signature header or token, then a declared
/// `Content-Length` over the limit), before a byte of the body is read; then `Buffering` (read
/// the body up to the limit) → checks and extraction, done at once → `Checking` (the
/// [pre-claim check](super::PreClaimCheck), when configured; nothing is claimed yet) →
/// `Claiming` (the core [`ResponseFuture`](crate::ResponseFuture), driving the claim protocol
/// directly: claim, call the handler, keep or release) → response. A short-circuit at any step ends in `Answered`. When
/// neither the extractor nor the verifier reads the body, `Buffering` is skipped.
///
/// The inner service receives the request with a [`ReplayBody`] (the caller's body, or the
/// buffered bytes); the output's body is a [`ResponseBody`] (the inner service's, or a
/// short-circuit's).
///
/// Dropping it before the claim settles is handled by the core future (see its docs).
#[pin_project]
pub struct ResponseFuture<S, B, C, X, V, R>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    #[pin]
    state: State<S, B, C>,
    front: Arc<Front<X, V, R>>,
    protocol: Arc<Protocol>,
}

/// What the checks let through: the service and classifier, until the claim starts.
struct Pending<S, C> {
    inner: S,
    classifier: C,
}

// Pinned in place for the whole call: boxing the larger states would cost an allocation per
// request for nothing.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = StateProj)]
enum State<S, B, C>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    Buffering {
        #[pin]
        collect: Collect<Limited<B>>,
        parts: Option<Parts>,
        pending: Option<Pending<S, C>>,
    },
    Checking {
        check: PreClaimFuture,
        req: Option<Request<ReplayBody<B>>>,
        claim: Option<Claim>,
        pending: Option<Pending<S, C>>,
    },
    Claiming {
        fut: Option<Pin<Box<CoreFuture<S, B, C>>>>,
        /// The request's fingerprint, with replay: compared with a duplicate's record.
        fingerprint: Option<String>,
        /// A claim (not a pass-through): run to completion in its own task, when the layer
        /// does that.
        claimed: bool,
    },
    /// A claimed request running in its own task: a client that goes away does not cancel it.
    Detached {
        task: tokio::task::JoinHandle<CoreOutput<S, B>>,
        fingerprint: Option<String>,
    },
    Answered {
        response: Option<Response<Bytes>>,
    },
}

impl<S, B, C, X, V, R> fmt::Debug for ResponseFuture<S, B, C, X, V, R>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Buffering { .. } => "buffering",
            State::Checking { .. } => "checking",
            State::Claiming { .. } => "claiming",
            State::Detached { .. } => "running_detached",
            State::Answered { .. } => "answered",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S, B, C, X, V, R> ResponseFuture<S, B, C, X, V, R>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
    X: HttpKeyExtractor,
    V: VerifyRequest,
    R: ShortCircuitResponse,
{
    pub(crate) fn new(
        req: Request<B>,
        inner: S,
        protocol: Arc<Protocol>,
        classifier: C,
        front: Arc<Front<X, V, R>>,
    ) -> Self {
        let pending = Pending { inner, classifier };
        let (mut parts, body) = req.into_parts();
        let state = if let Some(source) = &protocol.invalid {
            State::Claiming {
                fut: Some(Box::pin(crate::ResponseFuture::refused(
                    IdempotencyError::Misconfigured { source: source.clone() },
                    FromCollected,
                ))),
                fingerprint: None,
                claimed: false,
            }
        } else if let Err(error) = front.verifier.verify_head(&parts) {
            // Authentication comes first, from the head alone: not a byte of the body is read
            // for a request that cannot be authentic.
            State::Answered {
                response: Some(unauthenticated(&front, &error)),
            }
        } else if !front.needs_body() {
            match reject(&front, &mut parts, &Bytes::new()) {
                Ok(claim) => proceed(&front, pending, parts, Either::Left(body), claim, &protocol),
                Err(rejection) => State::Answered {
                    response: Some(rejection),
                },
            }
        } else if declared_length(&parts).is_some_and(|len| len > front.body_limit as u64)
            || body.size_hint().lower() > front.body_limit as u64
        {
            // Content-Length already says it is too large: do not read it.
            State::Answered {
                response: Some(too_large(&front)),
            }
        } else {
            State::Buffering {
                collect: Limited::new(body, front.body_limit).collect(),
                parts: Some(parts),
                pending: Some(pending),
            }
        };
        Self { state, front, protocol }
    }
}

/// Starts the claim of `key` (or passes the request through without one), driving the core
/// protocol directly.
fn start<S, B, C>(
    pending: Pending<S, C>,
    req: Request<ReplayBody<B>>,
    claim: Option<Claim>,
    protocol: &Arc<Protocol>,
    replay: Option<Arc<Replay>>,
) -> State<S, B, C>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    let Pending { inner, classifier } = pending;
    let inner = Collecting {
        inner,
        classifier,
        replay,
    };
    match claim {
        Some(Claim {
            key,
            takeover,
            fingerprint,
        }) => {
            // With replay the request's fingerprint rides in its claim token, stored with the
            // record, so a later request under the same key can be compared.
            let owner = fingerprint
                .as_deref()
                .and_then(|fp| ClaimToken::generate().with_fingerprint(fp));
            let fut =
                crate::ResponseFuture::claim(inner, req, key, owner, takeover.as_deref(), protocol, FromCollected);
            State::Claiming {
                fut: Some(Box::pin(fut)),
                fingerprint,
                claimed: true,
            }
        }
        None => State::Claiming {
            fut: Some(Box::pin(crate::ResponseFuture::pass_through(inner, req, FromCollected))),
            fingerprint: None,
            claimed: false,
        },
    }
}

/// After extraction: the pre-claim check first, when there is one and a key to claim; else
/// straight to the claim (or the pass-through).
fn proceed<S, B, C, X, V, R>(
    front: &Front<X, V, R>,
    pending: Pending<S, C>,
    parts: Parts,
    body: ReplayBody<B>,
    claim: Option<Claim>,
    protocol: &Arc<Protocol>,
) -> State<S, B, C>
where
    S: Service<Request<ReplayBody<B>>>,
    S::Response: HttpResponse,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
    B: Body,
    B::Error: Into<BoxError>,
{
    match (&front.pre_claim, claim) {
        (Some(check), Some(claim)) => State::Checking {
            check: check.check(&parts, &claim.key),
            req: Some(Request::from_parts(parts, body)),
            claim: Some(claim),
            pending: Some(pending),
        },
        (_, claim) => start(
            pending,
            Request::from_parts(parts, body),
            claim,
            protocol,
            front.replay.clone(),
        ),
    }
}

/// What the checks found to claim: the key, and an override's identity when the extractor
/// marked the request as one.
struct Claim {
    key: IdempotencyKey,
    takeover: Option<String>,
    /// With replay: the request's fingerprint.
    fingerprint: Option<String>,
}

/// The `Content-Length` the client declared, if it is one valid number.
fn declared_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The answer to a request the verifier refused; nothing was claimed.
fn unauthenticated<X, V, R: ShortCircuitResponse>(
    front: &Front<X, V, R>,
    error: &(dyn std::error::Error + 'static),
) -> Response<Bytes> {
    tracing::warn!(outcome = "unauthorized", error = %Chain(error), "rejected: signature check failed; nothing claimed");
    front.responses.unauthorized(error)
}

/// Signature check, then key extraction. Returns what to claim (`None`: pass through), or the
/// rejection's response. The key is also put in the extensions, for the handler.
#[allow(clippy::result_large_err)] // the rejection is the response itself, answered at once
fn reject<X, V, R>(front: &Front<X, V, R>, parts: &mut Parts, body: &Bytes) -> Result<Option<Claim>, Response<Bytes>>
where
    X: HttpKeyExtractor,
    V: VerifyRequest,
    R: ShortCircuitResponse,
{
    if let Err(error) = front.verifier.verify(parts, body) {
        return Err(unauthenticated(front, &error));
    }
    // Only the extractor may mark this request as an override (not an outer layer).
    parts.extensions.remove::<OverrideTrigger>();
    match front.extractor.extract(parts, body) {
        Ok(Some(key)) => {
            parts.extensions.insert(key.clone());
            let takeover = parts.extensions.get::<OverrideTrigger>().map(|o| o.identity.clone());
            let fingerprint = front.replay.as_ref().map(|replay| replay.fingerprint(parts, body));
            Ok(Some(Claim {
                key,
                takeover,
                fingerprint,
            }))
        }
        Ok(None) => {
            // A key left by an outer layer must not look claimed to the handler.
            parts.extensions.remove::<IdempotencyKey>();
            Ok(None)
        }
        Err(error) => {
            let unsupported = (&error as &(dyn std::error::Error + 'static))
                .downcast_ref::<ExtractError>()
                .is_some_and(|e| matches!(e, ExtractError::UnsupportedContentType { .. }));
            if unsupported {
                tracing::info!(outcome = "unsupported_media_type", error = %Chain(&error), "rejected: body is not JSON; nothing claimed");
                return Err(front.responses.unsupported_media_type(&error));
            }
            tracing::info!(outcome = "invalid", error = %Chain(&error), "rejected: no valid idempotency key; nothing claimed");
            Err(front.responses.invalid(&error))
        }
    }
}

fn too_large<X, V, R: ShortCircuitResponse>(front: &Front<X, V, R>) -> Response<Bytes> {
    tracing::info!(
        outcome = "too_large",
        limit = front.body_limit,
        "rejected: body over the limit; nothing claimed"
    );
    front.responses.too_large(front.body_limit)
}

/// The claim protocol's future, as the HTTP layer drives it.
type CoreFuture<S, B, C> = crate::ResponseFuture<Collecting<S, C>, Request<ReplayBody<B>>, FromCollected>;

/// What [`CoreFuture`] resolves to.
type CoreOutput<S, B> = Result<
    Response<ResponseBody<<<S as Service<Request<ReplayBody<B>>>>::Response as HttpResponse>::Body>>,
    IdempotencyError<Classified<<S as Service<Request<ReplayBody<B>>>>::Error>>,
>;

/// The layered service's answer from the claim protocol's outcome.
fn answer<X, V, R: ShortCircuitResponse, ResBody, E>(
    front: &Front<X, V, R>,
    fingerprint: Option<&str>,
    output: Result<Response<ResponseBody<ResBody>>, IdempotencyError<Classified<E>>>,
) -> Result<Response<ResponseBody<ResBody>>, E> {
    let responses = &front.responses;
    let response = match output {
        Ok(mut response) => {
            response.extensions_mut().remove::<Settled>();
            return Ok(response);
        }
        Err(IdempotencyError::Inner(classified)) => return Err(classified.error),
        Err(IdempotencyError::Duplicate { key, record }) => match &front.replay {
            Some(replay) => replay.answer(&key, &record, fingerprint),
            None => responses.duplicate(&key),
        },
        Err(IdempotencyError::StoreUnavailable { .. }) => responses.unavailable(),
        Err(IdempotencyError::ClaimLost { key }) => responses.claim_lost(&key),
        Err(IdempotencyError::InvalidKey { source }) => responses.invalid(&*source),
        // The job was blocked (the handler's own answer is gone with the error); its claim
        // still stands until the background release succeeds.
        Err(IdempotencyError::ReleaseFailed { .. }) => responses.unavailable(),
        Err(IdempotencyError::Misconfigured { .. }) => responses.unavailable(),
    };
    Ok(short_circuit(response))
}

/// One of the layer's own answers, as the layered service's response.
fn short_circuit<ResBody>(response: Response<Bytes>) -> Response<ResponseBody<ResBody>> {
    response.map(|bytes| Either::Right(Full::new(bytes)))
}

impl<S, B, C, X, V, R, ResBody> Future for ResponseFuture<S, B, C, X, V, R>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone,
    ResBody: Body,
    // A claimed request runs to completion in its own task (see `with_run_to_completion`).
    S: Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
    ResBody::Data: Send,
    B: Send + 'static,
    C: Send + 'static,
    B: Body,
    B::Error: Into<BoxError>,
    X: HttpKeyExtractor,
    V: VerifyRequest,
    R: ShortCircuitResponse,
    C: ClassifyOutcome<Response<ResBody>, S::Error> + Clone,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Buffering {
                    collect,
                    parts,
                    pending,
                } => {
                    let collected = ready!(collect.poll(cx));
                    let (Some(mut parts), Some(pending)) = (parts.take(), pending.take()) else {
                        polled_after_completion()
                    };
                    let next = match collected {
                        Ok(collected) => {
                            let bytes = collected.to_bytes();
                            match reject(this.front, &mut parts, &bytes) {
                                Ok(claim) => proceed(
                                    this.front,
                                    pending,
                                    parts,
                                    Either::Right(Full::new(bytes)),
                                    claim,
                                    this.protocol,
                                ),
                                Err(rejection) => State::Answered {
                                    response: Some(rejection),
                                },
                            }
                        }
                        Err(error) if error.is::<LengthLimitError>() => State::Answered {
                            response: Some(too_large(this.front)),
                        },
                        Err(source) => {
                            let error = ExtractError::UnreadableBody { source };
                            tracing::info!(outcome = "invalid", error = %Chain(&error), "rejected: body unreadable; nothing claimed");
                            State::Answered {
                                response: Some(this.front.responses.invalid(&error)),
                            }
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Checking {
                    check,
                    req,
                    claim,
                    pending,
                } => {
                    let decision = ready!(check.as_mut().poll(cx));
                    let (Some(mut req), Some(claim), Some(pending)) = (req.take(), claim.take(), pending.take()) else {
                        polled_after_completion()
                    };
                    let next = match decision {
                        PreClaim::Claim => start(pending, req, Some(claim), this.protocol, this.front.replay.clone()),
                        PreClaim::Ignore => {
                            tracing::info!(key = %claim.key, outcome = "ignored", "pre-claim check: not a job; passing through unclaimed");
                            req.extensions_mut().remove::<IdempotencyKey>();
                            start(pending, req, None, this.protocol, this.front.replay.clone())
                        }
                        PreClaim::Defer => {
                            tracing::info!(key = %claim.key, outcome = "deferred", "pre-claim check deferred the request; nothing claimed");
                            State::Answered {
                                response: Some(this.front.responses.deferred(&claim.key)),
                            }
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Claiming {
                    fut,
                    fingerprint,
                    claimed,
                } => {
                    if *claimed
                        && let Some(handlers) = &this.front.handlers
                        && tokio::runtime::Handle::try_current().is_ok()
                        && let Some(core) = fut.take()
                    {
                        let task = handlers.spawn(core);
                        let fingerprint = fingerprint.take();
                        this.state.set(State::Detached { task, fingerprint });
                        continue;
                    }
                    let Some(core) = fut.as_mut() else {
                        polled_after_completion()
                    };
                    let output = ready!(core.as_mut().poll(cx));
                    return Poll::Ready(answer(this.front, fingerprint.as_deref(), output));
                }
                StateProj::Detached { task, fingerprint } => {
                    let output = match ready!(Pin::new(task).poll(cx)) {
                        Ok(output) => output,
                        // The handler panicked: the panic is the caller's, as without the task.
                        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                        // Cancelled: the runtime is shutting down.
                        Err(_) => return Poll::Ready(Ok(short_circuit(this.front.responses.unavailable()))),
                    };
                    return Poll::Ready(answer(this.front, fingerprint.as_deref(), output));
                }
                StateProj::Answered { response } => {
                    let Some(response) = response.take() else {
                        polled_after_completion()
                    };
                    return Poll::Ready(Ok(short_circuit(response)));
                }
            }
        }
    }
}

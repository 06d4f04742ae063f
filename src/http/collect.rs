//! The handler as the claim protocol sees it from the HTTP layer: its response is classified
//! (keep or release) by the layer's classifier on the handler's own response, and — with
//! [`Replay`](super::Replay) — a response to keep is read whole and stored with the record.
//!
//! The core protocol classifies synchronously from `&Result<Response, E>`, which cannot read a
//! streaming body; so the decision is made here, where the body can be awaited, and handed to
//! the core as a response extension ([`Settled`]) or beside the error ([`Classified`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Either, Full};
use pin_project::pin_project;
use tower::Service;

use super::body::ResponseBody;
use super::replay::Replay;
use crate::{ClassifyOutcome, Settle};

/// The inner service, wrapped: see the module docs.
#[derive(Clone)]
pub(crate) struct Collecting<S, C> {
    pub(crate) inner: S,
    pub(crate) classifier: C,
    pub(crate) replay: Option<Arc<Replay>>,
}

/// The decision, carried to the core classifier on the response.
#[derive(Clone)]
pub(crate) struct Settled {
    settle: Settle,
    stored: Option<Arc<Vec<u8>>>,
}

/// The inner service's error, with the classifier's decision on it.
pub(crate) struct Classified<E> {
    pub(crate) error: E,
    settle: Settle,
}

/// The core classifier of the HTTP layer: reads the decision made by [`Collecting`].
#[derive(Clone, Copy)]
pub(crate) struct FromCollected;

impl<B, E> ClassifyOutcome<Response<B>, Classified<E>> for FromCollected {
    fn classify(&self, result: &Result<Response<B>, Classified<E>>) -> Settle {
        match result {
            Ok(response) => response
                .extensions()
                .get::<Settled>()
                .map_or(Settle::Keep, |s| s.settle),
            Err(classified) => classified.settle,
        }
    }

    fn outcome(&self, result: &Result<Response<B>, Classified<E>>) -> Option<Vec<u8>> {
        let settled = result.as_ref().ok()?.extensions().get::<Settled>()?;
        settled.stored.as_ref().map(|bytes| bytes.to_vec())
    }
}

impl<S, C, ReqBody> Service<Request<ReqBody>> for Collecting<S, C>
where
    S: Service<Request<ReqBody>>,
    S::Response: HttpResponse,
    C: ClassifyOutcome<S::Response, S::Error> + Clone,
{
    type Response = Response<ResponseBody<<S::Response as HttpResponse>::Body>>;
    type Error = Classified<S::Error>;
    type Future = CollectingFuture<S::Future, C, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|error| Classified {
            error,
            settle: Settle::Keep,
        })
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The handler finds its claim (lost signal, fencing token) in the request's extensions.
        match crate::LeaseHandle::current() {
            Some(handle) => {
                req.extensions_mut().insert(handle);
            }
            None => {
                req.extensions_mut().remove::<crate::LeaseHandle>();
            }
        }
        CollectingFuture {
            state: CollectState::Calling {
                fut: self.inner.call(req),
            },
            classifier: self.classifier.clone(),
            replay: self.replay.clone(),
        }
    }
}

/// The future of [`Collecting`].
#[pin_project]
pub(crate) struct CollectingFuture<F, C, Resp: HttpResponse> {
    #[pin]
    state: CollectState<F, Resp::Body>,
    classifier: C,
    replay: Option<Arc<Replay>>,
}

// Moved once per call, never copied around: boxing the larger state would cost an allocation
// per request for nothing.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = CollectProj)]
enum CollectState<F, ResBody: Body> {
    Calling {
        #[pin]
        fut: F,
    },
    Reading {
        #[pin]
        collect: Collect<ResBody>,
        parts: Option<http::response::Parts>,
    },
}

impl<F, C, E, Resp> Future for CollectingFuture<F, C, Resp>
where
    F: Future<Output = Result<Resp, E>>,
    C: ClassifyOutcome<Resp, E>,
    Resp: HttpResponse,
{
    type Output = Result<Response<ResponseBody<Resp::Body>>, Classified<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                CollectProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx));
                    let settle = this.classifier.classify(&result);
                    let mut response = match result {
                        Ok(response) => response.into_response(),
                        Err(error) => return Poll::Ready(Err(Classified { error, settle })),
                    };
                    if this.replay.is_none() {
                        response.extensions_mut().insert(Settled { settle, stored: None });
                        return Poll::Ready(Ok(response.map(Either::Left)));
                    }
                    // With replay, a refused or failed request is not stored: released, so a
                    // retry runs the handler again.
                    let status = response.status();
                    if settle == Settle::Release || status.is_client_error() || status.is_server_error() {
                        response.extensions_mut().insert(Settled {
                            settle: Settle::Release,
                            stored: None,
                        });
                        return Poll::Ready(Ok(response.map(Either::Left)));
                    }
                    let (parts, body) = response.into_parts();
                    this.state.set(CollectState::Reading {
                        collect: body.collect(),
                        parts: Some(parts),
                    });
                }
                CollectProj::Reading { collect, parts } => {
                    let collected = ready!(collect.poll(cx));
                    let Some(mut parts) = parts.take() else {
                        crate::future::polled_after_completion()
                    };
                    let Some(replay) = this.replay.as_ref() else {
                        crate::future::polled_after_completion()
                    };
                    let (bytes, stored) = match collected {
                        Ok(collected) => {
                            let bytes = collected.to_bytes();
                            let stored = replay.encode(parts.status, &parts.headers, &bytes);
                            (bytes, Some(Arc::new(stored)))
                        }
                        Err(_) => {
                            // The handler ran but its body broke off: keep the claim (it may
                            // have had its effect), store nothing, answer what was read: none.
                            tracing::error!(
                                outcome = "response_body_failed",
                                "the handler's response body failed while being read for replay; nothing stored"
                            );
                            parts.status = http::StatusCode::BAD_GATEWAY;
                            (Bytes::new(), None)
                        }
                    };
                    parts.extensions.insert(Settled {
                        settle: Settle::Keep,
                        stored,
                    });
                    return Poll::Ready(Ok(Response::from_parts(parts, Either::Right(Full::new(bytes)))));
                }
            }
        }
    }
}

/// An HTTP response whose body the layer can read: `http::Response<B>` with `B: Body`. Sealed;
/// named in the bounds of the HTTP layer's service and future.
pub trait HttpResponse: sealed::Sealed {
    /// The response's body type.
    type Body: Body;
    /// The response itself.
    #[doc(hidden)]
    fn into_response(self) -> Response<Self::Body>;
}

impl<B: Body> HttpResponse for Response<B> {
    type Body = B;
    fn into_response(self) -> Response<B> {
        self
    }
}

mod sealed {
    pub trait Sealed {}
    impl<B> Sealed for http::Response<B> {}
}

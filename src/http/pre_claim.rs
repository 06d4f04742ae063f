//! Checks before the claim: an asynchronous step that sees the request (and what the extractor
//! found, in its extensions) and decides claim, ignore or defer **before any claim exists**.
//!
//! The system this crate replaces claims a review only after it has checked, with API calls,
//! that every check of the commit is complete and green. If that check ran in the handler, the
//! claim would already be held while it ran: a delivery that defers ("not all checks done yet")
//! would hold the key, and the concurrent all-green delivery for the same key would be answered
//! duplicate — then nothing dispatches. A deferral here takes no claim.

use std::future::Future;
use std::pin::Pin;

use http::request::Parts;

use crate::IdempotencyKey;

/// What a [`PreClaimCheck`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PreClaim {
    /// Claim the key, then call the handler: the usual path.
    Claim,
    /// Not a job: call the handler without a claim (its request carries no
    /// [`IdempotencyKey`]), as for an event that dispatches nothing.
    Ignore,
    /// Not yet: answer at once ([`ShortCircuitResponse::deferred`](super::ShortCircuitResponse::deferred),
    /// `200 {"status":"deferred"}` by default) without a claim and without calling the handler;
    /// a later trigger for the same key can still claim it.
    Defer,
}

/// The future a [`PreClaimCheck`] returns.
pub type PreClaimFuture = Pin<Box<dyn Future<Output = PreClaim> + Send + 'static>>;

/// An asynchronous check before the claim, in the spirit of tower-http's
/// `AsyncAuthorizeRequest`. It sees the request's head — with what the extractor found in its
/// extensions, e.g. the [`DispatchTarget`](super::DispatchTarget) of a webhook — and the key.
///
/// Closures `Fn(&Parts, &IdempotencyKey) -> impl Future<Output = PreClaim>` implement it:
///
/// ```
/// use http::request::Parts;
/// use tower_idempotency::IdempotencyKey;
/// use tower_idempotency::http::{DispatchTarget, PreClaim, PreClaimCheck};
///
/// let all_checks_green = |parts: &Parts, _key: &IdempotencyKey| {
///     let target = parts.extensions.get::<DispatchTarget>().cloned();
///     async move {
///         match target {
///             // Ask the forge's API whether every check of target.head_sha is complete and green.
///             Some(_target) => PreClaim::Claim,
///             None => PreClaim::Ignore,
///         }
///     }
/// };
/// # fn is_check(_: &impl PreClaimCheck) {}
/// is_check(&all_checks_green);
/// ```
pub trait PreClaimCheck: Send + Sync + 'static {
    /// Decides for one request.
    fn check(&self, parts: &Parts, key: &IdempotencyKey) -> PreClaimFuture;
}

impl<F, Fut> PreClaimCheck for F
where
    F: Fn(&Parts, &IdempotencyKey) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = PreClaim> + Send + 'static,
{
    fn check(&self, parts: &Parts, key: &IdempotencyKey) -> PreClaimFuture {
        Box::pin(self(parts, key))
    }
}

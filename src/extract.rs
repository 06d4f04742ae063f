//! Key extraction: how the layer decides which requests are "the same job".
//!
//! Extraction is pluggable because only the application knows what identifies a job: a header,
//! a field of a queue message, or a (project, pull request, head SHA) triple from a webhook body.

use std::sync::Arc;

use crate::IdempotencyKey;
use crate::store::ClaimToken;

/// The boxed error an extractor's failure is reported as.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Pulls an [`IdempotencyKey`] out of a request.
///
/// - `Ok(Some(key))`: the request takes a claim on `key` before the inner service runs.
/// - `Ok(None)`: the request is not deduplicated and passes through unclaimed.
/// - `Err(_)`: the request is rejected; the inner service is never called.
///
/// Closures `FnMut(&Req) -> Result<Option<IdempotencyKey>, E>` implement it:
///
/// ```
/// use tower_idempotency::{IdempotencyKey, KeyError, KeyExtractor};
///
/// struct Job { project: String, pr: u64, sha: String }
///
/// let mut extractor = |job: &Job| -> Result<Option<IdempotencyKey>, KeyError> {
///     IdempotencyKey::for_pull_request(&job.project, job.pr, &job.sha).map(Some)
/// };
/// let job = Job { project: "o/r".into(), pr: 7, sha: "abcdef1".into() };
/// let key = extractor.extract(&job).unwrap().unwrap();
/// assert_eq!(key.as_str(), "o/r:7:abcdef1");
/// ```
pub trait KeyExtractor<Req> {
    /// Why a key could not be extracted. Shown to the caller as an invalid-key rejection.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Extracts the key of `req`.
    fn extract(&mut self, req: &Req) -> Result<Option<IdempotencyKey>, Self::Error>;

    /// A stable identity of the job `req` belongs to (a stream message id, a delivery id), so a
    /// retry of the same job finds its own claim and is answered `Acquired`, not duplicate.
    /// `None` (the default) claims under a fresh token per call. See [`WithOwner`].
    fn owner(&mut self, req: &Req) -> Option<ClaimToken> {
        let _ = req;
        None
    }

    /// When `req` is a **human override** (a person asked for the job again), its own identity
    /// (e.g. the delivery id of the review request). An override takes the key over even while
    /// an automated claim holds it, and is itself deduplicated by this identity: the same
    /// override delivered twice dispatches once. `None` (the default): an ordinary claim. See
    /// [`WithOverride`].
    fn takeover(&mut self, req: &Req) -> Option<String> {
        let _ = req;
        None
    }

    /// With the run-once-more strategy: `req` encoded, to be recorded as the follow-up of a run
    /// in progress, and how to decode a recorded follow-up. `None` (the default): a duplicate
    /// is only a duplicate. See [`WithRunOnceMore`].
    fn follow_up(&mut self, req: &Req) -> Option<FollowUp<Req>> {
        let _ = req;
        None
    }
}

/// Turns a recorded follow-up back into a request.
pub(crate) type Decode<Req> = Arc<dyn Fn(&[u8]) -> Option<Req> + Send + Sync>;

/// A request as a follow-up: its bytes, and the decoder for recorded ones. Made by
/// [`WithRunOnceMore`].
pub struct FollowUp<Req> {
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) decode: Decode<Req>,
}

impl<Req> std::fmt::Debug for FollowUp<Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowUp")
            .field("payload_len", &self.payload.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

/// An extractor with the run-once-more strategy, made by
/// [`IdempotencyLayer::with_run_once_more`](crate::IdempotencyLayer::with_run_once_more):
/// `encode` turns a request into the bytes recorded as a run's follow-up, `decode` turns
/// recorded bytes back into a request (in whichever process runs it).
#[derive(Clone)]
pub struct WithRunOnceMore<X, E, Req> {
    extractor: X,
    encode: E,
    decode: Decode<Req>,
}

impl<X: std::fmt::Debug, E, Req> std::fmt::Debug for WithRunOnceMore<X, E, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithRunOnceMore")
            .field("extractor", &self.extractor)
            .finish_non_exhaustive()
    }
}

impl<X, E, Req> WithRunOnceMore<X, E, Req> {
    /// Keys from `extractor`; follow-ups encoded by `encode` and decoded by `decode`.
    pub fn new(extractor: X, encode: E, decode: impl Fn(&[u8]) -> Option<Req> + Send + Sync + 'static) -> Self {
        Self {
            extractor,
            encode,
            decode: Arc::new(decode),
        }
    }
}

impl<Req, X, E> KeyExtractor<Req> for WithRunOnceMore<X, E, Req>
where
    X: KeyExtractor<Req>,
    E: FnMut(&Req) -> Option<Vec<u8>>,
{
    type Error = X::Error;

    fn extract(&mut self, req: &Req) -> Result<Option<IdempotencyKey>, X::Error> {
        self.extractor.extract(req)
    }

    fn owner(&mut self, req: &Req) -> Option<ClaimToken> {
        self.extractor.owner(req)
    }

    fn takeover(&mut self, req: &Req) -> Option<String> {
        self.extractor.takeover(req)
    }

    fn follow_up(&mut self, req: &Req) -> Option<FollowUp<Req>> {
        Some(FollowUp {
            payload: (self.encode)(req),
            decode: self.decode.clone(),
        })
    }
}

impl<Req, F, E> KeyExtractor<Req> for F
where
    F: FnMut(&Req) -> Result<Option<IdempotencyKey>, E>,
    E: std::error::Error + Send + Sync + 'static,
{
    type Error = E;

    fn extract(&mut self, req: &Req) -> Result<Option<IdempotencyKey>, E> {
        self(req)
    }
}

/// An extractor with a stable owner identity per job, made by
/// [`IdempotencyLayer::with_owner`](crate::IdempotencyLayer::with_owner).
///
/// The claim is taken under a token made from the owner identity, so the same job — a queue
/// message handed out again after a crash or a blocked run — finds its own claim and is
/// dispatched, while any other job with the same key is a duplicate. The identity must be
/// unique per job (not per key): two different jobs sharing one would both be let through.
///
/// ```
/// use tower_idempotency::{IdempotencyKey, KeyError, KeyExtractor, WithOwner};
///
/// struct Message { id: String, pr_key: String }
///
/// let mut extractor = WithOwner::new(
///     |m: &Message| -> Result<_, KeyError> { IdempotencyKey::new(&m.pr_key).map(Some) },
///     |m: &Message| Some(m.id.clone()),
/// );
/// let msg = Message { id: "1700000000000-0".into(), pr_key: "o/r:1:abcdef1".into() };
/// assert_eq!(extractor.owner(&msg).unwrap().as_str(), "owner:1700000000000-0");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct WithOwner<X, F> {
    extractor: X,
    owner: F,
}

impl<X, F> WithOwner<X, F> {
    /// Keys from `extractor`; owner identities from `owner`.
    pub fn new(extractor: X, owner: F) -> Self {
        Self { extractor, owner }
    }
}

impl<Req, X, F> KeyExtractor<Req> for WithOwner<X, F>
where
    X: KeyExtractor<Req>,
    F: FnMut(&Req) -> Option<String>,
{
    type Error = X::Error;

    fn extract(&mut self, req: &Req) -> Result<Option<IdempotencyKey>, X::Error> {
        self.extractor.extract(req)
    }

    fn owner(&mut self, req: &Req) -> Option<ClaimToken> {
        (self.owner)(req).map(|owner| ClaimToken::from_owner(&owner))
    }

    fn takeover(&mut self, req: &Req) -> Option<String> {
        self.extractor.takeover(req)
    }

    fn follow_up(&mut self, req: &Req) -> Option<FollowUp<Req>> {
        self.extractor.follow_up(req)
    }
}

/// An extractor that marks human overrides, made by
/// [`IdempotencyLayer::with_override`](crate::IdempotencyLayer::with_override): `takeover`
/// returns the override's own identity (a review request's delivery id) for requests that are
/// overrides, `None` for ordinary triggers.
///
/// ```
/// use tower_idempotency::{IdempotencyKey, KeyError, KeyExtractor, WithOverride};
///
/// struct Trigger { key: String, requested_by_person: Option<String> }
///
/// let mut extractor = WithOverride::new(
///     |t: &Trigger| -> Result<_, KeyError> { IdempotencyKey::new(&t.key).map(Some) },
///     |t: &Trigger| t.requested_by_person.clone(),
/// );
/// let rerun = Trigger { key: "o/r:1:abcdef1".into(), requested_by_person: Some("delivery-7".into()) };
/// assert_eq!(extractor.takeover(&rerun).as_deref(), Some("delivery-7"));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct WithOverride<X, F> {
    extractor: X,
    takeover: F,
}

impl<X, F> WithOverride<X, F> {
    /// Keys from `extractor`; override identities from `takeover`.
    pub fn new(extractor: X, takeover: F) -> Self {
        Self { extractor, takeover }
    }
}

impl<Req, X, F> KeyExtractor<Req> for WithOverride<X, F>
where
    X: KeyExtractor<Req>,
    F: FnMut(&Req) -> Option<String>,
{
    type Error = X::Error;

    fn extract(&mut self, req: &Req) -> Result<Option<IdempotencyKey>, X::Error> {
        self.extractor.extract(req)
    }

    fn owner(&mut self, req: &Req) -> Option<ClaimToken> {
        self.extractor.owner(req)
    }

    fn takeover(&mut self, req: &Req) -> Option<String> {
        (self.takeover)(req)
    }

    fn follow_up(&mut self, req: &Req) -> Option<FollowUp<Req>> {
        self.extractor.follow_up(req)
    }
}

//! Key extraction: how the layer decides which requests are "the same job".
//!
//! Extraction is pluggable because only the application knows what identifies a job: a header,
//! a field of a queue message, or a (project, pull request, head SHA) triple from a webhook body.

use crate::IdempotencyKey;

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

//! Make job dispatch happen exactly once across processes.
//!
//! A service often receives the same trigger more than once: a webhook router sees GitHub's
//! `check_suite completed` while a queue worker in another process runs its post-completion hook
//! for the same pull request and commit. A per-process map cannot stop both from dispatching the
//! same expensive job, because each process sees an empty map. [`IdempotencyLayer`] makes one
//! atomic claim in a shared store — in Redis, `SET key token NX PX ttl` — before the inner
//! service runs. Whoever gets the claim dispatches; everyone else is short-circuited as a
//! duplicate.
//!
//! - **Fail closed.** If the store cannot answer, the call is treated as a duplicate and the
//!   error is logged (and reported to Sentry with the `sentry` feature): better to skip one
//!   dispatch than to run it twice. [`StoreErrorPolicy::FailOpen`] inverts that.
//! - **Release on blocked.** A [classifier](ClassifyOutcome) looks at the inner service's result;
//!   when the job was blocked (e.g. a capacity gate said "not now") the claim is deleted so a later
//!   trigger can dispatch.
//! - **Bounded.** Every store call has a timeout; a claim whose reply was lost is cleaned up with
//!   a token-checked delete so it cannot block the key for the whole TTL.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore};
//!
//! struct Job { project: String, pr: u64, sha: String }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // In production: `RedisStore::connect("redis://127.0.0.1:6379").await?`.
//! let store = MemoryStore::new();
//! let svc = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(store, |job: &Job| -> Result<_, KeyError> {
//!         IdempotencyKey::for_pull_request(&job.project, job.pr, &job.sha).map(Some)
//!     }))
//!     .service_fn(|job: Job| async move { Ok::<_, Infallible>(format!("review {}#{}", job.project, job.pr)) });
//!
//! let job = Job { project: "octo/repo".into(), pr: 42, sha: "abc123f".into() };
//! assert_eq!(svc.oneshot(job).await.unwrap(), "review octo/repo#42");
//! # }
//! ```
//!
//! The same store also carries a **distributed concurrency limit** ([`limit`],
//! [`ConcurrencyLimitLayer`]): at most N concurrent calls per key across processes, with leases
//! on the Redis server's clock.
//!
//! # Features
//! - `redis` (default): [`RedisStore`].
//! - `redis-cluster`: `RedisStore` over a cluster connection.
//! - `sentry`: report store errors through `sentry-core`.
//! - `http`: the HTTP form of the layer and webhook key extractors.
//! - `metrics` (default): outcome counters, store latency, hold time and pending background work
//!   through the `metrics` facade ([`observe`]).
//! - `tls-rustls`, `tls-native-tls`: `rediss://` URLs, with a private CA and client certificates
//!   on the store builders.

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

mod classify;
mod error;
mod extract;
mod future;
#[cfg(feature = "http")]
pub mod http;
mod key;
mod layer;
mod lease_handle;
pub mod limit;
pub mod observe;
mod protocol;
mod report;
mod service;
mod settings;
pub mod store;

pub use classify::{ClassifyOutcome, DefaultClassifier, Settle, StoredOutcome};
pub use error::IdempotencyError;
pub use extract::{BoxError, FollowUp, KeyExtractor, WithOverride, WithOwner, WithRunOnceMore};
pub use future::ResponseFuture;
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use layer::IdempotencyLayer;
pub use lease_handle::LeaseHandle;
pub use limit::{ConcurrencyLimit, ConcurrencyLimitLayer, LimitError};
pub use report::{DEFAULT_REPORT_INTERVAL, DEFAULT_SENTRY_TAG};
pub use service::Idempotency;
pub use settings::{
    ConfigError, DEFAULT_MAX_HOLD_TTLS, DEFAULT_MAX_OUTCOME_SIZE, DEFAULT_TTL, LostClaimPolicy, StoreErrorPolicy,
};
pub use store::{ClaimOutcome, ClaimReply, MemoryStore, Record, RecordState, StoreError};
#[cfg(feature = "redis")]
pub use store::{RedisStore, RedisStoreBuilder};

/// The README's code blocks, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

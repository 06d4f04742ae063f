//! A distributed concurrency limit: at most N concurrent calls per key, across processes.
//!
//! The idempotency layer answers "has this job been dispatched?"; this one answers "how many
//! runs of this kind are going on right now?" — the work-item lock of the system this crate
//! replaces (at most N concurrent agent runs per (project, work item, agent type)), which lived
//! in one router's memory, so a worker process that enqueued work bypassed it. Here the holders
//! live in the same store as the claims, so every process counts against the same limit.
//!
//! [`ConcurrencyLimitLayer`] acquires one of the key's N slots before the inner service runs,
//! renews its lease while the call runs, and releases it, owner-checked, when the call is done.
//! Over the limit, the call is short-circuited with [`LimitError::AtCapacity`] (a queue consumer
//! leaves the job for a retry; over HTTP, `LimitResponseLayer` (feature `http`) answers `429`
//! with `Retry-After`, see `http_response`).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use tower::{Layer, ServiceExt};
//! use tower_idempotency::IdempotencyKey;
//! use tower_idempotency::limit::{ConcurrencyLimitLayer, LimitError, MemoryLimitStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // In production, a `RedisStore` shared by every process.
//! let layer = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), |run: &&'static str| {
//!     IdempotencyKey::new(*run).map(Some)
//! })
//! .with_limit(1)
//! .build()
//! .expect("valid settings");
//! let (gate, wait) = tokio::sync::oneshot::channel::<()>();
//! let wait = std::sync::Arc::new(tokio::sync::Mutex::new(Some(wait)));
//! let svc = layer.layer(tower::service_fn(move |_run: &'static str| {
//!     let wait = wait.clone();
//!     async move {
//!         if let Some(rx) = wait.lock().await.take() { let _ = rx.await; } // the first run waits
//!         Ok::<_, Infallible>("done")
//!     }
//! }));
//!
//! let first = tokio::spawn(svc.clone().oneshot("project-1:work-item-42:review"));
//! tokio::task::yield_now().await;
//! let second = svc.clone().oneshot("project-1:work-item-42:review").await;
//! assert!(matches!(second, Err(LimitError::AtCapacity { limit: 1, .. })));
//! gate.send(()).unwrap();
//! assert_eq!(first.await.unwrap().unwrap(), "done");
//! assert_eq!(svc.oneshot("project-1:work-item-42:review").await.unwrap(), "done", "the slot is free again");
//! # }
//! ```
//!
//! # Redis data layout
//!
//! **One sorted set per limited key** (`<namespace><key>`): member = holder token (a fresh
//! [`ClaimToken`](crate::store::ClaimToken) per call), score = that holder's lease expiry in
//! milliseconds **of the Redis server's clock**. Every operation is one round trip touching
//! that one key, so it works unchanged on Redis Cluster.
//!
//! | operation | command | what it does |
//! |---|---|---|
//! | acquire | script (`KEYS[1]` = key; holder, limit, lease ms) | `TIME` → now; `ZREMRANGEBYSCORE key -inf now` (expired holders drop out); if the holder is already a member (a resend) or `ZCARD < limit`: `ZADD key now+lease holder`, `PEXPIREAT key <latest score>`, granted; else at capacity, `retry_after` = earliest score − now |
//! | renew | script (`KEYS[1]` = key; holder, lease ms) | `TIME` → now; only if the holder's score is **> now**: `ZADD XX key now+lease holder`, `PEXPIREAT`; else `0`, and the lease stays dead |
//! | release | `ZREM key holder` | removes this holder only |
//!
//! Clocks: lease expiry is decided by the server's `TIME` inside the scripts; client clocks are
//! never compared. The client keeps its own, conservative view (send time of the last confirmed
//! acquire or renewal + lease, always at or before the server's expiry) to notice a lease that
//! ran out while the store could not be reached. The key's own `PEXPIREAT` follows its latest
//! lease, so a key whose holders all died disappears by itself.
//!
//! **Minimum Redis: 5.0.** The scripts write after `TIME`, which needs script effects
//! replication (the default since 5.0, the only mode since 7.0). Tested with 7.0.
//!
//! # Failure modes, and what bounds them
//!
//! - **A holder that dies** (`kill -9`, network loss) stops renewing: its slot comes back when
//!   its lease expires, at most `lease` after its last renewal.
//! - **A late renewal never revives an expired lease**: the renew script checks the score
//!   against the server's now; the holder's call is then aborted ([`LostLeasePolicy::Abort`],
//!   the default) with [`LimitError::LeaseLost`].
//! - **An acquire whose reply was lost** may have left a holder that nobody runs ("phantom").
//!   It expires with its lease at the latest; sooner, the layer removes it with an
//!   owner-checked `ZREM` from a background task as soon as the store answers again (watched
//!   for 10 s in case the acquire lands late).
//! - **Store errors fail closed** by default ([`LimitError::StoreUnavailable`]; the inner
//!   service is not called); [`StoreErrorPolicy::FailOpen`](crate::StoreErrorPolicy::FailOpen)
//!   runs the call without a slot.
//! - A call that hangs keeps renewing its slot: bound the inner service with a timeout
//!   (`tower::timeout`) when that matters.
//!
//! # Observability
//!
//! Every decision is a `tracing` event with fields `key` and `outcome` (`granted`,
//! `at_capacity`, `released`, `release_failed`, `lease_lost`, `store_unavailable`,
//! `failed_open`); with the `metrics` feature, a counter `idempotency.limit.outcomes` with labels
//! `layer` ([`with_name`](ConcurrencyLimitLayer::with_name)) and `outcome`.

mod error;
mod future;
#[cfg(feature = "http")]
mod http;
mod layer;
mod memory;
mod permit;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod store;

pub use error::{LimitConfigError, LimitError};
pub use future::ResponseFuture;
#[cfg(feature = "http")]
pub use http::{LimitResponse, LimitResponseFuture, LimitResponseLayer, http_response};
pub use layer::{ChooseLimit, ConcurrencyLimitLayer, DEFAULT_LEASE, LostLeasePolicy};
pub use memory::MemoryLimitStore;
#[cfg(feature = "redis")]
pub use redis::{ACQUIRE_SCRIPT, RENEW_SCRIPT};
pub use service::ConcurrencyLimit;
pub use store::{Acquire, LimitStore};

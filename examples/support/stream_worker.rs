//! A Redis Streams consumer whose messages are handled by a `tower::Service` wrapped in
//! `IdempotencyLayer`: the queue-worker side of the incident.
//!
//! Shared by `examples/stream_worker.rs`, `examples/incident_replay.rs` and the tests
//! (included with `#[path]`), so all three run the same code.
//!
//! What happens to a message, by outcome of the wrapped service:
//!
//! | outcome | claim | message |
//! |---|---|---|
//! | dispatched | kept until its TTL | `XACK` |
//! | duplicate | someone else's, untouched | `XACK` (skipped: the job is done elsewhere) |
//! | blocked (capacity gate) | released by the classifier | left pending, retried after `min_idle` |
//! | blocked, release failed (`ReleaseFailed`) | still stands; released in the background | left pending: the retry dispatches once it is gone |
//! | store unavailable (fail closed) | none taken | left pending, retried: nothing is lost |
//! | inner error, classifier releases | released | left pending, retried |
//! | inner error, classifier keeps | kept | `XACK`: a retry would only meet our own claim |
//! | malformed message / invalid key | none taken | `XACK` and logged at `error`: it can never succeed |
//!
//! Pending messages idle for at least `min_idle` are taken over with `XAUTOCLAIM` (from this
//! consumer or a dead one) before new messages are read.
#![allow(dead_code)]

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncCommands, RedisResult};
use tower::{Service, ServiceExt};
use tower_idempotency::{IdempotencyError, IdempotencyKey, KeyError, Settle};

/// One review to dispatch, as carried by stream messages:
/// `project P pr N sha S event E delivery D` (the fields the webhook router writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewJob {
    pub project: String,
    pub pr: u64,
    pub sha: String,
    pub event: String,
    pub delivery: String,
}

impl ReviewJob {
    /// The dispatch key: (project, PR, head SHA).
    pub fn key(&self) -> Result<IdempotencyKey, KeyError> {
        IdempotencyKey::for_pull_request(&self.project, self.pr, &self.sha)
    }

    /// Parses a stream entry; `None` when a field is missing or malformed.
    pub fn from_entry(entry: &StreamId) -> Option<Self> {
        Some(Self {
            project: entry.get("project")?,
            pr: entry.get::<String>("pr")?.parse().ok()?,
            sha: entry.get("sha")?,
            event: entry.get("event").unwrap_or_default(),
            delivery: entry.get("delivery").unwrap_or_default(),
        })
    }

    /// `XADD` arguments for this job.
    pub fn fields(&self) -> [(&'static str, String); 5] {
        [
            ("project", self.project.clone()),
            ("pr", self.pr.to_string()),
            ("sha", self.sha.clone()),
            ("event", self.event.clone()),
            ("delivery", self.delivery.clone()),
        ]
    }
}

/// The extractor the worker uses: every job has a key; a bad one is an error (never a dispatch).
pub fn review_key(job: &ReviewJob) -> Result<Option<IdempotencyKey>, KeyError> {
    job.key().map(Some)
}

/// What the dispatching service reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dispatch {
    /// Written to the review stream, with its entry id.
    Dispatched(String),
    /// The capacity gate said "not now".
    Blocked,
}

/// Releases the claim when the dispatch was blocked, and on inner errors so they are retried.
pub fn release_blocked_or_failed<E>(result: &Result<Dispatch, E>) -> Settle {
    match result {
        Ok(Dispatch::Dispatched(_)) => Settle::Keep,
        Ok(Dispatch::Blocked) | Err(_) => Settle::Release,
    }
}

/// The review dispatch itself: `XADD <stream> * project … delivery …`, unless `XLEN <stream>`
/// has reached `capacity` (then `Blocked`).
#[derive(Clone)]
pub struct DispatchReview {
    pub conn: redis::aio::ConnectionManager,
    pub stream: String,
    pub capacity: Option<usize>,
}

impl Service<ReviewJob> for DispatchReview {
    type Response = Dispatch;
    type Error = redis::RedisError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = RedisResult<Dispatch>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<RedisResult<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, job: ReviewJob) -> Self::Future {
        let (mut conn, stream, capacity) = (self.conn.clone(), self.stream.clone(), self.capacity);
        Box::pin(async move {
            if let Some(cap) = capacity {
                let len: usize = conn.xlen(&stream).await?;
                if len >= cap {
                    return Ok(Dispatch::Blocked);
                }
            }
            let id: String = conn.xadd(&stream, "*", &job.fields()).await?;
            Ok(Dispatch::Dispatched(id))
        })
    }
}

/// What to do with a message once its job has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// `XACK`: done, or can never succeed.
    Ack,
    /// Leave it pending; `XAUTOCLAIM` hands it out again after `min_idle`.
    Retry,
}

/// Maps the layered service's result to a disposition. `inner_error` is what the layer's
/// classifier does on an inner error.
pub fn disposition<E>(result: &Result<Dispatch, IdempotencyError<E>>, inner_error: Settle) -> Disposition {
    match result {
        Ok(Dispatch::Dispatched(_)) => Disposition::Ack,
        Ok(Dispatch::Blocked) => Disposition::Retry,
        // The original still runs: if it is blocked or fails it releases its claim, and this
        // message's retry (after `min_idle`) must dispatch then. Acked only once it completed.
        Err(e @ IdempotencyError::Duplicate { .. }) if e.is_duplicate_in_progress() => Disposition::Retry,
        Err(IdempotencyError::Duplicate { .. }) => Disposition::Ack,
        Err(IdempotencyError::StoreUnavailable { .. }) => Disposition::Retry,
        Err(IdempotencyError::InvalidKey { .. }) => Disposition::Ack,
        Err(IdempotencyError::ClaimLost { .. }) => Disposition::Ack,
        // Blocked, and the claim could not be released yet: acking would lose the job.
        Err(IdempotencyError::ReleaseFailed { .. }) => Disposition::Retry,
        Err(IdempotencyError::Inner(_)) => match inner_error {
            Settle::Release => Disposition::Retry,
            Settle::Keep => Disposition::Ack,
        },
        Err(_) => Disposition::Retry,
    }
}

/// A consumer in a consumer group. Uses its own connection: `XREADGROUP BLOCK` holds the
/// connection it runs on, so it must not share the claim store's multiplexed connection.
pub struct StreamConsumer {
    conn: MultiplexedConnection,
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub min_idle: Duration,
    pub block: Duration,
    pub batch: usize,
    autoclaim_cursor: String,
}

impl StreamConsumer {
    /// Connects and creates the group (reading from the stream's start) if it does not exist.
    pub async fn new(url: &str, stream: &str, group: &str, consumer: &str, min_idle: Duration) -> RedisResult<Self> {
        let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
        let created: RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e);
        }
        Ok(Self {
            conn,
            stream: stream.into(),
            group: group.into(),
            consumer: consumer.into(),
            min_idle,
            block: Duration::from_millis(200),
            batch: 32,
            autoclaim_cursor: "0-0".into(),
        })
    }

    /// Next messages for this consumer: first pending ones idle for `min_idle` (`XAUTOCLAIM`),
    /// else new ones (`XREADGROUP … >`, blocking up to `block`).
    pub async fn next_batch(&mut self) -> RedisResult<Vec<StreamId>> {
        let reclaimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(self.min_idle.as_millis() as u64)
            .arg(&self.autoclaim_cursor)
            .arg("COUNT")
            .arg(self.batch)
            .query_async(&mut self.conn)
            .await?;
        self.autoclaim_cursor = reclaimed.next_stream_id;
        if !reclaimed.claimed.is_empty() {
            return Ok(reclaimed.claimed);
        }
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.batch)
            .arg("BLOCK")
            .arg(self.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    pub async fn ack(&mut self, id: &str) -> RedisResult<()> {
        let _: i64 = self.conn.xack(&self.stream, &self.group, &[id]).await?;
        Ok(())
    }

    /// Number of messages delivered to the group and not yet acknowledged.
    pub async fn pending(&mut self) -> RedisResult<usize> {
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut self.conn)
            .await?;
        match summary {
            redis::Value::Array(items) => Ok(items
                .first()
                .and_then(|v| redis::from_redis_value_ref::<usize>(v).ok())
                .unwrap_or(0)),
            _ => Ok(0),
        }
    }
}

/// The result of handling one message: the service's result (`None` for a malformed message)
/// and what to do with the message.
pub type Handled<E> = (Option<Result<Dispatch, IdempotencyError<E>>>, Disposition);

/// Runs one message through the layered service and decides its disposition, without acking:
/// lets a worker handle a batch concurrently and ack afterwards.
pub async fn process_message<S, E>(svc: &mut S, entry: &StreamId, inner_error: Settle) -> Handled<E>
where
    S: Service<ReviewJob, Response = Dispatch, Error = IdempotencyError<E>>,
    E: std::fmt::Display,
{
    let Some(job) = ReviewJob::from_entry(entry) else {
        tracing::error!(id = %entry.id, "malformed message (missing or invalid project/pr/sha); acked and dropped");
        return (None, Disposition::Ack);
    };
    let result = match svc.ready().await {
        Ok(svc) => svc.call(job).await,
        Err(e) => Err(e),
    };
    let disposition = disposition(&result, inner_error);
    match (&result, disposition) {
        (Err(e), Disposition::Ack) if !e.is_duplicate() => {
            tracing::error!(id = %entry.id, error = %e, "message acked without dispatch")
        }
        (Err(e), Disposition::Retry) => tracing::warn!(id = %entry.id, error = %e, "message left pending for retry"),
        _ => {}
    }
    (Some(result), disposition)
}

/// Handles one message: parse, run the layered service, ack or leave pending.
pub async fn handle_message<S, E>(
    consumer: &mut StreamConsumer,
    svc: &mut S,
    entry: &StreamId,
    inner_error: Settle,
) -> RedisResult<Handled<E>>
where
    S: Service<ReviewJob, Response = Dispatch, Error = IdempotencyError<E>>,
    E: std::fmt::Display,
{
    let handled = process_message(svc, entry, inner_error).await;
    if handled.1 == Disposition::Ack {
        consumer.ack(&entry.id).await?;
    }
    Ok(handled)
}

/// The review dispatch wrapped in the idempotency layer, as the worker and the replay run it.
pub type ReviewService = tower_idempotency::Idempotency<
    DispatchReview,
    fn(&ReviewJob) -> Result<Option<IdempotencyKey>, KeyError>,
    fn(&Result<Dispatch, redis::RedisError>) -> Settle,
>;

/// Builds [`ReviewService`]: claims in `store` under `namespace`, releases on blocked and on
/// inner errors (so both are retried), dispatches to `dispatch`.
pub fn review_service<St: tower_idempotency::store::IdempotencyStore>(
    store: St,
    namespace: &str,
    dispatch: DispatchReview,
) -> ReviewService {
    use tower::Layer;
    let extractor: fn(&ReviewJob) -> Result<Option<IdempotencyKey>, KeyError> = review_key;
    let classifier: fn(&Result<Dispatch, redis::RedisError>) -> Settle = release_blocked_or_failed;
    tower_idempotency::IdempotencyLayer::new(store, extractor)
        .with_namespace(namespace)
        .with_classifier(classifier)
        .layer(dispatch)
}

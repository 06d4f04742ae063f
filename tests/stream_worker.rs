//! The queue-consumer cases of the stream worker (examples/support/stream_worker.rs), each
//! against a real Redis: what happens to the message and to the claim.

mod common;
#[path = "../examples/support/stream_worker.rs"]
mod stream_worker;

use std::time::Duration;

use common::RedisServer;
use redis::AsyncCommands;
use stream_worker::*;
use tower_idempotency::{RedisStore, Settle};

const JOBS: &str = "jobs";
const REVIEWS: &str = "reviews";

fn job(sha: &str) -> ReviewJob {
    ReviewJob {
        project: "octo/repo".into(),
        pr: 7,
        sha: sha.into(),
        event: "test".into(),
        delivery: "d".into(),
    }
}

struct Rig {
    server: RedisServer,
    consumer: StreamConsumer,
    conn: redis::aio::MultiplexedConnection,
}

impl Rig {
    async fn new(min_idle: Duration) -> Self {
        let server = RedisServer::start();
        let consumer = StreamConsumer::new(&server.url(), JOBS, "workers", "w1", min_idle)
            .await
            .unwrap();
        let conn = common::raw_conn(&server).await;
        Self { server, consumer, conn }
    }

    async fn push(&mut self, job: &ReviewJob) {
        let _: String = self.conn.xadd(JOBS, "*", &job.fields()).await.unwrap();
    }

    async fn reviews(&mut self) -> usize {
        self.conn.xlen(REVIEWS).await.unwrap()
    }

    /// The layered service: claims in `store_url`, dispatches to the REVIEWS stream of this rig.
    async fn service(&self, store_url: &str, capacity: Option<usize>) -> ReviewService {
        let store = RedisStore::builder(store_url)
            .timeout(Duration::from_millis(200))
            .connect_lazy()
            .unwrap();
        let conn = redis::Client::open(self.server.url())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        review_service(
            store,
            "dispatch:",
            DispatchReview {
                conn,
                stream: REVIEWS.into(),
                capacity,
            },
        )
    }
}

#[tokio::test]
async fn dispatched_message_is_acked() {
    let mut rig = Rig::new(Duration::from_secs(60)).await;
    let mut svc = rig.service(&rig.server.url(), None).await;
    rig.push(&job("aaaaaaa")).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    assert_eq!(batch.len(), 1);
    let (result, disposition) = handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
        .await
        .unwrap();
    assert!(matches!(result, Some(Ok(Dispatch::Dispatched(_)))));
    assert_eq!(disposition, Disposition::Ack);
    assert_eq!(rig.consumer.pending().await.unwrap(), 0);
    assert_eq!(rig.reviews().await, 1);
}

#[tokio::test]
async fn duplicate_message_is_acked_and_skipped() {
    let mut rig = Rig::new(Duration::from_secs(60)).await;
    let mut svc = rig.service(&rig.server.url(), None).await;
    rig.push(&job("bbbbbbb")).await;
    rig.push(&job("bbbbbbb")).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    assert_eq!(batch.len(), 2);
    handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
        .await
        .unwrap();
    let (result, disposition) = handle_message(&mut rig.consumer, &mut svc, &batch[1], Settle::Release)
        .await
        .unwrap();
    assert!(matches!(result, Some(Err(ref e)) if e.is_duplicate()));
    assert_eq!(disposition, Disposition::Ack);
    assert_eq!(rig.consumer.pending().await.unwrap(), 0);
    assert_eq!(rig.reviews().await, 1, "dispatched once");
}

#[tokio::test]
async fn blocked_message_releases_claim_and_stays_pending_then_is_reclaimed() {
    let mut rig = Rig::new(Duration::from_millis(300)).await;
    // Capacity 1, and the review stream already holds one entry: the gate is closed.
    let _: String = rig.conn.xadd(REVIEWS, "*", &[("filler", "1")]).await.unwrap();
    let mut svc = rig.service(&rig.server.url(), Some(1)).await;
    rig.push(&job("ccccccc")).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    let (result, disposition) = handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
        .await
        .unwrap();
    assert!(matches!(result, Some(Ok(Dispatch::Blocked))));
    assert_eq!(disposition, Disposition::Retry);
    assert_eq!(rig.consumer.pending().await.unwrap(), 1, "left pending");
    let claimed: bool = rig.conn.exists("dispatch:octo/repo:7:ccccccc").await.unwrap();
    assert!(!claimed, "claim released");

    // Capacity frees up; after min_idle XAUTOCLAIM hands the message out again and it dispatches.
    let _: i64 = rig.conn.del(REVIEWS).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    assert_eq!(batch.len(), 1, "reclaimed with XAUTOCLAIM");
    let (result, disposition) = handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
        .await
        .unwrap();
    assert!(matches!(result, Some(Ok(Dispatch::Dispatched(_)))), "{result:?}");
    assert_eq!(disposition, Disposition::Ack);
    assert_eq!(rig.consumer.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn store_unavailable_fails_closed_and_leaves_message_pending() {
    let mut rig = Rig::new(Duration::from_millis(300)).await;
    // Claims live in a second Redis, which is down; the stream's Redis is fine.
    let mut claims = RedisServer::start();
    let mut svc = rig.service(&claims.url(), None).await;
    claims.kill();
    rig.push(&job("ddddddd")).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    let (result, disposition) = handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
        .await
        .unwrap();
    assert!(
        matches!(result, Some(Err(ref e)) if e.is_store_unavailable()),
        "{result:?}"
    );
    assert_eq!(disposition, Disposition::Retry);
    assert_eq!(rig.reviews().await, 0, "nothing dispatched");
    assert_eq!(rig.consumer.pending().await.unwrap(), 1, "nothing lost");

    // The claim store comes back: the retried message dispatches.
    claims.restart();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    assert_eq!(batch.len(), 1);
    let mut outcome = None;
    for _ in 0..20 {
        let (result, disposition) = handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
            .await
            .unwrap();
        if disposition == Disposition::Ack {
            outcome = result;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(outcome, Some(Ok(Dispatch::Dispatched(_)))), "{outcome:?}");
    assert_eq!(rig.reviews().await, 1);
}

#[tokio::test]
async fn inner_error_follows_the_classifier() {
    let mut rig = Rig::new(Duration::from_secs(60)).await;
    // Make XADD fail: the review stream key holds a string.
    let _: () = rig.conn.set(REVIEWS, "not a stream").await.unwrap();
    let mut svc = rig.service(&rig.server.url(), None).await;
    rig.push(&job("eeeeeee")).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    let (result, disposition) = handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
        .await
        .unwrap();
    assert!(
        matches!(result, Some(Err(tower_idempotency::IdempotencyError::Inner(_)))),
        "{result:?}"
    );
    assert_eq!(disposition, Disposition::Retry, "classifier releases on error: retry");
    let claimed: bool = rig.conn.exists("dispatch:octo/repo:7:eeeeeee").await.unwrap();
    assert!(!claimed);
    assert_eq!(rig.consumer.pending().await.unwrap(), 1);
    // With a classifier that keeps the claim on error, the message is acked (a retry would be a duplicate).
    assert_eq!(disposition_for_kept_error(), Disposition::Ack);
}

fn disposition_for_kept_error() -> Disposition {
    let result: Result<Dispatch, tower_idempotency::IdempotencyError<std::io::Error>> = Err(
        tower_idempotency::IdempotencyError::Inner(std::io::Error::other("boom")),
    );
    disposition(&result, Settle::Keep)
}

#[tokio::test]
async fn malformed_message_is_acked_and_never_dispatched() {
    let mut rig = Rig::new(Duration::from_secs(60)).await;
    let mut svc = rig.service(&rig.server.url(), None).await;
    let _: String = rig
        .conn
        .xadd(JOBS, "*", &[("project", "octo/repo"), ("pr", "-3"), ("sha", "abcdef1")])
        .await
        .unwrap();
    let _: String = rig
        .conn
        .xadd(
            JOBS,
            "*",
            &[("project", "octo/repo"), ("pr", "3"), ("sha", "not-a-sha")],
        )
        .await
        .unwrap();
    let batch = rig.consumer.next_batch().await.unwrap();
    assert_eq!(batch.len(), 2);
    let (r1, d1) = handle_message(&mut rig.consumer, &mut svc, &batch[0], Settle::Release)
        .await
        .unwrap();
    assert!(r1.is_none(), "negative PR: malformed");
    let (r2, d2) = handle_message(&mut rig.consumer, &mut svc, &batch[1], Settle::Release)
        .await
        .unwrap();
    assert!(
        matches!(r2, Some(Err(tower_idempotency::IdempotencyError::InvalidKey { .. }))),
        "{r2:?}"
    );
    assert_eq!((d1, d2), (Disposition::Ack, Disposition::Ack));
    assert_eq!(rig.reviews().await, 0);
    assert_eq!(rig.consumer.pending().await.unwrap(), 0);
}

/// The original of a key runs for 2 s; its duplicate arrives 0.5 s in. The duplicate is left
/// pending (not acked) while the original runs, and its retry follows the original's fate:
/// `blocked` → the retry dispatches; completed → the retry is acked without dispatching.
async fn duplicate_arriving_while_the_original_runs(original_blocked: bool) -> (usize, Disposition) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::Layer;

    let mut rig = Rig::new(Duration::from_millis(300)).await;
    let store = RedisStore::builder(rig.server.url())
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let (calls, dispatched) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, d) = (calls.clone(), dispatched.clone());
    let inner = tower::service_fn(move |_: ReviewJob| {
        let (c, d) = (c.clone(), d.clone());
        async move {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if original_blocked {
                    return Ok::<_, std::convert::Infallible>(Dispatch::Blocked);
                }
            }
            d.fetch_add(1, Ordering::SeqCst);
            Ok(Dispatch::Dispatched("1-0".into()))
        }
    });
    let svc = tower_idempotency::IdempotencyLayer::new(store, review_key)
        .with_namespace("dispatch:")
        .with_classifier(release_blocked_or_failed::<std::convert::Infallible>)
        .build()
        .unwrap()
        .layer(inner);

    rig.push(&job("ddddddd")).await;
    rig.push(&job("ddddddd")).await;
    let batch = rig.consumer.next_batch().await.unwrap();
    assert_eq!(batch.len(), 2);
    let (first, second) = (batch[0].clone(), batch[1].clone());
    let mut original_svc = svc.clone();
    let original = tokio::spawn(async move { process_message(&mut original_svc, &first, Settle::Release).await });

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut dup_svc = svc.clone();
    let (result, disposition) = process_message(&mut dup_svc, &second, Settle::Release).await;
    assert!(
        matches!(&result, Some(Err(e)) if e.is_duplicate_in_progress()),
        "the original is in progress: {result:?}"
    );
    assert_eq!(disposition, Disposition::Retry, "left pending while the original runs");

    let (_, original_disposition) = original.await.unwrap();
    let expected = if original_blocked {
        Disposition::Retry
    } else {
        Disposition::Ack
    };
    assert_eq!(original_disposition, expected);
    if original_disposition == Disposition::Ack {
        rig.consumer.ack(&batch[0].id).await.unwrap();
    }

    // After min_idle, XAUTOCLAIM hands the pending messages out again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retry = rig.consumer.next_batch().await.unwrap();
    let retried = retry
        .iter()
        .find(|e| e.id == second.id)
        .expect("the duplicate was left pending and comes back");
    let mut retry_svc = svc.clone();
    let (result, disposition) = handle_message(&mut rig.consumer, &mut retry_svc, retried, Settle::Release)
        .await
        .unwrap();
    if original_blocked {
        assert!(matches!(result, Some(Ok(Dispatch::Dispatched(_)))), "{result:?}");
    } else {
        assert!(
            matches!(&result, Some(Err(e)) if e.is_duplicate_completed()),
            "{result:?}"
        );
    }
    (dispatched.load(Ordering::SeqCst), disposition)
}

#[tokio::test]
async fn duplicate_in_progress_stays_pending_and_dispatches_after_the_original_is_blocked() {
    let (dispatched, disposition) = duplicate_arriving_while_the_original_runs(true).await;
    assert_eq!(disposition, Disposition::Ack);
    assert_eq!(
        dispatched, 1,
        "the blocked original's trigger is not lost: the retry dispatched it"
    );
}

#[tokio::test]
async fn duplicate_in_progress_stays_pending_and_is_acked_after_the_original_completes() {
    let (dispatched, disposition) = duplicate_arriving_while_the_original_runs(false).await;
    assert_eq!(disposition, Disposition::Ack);
    assert_eq!(
        dispatched, 1,
        "the completed original ran once; its duplicate was acked without a run"
    );
}

//! Lease lost → the job is told, and fencing tokens order holders (issue 12, part 4), against a
//! real redis-server.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::RedisServer;
use tower::{Layer, ServiceExt};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, LeaseHandle, RedisStore};

fn key_of(job: &String) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(job).map(Some)
}

/// The first holder is paused (its thread blocked, as in a long GC pause) past its lease; a
/// second holder claims the expired key. When the first resumes, renewal finds its claim lost:
/// its `LeaseHandle` fires, and its fencing token is lower than the new holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_is_told_and_its_fencing_token_is_lower() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.expect("connect");
    let layer = IdempotencyLayer::new(store, key_of as fn(&String) -> _)
        .with_ttl(Duration::from_millis(300))
        .with_renewal(Duration::from_millis(100))
        .with_fencing(true)
        .build()
        .expect("valid settings");
    let paused = layer.layer(tower::service_fn(|_: String| async {
        let lease = LeaseHandle::current().expect("a claimed job sees its lease");
        // Paused: no renewal can run on this task while the thread is blocked.
        std::thread::sleep(Duration::from_millis(900));
        let told = tokio::time::timeout(Duration::from_secs(5), lease.lost()).await.is_ok();
        Ok::<_, Infallible>((lease.fencing_token(), told, lease.is_lost()))
    }));
    let next = layer.layer(tower::service_fn(|_: String| async {
        Ok::<_, Infallible>(LeaseHandle::current().and_then(|l| l.fencing_token()))
    }));

    let first = tokio::spawn(paused.oneshot("job".to_owned()));
    // Past the first holder's 300 ms lease (it cannot renew while paused).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second_fence = next
        .oneshot("job".to_owned())
        .await
        .expect("the expired key is claimed again");
    let (first_fence, told, lost) = first.await.expect("task").expect("first job");

    assert!(told && lost, "the paused holder must be told its lease was lost");
    let (first_fence, second_fence) = (first_fence.expect("fencing on"), second_fence.expect("fencing on"));
    assert!(
        first_fence < second_fence,
        "the stale holder's token {first_fence} must be lower than the new holder's {second_fence}"
    );
}

/// Without fencing, the lease handle is still there (with no token) and not lost.
#[tokio::test]
async fn a_job_sees_its_lease_without_a_fencing_token_when_fencing_is_off() {
    let server = RedisServer::start();
    let store = RedisStore::connect(server.url()).await.expect("connect");
    let svc = IdempotencyLayer::new(store, key_of as fn(&String) -> _).layer(tower::service_fn(|_: String| async {
        let lease = LeaseHandle::current();
        Ok::<_, Infallible>(lease.map(|l| (l.key().to_string(), l.fencing_token(), l.is_lost())))
    }));
    assert_eq!(
        svc.oneshot("k".to_owned()).await.unwrap(),
        Some(("k".to_owned(), None, false))
    );
    assert!(LeaseHandle::current().is_none(), "only while the layer calls the job");
}

/// An HTTP handler finds its lease in the request's extensions.
#[tokio::test]
async fn an_http_handler_finds_its_lease_in_the_request_extensions() {
    use axum::body::Body;
    use axum::http::Request;
    use tower_idempotency::MemoryStore;
    use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer};

    let svc = HttpIdempotencyLayer::new(MemoryStore::new(), HeaderKey::idempotency_key())
        .with_fencing(true)
        .layer(tower::service_fn(|req: Request<_>| async move {
            let lease = req.extensions().get::<LeaseHandle>().cloned();
            let _: &tower_idempotency::http::ReplayBody<Body> = req.body();
            Ok::<_, Infallible>(axum::http::Response::new(
                lease
                    .and_then(|l| l.fencing_token())
                    .map_or("none".to_owned(), |f| f.to_string()),
            ))
        }));
    let req = Request::post("/")
        .header("idempotency-key", "k")
        .body(Body::empty())
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    use http_body_util::BodyExt;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_ne!(body.as_ref(), b"none", "the handler saw a fencing token");
}

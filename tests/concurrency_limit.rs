//! The distributed concurrency limit against a real `redis-server` (a throwaway one per test):
//! at most N holders across callers and connections, leases on the server's clock, and the
//! known failure modes of Redis semaphores — a late renewal that would revive an expired lease,
//! a lost acquire reply that would leave a phantom holder, a store that is down.
//!
//! Tests assert policy, not speed: time bounds are generous multiples of the lease.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::fault_proxy::{FaultProxy, Mode};
use common::{Calls, RedisServer, raw_conn};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::limit::{
    Acquire, ConcurrencyLimitLayer, LimitError, LimitStore, LostLeasePolicy, MemoryLimitStore, http_response,
};
use tower_idempotency::store::ClaimToken;
use tower_idempotency::{IdempotencyKey, KeyError, RedisStore, StoreError, StoreErrorPolicy};

const KEY: &str = "project-1:work-item-42:review";

async fn store(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect to the test redis")
}

fn by_name(name: &&'static str) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(*name).map(Some)
}

async fn zcard(server: &RedisServer, key: &str) -> i64 {
    let mut conn = raw_conn(server).await;
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("ZCARD")
}

/// Concurrency seen by the inner service: current and maximum.
#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
    fn now(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }
}

/// An inner service that holds its slot until the test opens the gate.
fn gated(
    gauge: Gauge,
    gate: Arc<Semaphore>,
) -> impl Service<&'static str, Response = (), Error = Infallible, Future: Send> + Clone {
    tower::service_fn(move |_run: &'static str| {
        let (gauge, gate) = (gauge.clone(), gate.clone());
        async move {
            gauge.enter();
            let _ = gate.acquire().await.map(|p| p.forget());
            gauge.leave();
            Ok::<_, Infallible>(())
        }
    })
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_n_holders_across_callers_and_two_connections() {
    let server = RedisServer::start();
    const LIMIT: usize = 3;
    const CALLS: usize = 40;
    let gauge = Gauge::default();
    let gate = Arc::new(Semaphore::new(0));
    // Two independent stores (two connections), as two processes would have.
    let mut services = Vec::new();
    for _ in 0..2 {
        let layer = ConcurrencyLimitLayer::new(store(&server.url()).await, by_name)
            .with_limit(LIMIT)
            .with_namespace("limit:")
            .build()
            .expect("valid settings");
        services.push(layer.layer(gated(gauge.clone(), gate.clone())));
    }
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let svc = services[i % 2].clone();
        calls.push(tokio::spawn(svc.oneshot(KEY)));
    }
    // Exactly LIMIT calls get in and wait at the gate; everyone else is answered at capacity.
    wait_until("every call over the limit is answered", Duration::from_secs(20), || {
        let finished = calls.iter().filter(|c| c.is_finished()).count();
        async move { finished == CALLS - LIMIT }
    })
    .await;
    assert_eq!(
        gauge.now(),
        LIMIT,
        "exactly the limit runs while the others are refused"
    );
    assert_eq!(zcard(&server, &format!("limit:{KEY}")).await, LIMIT as i64);
    gate.add_permits(CALLS);
    let (mut ok, mut at_capacity) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(()) => ok += 1,
            Err(LimitError::AtCapacity {
                key,
                limit,
                retry_after,
            }) => {
                assert_eq!(key.as_str(), KEY);
                assert_eq!(limit, LIMIT);
                assert!(
                    retry_after <= tower_idempotency::limit::DEFAULT_LEASE,
                    "{retry_after:?}"
                );
                at_capacity += 1;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!((ok, at_capacity), (LIMIT, CALLS - LIMIT));
    assert!(gauge.max() <= LIMIT, "max concurrency {} > limit {LIMIT}", gauge.max());
    assert_eq!(
        zcard(&server, &format!("limit:{KEY}")).await,
        0,
        "every slot was released"
    );
}

#[tokio::test]
async fn limit_chosen_per_request() {
    let server = RedisServer::start();
    let gauge = Gauge::default();
    let gate = Arc::new(Semaphore::new(0));
    // Review runs: 1 at a time per work item; fix runs: 2.
    let layer = ConcurrencyLimitLayer::new(store(&server.url()).await, by_name)
        .with_limit_per_request(|run: &&'static str| if run.ends_with(":review") { 1 } else { 2 })
        .build()
        .expect("valid settings");
    let svc = layer.layer(gated(gauge.clone(), gate.clone()));
    let review = "project-1:work-item-42:review";
    let fix = "project-1:work-item-42:fix";
    let held: Vec<_> = [review, fix, fix]
        .into_iter()
        .map(|k| tokio::spawn(svc.clone().oneshot(k)))
        .collect();
    wait_until("three slots are held", Duration::from_secs(20), || {
        let n = gauge.now();
        async move { n == 3 }
    })
    .await;
    let err = svc
        .clone()
        .oneshot(review)
        .await
        .expect_err("a second review is over its limit of 1");
    assert!(matches!(err, LimitError::AtCapacity { limit: 1, .. }), "{err}");
    let err = svc
        .clone()
        .oneshot(fix)
        .await
        .expect_err("a third fix is over its limit of 2");
    assert!(matches!(err, LimitError::AtCapacity { limit: 2, .. }), "{err}");
    gate.add_permits(10);
    for h in held {
        h.await.expect("task").expect("held calls finish");
    }
    // A chooser that answers 0 refuses the call instead of letting nobody in forever.
    let zero = ConcurrencyLimitLayer::new(store(&server.url()).await, by_name)
        .with_limit_per_request(|_: &&'static str| 0)
        .layer(tower::service_fn(|_: &'static str| async { Ok::<_, Infallible>(()) }));
    assert!(matches!(
        zero.oneshot(review).await,
        Err(LimitError::Misconfigured { .. })
    ));
}

/// The store contract every backend must keep, run against Redis and memory.
async fn expired_lease_is_not_revived<St: LimitStore>(store: &St, key: &str) {
    let (keeper, late, next) = (ClaimToken::generate(), ClaimToken::generate(), ClaimToken::generate());
    let long = Duration::from_secs(60);
    // A second holder with a long lease keeps the key itself alive, so only the lease check
    // (not the key's own expiry) can stop the revival.
    assert_eq!(store.acquire(key, &keeper, 2, long).await.unwrap(), Acquire::Granted);
    let lease = Duration::from_millis(200);
    assert_eq!(store.acquire(key, &late, 2, lease).await.unwrap(), Acquire::Granted);
    // The holder stops renewing (a long GC pause, a partition) until its lease has expired...
    tokio::time::sleep(lease * 3).await;
    // ...then its renewal arrives late: refused, the lease stays dead.
    assert!(!store.renew(key, &late, long).await.unwrap());
    // So the slot is free for the next holder, and stays theirs.
    assert_eq!(store.acquire(key, &next, 2, long).await.unwrap(), Acquire::Granted);
    assert!(!store.renew(key, &late, long).await.unwrap());
    assert!(matches!(
        store.acquire(key, &late, 2, long).await.unwrap(),
        Acquire::AtCapacity { .. }
    ));
    assert!(store.renew(key, &next, long).await.unwrap(), "a live lease renews");
}

async fn release_is_owner_checked<St: LimitStore>(store: &St, key: &str) {
    let (a, b, stranger) = (ClaimToken::generate(), ClaimToken::generate(), ClaimToken::generate());
    let lease = Duration::from_secs(60);
    assert_eq!(store.acquire(key, &a, 2, lease).await.unwrap(), Acquire::Granted);
    assert_eq!(store.acquire(key, &b, 2, lease).await.unwrap(), Acquire::Granted);
    // A resent acquire of a holder is granted without taking a second slot.
    assert_eq!(store.acquire(key, &a, 2, lease).await.unwrap(), Acquire::Granted);
    assert!(
        !store.release(key, &stranger).await.unwrap(),
        "a stranger releases nothing"
    );
    assert!(matches!(
        store.acquire(key, &stranger, 2, lease).await.unwrap(),
        Acquire::AtCapacity { .. }
    ));
    assert!(store.release(key, &a).await.unwrap());
    assert!(!store.release(key, &a).await.unwrap(), "releasing twice is a no-op");
    assert!(store.renew(key, &b, lease).await.unwrap(), "b's slot was not touched");
    assert_eq!(store.acquire(key, &stranger, 2, lease).await.unwrap(), Acquire::Granted);
}

#[tokio::test]
async fn expired_holder_is_not_revived_by_a_late_renewal() {
    let server = RedisServer::start();
    let redis = store(&server.url()).await;
    expired_lease_is_not_revived(&redis, "revive").await;
    expired_lease_is_not_revived(&MemoryLimitStore::new(), "revive").await;
}

#[tokio::test]
async fn release_is_owner_checked_and_acquire_is_idempotent_per_holder() {
    let server = RedisServer::start();
    let redis = store(&server.url()).await;
    release_is_owner_checked(&redis, "owners").await;
    assert_eq!(zcard(&server, "owners").await, 2);
    release_is_owner_checked(&MemoryLimitStore::new(), "owners").await;
}

#[tokio::test]
async fn retry_after_is_the_time_until_the_earliest_lease_expires() {
    let server = RedisServer::start();
    let redis = store(&server.url()).await;
    let lease = Duration::from_secs(20);
    redis.acquire("k", &ClaimToken::generate(), 1, lease).await.unwrap();
    match redis.acquire("k", &ClaimToken::generate(), 1, lease).await.unwrap() {
        Acquire::AtCapacity { retry_after } => {
            assert!(
                retry_after <= lease && retry_after > Duration::from_secs(5),
                "{retry_after:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    // The key itself expires with its latest lease: a dead holder leaves nothing behind.
    let pttl: i64 = redis::cmd("PTTL")
        .arg("k")
        .query_async(&mut raw_conn(&server).await)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 20_000, "PTTL {pttl}");
}

/// A store whose acquire lands but whose reply is "lost" (a timeout), and which cannot answer
/// anything else: the phantom holder must be bounded by its lease alone.
struct LostReplies(RedisStore);

impl LimitStore for LostReplies {
    async fn acquire(
        &self,
        key: &str,
        holder: &ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> Result<Acquire, StoreError> {
        self.0.acquire(key, holder, limit, lease).await?;
        Err(StoreError::Timeout {
            operation: "limit_acquire",
            after: Duration::from_millis(1),
        })
    }
    async fn renew(&self, _: &str, _: &ClaimToken, _: Duration) -> Result<bool, StoreError> {
        Err(StoreError::Timeout {
            operation: "limit_renew",
            after: Duration::from_millis(1),
        })
    }
    async fn release(&self, _: &str, _: &ClaimToken) -> Result<bool, StoreError> {
        Err(StoreError::Timeout {
            operation: "limit_release",
            after: Duration::from_millis(1),
        })
    }
}

#[tokio::test]
async fn lost_acquire_reply_leaves_no_phantom_holder_beyond_the_lease() {
    let server = RedisServer::start();
    let lease = Duration::from_secs(2);
    let calls = Calls::default();
    let c = calls.clone();
    let svc = ConcurrencyLimitLayer::new(LostReplies(store(&server.url()).await), by_name)
        .with_lease(lease)
        .layer(tower::service_fn(move |_: &'static str| {
            c.hit();
            async { Ok::<_, Infallible>(()) }
        }));
    let err = svc.oneshot(KEY).await.expect_err("the reply was lost: fail closed");
    assert!(err.is_store_unavailable(), "{err}");
    assert_eq!(calls.get(), 0);
    // The acquire landed: a phantom holds the only slot...
    let redis = store(&server.url()).await;
    let probe = ClaimToken::generate();
    match redis.acquire(KEY, &probe, 1, lease).await.unwrap() {
        Acquire::AtCapacity { retry_after } => assert!(retry_after <= lease, "{retry_after:?}"),
        Acquire::Granted => panic!("the phantom should hold the slot right after the lost reply"),
        other => panic!("{other:?}"),
    }
    // ...but only until its lease expires on the server, even though nobody could release it.
    let started = Instant::now();
    wait_until("the phantom's lease expired", lease * 10, || {
        let (redis, probe) = (&redis, probe.clone());
        async move { redis.acquire(KEY, &probe, 1, lease).await.unwrap() == Acquire::Granted }
    })
    .await;
    println!("phantom gone after {:?} (lease {lease:?})", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acquire_reply_is_cleaned_up_by_an_owner_checked_release() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port()).into());
    // A lease so long that the slot coming back cannot be its expiry.
    let lease = Duration::from_secs(120);
    let through_proxy = store(&proxy.url()).await;
    let svc = ConcurrencyLimitLayer::new(through_proxy, by_name)
        .with_limit(2)
        .with_lease(lease)
        .layer(tower::service_fn(|_: &'static str| async { Ok::<_, Infallible>(()) }));
    // Load the script first, so the lost reply is the acquire's own, not `NOSCRIPT`'s.
    svc.clone().oneshot("warm-up").await.expect("warm-up call");
    let other = store(&server.url()).await;
    let bystander = ClaimToken::generate();
    assert_eq!(
        other.acquire(KEY, &bystander, 2, lease).await.unwrap(),
        Acquire::Granted
    );

    proxy.set_mode(Mode::LoseNextReply);
    let lost_at = Instant::now();
    let err = svc.clone().oneshot(KEY).await.expect_err("the reply was lost");
    assert!(err.is_store_unavailable(), "{err}");
    assert_eq!(proxy.replies_lost(), 1);
    // The cleanup removes the phantom (owner-checked: the bystander keeps its slot) long
    // before its lease would have.
    wait_until("the phantom holder is removed", Duration::from_secs(30), || {
        let server = &server;
        async move { zcard(server, KEY).await == 1 }
    })
    .await;
    println!(
        "phantom removed {:?} after the lost reply (lease {lease:?})",
        lost_at.elapsed()
    );
    assert!(
        other.renew(KEY, &bystander, lease).await.unwrap(),
        "the bystander still holds its slot"
    );
    wait_until("the background cleanup finished", Duration::from_secs(30), || {
        let n = svc.background_tasks();
        async move { n == 0 }
    })
    .await;
}

#[tokio::test]
async fn store_down_fails_closed_without_calling_the_inner_service() {
    let mut server = RedisServer::start();
    let calls = Calls::default();
    let c = calls.clone();
    let inner = tower::service_fn(move |_: &'static str| {
        c.hit();
        async { Ok::<_, Infallible>(()) }
    });
    let closed = ConcurrencyLimitLayer::new(store(&server.url()).await, by_name).layer(inner.clone());
    let open = ConcurrencyLimitLayer::new(store(&server.url()).await, by_name)
        .with_store_error_policy(StoreErrorPolicy::FailOpen)
        .layer(inner);
    server.kill();
    let err = closed.oneshot(KEY).await.expect_err("redis is down");
    match &err {
        LimitError::StoreUnavailable { key, .. } => assert_eq!(key.as_str(), KEY),
        other => panic!("expected StoreUnavailable, got {other}"),
    }
    assert!(std::error::Error::source(&err).is_some(), "the cause is kept");
    assert_eq!(calls.get(), 0, "failed closed: the inner service was not called");
    open.oneshot(KEY)
        .await
        .expect("fail open: the call runs without a slot");
    assert_eq!(calls.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_holder_whose_run_is_longer_than_the_lease() {
    let server = RedisServer::start();
    let lease = Duration::from_secs(2);
    let run = lease * 3;
    let svc = ConcurrencyLimitLayer::new(store(&server.url()).await, by_name)
        .with_lease(lease)
        .with_renewal(Duration::from_millis(400))
        .build()
        .expect("valid settings")
        .layer(tower::service_fn(move |_: &'static str| async move {
            tokio::time::sleep(run).await;
            Ok::<_, Infallible>("finished")
        }));
    let long = tokio::spawn(svc.clone().oneshot(KEY));
    let probe = store(&server.url()).await;
    let token = ClaimToken::generate();
    wait_until("the long run holds its slot", Duration::from_secs(20), || {
        let server = &server;
        async move { zcard(server, KEY).await == 1 }
    })
    .await;
    // For the whole run, three leases long, nobody else gets the slot.
    while !long.is_finished() {
        assert!(
            matches!(
                probe.acquire(KEY, &token, 1, lease).await.unwrap(),
                Acquire::AtCapacity { .. }
            ) || long.is_finished(),
            "the slot was lost while the run still held it"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(long.await.unwrap().expect("the run finished with its slot"), "finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_whose_lease_ran_out_is_aborted_with_lease_lost() {
    let server = RedisServer::start();
    let lease = Duration::from_millis(600);
    let svc = ConcurrencyLimitLayer::new(
        RedisStore::builder(server.url())
            .timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap(),
        by_name,
    )
    .with_lease(lease)
    .with_renewal(Duration::from_millis(200))
    .with_lost_lease_policy(LostLeasePolicy::Abort)
    .layer(tower::service_fn(|_: &'static str| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, Infallible>(())
    }));
    let call = tokio::spawn(svc.oneshot(KEY));
    wait_until("the call holds its slot", Duration::from_secs(20), || {
        let server = &server;
        async move { zcard(server, KEY).await == 1 }
    })
    .await;
    // Renewals cannot get through while Redis hangs, so the lease runs out.
    server.freeze();
    let frozen_at = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), call).await;
    println!(
        "call aborted {:?} after Redis froze (lease {lease:?})",
        frozen_at.elapsed()
    );
    server.thaw();
    let err = result
        .expect("the call ends once its lease ran out")
        .unwrap()
        .expect_err("aborted");
    assert!(err.is_lease_lost(), "{err}");
    // The late renewals did not bring the holder back: the slot is free.
    let probe = store(&server.url()).await;
    wait_until("the slot is free", Duration::from_secs(20), || {
        let probe = &probe;
        async move { probe.acquire(KEY, &ClaimToken::generate(), 1, lease).await.unwrap() == Acquire::Granted }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_call_releases_its_slot() {
    let server = RedisServer::start();
    let lease = Duration::from_secs(120);
    let svc = ConcurrencyLimitLayer::new(store(&server.url()).await, by_name)
        .with_lease(lease)
        .layer(tower::service_fn(|_: &'static str| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(())
        }));
    let call = tokio::spawn(svc.clone().oneshot(KEY));
    wait_until("the call holds its slot", Duration::from_secs(20), || {
        let server = &server;
        async move { zcard(server, KEY).await == 1 }
    })
    .await;
    call.abort();
    // Released in the background, far sooner than the 120 s lease.
    wait_until("the slot is released", Duration::from_secs(30), || {
        let server = &server;
        async move { zcard(server, KEY).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn http_at_capacity_is_429_with_retry_after() {
    use axum::body::Body;
    use axum::error_handling::HandleErrorLayer;
    use axum::response::IntoResponse;
    use http::{Request, StatusCode};

    let server = RedisServer::start();
    let gate = Arc::new(Semaphore::new(0));
    let limit = ConcurrencyLimitLayer::new(store(&server.url()).await, |req: &Request<Body>| {
        let item = req.uri().path().trim_start_matches("/runs/");
        IdempotencyKey::new(format!("project-1:{item}:review")).map(Some)
    })
    .with_limit(1)
    .with_lease(Duration::from_secs(20))
    .build()
    .expect("valid settings");
    let g = gate.clone();
    let app = axum::Router::new()
        .route(
            "/runs/{item}",
            axum::routing::post(move || {
                let g = g.clone();
                async move {
                    let _ = g.acquire().await.map(|p| p.forget());
                    "ran"
                }
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|err: LimitError<Infallible>| async move {
                    match http_response(&err) {
                        Some(response) => response.map(Body::from).into_response(),
                        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }))
                .layer(limit),
        );
    let post = || Request::post("/runs/work-item-42").body(Body::empty()).unwrap();
    let first = tokio::spawn(app.clone().oneshot(post()));
    wait_until("the first run holds the slot", Duration::from_secs(20), || {
        let server = &server;
        async move { zcard(server, "project-1:work-item-42:review").await == 1 }
    })
    .await;
    let refused = app.clone().oneshot(post()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    let body = axum::body::to_bytes(refused.into_body(), 1 << 16).await.unwrap();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["limit"], 1);
    assert_eq!(problem["key"], "project-1:work-item-42:review");
    // Another work item is not limited by this one.
    let other = tokio::spawn(
        app.clone()
            .oneshot(Request::post("/runs/work-item-7").body(Body::empty()).unwrap()),
    );
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(other.await.unwrap().unwrap().status(), StatusCode::OK);
}

/// The response future and the store trait objects must be usable from spawned tasks.
#[test]
fn futures_are_send_and_static() {
    fn assert_send_static<T: Send + 'static>(_: &T) {}
    let svc = ConcurrencyLimitLayer::new(MemoryLimitStore::new(), by_name)
        .layer(tower::service_fn(|_: &'static str| async { Ok::<_, Infallible>(()) }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fut = svc.oneshot(KEY);
        assert_send_static(&fut);
        fut.await.unwrap();
    });
}

/// A store whose acquire takes a while, and which counts the acquires that landed.
struct SlowAcquire {
    inner: RedisStore,
    landed: Arc<AtomicUsize>,
}

impl LimitStore for SlowAcquire {
    async fn acquire(
        &self,
        key: &str,
        holder: &ClaimToken,
        limit: usize,
        lease: Duration,
    ) -> Result<Acquire, StoreError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = self.inner.acquire(key, holder, limit, lease).await;
        self.landed.fetch_add(1, Ordering::SeqCst);
        answer
    }
    async fn renew(&self, key: &str, holder: &ClaimToken, lease: Duration) -> Result<bool, StoreError> {
        self.inner.renew(key, holder, lease).await
    }
    async fn release(&self, key: &str, holder: &ClaimToken) -> Result<bool, StoreError> {
        self.inner.release(key, holder).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_dropped_while_acquiring_releases_the_slot_once_the_acquire_lands() {
    let server = RedisServer::start();
    let landed = Arc::new(AtomicUsize::new(0));
    let calls = Calls::default();
    let c = calls.clone();
    let svc = ConcurrencyLimitLayer::new(
        SlowAcquire {
            inner: store(&server.url()).await,
            landed: landed.clone(),
        },
        by_name,
    )
    .with_lease(Duration::from_secs(120))
    .layer(tower::service_fn(move |_: &'static str| {
        c.hit();
        async { Ok::<_, Infallible>(()) }
    }));
    let call = tokio::spawn(svc.clone().oneshot(KEY));
    tokio::time::sleep(Duration::from_millis(50)).await;
    call.abort();
    // The acquire still lands (it was handed to the background, not cancelled)...
    wait_until("the acquire landed", Duration::from_secs(20), || {
        let n = landed.load(Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;
    // ...and its slot is released, long before the 120 s lease.
    wait_until("the background release finished", Duration::from_secs(30), || {
        let n = svc.background_tasks();
        async move { n == 0 }
    })
    .await;
    assert_eq!(zcard(&server, KEY).await, 0, "the slot of the dropped call is free");
    assert_eq!(calls.get(), 0, "the dropped call never ran");
}

#[cfg(feature = "metrics")]
#[test]
fn outcomes_are_counted_by_layer_and_outcome_never_by_key() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = MemoryLimitStore::new();
            let holder = ClaimToken::generate();
            // Someone else holds the only slot of "busy".
            store
                .acquire("busy", &holder, 1, Duration::from_secs(60))
                .await
                .unwrap();
            let svc = ConcurrencyLimitLayer::new(Arc::new(store), by_name)
                .with_name("agent-runs")
                .layer(tower::service_fn(|_: &'static str| async { Ok::<_, Infallible>(()) }));
            svc.clone().oneshot("free").await.expect("granted");
            assert!(svc.oneshot("busy").await.unwrap_err().is_at_capacity());
        });
    });
    let counts: Vec<(String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "idempotency.limit.outcomes")
        .filter_map(|(key, _, _, value)| {
            let labels: Vec<_> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            assert!(labels.iter().all(|(k, _)| k == "layer" || k == "outcome"), "{labels:?}");
            assert!(labels.contains(&("layer".into(), "agent-runs".into())), "{labels:?}");
            let outcome = labels.into_iter().find(|(k, _)| k == "outcome")?.1;
            match value {
                DebugValue::Counter(n) if n > 0 => Some((outcome, n)),
                _ => None,
            }
        })
        .collect();
    let get = |o: &str| counts.iter().find(|(name, _)| name == o).map_or(0, |(_, n)| *n);
    assert_eq!(
        (get("granted"), get("released"), get("at_capacity")),
        (1, 1, 1),
        "{counts:?}"
    );
}

/// Without renewal, a call that outlives its lease has lost its slot: aborted by default, let
/// finish under `LostLeasePolicy::Continue`. (Memory store, paused clock: no real waiting.)
#[tokio::test(start_paused = true)]
async fn without_renewal_a_call_longer_than_its_lease_loses_its_slot() {
    let slow = || {
        tower::service_fn(|_: &'static str| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Infallible>("finished")
        })
    };
    let layer = ConcurrencyLimitLayer::new(Arc::new(MemoryLimitStore::new()), by_name)
        .with_lease(Duration::from_secs(1))
        .without_renewal()
        .build()
        .expect("valid settings");
    let err = layer.clone().layer(slow()).oneshot(KEY).await.unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    let finished = layer
        .with_lost_lease_policy(LostLeasePolicy::Continue)
        .layer(slow())
        .oneshot(KEY)
        .await;
    assert_eq!(finished.unwrap(), "finished");
}

/// On Redis Cluster every limit command touches one key, so keys on every primary work, and
/// two cluster connections share one limit.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_works_on_redis_cluster_across_nodes() {
    use common::redis_cluster::RedisCluster;
    let cluster = RedisCluster::start();
    let connect = || async {
        RedisStore::cluster_builder(cluster.urls())
            .timeout(Duration::from_secs(1))
            .connect()
            .await
            .expect("connect to the test cluster")
    };
    let (a, b) = (connect().await, connect().await);
    let lease = Duration::from_secs(60);
    for node in 0..3 {
        for key in cluster.keys_on(node, "limit:", 2) {
            let (first, second, third) = (ClaimToken::generate(), ClaimToken::generate(), ClaimToken::generate());
            assert_eq!(a.acquire(&key, &first, 2, lease).await.unwrap(), Acquire::Granted);
            assert_eq!(b.acquire(&key, &second, 2, lease).await.unwrap(), Acquire::Granted);
            assert!(matches!(
                b.acquire(&key, &third, 2, lease).await.unwrap(),
                Acquire::AtCapacity { .. }
            ));
            assert!(a.renew(&key, &first, lease).await.unwrap());
            assert!(
                b.release(&key, &first).await.unwrap(),
                "release is by holder, not connection"
            );
            assert_eq!(a.acquire(&key, &third, 2, lease).await.unwrap(), Acquire::Granted);
        }
    }
}

/// `LimitResponseLayer` outside the limit: an axum router takes it as it is (no
/// `HandleErrorLayer`), at capacity answers 429, and the handler's own answers pass through.
#[tokio::test]
async fn limit_response_layer_drops_into_an_axum_router() {
    use axum::body::Body;
    use http::{Request, StatusCode};
    use tower_idempotency::limit::LimitResponseLayer;

    let server = RedisServer::start();
    let gate = Arc::new(Semaphore::new(0));
    let limit = ConcurrencyLimitLayer::new(store(&server.url()).await, |req: &Request<Body>| {
        IdempotencyKey::new(req.uri().path()).map(Some)
    })
    .with_limit(1)
    .build()
    .expect("valid settings");
    let g = gate.clone();
    let app: axum::Router = axum::Router::new()
        .route(
            "/runs/{item}",
            axum::routing::post(move || {
                let g = g.clone();
                async move {
                    let _ = g.acquire().await.map(|p| p.forget());
                    (StatusCode::ACCEPTED, "ran")
                }
            }),
        )
        .layer(
            tower::ServiceBuilder::new()
                .layer(LimitResponseLayer::new())
                .layer(limit),
        );
    let post = || Request::post("/runs/work-item-42").body(Body::empty()).unwrap();
    let first = tokio::spawn(app.clone().oneshot(post()));
    wait_until("the first run holds the slot", Duration::from_secs(20), || {
        let server = &server;
        async move { zcard(server, "/runs/work-item-42").await == 1 }
    })
    .await;
    let refused = app.clone().oneshot(post()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::ACCEPTED);
}

//! Criterion benches of the claim path.
//!
//! - `layer_overhead_memory`: what the layer adds to a call, with `MemoryStore` (no network):
//!   the bare inner service; the layer with a fresh key per call; the layer with one hot key
//!   that is always a duplicate; the layer over a store that grants everything (the layer's own
//!   machinery, no data structure), without and with coalescing; `MemoryStore::claim` alone.
//! - `claim_parts`: the per-call pieces the layer builds (token, key).
//! - `redis_claim`: `RedisStore::claim` against a raw redis-rs `SET key token NX PX ttl` on the
//!   same multiplexed connection, one at a time (latency) and 64 at once (pipelined), against
//!   a `redis-server` this bench starts on a free port.
//!
//! Run: `cargo bench --bench claim` (filter with e.g. `-- redis_claim`). For the load test with
//! concurrency, key patterns and the `RESULT` lines, see `benches/throughput.rs`.

#[path = "support/grant_all.rs"]
mod grant_all;
#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::store::{ClaimToken, IdempotencyStore};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, RedisStore};

use redis_server::RedisServer;

/// Claim TTL for the Redis benches (the value does not change the cost of `SET NX PX`).
const TTL: Duration = Duration::from_secs(300);
/// Claim TTL for the `MemoryStore` benches: short, so the map of unique keys is swept and stays
/// bounded (about one second of claims) however long criterion runs.
const MEMORY_TTL: Duration = Duration::from_secs(1);

/// Unique key per call, built the same way for every arm so formatting cancels out.
fn next_key(counter: &AtomicU64) -> String {
    format!("bench:u:{}", counter.fetch_add(1, Ordering::Relaxed))
}

fn trivial(_req: String) -> std::future::Ready<Result<(), Infallible>> {
    std::future::ready(Ok(()))
}

fn key_of(req: &String) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(req).map(Some)
}

use grant_all::GrantAll;

/// Where each call's request comes from.
#[derive(Clone, Copy)]
enum Keys {
    /// A fresh key per call.
    Unique,
    /// The same key every call.
    Hot,
}

/// Times `iters` sequential calls of `svc` (ready, then call), each with a freshly built key.
/// Every arm pays the same for building the request, so differences are the service's own.
fn bench_service<S>(b: &mut criterion::Bencher<'_>, rt: &tokio::runtime::Runtime, svc: S, keys: Keys)
where
    S: Service<String> + Clone + 'static,
{
    let counter = Arc::new(AtomicU64::new(0));
    b.to_async(rt).iter_custom(|iters| {
        let mut svc = svc.clone();
        let counter = counter.clone();
        async move {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let req = match keys {
                    Keys::Unique => next_key(&counter),
                    Keys::Hot => {
                        // Pay for formatting a key as the other arms do (so the comparison with
                        // `bare_inner` is conservative), then send the hot key.
                        black_box(next_key(&counter));
                        String::from("bench:hot")
                    }
                };
                let result = match svc.ready().await {
                    Ok(ready) => ready.call(req).await.is_ok(),
                    Err(_) => false,
                };
                black_box(result);
            }
            start.elapsed()
        }
    });
}

fn layer_overhead_memory(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("layer_overhead_memory");
    group.throughput(Throughput::Elements(1));

    group.bench_function("bare_inner", |b| {
        bench_service(b, &rt, tower::service_fn(trivial), Keys::Unique);
    });

    group.bench_function("layer_unique_keys", |b| {
        let svc = IdempotencyLayer::new(MemoryStore::new(), key_of)
            .with_ttl(MEMORY_TTL)
            .layer(tower::service_fn(trivial));
        bench_service(b, &rt, svc, Keys::Unique);
    });

    group.bench_function("layer_hot_key_duplicate", |b| {
        let svc = IdempotencyLayer::new(MemoryStore::new(), key_of)
            .with_ttl(TTL)
            .layer(tower::service_fn(trivial));
        let first = rt.block_on(svc.clone().oneshot("bench:hot".to_string()));
        assert!(first.is_ok(), "the first call claims the hot key");
        let again = rt.block_on(svc.clone().oneshot("bench:hot".to_string()));
        assert!(
            again.is_err_and(|e| e.is_duplicate()),
            "every later call is a duplicate"
        );
        bench_service(b, &rt, svc, Keys::Hot);
    });

    group.bench_function("layer_grant_all_store", |b| {
        let svc = IdempotencyLayer::new(GrantAll, key_of).layer(tower::service_fn(trivial));
        bench_service(b, &rt, svc, Keys::Unique);
    });

    group.bench_function("layer_grant_all_store_coalescing", |b| {
        let svc = IdempotencyLayer::new(GrantAll, key_of)
            .with_coalescing(true)
            .layer(tower::service_fn(trivial));
        bench_service(b, &rt, svc, Keys::Unique);
    });

    group.bench_function("memory_store_claim_unique", |b| {
        let store = Arc::new(MemoryStore::new());
        let svc = tower::service_fn(move |key: String| {
            let store = store.clone();
            async move {
                let outcome = store.claim(&key, &ClaimToken::generate(), MEMORY_TTL).await;
                Ok::<_, Infallible>(black_box(outcome).is_ok())
            }
        });
        bench_service(b, &rt, svc, Keys::Unique);
    });
    group.finish();
}

fn claim_parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("claim_parts");
    group.bench_function("claim_token_generate", |b| b.iter(|| black_box(ClaimToken::generate())));
    group.bench_function("idempotency_key_new", |b| {
        let key = "octo-org/octo-repo:42:abc123f0123456789abcdef0123456789abcdef";
        b.iter(|| black_box(IdempotencyKey::new(black_box(key))))
    });
    group.finish();
}

fn redis_claim(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let store = rt.block_on(async {
        RedisStore::connect(server.url())
            .await
            .expect("connect to the bench's redis-server")
    });
    // The same multiplexed connection the store sends its claims on.
    let conn = store.connection();
    let keys = Arc::new(AtomicU64::new(0));
    let ttl_ms = TTL.as_millis() as u64;

    let raw_claim = {
        let conn = conn.clone();
        move |key: String, token: String| {
            let mut conn = conn.clone();
            async move {
                let reply: redis::Value = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut conn)
                    .await
                    .expect("raw SET NX PX");
                reply
            }
        }
    };

    let mut group = c.benchmark_group("redis_claim");
    group.measurement_time(Duration::from_secs(5));

    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_set_nx_px", |b| {
        b.to_async(&rt).iter(|| {
            let key = next_key(&keys);
            let token = ClaimToken::generate().as_str().to_owned();
            raw_claim(key, token)
        });
    });
    group.bench_function("redis_store_claim", |b| {
        b.to_async(&rt).iter(|| {
            let key = next_key(&keys);
            let store = &store;
            async move {
                store
                    .claim(&key, &ClaimToken::generate(), TTL)
                    .await
                    .expect("store claim")
            }
        });
    });

    const BATCH: u64 = 64;
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("raw_set_nx_px_x64_concurrent", |b| {
        b.to_async(&rt).iter(|| {
            let claims: Vec<_> = (0..BATCH)
                .map(|_| raw_claim(next_key(&keys), ClaimToken::generate().as_str().to_owned()))
                .collect();
            join_all(claims)
        });
    });
    group.bench_function("redis_store_claim_x64_concurrent", |b| {
        b.to_async(&rt).iter(|| {
            let claims: Vec<_> = (0..BATCH)
                .map(|_| {
                    let key = next_key(&keys);
                    let store = &store;
                    async move {
                        store
                            .claim(&key, &ClaimToken::generate(), TTL)
                            .await
                            .expect("store claim")
                    }
                })
                .collect();
            join_all(claims)
        });
    });
    group.finish();
    drop(store);
    drop(server);
}

criterion_group!(benches, layer_overhead_memory, claim_parts, redis_claim);
criterion_main!(benches);

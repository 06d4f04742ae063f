//! One conformance suite, run against every store: the semantics the layer relies on.

//! The cases live in tests/common/conformance.rs, shared with the Redis Cluster suite
//! (tests/cluster_store.rs).

mod common;
#[macro_use]
#[path = "common/conformance.rs"]
mod conformance;

use std::sync::Arc;

use common::RedisServer;
use conformance::Harness;
use tower_idempotency::{MemoryStore, RedisStore};

fn memory() -> Harness<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let s = store.clone();
    Harness {
        store,
        exists: Box::new(move |k| {
            let found = s.contains(&k);
            Box::pin(async move { found })
        }),
        guard: None,
    }
}

async fn redis() -> Harness<RedisStore> {
    let server = RedisServer::start();
    let store = Arc::new(RedisStore::connect(server.url()).await.expect("connect to test redis"));
    let conn = store.connection();
    Harness {
        store,
        exists: Box::new(move |k| {
            let mut conn = conn.clone();
            Box::pin(async move {
                redis::cmd("EXISTS")
                    .arg(k)
                    .query_async::<i64>(&mut conn)
                    .await
                    .expect("EXISTS")
                    == 1
            })
        }),
        guard: Some(Box::new(server)),
    }
}

conformance!(memory_store, memory());
conformance!(redis_store, redis().await);

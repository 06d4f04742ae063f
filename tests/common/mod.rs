#![allow(dead_code, unreachable_pub)]

pub mod fault_proxy;
pub mod redis_cluster;
pub mod redis_server;

pub use redis_server::RedisServer;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts calls of a trivial inner service.
#[derive(Clone, Default)]
pub struct Calls(pub Arc<AtomicUsize>);

impl Calls {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A plain redis-rs connection for checks outside the store under test.
pub async fn raw_conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

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

/// An example binary `cargo test` built next to this test's binary (an unfiltered `cargo test`
/// builds the examples; run `cargo build --examples --all-features` before a filtered one).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/examples/<name>
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --all-features` builds the examples; run `cargo build --examples --all-features` first",
        bin.display()
    );
    bin
}

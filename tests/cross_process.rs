//! `duplicate_is_short_circuited_across_processes`: several OS processes, each with its own
//! Redis connection and its own layer, race hundreds of concurrent claims over the same keys.
//! Exactly one dispatch per key may happen in total. With the `redis-cluster` feature the same
//! race also runs against a local 3-primary Redis Cluster.
//!
//! The binary has its own `main` (harness = false): run plainly it is the parent test; the
//! parent re-executes it with `RACE_CHILD_URL` (or `RACE_CHILD_CLUSTER`) set to make each
//! racing child.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::RedisServer;
use redis::aio::ConnectionLike;
use tower::{Service, ServiceExt};
use tower_idempotency::store::IdempotencyStore;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, RedisStore};

const CHILDREN: usize = 3;
const KEYS: usize = 100;
const COPIES_PER_CHILD: usize = 3; // each child fires every key this many times, concurrently

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(url) = std::env::var("RACE_CHILD_URL") {
        let store = rt.block_on(RedisStore::connect(url.as_str())).expect("child: connect");
        rt.block_on(child(store.connection(), store));
        return;
    }
    #[cfg(feature = "redis-cluster")]
    if let Ok(urls) = std::env::var("RACE_CHILD_CLUSTER") {
        let store = rt
            .block_on(RedisStore::connect_cluster(urls.split(',')))
            .expect("child: connect");
        rt.block_on(child(store.connection(), store));
        return;
    }
    let mut passed = 0;
    let started = Instant::now();
    {
        let server = RedisServer::start();
        let conn = rt
            .block_on(RedisStore::connect(server.url()))
            .expect("connect")
            .connection();
        rt.block_on(race(conn, ("RACE_CHILD_URL", server.url())));
    }
    println!(
        "test duplicate_is_short_circuited_across_processes ... ok ({:?})",
        started.elapsed()
    );
    passed += 1;
    #[cfg(feature = "redis-cluster")]
    {
        let started = Instant::now();
        let cluster = common::redis_cluster::RedisCluster::start();
        let conn = rt
            .block_on(RedisStore::connect_cluster(cluster.urls()))
            .expect("connect")
            .connection();
        rt.block_on(race(conn, ("RACE_CHILD_CLUSTER", cluster.urls().join(","))));
        println!(
            "test duplicate_is_short_circuited_across_processes_on_a_cluster ... ok ({:?})",
            started.elapsed()
        );
        passed += 1;
    }
    println!("cross_process: {passed} passed, 0 failed");
}

/// The parent: starts the children, fires the race, checks the totals. `child_env` says how a
/// child finds the same Redis.
async fn race<C: ConnectionLike + Clone>(mut conn: C, child_env: (&str, String)) {
    let exe = std::env::current_exe().expect("current_exe");
    let children: Vec<_> = (0..CHILDREN)
        .map(|_| {
            Command::new(&exe)
                .env(child_env.0, &child_env.1)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn child process")
        })
        .collect();

    // Start the race only when every child is connected and waiting.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready: Option<usize> = redis::cmd("GET")
            .arg("race:ready")
            .query_async(&mut conn)
            .await
            .unwrap();
        if ready == Some(CHILDREN) {
            break;
        }
        assert!(Instant::now() < deadline, "children did not get ready: {ready:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = redis::cmd("SET")
        .arg("race:go")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();

    let (mut dispatched, mut duplicates) = (0, 0);
    for child in children {
        let out = child.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {}\n{stdout}", out.status);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("RACE_RESULT"))
            .expect("child printed no RACE_RESULT");
        let field = |name: &str| -> usize {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line}"))
        };
        assert_eq!(field("errors"), 0, "{line}");
        dispatched += field("dispatched");
        duplicates += field("duplicates");
    }
    assert_eq!(dispatched, KEYS, "exactly one dispatch per key across all processes");
    assert_eq!(duplicates, KEYS * (CHILDREN * COPIES_PER_CHILD - 1));
    // Independent evidence, written by the inner service itself: one INCR per dispatch.
    for k in 0..KEYS {
        let n: Option<usize> = redis::cmd("GET")
            .arg(format!("dispatches:job-{k}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, Some(1), "job-{k} dispatched {n:?} times");
    }
}

/// One racing process: its own store and connection, its own layer.
async fn child<C, St>(conn: C, store: St)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    St: IdempotencyStore,
{
    let (mut coord, counter) = (conn.clone(), conn);
    let layer = IdempotencyLayer::new(store, |k: &String| -> Result<_, KeyError> {
        IdempotencyKey::new(k).map(Some)
    })
    .with_namespace("race:claim:");
    let svc = tower::ServiceBuilder::new().layer(layer).service_fn(move |k: String| {
        let mut counter = counter.clone();
        async move {
            redis::cmd("INCR")
                .arg(format!("dispatches:{k}"))
                .query_async::<i64>(&mut counter)
                .await
        }
    });

    let _: i64 = redis::cmd("INCR")
        .arg("race:ready")
        .query_async(&mut coord)
        .await
        .expect("child: ready");
    loop {
        let go: Option<i64> = redis::cmd("GET")
            .arg("race:go")
            .query_async(&mut coord)
            .await
            .expect("child: go");
        if go.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let mut tasks = Vec::new();
    for copy in 0..COPIES_PER_CHILD {
        for k in 0..KEYS {
            // Interleave copies so the same key is in flight from every process at once.
            let key = format!("job-{}", (k + copy * 7) % KEYS);
            let mut svc = svc.clone();
            tasks.push(tokio::spawn(async move { svc.ready().await?.call(key).await }));
        }
    }
    let (mut dispatched, mut duplicates, mut errors) = (0, 0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => dispatched += 1,
            Err(e) if e.is_duplicate() => duplicates += 1,
            Err(e) => {
                eprintln!("child error: {e}");
                errors += 1
            }
        }
    }
    println!(
        "RACE_RESULT pid={} dispatched={dispatched} duplicates={duplicates} errors={errors}",
        std::process::id()
    );
}

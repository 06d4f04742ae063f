//! The apalis worker of `examples/apalis_worker.rs` (its code, `examples/support/apalis_review.rs`)
//! against a real Redis: `IdempotencyLayer` added with apalis's `WorkerBuilder::layer`, and what
//! each outcome leaves in apalis-redis's queue (done, dead, retried).

#[path = "../examples/support/apalis_review.rs"]
mod apalis_review;
mod common;

use std::collections::HashMap;
use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::{Config, RedisStorage};
use apalis_review::*;
use common::RedisServer;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_idempotency::RedisStore;

const QUEUE: &str = "reviews-queue";
const REVIEWS: &str = "reviews";
const NAMESPACE: &str = "apalis-dispatch:";
/// Every wait in these tests polls until this deadline, then fails with what it saw.
const DEADLINE: Duration = Duration::from_secs(15);

fn job(sha: &str, trigger: &str) -> ReviewJob {
    ReviewJob {
        project: "octo/repo".into(),
        pr: 7,
        sha: sha.into(),
        trigger: trigger.into(),
    }
}

async fn storage(server: &RedisServer) -> RedisStorage<ReviewJob> {
    let conn = apalis_redis::connect(server.url())
        .await
        .expect("connect apalis storage");
    // One task per fetch, so two workers share the queue instead of one taking the whole batch.
    RedisStorage::new(conn).with_config(Config::default().queue(QUEUE).batch_size(1))
}

async fn store(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .timeout(Duration::from_millis(200))
        .connect_lazy()
        .expect("store")
}

/// A running worker of the example's code, stopped by [`Worker::stop`].
struct Worker {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), apalis::prelude::WorkerError>>,
}

impl Worker {
    async fn spawn(name: &str, apalis: &RedisServer, store: RedisStore, store_retry_delay: Duration) -> Self {
        let options = ReviewWorkerOptions {
            name: name.into(),
            namespace: NAMESPACE.into(),
            poll_interval: Duration::from_millis(50),
            store_retry_delay,
        };
        let dispatcher = ReviewDispatcher {
            conn: apalis_redis::connect(apalis.url()).await.expect("connect dispatcher"),
            stream: REVIEWS.into(),
        };
        let storage = storage(apalis).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(run_review_worker(options, storage, store, dispatcher, async {
            let _ = stopped.await;
        }));
        Self { stop, handle }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let exit = tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("worker did not stop within 10 s");
        exit.expect("worker task panicked")
            .expect("worker exited with an error");
    }
}

/// What apalis-redis recorded for one task.
#[derive(Debug)]
struct TaskRecord {
    id: String,
    meta: HashMap<String, String>,
}

impl TaskRecord {
    fn status(&self) -> &str {
        self.meta.get("status").map(String::as_str).unwrap_or("")
    }
    fn result(&self) -> &str {
        self.meta.get("result").map(String::as_str).unwrap_or("")
    }
    fn attempts(&self) -> &str {
        self.meta.get("attempts").map(String::as_str).unwrap_or("")
    }
}

/// Reads apalis-redis's queue state and the dispatched reviews.
struct Queue {
    conn: MultiplexedConnection,
}

impl Queue {
    async fn new(server: &RedisServer) -> Self {
        Self {
            conn: common::raw_conn(server).await,
        }
    }

    async fn set(&mut self, name: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.conn.smembers(format!("{QUEUE}:{name}")).await.unwrap();
        ids.sort();
        ids
    }

    async fn all_tasks(&mut self) -> Vec<TaskRecord> {
        let mut ids: Vec<String> = self.conn.hkeys(format!("{QUEUE}:data")).await.unwrap();
        ids.sort();
        let mut records = Vec::new();
        for id in ids {
            let meta: HashMap<String, String> = self.conn.hgetall(format!("{QUEUE}:meta:{id}")).await.unwrap();
            records.push(TaskRecord { id, meta });
        }
        records
    }

    async fn task(&mut self, id: &str) -> TaskRecord {
        let meta: HashMap<String, String> = self.conn.hgetall(format!("{QUEUE}:meta:{id}")).await.unwrap();
        TaskRecord { id: id.into(), meta }
    }

    /// The SHA of each dispatched review, in dispatch order.
    async fn dispatched_shas(&mut self) -> Vec<String> {
        let reply: StreamRangeReply = self.conn.xrange_all(REVIEWS).await.unwrap();
        reply
            .ids
            .iter()
            .map(|e| e.get::<String>("sha").unwrap_or_default())
            .collect()
    }

    /// Polls until `done` and `dead` hold `done` and `dead` tasks, or fails after [`DEADLINE`].
    async fn wait_settled(&mut self, done: usize, dead: usize) {
        let start = Instant::now();
        loop {
            let (d, x) = (self.set("done").await, self.set("dead").await);
            if d.len() == done && x.len() == dead {
                return;
            }
            if start.elapsed() > DEADLINE {
                let tasks = self.all_tasks().await;
                panic!(
                    "after {DEADLINE:?}: done={d:?} dead={x:?}, expected {done} done and {dead} dead; tasks: {tasks:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn only_task_id(&mut self) -> String {
        let tasks = self.all_tasks().await;
        assert_eq!(tasks.len(), 1, "expected exactly one task: {tasks:#?}");
        tasks[0].id.clone()
    }
}

async fn claim_keys(conn: &mut MultiplexedConnection) -> Vec<String> {
    let mut keys: Vec<String> = conn.keys(format!("{NAMESPACE}*")).await.unwrap();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_review_pushed_twice_with_two_workers_runs_the_handler_once() {
    let server = RedisServer::start();
    let mut queue = Queue::new(&server).await;
    let mut pusher = storage(&server).await;
    // Two triggers for the same (project, PR, SHA), e.g. the router and a post-completion hook,
    // and one for another SHA, which must still be dispatched.
    pusher.push(job("abcdef1", "check_suite")).await.unwrap();
    pusher.push(job("abcdef1", "post-completion hook")).await.unwrap();
    pusher.push(job("0123456", "check_suite")).await.unwrap();

    let w1 = Worker::spawn("w1", &server, store(&server.url()).await, Duration::from_millis(100)).await;
    let w2 = Worker::spawn("w2", &server, store(&server.url()).await, Duration::from_millis(100)).await;
    queue.wait_settled(3, 0).await;
    w1.stop().await;
    w2.stop().await;

    let mut shas = queue.dispatched_shas().await;
    shas.sort();
    assert_eq!(shas, ["0123456", "abcdef1"], "each review dispatched exactly once");

    let tasks = queue.all_tasks().await;
    let ran = tasks.iter().filter(|t| t.result().contains("\"Ran\"")).count();
    let duplicates: Vec<_> = tasks.iter().filter(|t| t.result().contains("\"Duplicate\"")).collect();
    assert_eq!(ran, 2, "{tasks:#?}");
    assert_eq!(duplicates.len(), 1, "{tasks:#?}");
    assert!(
        duplicates[0].result().contains("octo/repo:7:abcdef1"),
        "the duplicate is the second abcdef1 trigger: {tasks:#?}"
    );
    // Recorded as done, once: a duplicate is not retried (attempts 0: the handler never ran).
    assert!(tasks.iter().all(|t| t.status() == "Done"), "{tasks:#?}");
    assert_eq!(duplicates[0].attempts(), "0", "{tasks:#?}");

    let mut conn = common::raw_conn(&server).await;
    assert_eq!(
        claim_keys(&mut conn).await,
        [
            format!("{NAMESPACE}octo/repo:7:0123456"),
            format!("{NAMESPACE}octo/repo:7:abcdef1")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_with_invalid_key_is_dead_and_never_runs_the_handler() {
    let server = RedisServer::start();
    let mut queue = Queue::new(&server).await;
    let mut pusher = storage(&server).await;
    pusher.push(job("main", "bad trigger")).await.unwrap(); // not a commit id
    let w1 = Worker::spawn("w1", &server, store(&server.url()).await, Duration::from_millis(100)).await;
    queue.wait_settled(0, 1).await;
    // A valid job after it: the worker went on, and dispatches normally.
    pusher.push(job("abcdef1", "good trigger")).await.unwrap();
    queue.wait_settled(1, 1).await;
    w1.stop().await;

    assert_eq!(
        queue.dispatched_shas().await,
        ["abcdef1"],
        "the invalid job never dispatched"
    );
    let dead = queue.set("dead").await;
    let record = queue.task(&dead[0]).await;
    assert_eq!(record.status(), "Killed", "{record:#?}");
    assert!(record.result().contains("invalid idempotency key"), "{record:#?}");
    assert!(record.result().contains("`main` is not a commit id"), "{record:#?}");
    // Dead is final in apalis-redis: not scheduled for a retry.
    let scheduled: Vec<String> = common::raw_conn(&server)
        .await
        .zrange(format!("{QUEUE}:scheduled"), 0, -1)
        .await
        .unwrap();
    assert!(scheduled.is_empty(), "{scheduled:?}");
    let mut conn = common::raw_conn(&server).await;
    assert_eq!(claim_keys(&mut conn).await, [format!("{NAMESPACE}octo/repo:7:abcdef1")]);
}

/// Counts apalis-redis's "rescheduled for a retry" events (`PUBLISH tasks:<queue>:scheduled:retry`),
/// which `handle_results.lua` sends each time it reschedules a `Failed` task.
struct Retries {
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    _listener: JoinHandle<()>,
}

impl Retries {
    async fn subscribe(server: &RedisServer) -> Self {
        use futures::StreamExt;
        let client = redis::Client::open(server.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub
            .subscribe(format!("tasks:{QUEUE}:scheduled:retry"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let listener = tokio::spawn(async move {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                if tx.send(msg.get_payload::<String>().unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            _listener: listener,
        }
    }

    /// Waits for the next retry of task `id` and returns when it was seen, or fails after
    /// [`DEADLINE`].
    async fn next(&mut self, id: &str) -> Instant {
        let wait = async {
            while let Some(task) = self.rx.recv().await {
                if task == id {
                    return Instant::now();
                }
            }
            panic!("retry listener ended");
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("task {id} was not rescheduled within {DEADLINE:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_unavailable_task_is_retried_and_dispatched_once_the_store_is_back() {
    let apalis = RedisServer::start();
    let mut claims = RedisServer::start();
    let mut queue = Queue::new(&apalis).await;
    let mut retries = Retries::subscribe(&apalis).await;
    let store = store(&claims.url()).await;
    claims.kill();

    storage(&apalis)
        .await
        .push(job("abcdef1", "check_suite"))
        .await
        .unwrap();
    let id = queue.only_task_id().await;
    let store_retry_delay = Duration::from_millis(200);
    let w1 = Worker::spawn("w1", &apalis, store, store_retry_delay).await;
    // Failed closed and rescheduled by apalis-redis, twice: retried while the store is down,
    // paced by `store_retry_delay` (apalis counts no attempt for it, so it is due at once).
    let first = retries.next(&id).await;
    let second = retries.next(&id).await;
    assert!(
        second - first >= store_retry_delay,
        "retried after {:?}, sooner than the {store_retry_delay:?} retry delay",
        second - first
    );
    assert!(
        queue.dispatched_shas().await.is_empty(),
        "nothing dispatched while the store is down"
    );
    let failed = queue.task(&id).await;
    assert!(failed.result().contains("idempotency store unavailable"), "{failed:#?}");
    assert!(queue.set("dead").await.is_empty(), "not given up on");

    let claims = tokio::task::spawn_blocking(move || {
        claims.restart();
        claims
    })
    .await
    .unwrap();
    queue.wait_settled(1, 0).await;
    w1.stop().await;

    assert_eq!(
        queue.dispatched_shas().await,
        ["abcdef1"],
        "dispatched once, after the store came back"
    );
    let record = queue.task(&id).await;
    assert_eq!(record.status(), "Done", "{record:#?}");
    assert!(record.result().contains("\"Ran\""), "{record:#?}");
    let mut conn = common::raw_conn(&claims).await;
    assert_eq!(claim_keys(&mut conn).await, [format!("{NAMESPACE}octo/repo:7:abcdef1")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dispatch_releases_the_claim_so_apalis_retry_dispatches_once() {
    let server = RedisServer::start();
    let mut queue = Queue::new(&server).await;
    let mut retries = Retries::subscribe(&server).await;
    let mut conn = common::raw_conn(&server).await;
    // The reviews key holds a string: XADD fails with WRONGTYPE, the handler returns an error.
    let _: () = conn.set(REVIEWS, "not a stream").await.unwrap();

    storage(&server)
        .await
        .push(job("abcdef1", "check_suite"))
        .await
        .unwrap();
    let id = queue.only_task_id().await;
    let w1 = Worker::spawn("w1", &server, store(&server.url()).await, Duration::from_millis(100)).await;
    retries.next(&id).await;
    let failed = queue.task(&id).await;
    assert_eq!(failed.status(), "Failed", "{failed:#?}");
    assert!(failed.result().contains("WRONGTYPE"), "{failed:#?}");
    assert!(
        claim_keys(&mut conn).await.is_empty(),
        "the claim was released for the retry"
    );

    let _: () = conn.del(REVIEWS).await.unwrap();
    queue.wait_settled(1, 0).await;
    w1.stop().await;

    assert_eq!(queue.dispatched_shas().await, ["abcdef1"]);
    let record = queue.task(&id).await;
    assert_eq!(record.status(), "Done", "{record:#?}");
    assert!(
        record.result().contains("\"Ran\""),
        "the retry ran the handler: {record:#?}"
    );
    let attempts: usize = record.attempts().parse().unwrap();
    assert!(attempts >= 2, "{record:#?}");
    assert_eq!(claim_keys(&mut conn).await, [format!("{NAMESPACE}octo/repo:7:abcdef1")]);
}

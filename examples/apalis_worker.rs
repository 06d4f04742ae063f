//! An [apalis](https://docs.rs/apalis) worker with `IdempotencyLayer` added through apalis's own
//! `WorkerBuilder::layer`: a review that was already dispatched (by another worker, or by the
//! webhook router sharing the namespace) is not dispatched again.
//!
//! ```text
//! cargo run --example apalis_worker                       # a worker; Ctrl-C stops it
//! cargo run --example apalis_worker -- --push octo/repo 7 abcdef1
//! cargo run --example apalis_worker -- --push octo/repo 7 abcdef1   # same review: skipped
//! cargo run --example apalis_worker -- --push octo/repo 7 main      # invalid key: dead, never run
//! redis-cli XRANGE apalis-reviews - +                     # the dispatched reviews
//! ```
//!
//! Redis: `REDIS_URL`, read once at start, else `redis://127.0.0.1:6379`. Options:
//! `--name NAME` (worker name, default `review-worker-<pid>`), `--namespace PREFIX` (claim keys,
//! default `apalis-dispatch:`; use the router's namespace to deduplicate against it too).
//!
//! The composition, and what a duplicate, a store outage and an invalid key mean for the apalis
//! task (done, retried, dead), are in `support/apalis_review.rs`.

#[path = "support/apalis_review.rs"]
mod apalis_review;

use std::time::Duration;

use apalis::prelude::TaskSink;
use apalis_redis::{Config, RedisStorage};
use apalis_review::{ReviewDispatcher, ReviewJob, ReviewWorkerOptions, run_review_worker};
use tower_idempotency::RedisStore;

/// The apalis queue the jobs go through.
const QUEUE: &str = "review-jobs";
/// The stream dispatched reviews are written to.
const REVIEWS: &str = "apalis-reviews";

enum Mode {
    Work(ReviewWorkerOptions),
    Push(ReviewJob),
}

fn parse_args() -> Result<Mode, String> {
    let mut options = ReviewWorkerOptions {
        name: format!("review-worker-{}", std::process::id()),
        namespace: "apalis-dispatch:".into(),
        poll_interval: Duration::from_millis(500),
        store_retry_delay: Duration::from_secs(1),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--name" => options.name = value()?,
            "--namespace" => options.namespace = value()?,
            "--push" => {
                let project = value()?;
                let pr = value()?.parse().map_err(|e| format!("--push: PR number: {e}"))?;
                let sha = value()?;
                let trigger = format!("apalis_worker --push (pid {})", std::process::id());
                return Ok(Mode::Push(ReviewJob {
                    project,
                    pr,
                    sha,
                    trigger,
                }));
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Mode::Work(options))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,apalis_core=warn".into()),
        )
        .init();
    // Read once, at start; never again.
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mode = parse_args()?;

    let conn = apalis_redis::connect(redis_url.as_str())
        .await
        .map_err(|e| format!("cannot connect to Redis at {redis_url}: {e}"))?;
    let mut storage = RedisStorage::<ReviewJob>::new(conn.clone()).with_config(Config::default().queue(QUEUE));

    let options = match mode {
        Mode::Push(job) => {
            storage.push(job.clone()).await?;
            println!("pushed {job:?} to apalis queue `{QUEUE}`");
            return Ok(());
        }
        Mode::Work(options) => options,
    };

    let store = RedisStore::connect(redis_url.as_str()).await?;
    let dispatcher = ReviewDispatcher {
        conn,
        stream: REVIEWS.into(),
    };
    println!(
        "worker `{}` on apalis queue `{QUEUE}`, claims under `{}`, reviews to stream `{REVIEWS}`; Ctrl-C stops it",
        options.name, options.namespace
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    run_review_worker(options, storage, store, dispatcher, shutdown).await?;
    Ok(())
}

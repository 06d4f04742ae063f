//! A queue worker: consumes review requests from a Redis Stream through a consumer group and
//! dispatches each one through `IdempotencyLayer`, so a review that the webhook router (or
//! another worker) already dispatched is skipped.
//!
//! ```text
//! cargo run --example stream_worker -- [--redis URL] [--stream review-jobs] [--group workers]
//!     [--consumer NAME] [--reviews reviews] [--namespace github-dispatch:] [--ttl-secs 300]
//!     [--capacity N] [--min-idle-ms 30000]
//! ```
//!
//! Feed it with `redis-cli XADD review-jobs '*' project octo/repo pr 7 sha abcdef1`.
//! What happens to each message is tabulated in `support/stream_worker.rs`.

#[path = "support/stream_worker.rs"]
mod stream_worker;

use std::time::Duration;

use stream_worker::{DispatchReview, StreamConsumer, handle_message, review_service};
use tower_idempotency::{RedisStore, Settle};

struct Args {
    redis: String,
    stream: String,
    group: String,
    consumer: String,
    reviews: String,
    namespace: String,
    ttl: Duration,
    capacity: Option<usize>,
    min_idle: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        // Read once, at start; never again.
        redis: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        stream: "review-jobs".into(),
        group: "workers".into(),
        consumer: format!("worker-{}", std::process::id()),
        reviews: "reviews".into(),
        namespace: "github-dispatch:".into(),
        ttl: Duration::from_secs(300),
        capacity: None,
        min_idle: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--redis" => a.redis = value()?,
            "--stream" => a.stream = value()?,
            "--group" => a.group = value()?,
            "--consumer" => a.consumer = value()?,
            "--reviews" => a.reviews = value()?,
            "--namespace" => a.namespace = value()?,
            "--ttl-secs" => a.ttl = Duration::from_secs(value()?.parse().map_err(|e| format!("--ttl-secs: {e}"))?),
            "--capacity" => a.capacity = Some(value()?.parse().map_err(|e| format!("--capacity: {e}"))?),
            "--min-idle-ms" => {
                a.min_idle = Duration::from_millis(value()?.parse().map_err(|e| format!("--min-idle-ms: {e}"))?)
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = RedisStore::connect(args.redis.as_str()).await?;
    let conn = redis::Client::open(args.redis.as_str())?
        .get_connection_manager()
        .await?;
    let dispatch = DispatchReview {
        conn,
        stream: args.reviews.clone(),
        capacity: args.capacity,
    };
    let mut svc = review_service(store, &args.namespace, dispatch);
    let mut consumer =
        StreamConsumer::new(&args.redis, &args.stream, &args.group, &args.consumer, args.min_idle).await?;
    println!(
        "worker {} consuming {} (group {}), dispatching to {}",
        args.consumer, args.stream, args.group, args.reviews
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            batch = consumer.next_batch() => {
                for entry in batch? {
                    let (result, disposition) = handle_message(&mut consumer, &mut svc, &entry, Settle::Release).await?;
                    tracing::info!(id = %entry.id, ?disposition, outcome = ?result.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string())), "message handled");
                }
            }
        }
    }
}

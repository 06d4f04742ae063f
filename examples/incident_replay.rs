//! Replays the incident this crate exists for, with real OS processes and a real Redis.
//!
//! A webhook router (one process) receives GitHub `check_suite` (completed, success) and
//! `pull_request` (`review_requested`) deliveries over HTTP, while a queue worker (another
//! process) finishes implementation jobs and runs a post-completion hook that dispatches the
//! review for the same (repository, PR, head SHA). Triggers are fired concurrently, with jitter,
//! at both. Both processes dispatch by `XADD` to the same review stream, through
//! `IdempotencyLayer` with the same namespace: each head SHA must be reviewed exactly once.
//!
//! Then the same scenario runs with a per-process in-memory map (`MemoryStore` in each
//! process), which is what the incident had, so the difference is visible.
//!
//! ```text
//! cargo run --example incident_replay -- [--triggers N] [--rounds K] [--redis URL]
//! ```
//!
//! Redis: `--redis`, else `REDIS_URL` (unreachable → exit 1), else `redis://127.0.0.1:6379`;
//! when nothing answers there and `redis-server` is on PATH, a throwaway server is started on a
//! free port and stopped at the end. Everything the replay writes lives under keys prefixed
//! `incident-replay:<run id>:`, deleted at the end; nothing else in that Redis is touched.
//!
//! Exit code 0 only when every key was dispatched exactly once.

#[path = "support/redis_choice.rs"]
mod redis_choice;
#[path = "../tests/common/redis_server.rs"]
mod redis_server;
#[path = "support/stream_worker.rs"]
mod stream_worker;
#[path = "support/webhook_router.rs"]
mod webhook_router;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROJECT: &str = "octo-org/octo-repo";
/// `repository.id` of `PROJECT`: GitHub lists a suite's pull requests with their base
/// repository's id, and the router keys only the event repository's own pull request.
const REPOSITORY_ID: u64 = 300_029_405;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StoreKind {
    Redis,
    Memory,
}

impl StoreKind {
    fn as_str(self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::Memory => "memory",
        }
    }
}

#[derive(Debug)]
struct Args {
    role: Option<String>,
    triggers: usize,
    rounds: usize,
    redis: Option<String>,
    store: StoreKind,
    run: String,
    expect: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        role: None,
        triggers: 8,
        rounds: 5,
        redis: None,
        store: StoreKind::Redis,
        run: String::new(),
        expect: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String, flag: &str| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--triggers" => a.triggers = number(value()?, "--triggers")?,
            "--rounds" => a.rounds = number(value()?, "--rounds")?,
            "--redis" => a.redis = Some(value()?),
            // Internal: the child processes.
            "--role" => a.role = Some(value()?),
            "--store" => {
                a.store = match value()?.as_str() {
                    "redis" => StoreKind::Redis,
                    "memory" => StoreKind::Memory,
                    other => return Err(format!("--store: unknown store {other}")),
                }
            }
            "--run" => a.run = value()?,
            "--expect" => a.expect = number(value()?, "--expect")?,
            "-h" | "--help" => {
                return Err("usage: incident_replay [--triggers N] [--rounds K] [--redis URL]".into());
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.role.is_none() && (a.triggers < 2 || a.rounds == 0) {
        return Err("--triggers must be at least 2 (one per process) and --rounds at least 1".into());
    }
    Ok(a)
}

/// Names of everything one scenario writes, all under `incident-replay:<run>:`.
struct Names {
    namespace: String,
    reviews: String,
    jobs: String,
}

fn names(run: &str) -> Names {
    Names {
        namespace: format!("incident-replay:{run}:claim:"),
        reviews: format!("incident-replay:{run}:reviews"),
        jobs: format!("incident-replay:{run}:impl-jobs"),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.role.as_deref() {
        None => return rt.block_on(parent(args)),
        Some("router") => rt.block_on(router(args)),
        Some("worker") => rt.block_on(worker(args)),
        Some(other) => Err(format!("unknown role {other}").into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- parent

#[derive(Default, Debug)]
struct Tally {
    triggers: usize,
    dispatched: usize,
    duplicates: usize,
    ignored: usize,
    store_errors: usize,
    other: usize,
}

impl Tally {
    fn row(&self, name: &str) -> String {
        format!(
            "  {name:<24} {:>8} {:>10} {:>10} {:>12} {:>7}",
            self.triggers,
            self.dispatched,
            self.duplicates,
            self.store_errors,
            self.ignored + self.other
        )
    }

    fn parse(line: &str) -> Option<Tally> {
        let mut t = Tally::default();
        for kv in line.split_whitespace().skip(1) {
            let (k, v) = kv.split_once('=')?;
            let v: usize = v.parse().ok()?;
            match k {
                "triggers" => t.triggers = v,
                "dispatched" => t.dispatched = v,
                "duplicates" => t.duplicates = v,
                "store_errors" => t.store_errors = v,
                "ignored" => t.ignored = v,
                "other" => t.other = v,
                _ => {}
            }
        }
        Some(t)
    }

    fn line(&self) -> String {
        format!(
            "TALLY triggers={} dispatched={} duplicates={} store_errors={} ignored={} other={}",
            self.triggers, self.dispatched, self.duplicates, self.store_errors, self.ignored, self.other
        )
    }
}

struct Outcome {
    router: Tally,
    worker: Tally,
    per_key: BTreeMap<String, usize>,
    triggers: usize,
}

async fn parent(args: Args) -> ExitCode {
    let (url, server) = match redis_choice::resolve_redis(args.redis.clone()).await {
        Ok(found) => found,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let run = format!("{}-{}", std::process::id(), started.elapsed().as_nanos() % 100_000);
    println!(
        "replaying the incident: {} rounds (distinct head SHAs) x {} triggers, router and worker as separate processes",
        args.rounds, args.triggers
    );

    let shared = match scenario(&url, &format!("{run}-redis"), StoreKind::Redis, &args).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            cleanup(&url, &run).await;
            return ExitCode::FAILURE;
        }
    };
    let total_duplicates = shared.router.duplicates + shared.worker.duplicates;
    let total_errors = shared.router.store_errors + shared.worker.store_errors;
    print_tables(
        "with IdempotencyLayer + RedisStore (one claim shared by both processes)",
        &shared,
    );
    let dispatched: usize = shared.per_key.values().sum();
    println!(
        "triggers={} dispatched={} duplicates={} store_errors={}",
        shared.triggers, dispatched, total_duplicates, total_errors
    );

    let exactly_once = shared.per_key.len() == args.rounds && shared.per_key.values().all(|&n| n == 1);

    match scenario(&url, &format!("{run}-memory"), StoreKind::Memory, &args).await {
        Ok(memory) => {
            print_tables("with a per-process in-memory map (what the incident had)", &memory);
            let dispatched: usize = memory.per_key.values().sum();
            let doubled = memory.per_key.values().filter(|&&n| n > 1).count();
            println!(
                "in-memory map: dispatched={dispatched} for {} keys ({doubled} keys dispatched more than once)",
                args.rounds
            );
        }
        Err(e) => eprintln!("the in-memory comparison failed: {e}"),
    }
    cleanup(&url, &run).await;
    drop(server);
    println!("finished in {:.1?}", started.elapsed());
    if exactly_once {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "FAILED: not every key was dispatched exactly once: {:?}",
            shared.per_key
        );
        ExitCode::FAILURE
    }
}

fn print_tables(title: &str, o: &Outcome) {
    println!("\n{title}");
    println!(
        "  {:<24} {:>8} {:>10} {:>10} {:>12} {:>7}",
        "process", "triggers", "dispatched", "duplicates", "store_errors", "other"
    );
    println!("{}", o.router.row("router (webhooks, HTTP)"));
    println!("{}", o.worker.row("worker (post-completion)"));
    let per_key: Vec<String> = o
        .per_key
        .iter()
        .map(|(k, n)| match k.rsplit_once(':') {
            Some((head, sha)) => format!("{head}:{}={n}", &sha[..sha.len().min(7)]),
            None => format!("{k}={n}"),
        })
        .collect();
    println!("  reviews per key: {}", per_key.join(" "));
}

async fn cleanup(url: &str, run: &str) {
    let Ok(client) = redis::Client::open(url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let pattern = format!("incident-replay:{run}-*");
    let keys: Vec<String> = match conn.scan_match::<_, String>(&pattern).await {
        Ok(iter) => {
            use futures::StreamExt;
            iter.filter_map(|k| async move { k.ok() }).collect().await
        }
        Err(_) => return,
    };
    if !keys.is_empty() {
        let _: Result<i64, _> = conn.del(&keys).await;
    }
}

fn spawn_child(role: &str, url: &str, run: &str, store: StoreKind, expect: usize) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .args([
            "--role",
            role,
            "--redis",
            url,
            "--run",
            run,
            "--store",
            store.as_str(),
            "--expect",
            &expect.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
}

fn random_sha() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < 40 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(out.len());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(40);
    out
}

fn jitter(max_ms: u64) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let h = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Duration::from_millis(h % (max_ms + 1))
}

async fn scenario(url: &str, run: &str, store: StoreKind, args: &Args) -> Result<Outcome, Box<dyn std::error::Error>> {
    let n = names(run);
    let per_round_worker = args.triggers / 2;
    let per_round_router = args.triggers - per_round_worker;
    let mut router = spawn_child("router", url, run, store, 0)?;
    let mut worker = spawn_child("worker", url, run, store, per_round_worker * args.rounds)?;

    // The router tells us where it listens.
    let mut router_out = BufReader::new(router.stdout.take().ok_or("router stdout")?);
    let mut line = String::new();
    router_out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or_else(|| format!("router said {line:?}"))?
        .to_string();
    let mut worker_out = BufReader::new(worker.stdout.take().ok_or("worker stdout")?);
    line.clear();
    worker_out.read_line(&mut line)?;
    if line.trim() != "READY" {
        return Err(format!("worker said {line:?}").into());
    }

    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut tasks = Vec::new();
    for round in 0..args.rounds {
        let sha = random_sha();
        let pr = 100 + round as u64;
        for t in 0..per_round_router {
            let (addr, sha) = (addr.clone(), sha.clone());
            tasks.push(tokio::spawn(async move {
                // Webhook deliveries arrive a little more spread out than jobs finish; both sides
                // still race for every key (the worker has the stream hop to make up).
                tokio::time::sleep(jitter(60)).await;
                let (event, body) = if t % 2 == 0 {
                    check_suite(pr, &sha)
                } else {
                    workflow_run(pr, &sha)
                };
                post_webhook(
                    &addr,
                    event,
                    &format!("{run_id}-{round}-{t}", run_id = std::process::id()),
                    &body,
                )
                .await
            }));
        }
        for t in 0..per_round_worker {
            let mut conn = conn.clone();
            let (jobs, sha) = (n.jobs.clone(), sha.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(jitter(30)).await;
                let fields = [
                    ("project", PROJECT.to_string()),
                    ("pr", pr.to_string()),
                    ("sha", sha),
                    ("event", "implementation_finished".into()),
                    ("delivery", format!("job-{round}-{t}")),
                ];
                conn.xadd::<_, _, _, _, String>(&jobs, "*", &fields)
                    .await
                    .map(|_| 0)
                    .map_err(|e| e.to_string())
            }));
        }
    }
    let mut router_tally = Tally::default();
    for task in tasks {
        match task.await? {
            Ok(0) => {} // a job handed to the worker; it reports its own outcomes
            Ok(status) => {
                router_tally.triggers += 1;
                match status {
                    202 => router_tally.dispatched += 1,
                    200 => router_tally.duplicates += 1, // the GitHub preset answers duplicates with 200
                    503 => router_tally.store_errors += 1,
                    _ => router_tally.other += 1,
                }
            }
            Err(e) => return Err(e.into()),
        }
    }

    // Let the worker drain its queue, then stop the router.
    let worker_tally = tokio::task::spawn_blocking(move || -> Result<Tally, String> {
        let mut line = String::new();
        loop {
            line.clear();
            if worker_out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("worker exited without a tally".into());
            }
            if let Some(t) = line.starts_with("TALLY").then(|| Tally::parse(&line)).flatten() {
                let _ = worker.wait();
                return Ok(t);
            }
        }
    })
    .await??;
    drop(router.stdin.take()); // EOF: the router shuts down
    let _ = router.wait();

    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&n.reviews).await?;
    let mut per_key = BTreeMap::new();
    for e in entries.ids {
        let key = format!(
            "{}:{}:{}",
            e.get::<String>("project").unwrap_or_default(),
            e.get::<String>("pr").unwrap_or_default(),
            e.get::<String>("sha").unwrap_or_default()
        );
        *per_key.entry(key).or_insert(0) += 1;
    }
    Ok(Outcome {
        router: router_tally,
        worker: worker_tally,
        per_key,
        triggers: args.triggers * args.rounds,
    })
}

fn check_suite(pr: u64, sha: &str) -> (&'static str, String) {
    let body = serde_json::json!({
        "action": "completed",
        "check_suite": {
            "head_sha": sha, "head_branch": "feature", "status": "completed", "conclusion": "success",
            "pull_requests": [{ "number": pr, "head": { "sha": sha }, "base": { "repo": { "id": REPOSITORY_ID } } }]
        },
        "repository": { "id": REPOSITORY_ID, "full_name": PROJECT }
    });
    ("check_suite", body.to_string())
}

fn workflow_run(pr: u64, sha: &str) -> (&'static str, String) {
    let body = serde_json::json!({
        "action": "completed",
        "workflow_run": {
            "head_sha": sha,
            "conclusion": "success",
            "pull_requests": [{ "number": pr, "head": { "sha": sha }, "base": { "repo": { "id": REPOSITORY_ID } } }]
        },
        "repository": { "id": REPOSITORY_ID, "full_name": PROJECT }
    });
    ("workflow_run", body.to_string())
}

/// A minimal HTTP/1.1 POST; returns the status code.
async fn post_webhook(addr: &str, event: &str, delivery: &str, body: &str) -> Result<u16, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let request = format!(
        "POST /webhooks/github HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nx-github-event: {event}\r\n\
         x-github-delivery: {delivery}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&response);
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad response: {head}"))
}

// ---------------------------------------------------------------- router process

async fn router(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let url = args.redis.ok_or("--redis")?;
    let n = names(&args.run);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app = webhook_router::replay_router(&url, &n.namespace, &n.reviews, args.store == StoreKind::Memory).await?;
    println!("LISTENING {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    // Serve until the parent closes our stdin.
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        })
        .await;
    };
    axum::serve(listener, app).with_graceful_shutdown(stdin_closed).await?;
    Ok(())
}

// ---------------------------------------------------------------- worker process

async fn worker(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    use stream_worker::*;
    use tower_idempotency::Settle;
    let url = args.redis.ok_or("--redis")?;
    let n = names(&args.run);
    let conn = redis::Client::open(url.as_str())?.get_connection_manager().await?;
    let dispatch = DispatchReview {
        conn,
        stream: n.reviews.clone(),
        capacity: None,
    };
    // The layer erases the store's type, so both variants are the same service type.
    let svc = match args.store {
        StoreKind::Redis => review_service(
            tower_idempotency::RedisStore::connect(url.as_str()).await?,
            &n.namespace,
            dispatch,
        ),
        StoreKind::Memory => review_service(tower_idempotency::MemoryStore::new(), &n.namespace, dispatch),
    };
    let mut consumer = StreamConsumer::new(&url, &n.jobs, "workers", "worker-1", Duration::from_millis(300)).await?;
    println!("READY");
    std::io::stdout().flush()?;

    let mut tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut handled_count = 0;
    while handled_count < args.expect && Instant::now() < deadline {
        // A batch is handled concurrently, as a worker pool would: each job "finishes the
        // implementation" (a moment of jitter), then its post-completion hook dispatches the review.
        let batch = consumer.next_batch().await?;
        let handled = futures::future::join_all(batch.iter().map(|entry| {
            let mut svc = svc.clone();
            async move {
                tokio::time::sleep(jitter(10)).await;
                process_message(&mut svc, entry, Settle::Release).await
            }
        }))
        .await;
        for (entry, (result, disposition)) in batch.iter().zip(handled) {
            tally.triggers += 1;
            match result {
                Some(Ok(Dispatch::Dispatched(_))) => tally.dispatched += 1,
                Some(Err(e)) if e.is_duplicate() => tally.duplicates += 1,
                Some(Err(e)) if e.is_store_unavailable() => tally.store_errors += 1,
                _ => tally.other += 1,
            }
            if disposition == Disposition::Ack {
                consumer.ack(&entry.id).await?;
                handled_count += 1;
            }
        }
    }
    println!("{}", tally.line());
    Ok(())
}

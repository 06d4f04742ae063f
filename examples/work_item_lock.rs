//! The work-item lock across processes: at most N concurrent agent runs per (project, work
//! item, agent type), held in Redis instead of one router's memory.
//!
//! The system this crate replaces kept this lock in the router's memory, so a worker process
//! that enqueued work bypassed it. This example spawns `--processes P` OS processes (copies of
//! itself); each runs `--jobs J` concurrent agent runs for the **same** key
//! (`project-1:work-item-42:review`) through `ConcurrencyLimitLayer` with `--limit N` over a
//! shared `RedisStore`. Each run, while it holds its slot, increments a concurrency counter in
//! Redis, records the highest value seen, sleeps `--run-ms M`, and decrements the counter.
//!
//! ```text
//! cargo run --example work_item_lock -- [--processes 3] [--jobs 30] [--limit 2] [--run-ms 50]
//!     [--lease-ms 2000] [--redis URL]
//! ```
//!
//! A run refused at capacity is left for a retry, as a queue would: it waits about one run
//! length (jittered, never longer than the `retry_after` the limit answered) and tries again,
//! until it has run; so `runs` = P × J when all went well. A store error is counted and retried
//! the same way. The output is a table per process, then one line
//!
//! ```text
//! limit=<N> runs=<R> max_concurrency=<C> at_capacity=<A> store_errors=<E>
//! ```
//!
//! then the same scenario with a per-process `tokio::sync::Semaphore` of N permits (what the
//! seed system had), whose `max_concurrency` exceeds N as soon as P > 1.
//!
//! Redis: `--redis`, else `REDIS_URL` (unreachable → exit 1), else `redis://127.0.0.1:6379`;
//! when nothing answers there and `redis-server` is on PATH, a throwaway server is started on a
//! free port and stopped at the end. Everything the example writes lives under keys prefixed
//! `work-item-lock:{<run id>}:` (one hash tag, so the counter script also runs on a cluster),
//! deleted at the end; nothing else in that Redis is touched.
//!
//! Exit code 0 only when the Redis-backed `max_concurrency` ≤ N and all P × J runs ran.

#[path = "support/redis_choice.rs"]
mod redis_choice;
#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower::{Layer, Service, ServiceExt};
use tower_idempotency::limit::{ConcurrencyLimitLayer, LimitError};
use tower_idempotency::{IdempotencyKey, RedisStore};

/// The (project, work item, agent type) every run is for.
const KEY: &str = "project-1:work-item-42:review";
/// A run that could not get a slot for this long is given up (and the exit code says so).
const GIVE_UP: Duration = Duration::from_secs(120);

/// Raises the concurrency counter and records its highest value, atomically.
/// KEYS[1]: the counter; KEYS[2]: the highest value seen.
const ENTER: &str = r"
local n = redis.call('INCR', KEYS[1])
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > m then redis.call('SET', KEYS[2], n) end
return n";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Gate {
    /// `ConcurrencyLimitLayer` over a shared `RedisStore`.
    Redis,
    /// A `tokio::sync::Semaphore` in each process.
    Semaphore,
}

impl Gate {
    fn as_str(self) -> &'static str {
        match self {
            Gate::Redis => "redis",
            Gate::Semaphore => "semaphore",
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    processes: usize,
    jobs: usize,
    limit: usize,
    run: Duration,
    lease: Duration,
    redis: Option<String>,
    // Internal: a child process.
    child: bool,
    gate: Gate,
    run_id: String,
    process: usize,
}

const USAGE: &str =
    "usage: work_item_lock [--processes P] [--jobs J] [--limit N] [--run-ms M] [--lease-ms L] [--redis URL]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        processes: 3,
        jobs: 30,
        limit: 2,
        run: Duration::from_millis(50),
        lease: Duration::from_millis(2000),
        redis: None,
        child: false,
        gate: Gate::Redis,
        run_id: String::new(),
        process: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String, flag: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--processes" => a.processes = number(value()?, "--processes")? as usize,
            "--jobs" => a.jobs = number(value()?, "--jobs")? as usize,
            "--limit" => a.limit = number(value()?, "--limit")? as usize,
            "--run-ms" => a.run = Duration::from_millis(number(value()?, "--run-ms")?),
            "--lease-ms" => a.lease = Duration::from_millis(number(value()?, "--lease-ms")?),
            "--redis" => a.redis = Some(value()?),
            "--child" => a.child = true,
            "--gate" => {
                a.gate = match value()?.as_str() {
                    "redis" => Gate::Redis,
                    "semaphore" => Gate::Semaphore,
                    other => return Err(format!("--gate: unknown gate {other}")),
                }
            }
            "--run-id" => a.run_id = value()?,
            "--process" => a.process = number(value()?, "--process")? as usize,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if a.processes == 0 || a.jobs == 0 || a.limit == 0 {
        return Err("--processes, --jobs and --limit must be at least 1".into());
    }
    if a.lease < Duration::from_millis(30) {
        return Err("--lease-ms must be at least 30 (renewal runs every third of it)".into());
    }
    Ok(a)
}

/// The keys of one scenario, under one hash tag.
struct Names {
    namespace: String,
    current: String,
    max: String,
}

fn names(run_id: &str, gate: Gate) -> Names {
    let prefix = format!("work-item-lock:{{{run_id}}}:{}:", gate.as_str());
    Names {
        namespace: format!("{prefix}limit:"),
        current: format!("{prefix}current"),
        max: format!("{prefix}max"),
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
    if args.child {
        return match rt.block_on(child(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    rt.block_on(parent(args))
}

// ---------------------------------------------------------------- parent

/// What one process reports.
#[derive(Debug, Default, Clone)]
struct Tally {
    process: usize,
    runs: usize,
    at_capacity: usize,
    store_errors: usize,
    gave_up: usize,
    /// Highest number of this process's own runs at once.
    max_in_process: usize,
    elapsed_ms: u64,
}

impl Tally {
    fn line(&self) -> String {
        format!(
            "TALLY process={} runs={} at_capacity={} store_errors={} gave_up={} max_in_process={} elapsed_ms={}",
            self.process,
            self.runs,
            self.at_capacity,
            self.store_errors,
            self.gave_up,
            self.max_in_process,
            self.elapsed_ms
        )
    }

    fn parse(line: &str) -> Option<Tally> {
        let mut t = Tally::default();
        for kv in line.strip_prefix("TALLY ")?.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            let v_usize = v as usize;
            match k {
                "process" => t.process = v_usize,
                "runs" => t.runs = v_usize,
                "at_capacity" => t.at_capacity = v_usize,
                "store_errors" => t.store_errors = v_usize,
                "gave_up" => t.gave_up = v_usize,
                "max_in_process" => t.max_in_process = v_usize,
                "elapsed_ms" => t.elapsed_ms = v,
                _ => {}
            }
        }
        Some(t)
    }
}

struct Outcome {
    tallies: Vec<Tally>,
    max_concurrency: usize,
}

impl Outcome {
    fn sum(&self, f: impl Fn(&Tally) -> usize) -> usize {
        self.tallies.iter().map(f).sum()
    }
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
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() % 1_000_000)
            .unwrap_or(0)
    );
    println!(
        "work-item lock: {} processes x {} concurrent agent runs of {:?} each, key {KEY}, limit {}, lease {:?}",
        args.processes, args.jobs, args.run, args.limit, args.lease
    );

    let shared = match scenario(&url, &run_id, Gate::Redis, &args).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            cleanup(&url, &run_id).await;
            return ExitCode::FAILURE;
        }
    };
    print_table(
        "with ConcurrencyLimitLayer + RedisStore (one limit shared by every process)",
        &shared,
    );
    let runs = shared.sum(|t| t.runs);
    println!(
        "limit={} runs={} max_concurrency={} at_capacity={} store_errors={}",
        args.limit,
        runs,
        shared.max_concurrency,
        shared.sum(|t| t.at_capacity),
        shared.sum(|t| t.store_errors)
    );
    let within_limit = shared.max_concurrency <= args.limit;
    let all_ran = runs == args.processes * args.jobs;

    match scenario(&url, &run_id, Gate::Semaphore, &args).await {
        Ok(memory) => {
            print_table(
                "with a tokio::sync::Semaphore per process (the lock in one process's memory)",
                &memory,
            );
            println!(
                "in-memory semaphore: limit={} runs={} max_concurrency={}{}",
                args.limit,
                memory.sum(|t| t.runs),
                memory.max_concurrency,
                if memory.max_concurrency > args.limit {
                    " (over the limit: each process enforces it alone)"
                } else {
                    ""
                }
            );
        }
        Err(e) => eprintln!("the in-memory comparison failed: {e}"),
    }
    cleanup(&url, &run_id).await;
    drop(server);
    println!("finished in {:.1?}", started.elapsed());
    if !within_limit {
        eprintln!(
            "FAILED: {} runs held the lock at once, over the limit of {}",
            shared.max_concurrency, args.limit
        );
        return ExitCode::FAILURE;
    }
    if !all_ran {
        eprintln!(
            "FAILED: only {runs} of {} runs ran (see gave_up and store_errors above)",
            args.processes * args.jobs
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn print_table(title: &str, o: &Outcome) {
    println!("\n{title}");
    println!(
        "  {:<9} {:>6} {:>12} {:>13} {:>8} {:>15} {:>10}",
        "process", "runs", "at_capacity", "store_errors", "gave_up", "max_in_process", "elapsed"
    );
    for t in &o.tallies {
        println!(
            "  {:<9} {:>6} {:>12} {:>13} {:>8} {:>15} {:>8}ms",
            t.process, t.runs, t.at_capacity, t.store_errors, t.gave_up, t.max_in_process, t.elapsed_ms
        );
    }
    println!(
        "  max_concurrency across processes (recorded in Redis): {}",
        o.max_concurrency
    );
}

async fn cleanup(url: &str, run_id: &str) {
    let Ok(client) = redis::Client::open(url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let pattern = format!("work-item-lock:{{{run_id}}}:*");
    let keys: Vec<String> = match redis::AsyncCommands::scan_match::<_, String>(&mut conn, &pattern).await {
        Ok(iter) => {
            use futures::StreamExt;
            iter.filter_map(|k| async move { k.ok() }).collect().await
        }
        Err(_) => return,
    };
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
}

fn spawn_child(args: &Args, url: &str, run_id: &str, gate: Gate, process: usize) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["--child", "--redis", url, "--run-id", run_id, "--gate", gate.as_str()])
        .args(["--process", &process.to_string()])
        .args(["--jobs", &args.jobs.to_string(), "--limit", &args.limit.to_string()])
        .args(["--run-ms", &args.run.as_millis().to_string()])
        .args(["--lease-ms", &args.lease.as_millis().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
}

async fn scenario(url: &str, run_id: &str, gate: Gate, args: &Args) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut children = Vec::new();
    for process in 1..=args.processes {
        children.push(spawn_child(args, url, run_id, gate, process)?);
    }
    // Every process connects and says READY; then all start at once.
    let mut readers = Vec::new();
    for child in &mut children {
        let mut out = BufReader::new(child.stdout.take().ok_or("child stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "READY" {
            return Err(format!("a child process said {line:?} instead of READY").into());
        }
        readers.push(out);
    }
    for child in &mut children {
        let stdin = child.stdin.as_mut().ok_or("child stdin")?;
        stdin.write_all(b"GO\n")?;
        stdin.flush()?;
    }
    let tallies = tokio::task::spawn_blocking(move || -> Result<Vec<Tally>, String> {
        let mut tallies = Vec::new();
        for (mut out, mut child) in readers.into_iter().zip(children) {
            let mut line = String::new();
            let tally = loop {
                line.clear();
                if out.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                    break None;
                }
                if let Some(t) = Tally::parse(line.trim()) {
                    break Some(t);
                }
            };
            let status = child.wait().map_err(|e| e.to_string())?;
            tallies.push(tally.ok_or(format!("a child process exited ({status}) without a tally"))?);
        }
        Ok(tallies)
    })
    .await??;
    let n = names(run_id, gate);
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let max: Option<usize> = redis::cmd("GET").arg(&n.max).query_async(&mut conn).await?;
    Ok(Outcome {
        tallies,
        max_concurrency: max.unwrap_or(0),
    })
}

// ---------------------------------------------------------------- child process

fn jitter(around: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let h = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let ms = u64::try_from(around.as_millis()).unwrap_or(u64::MAX).max(2);
    // Between half and one and a half times `around`.
    Duration::from_millis(ms / 2 + h % (ms + 1))
}

/// One agent run while holding its slot: count it in, sleep, count it out.
#[derive(Clone)]
struct AgentRun {
    conn: redis::aio::ConnectionManager,
    current: Arc<str>,
    max: Arc<str>,
    run: Duration,
    local: Arc<AtomicUsize>,
    local_max: Arc<AtomicUsize>,
}

impl AgentRun {
    async fn run(mut self) -> Result<(), redis::RedisError> {
        let here = self.local.fetch_add(1, Ordering::SeqCst) + 1;
        self.local_max.fetch_max(here, Ordering::SeqCst);
        let entered: Result<i64, _> = redis::Script::new(ENTER)
            .key(&*self.current)
            .key(&*self.max)
            .invoke_async(&mut self.conn)
            .await;
        let result = match entered {
            Ok(_) => {
                tokio::time::sleep(self.run).await;
                redis::cmd("DECR")
                    .arg(&*self.current)
                    .query_async::<i64>(&mut self.conn)
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        };
        self.local.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

async fn child(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let url = args.redis.clone().ok_or("--redis")?;
    let n = names(&args.run_id, args.gate);
    let conn = redis::Client::open(url.as_str())?.get_connection_manager().await?;
    let agent = AgentRun {
        conn,
        current: Arc::from(n.current.as_str()),
        max: Arc::from(n.max.as_str()),
        run: args.run,
        local: Arc::default(),
        local_max: Arc::default(),
    };
    let store = RedisStore::connect(url.as_str()).await?;
    let layer = ConcurrencyLimitLayer::new(store, |_: &AgentRun| IdempotencyKey::new(KEY).map(Some))
        .with_limit(args.limit)
        .with_lease(args.lease)
        .with_namespace(n.namespace.as_str())
        .with_name("work-item-lock")
        .build()?;
    let svc = layer.layer(tower::service_fn(AgentRun::run));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.limit));

    println!("READY");
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await?;

    let started = Instant::now();
    let runs = (0..args.jobs).map(|_| {
        let (mut svc, agent, semaphore, gate) = (svc.clone(), agent.clone(), semaphore.clone(), args.gate);
        tokio::spawn(async move {
            let mut tally = Tally::default();
            let deadline = Instant::now() + GIVE_UP;
            loop {
                if gate == Gate::Semaphore {
                    // What the seed had: a lock in this process's memory only.
                    let Ok(_permit) = semaphore.acquire().await else { break };
                    match agent.clone().run().await {
                        Ok(()) => tally.runs += 1,
                        Err(_) => tally.store_errors += 1,
                    }
                    break;
                }
                let answer = match svc.ready().await {
                    Ok(ready) => ready.call(agent.clone()).await,
                    Err(e) => Err(e),
                };
                let pause = match answer {
                    Ok(()) => {
                        tally.runs += 1;
                        break;
                    }
                    // Left for a retry, as a queue would: about one run length, never longer
                    // than the limit's own estimate.
                    Err(LimitError::AtCapacity { retry_after, .. }) => {
                        tally.at_capacity += 1;
                        jitter(agent.run).min(retry_after)
                    }
                    Err(e) => {
                        eprintln!("run failed: {e}");
                        tally.store_errors += 1;
                        jitter(agent.run.max(Duration::from_millis(100)))
                    }
                };
                if Instant::now() + pause > deadline {
                    tally.gave_up += 1;
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            tally
        })
    });
    let mut total = Tally {
        process: args.process,
        ..Tally::default()
    };
    for run in runs.collect::<Vec<_>>() {
        let t = run.await?;
        total.runs += t.runs;
        total.at_capacity += t.at_capacity;
        total.store_errors += t.store_errors;
        total.gave_up += t.gave_up;
    }
    total.max_in_process = agent.local_max.load(Ordering::SeqCst);
    total.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    println!("{}", total.line());
    std::io::stdout().flush()?;
    Ok(())
}

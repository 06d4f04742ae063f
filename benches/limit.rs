//! What the concurrency limit costs: acquire + release through the store and through the layer,
//! side by side with the same Redis commands sent directly with redis-rs, in the same run, on
//! the same server and the same multiplexed connection.
//!
//! Starts its own `redis-server` on a free port and, for every concurrency C, runs back to back
//! (interleaved; the order rotates each round):
//!
//! - `raw`: C tasks each looping the acquire script (`EVALSHA`, the crate's own
//!   [`ACQUIRE_SCRIPT`]) then `ZREM`, with redis-rs on the store's connection;
//! - `store`: C tasks looping `LimitStore::acquire` + `LimitStore::release` on `RedisStore`;
//! - `layer`: C tasks looping calls through `ConcurrencyLimitLayer` (limit 1, renewal on) around
//!   a trivial service: acquire, call, release.
//!
//! Each task has its own key, so every acquire is granted (the expensive path: `ZADD` and
//! `PEXPIREAT`); the `one` pattern puts every task on one key with limit C.
//!
//! Every `RESULT` line has ops/s (one op = acquire + release: two round trips) per
//! implementation, their ratios to `raw`, and the CPU time this process (client, runtime,
//! connection driver; not Redis) spent per op, which other processes' load disturbs less than
//! throughput.
//!
//! Run: `cargo bench --bench limit`. Options (after `--`): `--seconds S` (default 2), `--rounds
//! R` (default 2), `--conc 1,16,64`. Unknown arguments (cargo adds `--bench`) are ignored.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::limit::{ACQUIRE_SCRIPT, Acquire, ConcurrencyLimitLayer, LimitStore};
use tower_idempotency::store::ClaimToken;
use tower_idempotency::{IdempotencyKey, KeyError, RedisStore};

const LEASE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Raw,
    Store,
    Layer,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Raw => "raw",
            Impl::Store => "store",
            Impl::Layer => "layer",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pattern {
    /// One key per task, limit 1.
    PerTask,
    /// Every task on one key, limit = C: a sorted set of C members.
    One,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::PerTask => "per_task",
            Pattern::One => "one",
        }
    }
}

struct Args {
    seconds: f64,
    rounds: usize,
    conc: Vec<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 2.0,
        rounds: 2,
        conc: vec![1, 16, 64],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--seconds" => {
                args.seconds = value.parse().unwrap_or_else(|_| fail("--seconds needs a number"));
                i += 1;
            }
            "--rounds" => {
                args.rounds = value.parse().unwrap_or_else(|_| fail("--rounds needs an integer"));
                i += 1;
            }
            "--conc" => {
                args.conc = value
                    .split(',')
                    .map(|c| c.trim().parse().unwrap_or_else(|_| fail("--conc needs integers")))
                    .collect();
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    args
}

fn fail(msg: &str) -> ! {
    eprintln!("limit bench: {msg}");
    std::process::exit(2)
}

type Svc = tower::util::BoxCloneService<String, (), tower_idempotency::LimitError<Infallible>>;

fn layered(store: RedisStore, limit: usize) -> Svc {
    let layer = ConcurrencyLimitLayer::new(store, |k: &String| -> Result<_, KeyError> {
        IdempotencyKey::new(k.as_str()).map(Some)
    })
    .with_limit(limit)
    .with_lease(LEASE)
    .build()
    .expect("valid settings");
    tower::util::BoxCloneService::new(layer.layer(tower::service_fn(|_: String| async { Ok::<_, Infallible>(()) })))
}

async fn task_loop(
    imp: Impl,
    store: RedisStore,
    mut conn: ConnectionManager,
    svc: Svc,
    key: String,
    limit: usize,
    deadline: Instant,
) -> (u64, u64) {
    let script = redis::Script::new(ACQUIRE_SCRIPT);
    let (mut ok, mut other) = (0u64, 0u64);
    let mut svc = svc;
    while Instant::now() < deadline {
        let granted = match imp {
            Impl::Raw => {
                let token = ClaimToken::generate();
                let reply: Vec<i64> = script
                    .key(&key)
                    .arg(token.as_str())
                    .arg(limit)
                    .arg(LEASE.as_millis() as u64)
                    .invoke_async(&mut conn)
                    .await
                    .expect("acquire script");
                let _: i64 = redis::cmd("ZREM")
                    .arg(&key)
                    .arg(token.as_str())
                    .query_async(&mut conn)
                    .await
                    .expect("ZREM");
                reply.first() == Some(&1)
            }
            Impl::Store => {
                let token = ClaimToken::generate();
                let answer = store.acquire(&key, &token, limit, LEASE).await.expect("acquire");
                store.release(&key, &token).await.expect("release");
                answer == Acquire::Granted
            }
            Impl::Layer => svc.ready().await.expect("ready").call(key.clone()).await.is_ok(),
        };
        if granted {
            ok += 1;
        } else {
            other += 1;
        }
    }
    (ok, other)
}

/// CPU time this process has used so far (user + system), from `/proc/self/stat`; zero where
/// that file does not exist.
fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may contain spaces) start after ") ".
            let rest = s.rsplit_once(") ")?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // Clock ticks are 1/100 s on Linux.
    Duration::from_millis(ticks * 10)
}

async fn run(imp: Impl, pattern: Pattern, c: usize, secs: f64, run_id: u64, store: &RedisStore) -> (f64, u64, u64) {
    let limit = match pattern {
        Pattern::PerTask => 1,
        Pattern::One => c,
    };
    let svc = layered(store.clone(), limit);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..c)
        .map(|t| {
            let key = match pattern {
                Pattern::PerTask => format!("bench-limit:{run_id}:{t}"),
                Pattern::One => format!("bench-limit:{run_id}:one"),
            };
            tokio::spawn(task_loop(
                imp,
                store.clone(),
                store.connection(),
                svc.clone(),
                key,
                limit,
                deadline,
            ))
        })
        .collect();
    let (mut ok, mut other) = (0, 0);
    for t in tasks {
        let (o, x) = t.await.expect("bench task");
        ok += o;
        other += x;
    }
    (started.elapsed().as_secs_f64(), ok, other)
}

fn main() {
    let args = parse_args();
    let redis_version = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "# limit bench: seconds={} rounds={} conc={:?} nproc={}",
        args.seconds,
        args.rounds,
        args.conc,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("# {redis_version}");
    println!("# loadavg at start: {}", loadavg());
    let server = redis_server::RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = RedisStore::connect(server.url()).await.expect("connect");
        // Warm up: load the scripts, open the connection.
        let _ = run(Impl::Layer, Pattern::PerTask, 4, 0.3, 0, &store).await;
        let _ = run(Impl::Raw, Pattern::PerTask, 4, 0.3, 0, &store).await;
        let mut run_id = 1;
        let impls = [Impl::Raw, Impl::Store, Impl::Layer];
        for pattern in [Pattern::PerTask, Pattern::One] {
            for &c in &args.conc {
                let mut totals = [(0.0f64, 0u64, 0u64); 3];
                let mut cpu = [Duration::ZERO; 3];
                for round in 0..args.rounds {
                    for k in 0..impls.len() {
                        let i = (k + round) % impls.len();
                        run_id += 1;
                        let cpu_before = process_cpu();
                        let (secs, ok, other) = run(impls[i], pattern, c, args.seconds, run_id, &store).await;
                        cpu[i] += process_cpu().saturating_sub(cpu_before);
                        totals[i].0 += secs;
                        totals[i].1 += ok;
                        totals[i].2 += other;
                        println!(
                            "run impl={} keys={} c={c} ops_per_s={:.0} granted={ok} refused={other}",
                            impls[i].name(),
                            pattern.name(),
                            (ok + other) as f64 / secs
                        );
                    }
                }
                let rate = |i: usize| (totals[i].1 + totals[i].2) as f64 / totals[i].0;
                let cpu_us = |i: usize| cpu[i].as_secs_f64() * 1e6 / (totals[i].1 + totals[i].2).max(1) as f64;
                let (raw, store_rate, layer) = (rate(0), rate(1), rate(2));
                println!(
                    "RESULT keys={} c={c} raw={raw:.0} store={store_rate:.0} layer={layer:.0} store/raw={:.3} layer/raw={:.3} cpu_us_per_op raw={:.1} store={:.1} layer={:.1}",
                    pattern.name(),
                    store_rate / raw,
                    layer / raw,
                    cpu_us(0),
                    cpu_us(1),
                    cpu_us(2)
                );
            }
        }
    });
    println!("# loadavg at end: {}", loadavg());
    drop(server);
}

/// The machine's load averages (1, 5, 15 min): how busy other processes kept the 2 cores.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

//! Load benchmark: what the claim path costs under concurrency, side by side with raw Redis.
//!
//! Starts its own `redis-server` on a free port and, for every concurrency C and key pattern,
//! runs back to back (interleaved, same server, same multiplexed connection):
//!
//! - `raw`: C tasks each looping `SET key token NX PX ttl` through redis-rs on the store's
//!   [`ConnectionManager`](redis::aio::ConnectionManager) (one multiplexed connection);
//! - `store`: C tasks looping `RedisStore::claim` on that same connection;
//! - `layer`: C tasks looping calls through `IdempotencyLayer::with_coalescing(true)` around a
//!   trivial service (this is the `layer=` figure of the `RESULT` line). Built with
//!   `.with_records(false)`: the **claim-only** path, one round trip per call (records are on by
//!   default, and completing a record is a second round trip, measured by `layer_rec`);
//! - `layer_nc`: the same claim-only layer without coalescing;
//! - `raw2`: the record arm's baseline, two commands per call on the same connection:
//!   `SET key token NX PX ttl`, then — only when that returned `OK` — `SET key <record> XX PX
//!   ttl` (what a claim plus a completion costs done by hand);
//! - `layer_rec`: the layer with records on (the default) and coalescing, around the same
//!   trivial service: claim, then complete the record (the `layer=` figure of the `RECORD`
//!   line);
//! - `ioredis`: the seed's TypeScript claim (`../shared/bench/ioredis-claim`), when `node` and
//!   `npm` are available.
//!
//! Run: `cargo bench --bench throughput`. Options (after `--`):
//! - `--seconds S` (default 2): length of one measured run;
//! - `--rounds R` (default 2): runs per implementation, interleaved (the order rotates each
//!   round), summed; the ioredis row runs once for `S * R` seconds;
//! - `--conc 1,16,64,256`, `--keys unique,hot,one`,
//!   `--impls raw,store,layer,layer_nc,raw2,layer_rec`: subsets (left-out implementations show
//!   as 0 in `RESULT` and `RECORD`; `RECORD` lines are printed when `raw2` or `layer_rec` ran);
//! - `--no-ioredis`; `--memory-only` (just the `MemoryStore` overhead lines).
//!
//! Unknown arguments (cargo adds `--bench`) are ignored. See BENCHMARKS.md for what every number
//! means.

#[path = "support/grant_all.rs"]
mod grant_all;
#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use redis::aio::ConnectionManager;
use tower::{Service, ServiceExt};
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryStore, RedisStore};

use redis_server::RedisServer;

/// Claim lifetime for every implementation (the ioredis script uses `EX 300`).
const TTL: Duration = Duration::from_secs(300);
/// Number of keys in the `hot` pattern (the ioredis script's default `--hot-count`).
const HOT_KEYS: u64 = 100;

// ---------------------------------------------------------------------------------------------
// Arguments

struct Args {
    seconds: f64,
    rounds: usize,
    conc: Vec<usize>,
    patterns: Vec<Pattern>,
    ioredis: bool,
    memory_only: bool,
    impls: Vec<Impl>,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 2.0,
        rounds: 2,
        conc: vec![1, 16, 64, 256],
        patterns: vec![Pattern::Unique, Pattern::Hot, Pattern::One],
        ioredis: true,
        memory_only: false,
        impls: Impl::ALL.to_vec(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let (name, inline) = match argv[i].split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (argv[i].clone(), None),
        };
        let takes_value = matches!(
            name.as_str(),
            "--seconds" | "--rounds" | "--conc" | "--keys" | "--impls"
        );
        let value = if takes_value {
            match inline {
                Some(v) => Some(v),
                None => {
                    i += 1;
                    argv.get(i).cloned()
                }
            }
        } else {
            None
        };
        match (name.as_str(), value) {
            ("--seconds", Some(v)) => match v.parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => args.seconds = s,
                _ => fail(&format!("--seconds needs a positive number, got `{v}`")),
            },
            ("--rounds", Some(v)) => match v.parse::<usize>() {
                Ok(r) if r > 0 => args.rounds = r,
                _ => fail(&format!("--rounds needs a positive integer, got `{v}`")),
            },
            ("--conc", Some(v)) => {
                args.conc = v
                    .split(',')
                    .map(|c| match c.trim().parse::<usize>() {
                        Ok(c) if c > 0 => c,
                        _ => fail(&format!(
                            "--conc needs positive integers separated by commas, got `{v}`"
                        )),
                    })
                    .collect();
            }
            ("--keys", Some(v)) => {
                args.patterns = v
                    .split(',')
                    .map(|p| {
                        Pattern::parse(p.trim()).unwrap_or_else(|| fail(&format!("--keys: unknown pattern `{p}`")))
                    })
                    .collect();
            }
            ("--impls", Some(v)) => {
                args.impls = v
                    .split(',')
                    .map(|p| {
                        Impl::parse(p.trim()).unwrap_or_else(|| fail(&format!("--impls: unknown implementation `{p}`")))
                    })
                    .collect();
            }
            ("--no-ioredis", _) => args.ioredis = false,
            ("--memory-only", _) => args.memory_only = true,
            (n, None) if takes_value => fail(&format!("{n} needs a value")),
            // cargo passes `--bench`; anything else unknown is ignored too.
            _ => {}
        }
        i += 1;
    }
    args
}

fn fail(msg: &str) -> ! {
    eprintln!("throughput: {msg}");
    std::process::exit(2)
}

// ---------------------------------------------------------------------------------------------
// Key patterns

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pattern {
    /// A fresh key for every call: every claim succeeds.
    Unique,
    /// 100 keys: the first claim of each succeeds, the rest are duplicates.
    Hot,
    /// One key: a webhook burst for one pull request.
    One,
}

impl Pattern {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "unique" => Some(Pattern::Unique),
            "hot" => Some(Pattern::Hot),
            "one" => Some(Pattern::One),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Pattern::Unique => "unique",
            Pattern::Hot => "hot",
            Pattern::One => "one",
        }
    }
}

/// Makes the keys of one task in one run. Every run has its own prefix, so each run starts with
/// unclaimed keys, and every implementation pays for formatting the same kind of key.
struct KeyGen {
    prefix: String,
    pattern: Pattern,
    task: usize,
    n: u64,
    rng: u64,
}

impl KeyGen {
    fn new(run: u64, pattern: Pattern, task: usize) -> Self {
        Self {
            prefix: format!("bench:{run}:"),
            pattern,
            task,
            n: 0,
            rng: 0x9E37_79B9_7F4A_7C15 ^ ((task as u64 + 1) * 0xD1B5_4A32_D192_ED03),
        }
    }

    fn next_key(&mut self) -> String {
        self.n += 1;
        let mut key = String::with_capacity(self.prefix.len() + 24);
        key.push_str(&self.prefix);
        // Writing to a String cannot fail.
        let _ = match self.pattern {
            Pattern::Unique => write!(key, "u:{}:{}", self.task, self.n),
            Pattern::Hot => {
                // xorshift64: cheap, per task, good enough to spread calls over the hot keys.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                write!(key, "h:{}", self.rng % HOT_KEYS)
            }
            Pattern::One => write!(key, "one"),
        };
        key
    }

    /// A token for the raw arm, about as long as a [`ClaimToken`].
    fn raw_token(&self) -> String {
        format!("{:016x}-{:x}", self.task, self.n)
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Raw,
    Store,
    Layer,
    LayerNoCoalesce,
    Raw2,
    LayerRecords,
}

impl Impl {
    const ALL: [Impl; 6] = [
        Impl::Raw,
        Impl::Store,
        Impl::Layer,
        Impl::LayerNoCoalesce,
        Impl::Raw2,
        Impl::LayerRecords,
    ];

    fn parse(s: &str) -> Option<Self> {
        Impl::ALL.into_iter().find(|i| i.name() == s)
    }

    fn name(self) -> &'static str {
        match self {
            Impl::Raw => "raw",
            Impl::Store => "store",
            Impl::Layer => "layer",
            Impl::LayerNoCoalesce => "layer_nc",
            Impl::Raw2 => "raw2",
            Impl::LayerRecords => "layer_rec",
        }
    }
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// What one run (or several rounds of it) measured.
struct Stats {
    secs: f64,
    ok: u64,
    dup: u64,
    err: u64,
    hist: Histogram<u64>,
    cpu: CpuUse,
}

impl Stats {
    fn empty() -> Self {
        Self {
            secs: 0.0,
            ok: 0,
            dup: 0,
            err: 0,
            hist: histogram(),
            cpu: CpuUse::default(),
        }
    }

    fn merge(&mut self, other: Stats) {
        self.secs += other.secs;
        self.ok += other.ok;
        self.dup += other.dup;
        self.err += other.err;
        self.hist.add(&other.hist).expect("histograms share bounds");
        self.cpu.add(&other.cpu);
    }

    fn ops(&self) -> u64 {
        self.ok + self.dup + self.err
    }

    fn ops_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops() as f64 / self.secs
        } else {
            0.0
        }
    }

    /// CPU time this process (client, runtime, connection driver) spent per operation.
    fn cpu_us_per_op(&self) -> f64 {
        self.cpu.bench * 1e6 / self.ops() as f64
    }

    fn quantile_us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Per-task counters.
struct TaskStats {
    ok: u64,
    dup: u64,
    err: u64,
    hist: Histogram<u64>,
}

impl TaskStats {
    fn new() -> Self {
        Self {
            ok: 0,
            dup: 0,
            err: 0,
            hist: histogram(),
        }
    }

    fn record(&mut self, started: Instant, now: Instant) {
        let ns = u64::try_from(now.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns.max(1));
    }
}

/// Everything a run needs, shared by all runs.
#[derive(Clone)]
struct Target {
    store: RedisStore,
    conn: ConnectionManager,
}

type Svc = tower_idempotency::Idempotency<
    tower::util::ServiceFn<fn(String) -> std::future::Ready<Result<(), Infallible>>>,
    fn(&String) -> Result<Option<IdempotencyKey>, KeyError>,
>;

fn trivial(_req: String) -> std::future::Ready<Result<(), Infallible>> {
    std::future::ready(Ok(()))
}

fn key_of(req: &String) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(req).map(Some)
}

/// The layer around the trivial service. `records: false` is the claim-only path (one round
/// trip per call); `true`, the default, completes the record after the call (a second one).
fn layered(store: RedisStore, coalesce: bool, records: bool) -> Svc {
    use tower::Layer;
    let layer = IdempotencyLayer::new(store, key_of as fn(&String) -> _)
        .with_ttl(TTL)
        .with_coalescing(coalesce)
        .with_records(records);
    layer.layer(tower::service_fn(trivial as fn(String) -> _))
}

async fn task_loop(imp: Impl, target: Target, svc: Svc, mut keys: KeyGen, deadline: Instant) -> TaskStats {
    let mut stats = TaskStats::new();
    let ttl_ms = TTL.as_millis() as u64;
    let mut conn = target.conn;
    let mut svc = svc;
    loop {
        let key = keys.next_key();
        let started = Instant::now();
        match imp {
            Impl::Raw => {
                let token = keys.raw_token();
                let reply: redis::RedisResult<redis::Value> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut conn)
                    .await;
                match reply {
                    Ok(redis::Value::Okay) => stats.ok += 1,
                    Ok(redis::Value::Nil) => stats.dup += 1,
                    _ => stats.err += 1,
                }
            }
            Impl::Raw2 => {
                let token = keys.raw_token();
                let claimed: redis::RedisResult<redis::Value> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut conn)
                    .await;
                match claimed {
                    Ok(redis::Value::Okay) => {
                        // About as long as a completed record: `␞<token>␟c<Unix ms>`.
                        let record = format!("\u{1e}{token}\u{1f}c1700000000000");
                        let done: redis::RedisResult<redis::Value> = redis::cmd("SET")
                            .arg(&key)
                            .arg(&record)
                            .arg("XX")
                            .arg("PX")
                            .arg(ttl_ms)
                            .query_async(&mut conn)
                            .await;
                        match done {
                            Ok(redis::Value::Okay) => stats.ok += 1,
                            _ => stats.err += 1,
                        }
                    }
                    Ok(redis::Value::Nil) => stats.dup += 1,
                    _ => stats.err += 1,
                }
            }
            Impl::Store => match target.store.claim(&key, &ClaimToken::generate(), TTL).await {
                Ok(ClaimOutcome::Acquired) => stats.ok += 1,
                Ok(ClaimOutcome::AlreadyClaimed) => stats.dup += 1,
                Err(_) => stats.err += 1,
            },
            Impl::Layer | Impl::LayerNoCoalesce | Impl::LayerRecords => {
                let result = match svc.ready().await {
                    Ok(ready) => ready.call(key).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => stats.ok += 1,
                    Err(e) if e.is_duplicate() => stats.dup += 1,
                    Err(_) => stats.err += 1,
                }
            }
        }
        let now = Instant::now();
        stats.record(started, now);
        if now >= deadline {
            return stats;
        }
    }
}

/// C tasks doing `imp` for `secs`; returns what they measured.
async fn run(imp: Impl, pattern: Pattern, c: usize, secs: f64, run_id: u64, target: &Target, redis_pid: u32) -> Stats {
    let svc = layered(
        target.store.clone(),
        matches!(imp, Impl::Layer | Impl::LayerRecords),
        imp == Impl::LayerRecords,
    );
    let cpu0 = CpuSample::take(redis_pid);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..c)
        .map(|task| {
            tokio::spawn(task_loop(
                imp,
                target.clone(),
                svc.clone(),
                KeyGen::new(run_id, pattern, task),
                deadline,
            ))
        })
        .collect();
    let mut stats = Stats::empty();
    for h in handles {
        let t = h.await.expect("benchmark task panicked");
        stats.ok += t.ok;
        stats.dup += t.dup;
        stats.err += t.err;
        stats.hist.add(&t.hist).expect("histograms share bounds");
    }
    stats.secs = start.elapsed().as_secs_f64();
    stats.cpu = CpuSample::take(redis_pid).since(&cpu0);
    stats
}

// ---------------------------------------------------------------------------------------------
// CPU accounting, to see how busy Redis, this process and everything else on the machine were.

#[derive(Default, Clone, Copy)]
struct CpuUse {
    /// Wall-clock seconds covered.
    wall: f64,
    /// CPU-seconds used by redis-server, by this process, and by everything else.
    redis: f64,
    bench: f64,
    other: f64,
}

impl CpuUse {
    fn add(&mut self, o: &CpuUse) {
        self.wall += o.wall;
        self.redis += o.redis;
        self.bench += o.bench;
        self.other += o.other;
    }

    /// Cores used on average: redis, bench, other.
    fn cores(&self) -> (f64, f64, f64) {
        if self.wall <= 0.0 {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        (self.redis / self.wall, self.bench / self.wall, self.other / self.wall)
    }
}

struct CpuSample {
    at: Instant,
    redis_ticks: Option<u64>,
    self_ticks: Option<u64>,
    busy_ticks: Option<u64>,
}

const TICKS_PER_SEC: f64 = 100.0;

impl CpuSample {
    fn take(redis_pid: u32) -> Self {
        Self {
            at: Instant::now(),
            redis_ticks: proc_ticks(&format!("/proc/{redis_pid}/stat")),
            self_ticks: proc_ticks("/proc/self/stat"),
            busy_ticks: machine_busy_ticks(),
        }
    }

    fn since(&self, before: &CpuSample) -> CpuUse {
        let d = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => a.saturating_sub(b) as f64 / TICKS_PER_SEC,
            _ => f64::NAN,
        };
        let redis = d(self.redis_ticks, before.redis_ticks);
        let bench = d(self.self_ticks, before.self_ticks);
        let busy = d(self.busy_ticks, before.busy_ticks);
        CpuUse {
            wall: self.at.duration_since(before.at).as_secs_f64(),
            redis,
            bench,
            other: (busy - redis - bench).max(0.0),
        }
    }
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(path: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Non-idle ticks of the whole machine (all cores), from /proc/stat.
fn machine_busy_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some(total - idle)
}

// ---------------------------------------------------------------------------------------------
// ioredis (the seed's TypeScript approach)

struct Ioredis {
    dir: PathBuf,
}

struct IoredisRun {
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    ok: u64,
    dup: u64,
    err: u64,
    secs: f64,
}

impl Ioredis {
    /// Copies the read-only script to a scratch folder and installs its dependencies there once.
    fn prepare() -> Result<Self, String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench/ioredis-claim");
        if !src.join("bench.mjs").is_file() {
            return Err(format!("{} not found", src.display()));
        }
        for tool in ["node", "npm"] {
            match Command::new(tool).arg("--version").output() {
                Ok(o) if o.status.success() => {}
                _ => return Err(format!("`{tool}` is not available on PATH")),
            }
        }
        let dir = scratch_dir().join("ioredis-claim");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut changed = false;
        for file in ["bench.mjs", "package.json", "package-lock.json"] {
            let new = std::fs::read(src.join(file)).map_err(|e| format!("cannot read {file}: {e}"))?;
            if std::fs::read(dir.join(file)).ok().as_deref() != Some(new.as_slice()) {
                std::fs::write(dir.join(file), &new).map_err(|e| format!("cannot write {file}: {e}"))?;
                changed = true;
            }
        }
        if changed || !dir.join("node_modules/ioredis/package.json").is_file() {
            eprintln!("ioredis: running `npm ci` in {}", dir.display());
            let out = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir)
                .output()
                .map_err(|e| format!("npm ci could not start: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "npm ci failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("(no output)")
                ));
            }
        }
        Ok(Self { dir })
    }

    fn run(
        &self,
        port: u16,
        redis_pid: u32,
        c: usize,
        pattern: Pattern,
        secs: f64,
        warmup: f64,
    ) -> Result<IoredisRun, String> {
        let (keys, hot_count) = match pattern {
            Pattern::Unique => ("unique", HOT_KEYS),
            Pattern::Hot => ("hot", HOT_KEYS),
            Pattern::One => ("hot", 1),
        };
        let out = Command::new("node")
            .arg("bench.mjs")
            .args(["--port", &port.to_string()])
            .args(["--conc", &c.to_string()])
            .args(["--duration", &format!("{secs}")])
            .args(["--warmup", &format!("{warmup}")])
            .args(["--keys", keys])
            .args(["--hot-count", &hot_count.to_string()])
            .args(["--redis-pid", &redis_pid.to_string()])
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("node could not start: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "node exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            ));
        }
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or("no JSON line in node's output")?;
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad JSON from node: {e}"))?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
        let int = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        Ok(IoredisRun {
            ops_per_s: num("ops_per_s"),
            p50_us: num("p50_us"),
            p99_us: num("p99_us"),
            p999_us: num("p999_us"),
            ok: int("ok"),
            dup: int("dup"),
            err: int("err"),
            secs: num("secs"),
        })
    }
}

/// `target/` (found from this executable's location), or the temp dir.
fn scratch_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|a| a.file_name().is_some_and(|n| n == "target"))
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(std::env::temp_dir)
}

// ---------------------------------------------------------------------------------------------
// MemoryStore overhead: the layer's own cost per call, without any network.

use grant_all::GrantAll;

#[derive(Clone, Copy, PartialEq, Eq)]
enum MemArm {
    /// The bare inner service.
    Bare,
    /// The layer over `MemoryStore`, a fresh key per call.
    LayerUnique,
    /// The layer over `MemoryStore`, one key: every call after the first is a duplicate.
    LayerDuplicate,
    /// The layer over `GrantAll`: the layer's machinery alone.
    LayerGrantAll,
    /// The same with coalescing on (every key unique: the coalescer's cost with no follower).
    LayerGrantAllCoalescing,
    /// `MemoryStore::claim` alone (with a fresh `ClaimToken`), no layer.
    StoreUnique,
}

/// Nanoseconds per call for each arm, best of three interleaved rounds, on one thread.
fn memory_overhead(secs: f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // A short TTL so the unique-key map is swept and stays bounded (about one second of
        // claims, i.e. up to a few million entries at these rates).
        let ttl = Duration::from_secs(1);
        let per_arm = Duration::from_secs_f64((secs / 3.0).clamp(0.2, 1.0));
        let arms = [
            MemArm::Bare,
            MemArm::LayerUnique,
            MemArm::LayerDuplicate,
            MemArm::LayerGrantAll,
            MemArm::LayerGrantAllCoalescing,
            MemArm::StoreUnique,
        ];
        // Claim-only arms (`with_records(false)`), comparable with the earlier MEMORY figures;
        // the record arm of the Redis run measures completion.
        let layer = |store| {
            tower::Layer::layer(
                &IdempotencyLayer::new(store, key_of as fn(&String) -> _)
                    .with_ttl(ttl)
                    .with_records(false),
                tower::service_fn(trivial as fn(String) -> _),
            )
        };
        // Built once and reused across rounds, so later rounds see a store in its steady state
        // (about one TTL of claims, swept) rather than a map growing from empty.
        let mut bare = tower::service_fn(trivial as fn(String) -> _);
        let mut layer_unique = layer(MemoryStore::new());
        let mut layer_dup = layer(MemoryStore::new());
        let mut layer_grant_all = tower::Layer::layer(
            &IdempotencyLayer::new(GrantAll, key_of as fn(&String) -> _).with_records(false),
            tower::service_fn(trivial as fn(String) -> _),
        );
        let mut layer_grant_all_coalescing = tower::Layer::layer(
            &IdempotencyLayer::new(GrantAll, key_of as fn(&String) -> _)
                .with_coalescing(true)
                .with_records(false),
            tower::service_fn(trivial as fn(String) -> _),
        );
        let store = std::sync::Arc::new(MemoryStore::new());
        let mut store_only = tower::service_fn(move |key: String| {
            let store = store.clone();
            async move {
                let _ = std::hint::black_box(store.claim(&key, &ClaimToken::generate(), ttl).await);
                Ok::<(), Infallible>(())
            }
        });
        let mut best = [f64::INFINITY; 6];
        let mut run = 0;
        for _round in 0..3 {
            for (arm, slot) in arms.iter().zip(best.iter_mut()) {
                run += 1;
                let ns = match arm {
                    MemArm::Bare => time_calls(&mut bare, per_arm, run, false).await,
                    MemArm::LayerUnique => time_calls(&mut layer_unique, per_arm, run, false).await,
                    MemArm::LayerDuplicate => time_calls(&mut layer_dup, per_arm, run, true).await,
                    MemArm::LayerGrantAll => time_calls(&mut layer_grant_all, per_arm, run, false).await,
                    MemArm::LayerGrantAllCoalescing => {
                        time_calls(&mut layer_grant_all_coalescing, per_arm, run, false).await
                    }
                    MemArm::StoreUnique => time_calls(&mut store_only, per_arm, run, false).await,
                };
                *slot = slot.min(ns);
            }
        }
        let [bare, unique, dup, grant_all, grant_all_coalescing, store] = best;
        println!(
            "MEMORY bare_ns={bare:.0} layer_unique_ns={unique:.0} layer_dup_ns={dup:.0} layer_grant_all_ns={grant_all:.0} layer_grant_all_coalescing_ns={grant_all_coalescing:.0} memory_store_claim_ns={store:.0} overhead_unique_ns={:.0} overhead_dup_ns={:.0} overhead_machinery_ns={:.0} overhead_machinery_coalescing_ns={:.0}",
            unique - bare,
            dup - bare,
            grant_all - bare,
            grant_all_coalescing - bare,
        );
        println!(
            "TARGET memory_overhead_unique < 1000 ns: {:.0} ns {}",
            unique - bare,
            pass(unique - bare < 1000.0)
        );
        println!(
            "TARGET memory_overhead_duplicate < 1000 ns: {:.0} ns {}",
            dup - bare,
            pass(dup - bare < 1000.0)
        );
    });
}

/// Mean nanoseconds per call over `dur`; `same_key` makes every call after the first a duplicate.
async fn time_calls<S, E>(svc: &mut S, dur: Duration, run: u64, same_key: bool) -> f64
where
    S: Service<String, Response = (), Error = E>,
{
    // The duplicate arm keeps one key across rounds; unique keys never repeat.
    let mut keys = if same_key {
        KeyGen::new(0, Pattern::One, 0)
    } else {
        KeyGen::new(run, Pattern::Unique, 0)
    };
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        for _ in 0..1024 {
            let key = keys.next_key();
            let ready = match svc.ready().await {
                Ok(r) => r,
                Err(_) => fail("service not ready"),
            };
            let _ = std::hint::black_box(ready.call(key).await);
        }
        n += 1024;
        let elapsed = start.elapsed();
        if elapsed >= dur {
            return elapsed.as_nanos() as f64 / n as f64;
        }
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

// ---------------------------------------------------------------------------------------------

struct Row {
    c: usize,
    pattern: Pattern,
    stats: Vec<(Impl, Stats)>,
    ioredis: Option<IoredisRun>,
    missing: Stats,
}

impl Row {
    /// What `imp` measured; empty (0 ops/s) when `--impls` left it out.
    fn get(&self, imp: Impl) -> &Stats {
        self.stats
            .iter()
            .find(|(i, _)| *i == imp)
            .map_or(&self.missing, |(_, s)| s)
    }
}

fn main() {
    let args = parse_args();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let redis_version = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "# throughput: seconds={} rounds={} conc={:?} keys={:?} nproc={nproc} cpu=\"{cpu}\"",
        args.seconds,
        args.rounds,
        args.conc,
        args.patterns.iter().map(|p| p.name()).collect::<Vec<_>>()
    );
    println!("# {redis_version}");

    memory_overhead(args.seconds);
    if args.memory_only {
        return;
    }

    let ioredis = if args.ioredis {
        match Ioredis::prepare() {
            Ok(i) => Some(i),
            Err(why) => {
                println!("# ioredis: skipped ({why})");
                None
            }
        }
    } else {
        println!("# ioredis: skipped (--no-ioredis)");
        None
    };

    let server = RedisServer::start();
    let redis_pid = server.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let target = rt.block_on(async {
        let store = RedisStore::builder(server.url())
            .connect()
            .await
            .expect("connect to the benchmark's redis-server");
        let conn = store.connection();
        Target { store, conn }
    });
    let flush = |target: &Target| {
        rt.block_on(async {
            let mut conn = target.conn.clone();
            let _: () = redis::cmd("FLUSHALL")
                .query_async(&mut conn)
                .await
                .expect("FLUSHALL on the benchmark's own server");
        })
    };

    let warmup = (args.seconds * 0.1).clamp(0.05, 0.5);
    let node_warmup = if args.seconds >= 2.0 { 1.0 } else { 0.5 };
    let impls = &args.impls;
    let mut run_id = 0u64;
    let mut rows = Vec::new();
    let mut ioredis_note_printed = false;
    for &c in &args.conc {
        for &pattern in &args.patterns {
            let mut acc: Vec<(Impl, Stats)> = impls.iter().map(|&i| (i, Stats::empty())).collect();
            for round in 0..args.rounds {
                // Rotate the order each round so no implementation always runs first.
                for k in 0..impls.len() {
                    let idx = (k + round) % impls.len();
                    let imp = impls[idx];
                    flush(&target);
                    run_id += 1;
                    rt.block_on(run(imp, pattern, c, warmup, run_id, &target, redis_pid));
                    run_id += 1;
                    let stats = rt.block_on(run(imp, pattern, c, args.seconds, run_id, &target, redis_pid));
                    acc[idx].1.merge(stats);
                }
            }
            for (imp, s) in &acc {
                print_run(c, pattern, imp.name(), s);
            }
            let io = match &ioredis {
                Some(node) => {
                    flush(&target);
                    match node.run(
                        server.port(),
                        redis_pid,
                        c,
                        pattern,
                        args.seconds * args.rounds as f64,
                        node_warmup,
                    ) {
                        Ok(r) => {
                            println!(
                                "run c={c} keys={} impl=ioredis secs={:.2} ops={} ok={} dup={} err={} ops_per_s={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1}",
                                pattern.name(),
                                r.secs,
                                r.ok + r.dup + r.err,
                                r.ok,
                                r.dup,
                                r.err,
                                r.ops_per_s,
                                r.p50_us,
                                r.p99_us,
                                r.p999_us
                            );
                            Some(r)
                        }
                        Err(why) => {
                            println!("# ioredis c={c} keys={}: skipped ({why})", pattern.name());
                            None
                        }
                    }
                }
                None => {
                    if !ioredis_note_printed {
                        println!("# ioredis rows skipped (see above)");
                        ioredis_note_printed = true;
                    }
                    None
                }
            };
            let row = Row {
                c,
                pattern,
                stats: acc,
                ioredis: io,
                missing: Stats::empty(),
            };
            print_result(&row);
            if impls.iter().any(|i| matches!(i, Impl::Raw2 | Impl::LayerRecords)) {
                print_record(&row);
            }
            rows.push(row);
        }
    }
    drop(target);
    drop(rt);
    drop(server);
    print_summary(&rows);
    if impls.iter().any(|i| matches!(i, Impl::Raw2 | Impl::LayerRecords)) {
        print_record_summary(&rows);
    }
}

fn print_run(c: usize, pattern: Pattern, name: &str, s: &Stats) {
    let (redis, bench, other) = s.cpu.cores();
    println!(
        "run c={c} keys={} impl={name} secs={:.2} ops={} ok={} dup={} err={} ops_per_s={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1} cpu_redis={redis:.2} cpu_bench={bench:.2} cpu_other={other:.2} bench_cpu_us_per_op={:.2} redis_cpu_us_per_op={:.2}",
        pattern.name(),
        s.secs,
        s.ops(),
        s.ok,
        s.dup,
        s.err,
        s.ops_per_s(),
        s.quantile_us(0.5),
        s.quantile_us(0.99),
        s.quantile_us(0.999),
        s.cpu_us_per_op(),
        s.cpu.redis * 1e6 / s.ops() as f64,
    );
}

fn print_result(row: &Row) {
    let raw = row.get(Impl::Raw);
    let store = row.get(Impl::Store);
    let layer = row.get(Impl::Layer);
    let layer_nc = row.get(Impl::LayerNoCoalesce);
    println!(
        "RESULT c={} keys={} raw={:.0} store={:.0} layer={:.0} ratio={:.3} p99_raw_us={:.1} p99_layer_us={:.1}",
        row.c,
        row.pattern.name(),
        raw.ops_per_s(),
        store.ops_per_s(),
        layer.ops_per_s(),
        layer.ops_per_s() / raw.ops_per_s(),
        raw.quantile_us(0.99),
        layer.quantile_us(0.99),
    );
    let io = match &row.ioredis {
        Some(r) => format!(
            "ioredis={:.0} layer/ioredis={:.3} p99_ioredis_us={:.1}",
            r.ops_per_s,
            layer.ops_per_s() / r.ops_per_s,
            r.p99_us
        ),
        None => "ioredis=skipped".to_string(),
    };
    println!(
        "EXTRA c={} keys={} store/raw={:.3} layer_nc={:.0} layer_nc/raw={:.3} p99_store_us={:.1} p99_layer_nc_us={:.1} cpu_us_per_op_raw={:.2} cpu_us_per_op_store={:.2} cpu_us_per_op_layer={:.2} cpu_us_per_op_layer_nc={:.2} {io}",
        row.c,
        row.pattern.name(),
        store.ops_per_s() / raw.ops_per_s(),
        layer_nc.ops_per_s(),
        layer_nc.ops_per_s() / raw.ops_per_s(),
        store.quantile_us(0.99),
        layer_nc.quantile_us(0.99),
        raw.cpu_us_per_op(),
        store.cpu_us_per_op(),
        layer.cpu_us_per_op(),
        layer_nc.cpu_us_per_op(),
    );
}

/// The record arm beside its two-command baseline (`layer` here is `layer_rec`).
fn print_record(row: &Row) {
    let raw2 = row.get(Impl::Raw2);
    let rec = row.get(Impl::LayerRecords);
    println!(
        "RECORD c={} keys={} raw2={:.0} layer={:.0} ratio={:.3} p99_raw2_us={:.1} p99_layer_us={:.1}",
        row.c,
        row.pattern.name(),
        raw2.ops_per_s(),
        rec.ops_per_s(),
        rec.ops_per_s() / raw2.ops_per_s(),
        raw2.quantile_us(0.99),
        rec.quantile_us(0.99),
    );
}

fn print_record_summary(rows: &[Row]) {
    println!();
    println!(
        "| c | keys | raw2 ops/s | layer_rec ops/s | layer_rec/raw2 | p50 raw2/layer_rec µs | p99 raw2/layer_rec µs | client CPU µs/op raw2/layer_rec | redis CPU µs/op raw2/layer_rec |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (raw2, rec) = (row.get(Impl::Raw2), row.get(Impl::LayerRecords));
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} / {:.1} | {:.1} / {:.1} |",
            row.c,
            row.pattern.name(),
            raw2.ops_per_s(),
            rec.ops_per_s(),
            rec.ops_per_s() / raw2.ops_per_s(),
            raw2.quantile_us(0.5),
            rec.quantile_us(0.5),
            raw2.quantile_us(0.99),
            rec.quantile_us(0.99),
            raw2.cpu_us_per_op(),
            rec.cpu_us_per_op(),
            raw2.cpu.redis * 1e6 / raw2.ops() as f64,
            rec.cpu.redis * 1e6 / rec.ops() as f64,
        );
    }
    println!();
    for row in rows.iter().filter(|r| r.c == 64 && r.pattern == Pattern::Unique) {
        let ratio = row.get(Impl::LayerRecords).ops_per_s() / row.get(Impl::Raw2).ops_per_s();
        println!(
            "TARGET record layer/raw2 unique c=64 >= 0.85: {ratio:.3} {}",
            if ratio >= 0.85 { "PASS" } else { "FAIL" }
        );
    }
}

fn print_summary(rows: &[Row]) {
    println!();
    println!(
        "| c | keys | raw ops/s | store ops/s | layer ops/s | layer (no coalescing) ops/s | ioredis ops/s | store/raw | layer/raw | layer_nc/raw | layer/ioredis | p50 raw/store/layer µs | p99 raw/store/layer/layer_nc/ioredis µs | p999 raw/layer µs | client CPU µs/op raw/store/layer/layer_nc |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (raw, store, layer, nc) = (
            row.get(Impl::Raw),
            row.get(Impl::Store),
            row.get(Impl::Layer),
            row.get(Impl::LayerNoCoalesce),
        );
        let (io_ops, io_ratio, io_p99) = match &row.ioredis {
            Some(r) => (
                format!("{:.0}", r.ops_per_s),
                format!("{:.2}", layer.ops_per_s() / r.ops_per_s),
                format!("{:.0}", r.p99_us),
            ),
            None => ("skipped".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {io_ops} | {:.2} | {:.2} | {:.2} | {io_ratio} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} / {:.0} / {io_p99} | {:.0} / {:.0} | {:.1} / {:.1} / {:.1} / {:.1} |",
            row.c,
            row.pattern.name(),
            raw.ops_per_s(),
            store.ops_per_s(),
            layer.ops_per_s(),
            nc.ops_per_s(),
            store.ops_per_s() / raw.ops_per_s(),
            layer.ops_per_s() / raw.ops_per_s(),
            nc.ops_per_s() / raw.ops_per_s(),
            raw.quantile_us(0.5),
            store.quantile_us(0.5),
            layer.quantile_us(0.5),
            raw.quantile_us(0.99),
            store.quantile_us(0.99),
            layer.quantile_us(0.99),
            nc.quantile_us(0.99),
            raw.quantile_us(0.999),
            layer.quantile_us(0.999),
            raw.cpu_us_per_op(),
            store.cpu_us_per_op(),
            layer.cpu_us_per_op(),
            nc.cpu_us_per_op(),
        );
    }
    println!();
    for row in rows.iter().filter(|r| r.c == 64) {
        let raw = row.get(Impl::Raw);
        let layer = row.get(Impl::Layer);
        let ratio = layer.ops_per_s() / raw.ops_per_s();
        match row.pattern {
            Pattern::Unique => {
                println!(
                    "TARGET layer/raw unique c=64 >= 0.90: {ratio:.3} {}",
                    pass(ratio >= 0.90)
                );
                let p = layer.quantile_us(0.99) / raw.quantile_us(0.99);
                println!("TARGET p99 layer/raw unique c=64 <= 1.5: {p:.2} {}", pass(p <= 1.5));
            }
            Pattern::One => println!(
                "TARGET layer/raw one c=64 >= 2 (coalescing): {ratio:.3} {}",
                pass(ratio >= 2.0)
            ),
            Pattern::Hot => {}
        }
    }
}

//! A fault-injection harness: randomized schedules of calls, store faults and dropped callers,
//! under every store-error policy, with coalescing on and off, shadow mode and renewal on and
//! off. After every schedule it asserts the protocol's invariants:
//!
//! - (a) under fail-closed (no shadow mode), at most one dispatch per key per claim lifetime;
//! - (b) every call is decided (inner service entered, or the future resolved) within two store
//!   timeouts plus a margin, coalescing followers included;
//! - (c) nothing is lost: once the store answers, a key whose dispatches were all blocked (or
//!   that nobody dispatched) is dispatched by one more trigger;
//! - (d) no background task (claim cleanups, retried releases) outlives its deadline: with the
//!   store answering, `background_tasks()` reaches 0 within the TTL plus a second;
//! - (e) coalescing never adds dispatches: a key is dispatched at most as many times as the store
//!   gave an answer that allows a dispatch (`Acquired`; under fail-open also an error).
//!
//! Over a `MemoryStore` behind a fault-injecting store wrapper (delays, errors before and after
//! the command is applied, slow replies), each schedule run with coalescing off and on:
//! `FAULT_HARNESS_CASES` schedules (default 64). Over a real `redis-server` behind the
//! fault-injecting TCP proxy of the test support (delay, blackhole, reset, lost reply), with
//! (a), (b) and (d): `FAULT_HARNESS_REDIS_CASES` schedules (default 4). `FAULT_HARNESS_MARGIN_MS`
//! widens the timing margin of (b) on a slow machine (default 50).
//!
//! `cargo test --all-features --test fault_harness -- --nocapture` shows what was exercised.

mod common;
mod fault_harness_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::RedisServer;
use common::fault_proxy::{FaultProxy, Mode};
use fault_harness_support::{
    CallResult, CallSpec, FAULT_KINDS, Fault, FaultStore, JobOutcome, Params, Run, Settings, Stats, call_strategy,
    cases_from_env, check_coalescing_bound, check_decisions, check_one_dispatch_per_claim, fault_strategy,
    keys_needing_dispatch, settings_strategy,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngSeed, TestRunner};
use tokio::time::Instant;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};
use tower_idempotency::{RedisStore, StoreError, StoreErrorPolicy};

const KEYS: [&str; 3] = ["k0", "k1", "k2"];

fn keys() -> Vec<String> {
    KEYS.iter().map(|k| (*k).to_owned()).collect()
}

fn margin() -> Duration {
    Duration::from_millis(cases_from_env("FAULT_HARNESS_MARGIN_MS", 50).into())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The seed every schedule of a test is generated from: `FAULT_HARNESS_SEED`, else random.
/// Printed on failure, so the same schedules can be run again.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    match std::env::var("FAULT_HARNESS_SEED") {
        Ok(v) => v.trim().parse().expect("FAULT_HARNESS_SEED must be a u64"),
        Err(_) => std::collections::hash_map::RandomState::new().build_hasher().finish(),
    }
}

/// `cases` values of `strategy`, from `seed`. Schedules are generated with proptest but not
/// shrunk: a run depends on real timing, so a shrunk schedule would not reliably fail again.
/// A failure prints the whole schedule and the seed instead.
fn generate<S: Strategy>(strategy: &S, cases: u32, seed: u64) -> Vec<S::Value> {
    let mut runner = TestRunner::new(ProptestConfig {
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    (0..cases)
        .map(|_| strategy.new_tree(&mut runner).expect("generate a schedule").current())
        .collect()
}

/// Panics with every violation, the schedules that broke them and the seed.
fn report(test: &str, failures: Vec<String>, cases: u32, seed: u64) {
    assert!(
        failures.is_empty(),
        "{test}: {} of {cases} schedules broke an invariant (FAULT_HARNESS_SEED={seed} generates them again):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Over a MemoryStore behind the fault store
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Schedule {
    calls: Vec<CallSpec>,
    faults: Vec<Fault>,
    settings: Settings,
}

/// Claims live 1.5 s for the layer, longer than the protocol's longest pause between two
/// background attempts on one claim (1 s), so a background job always gets another attempt
/// once the store answers again. The fault store keeps claims for a minute: no claim expires
/// during a run, and (c) sees only what the protocol itself released or cleaned up.
fn memory_params() -> Params {
    Params {
        ttl: Duration::from_millis(1500),
        store_timeout: Duration::from_millis(20),
        renew_every: Duration::from_millis(5),
        margin: margin(),
        namespace: String::new(),
    }
}

const MEMORY_HOLD: Duration = Duration::from_secs(60);

fn schedule_strategy() -> impl Strategy<Value = Schedule> {
    let timeout = memory_params().store_timeout;
    (
        prop::collection::vec(call_strategy(KEYS.len(), 40, 20), 1..10),
        prop::collection::vec(fault_strategy(timeout), 0..16),
        settings_strategy(),
    )
        .prop_map(|(calls, faults, settings)| Schedule {
            calls,
            faults,
            settings,
        })
}

/// Runs `schedule` on a fresh fault store and layer; returns the violated invariants and what
/// was exercised.
async fn run_memory(schedule: &Schedule, coalescing: bool) -> (Vec<String>, Stats) {
    let mut stats = Stats::default();
    let params = memory_params();
    let settings = schedule.settings;
    let store = Arc::new(
        FaultStore::new(params.store_timeout, schedule.faults.iter().copied()).keeping_claims_for(MEMORY_HOLD),
    );
    let run = Run::new(store.clone(), &settings, coalescing, &params);
    let keys = keys();

    let records = run.calls(&schedule.calls, &keys).await;
    let during = run.recorder.dispatches();
    let answers = store.answers();
    for (kind, n) in FAULT_KINDS.iter().zip(store.injected()) {
        stats.add_faults(kind, n);
    }
    store.disable_faults();

    let mut violations = check_decisions(&records, params.decision_bound());
    match run.drain_background(params.ttl + Duration::from_secs(1)).await {
        Ok(took) => stats.slowest_drain = stats.slowest_drain.max(took),
        Err(e) => violations.push(e),
    }
    let mut triggers = Vec::new();
    for key in keys_needing_dispatch(&records, &during) {
        let result = run.trigger(&key).await;
        if result != CallResult::Ok(JobOutcome::Dispatched) {
            violations.push(format!(
                "(c) key {key}: every dispatch was blocked (or none happened), yet a trigger with the store answering got {result:?}\n  calls: {:?}\n  store log (token counter, fault, answer):\n    {}",
                records.iter().filter(|r| r.key == key).map(|r| (r.id, &r.result)).collect::<Vec<_>>(),
                store.log_for(&key).replace('\n', "\n    ")
            ));
        }
        triggers.push(key);
    }
    if settings.exactly_once() {
        violations.extend(check_one_dispatch_per_claim(&run.recorder.dispatches()));
    }
    if coalescing && !settings.shadow {
        violations.extend(check_coalescing_bound(
            &during,
            &answers,
            &params.namespace,
            settings.policy,
        ));
    }

    stats.runs += 1;
    stats.add_results(&records);
    stats.calls += triggers.len();
    stats.dispatches += run.recorder.dispatches().len();
    let violations = violations
        .into_iter()
        .map(|v| format!("[coalescing {}] {v}", if coalescing { "on" } else { "off" }))
        .collect();
    (violations, stats)
}

/// Runs `schedule` with coalescing off and on, side by side on fresh stores.
async fn run_both(schedule: &Schedule) -> (Vec<String>, Stats) {
    let ((mut violations, mut stats), (on_violations, on_stats)) =
        tokio::join!(run_memory(schedule, false), run_memory(schedule, true));
    violations.extend(on_violations);
    stats.merge(on_stats);
    stats.schedules = 1;
    (violations, stats)
}

/// Schedules run this many at a time: a run lasts until its background jobs end, up to the TTL
/// after it, so one after another they would take minutes.
const PARALLEL: usize = 16;

#[test]
fn memory_store_fault_schedules_keep_the_invariants() {
    let (cases, seed) = (cases_from_env("FAULT_HARNESS_CASES", 64), seed());
    let schedules = generate(&schedule_strategy(), cases, seed);
    let rt = runtime();
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    for batch in schedules.chunks(PARALLEL) {
        let outcomes = rt.block_on(futures::future::join_all(batch.iter().map(run_both)));
        for (schedule, (violations, run_stats)) in batch.iter().zip(outcomes) {
            stats.merge(run_stats);
            if !violations.is_empty() {
                failures.push(format!("{}\nschedule: {schedule:?}", violations.join("\n")));
            }
        }
    }
    println!("{} (memory store; coalescing off and on each)", stats.summary());
    println!(
        "  runs {}, dispatches {}, faults {:?}, results {:?}, slowest background drain {:?}",
        stats.runs, stats.dispatches, stats.faults, stats.results, stats.slowest_drain
    );
    report("memory store", failures, cases, seed);
}

/// The harness has teeth: with a store that grants every claim, a burst on one key dispatches
/// twice under fail-closed, and invariant (a) says so.
#[test]
fn invariant_a_catches_a_store_that_grants_every_claim() {
    struct GrantAll;
    impl IdempotencyStore for GrantAll {
        async fn claim(&self, _: &str, _: &ClaimToken, _: Duration) -> Result<ClaimOutcome, StoreError> {
            Ok(ClaimOutcome::Acquired)
        }
        async fn release(&self, _: &str, _: &ClaimToken) -> Result<bool, StoreError> {
            Ok(true)
        }
        async fn renew(&self, _: &str, _: &ClaimToken, _: Duration) -> Result<bool, StoreError> {
            Ok(true)
        }
    }
    let settings = Settings {
        policy: StoreErrorPolicy::FailClosed,
        shadow: false,
        renewal: false,
    };
    let call = CallSpec {
        key: 0,
        start: Duration::ZERO,
        drop_after: None,
        outcome: JobOutcome::Dispatched,
        run: Duration::from_millis(5),
    };
    runtime().block_on(async {
        let run = Run::new(GrantAll, &settings, false, &memory_params());
        let records = run.calls(&[call.clone(), call], &keys()).await;
        assert!(check_decisions(&records, memory_params().decision_bound()).is_empty());
        let violations = check_one_dispatch_per_claim(&run.recorder.dispatches());
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].starts_with("(a) key k0"), "{violations:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// Over a real redis-server behind the fault proxy
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct RedisSchedule {
    calls: Vec<CallSpec>,
    /// Proxy mode switches: at this offset from the start, switch to this mode.
    modes: Vec<(Duration, Mode)>,
    settings: Settings,
    coalescing: bool,
}

/// The TTL outlasts a schedule (calls start within 300 ms and are decided within 350 ms), so no
/// claim expires during one; background jobs end by the TTL after it.
fn redis_params(case: usize) -> Params {
    Params {
        ttl: Duration::from_millis(1500),
        store_timeout: Duration::from_millis(150),
        renew_every: Duration::from_millis(50),
        margin: margin(),
        // Schedules share the server; each gets its own keys.
        namespace: format!("fault-harness-{case}:"),
    }
}

fn mode_strategy() -> impl Strategy<Value = Mode> {
    prop_oneof![
        2 => Just(Mode::Pass),
        1 => prop_oneof![Just(20u64), Just(60), Just(200)].prop_map(|n| Mode::Delay(Duration::from_millis(n))),
        1 => Just(Mode::Blackhole),
        1 => Just(Mode::Reset),
        1 => Just(Mode::LoseNextReply),
    ]
}

fn mode_kind(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Pass => None,
        Mode::Delay(_) => Some("delay"),
        Mode::Blackhole => Some("blackhole"),
        Mode::Reset => Some("reset"),
        Mode::LoseNextReply => Some("lose_next_reply"),
    }
}

fn redis_schedule_strategy() -> impl Strategy<Value = RedisSchedule> {
    (
        prop::collection::vec(call_strategy(KEYS.len(), 300, 50), 1..10),
        prop::collection::vec((0..300u64, mode_strategy()), 0..6),
        settings_strategy(),
        any::<bool>(),
    )
        .prop_map(|(calls, mut modes, settings, coalescing)| {
            modes.sort_by_key(|(at, _)| *at);
            RedisSchedule {
                calls,
                modes: modes
                    .into_iter()
                    .map(|(at, mode)| (Duration::from_millis(at), mode))
                    .collect(),
                settings,
                coalescing,
            }
        })
}

async fn run_redis(schedule: &RedisSchedule, proxy: &Arc<FaultProxy>, case: usize, stats: &mut Stats) -> Vec<String> {
    let params = redis_params(case);
    proxy.set_mode(Mode::Pass);
    let store = RedisStore::builder(proxy.url())
        .timeout(params.store_timeout)
        .connect()
        .await
        .expect("connect to redis through the fault proxy");
    let run = Run::new(store, &schedule.settings, schedule.coalescing, &params);

    let injected = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let driver = tokio::spawn({
        let (proxy, modes, injected) = (proxy.clone(), schedule.modes.clone(), injected.clone());
        let base = Instant::now();
        async move {
            for (at, mode) in modes {
                tokio::time::sleep_until(base + at).await;
                proxy.set_mode(mode);
                if let Some(kind) = mode_kind(mode) {
                    *injected.lock().unwrap().entry(kind).or_default() += 1;
                }
            }
        }
    });
    let records = run.calls(&schedule.calls, &keys()).await;
    driver.abort();
    let _ = driver.await;
    proxy.set_mode(Mode::Pass);
    for (kind, n) in injected.lock().unwrap().iter() {
        stats.add_faults(kind, *n);
    }

    let mut violations = check_decisions(&records, params.decision_bound());
    match run.drain_background(params.ttl + Duration::from_secs(1)).await {
        Ok(took) => stats.slowest_drain = stats.slowest_drain.max(took),
        Err(e) => violations.push(e),
    }
    if schedule.settings.exactly_once() {
        violations.extend(check_one_dispatch_per_claim(&run.recorder.dispatches()));
    }
    stats.runs += 1;
    stats.add_results(&records);
    stats.dispatches += run.recorder.dispatches().len();
    violations
}

#[test]
fn redis_behind_a_fault_proxy_keeps_the_invariants() {
    let (cases, seed) = (cases_from_env("FAULT_HARNESS_REDIS_CASES", 4), seed());
    let schedules = generate(&redis_schedule_strategy(), cases, seed);
    let rt = runtime();
    let server = RedisServer::start();
    let proxy = Arc::new(rt.block_on(async { FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port()))) }));
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    // One after another: the proxy's mode is shared.
    for (case, schedule) in schedules.iter().enumerate() {
        stats.schedules += 1;
        let violations = rt.block_on(run_redis(schedule, &proxy, case, &mut stats));
        if !violations.is_empty() {
            failures.push(format!("{}\nschedule: {schedule:?}", violations.join("\n")));
        }
    }
    println!(
        "{} (redis-server behind the fault proxy; {} connections, {} resets, {} replies lost)",
        stats.summary(),
        proxy.accepted(),
        proxy.resets(),
        proxy.replies_lost()
    );
    println!(
        "  dispatches {}, faults {:?}, results {:?}, slowest background drain {:?}",
        stats.dispatches, stats.faults, stats.results, stats.slowest_drain
    );
    report("redis", failures, cases, seed);
}

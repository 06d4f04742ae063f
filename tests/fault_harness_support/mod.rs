//! The fault-injection harness's parts, one concept per file:
//!
//! - `fault_store`: a `MemoryStore` behind a plan of faults (delays, errors before and after the
//!   command is applied, slow replies), bounding its own latency as `RedisStore` does;
//! - `worker`: the inner service, recording every dispatch;
//! - `run`: one schedule of calls against one layer, and what each call ended with;
//! - `invariants`: the checks (a)–(e) over what a run recorded;
//! - `strategies`: proptest strategies for schedules.
//!
//! Included by `tests/fault_harness.rs` with `mod fault_harness_support;` (a folder, so Cargo
//! does not build it as a test of its own). Written against the claim protocol with
//! `IdempotencyLayer::build`, `background_tasks` and `IdempotencyError::ReleaseFailed`.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

mod fault_store;
mod invariants;
mod run;
mod strategies;
mod worker;

pub use fault_store::{FAULT_KINDS, Fault, FaultStore};
pub use invariants::{check_coalescing_bound, check_decisions, check_one_dispatch_per_claim, keys_needing_dispatch};
pub use run::{CallRecord, CallResult, CallSpec, Params, Run, Settings};
pub use strategies::{call_strategy, fault_strategy, settings_strategy};
pub use worker::JobOutcome;

/// What the harness exercised, printed at the end of each test.
#[derive(Debug, Default)]
pub struct Stats {
    pub schedules: usize,
    pub runs: usize,
    pub calls: usize,
    pub dispatches: usize,
    /// Dispatches during schedules run with coalescing off and on (memory store only).
    pub dispatches_by_coalescing: [usize; 2],
    /// Faults injected, by kind name.
    pub faults: BTreeMap<&'static str, usize>,
    pub results: BTreeMap<String, usize>,
    pub slowest_drain: Duration,
}

impl Stats {
    pub fn add_faults(&mut self, kind: &'static str, n: usize) {
        if n > 0 {
            *self.faults.entry(kind).or_default() += n;
        }
    }

    pub fn add_results(&mut self, records: &[CallRecord]) {
        self.calls += records.len();
        for r in records {
            let name = match &r.result {
                CallResult::Ok(o) => format!("{o:?}"),
                CallResult::StoreUnavailable(_) => "StoreUnavailable".to_owned(),
                CallResult::Other(_) => "Other".to_owned(),
                other => format!("{other:?}"),
            };
            *self.results.entry(name).or_default() += 1;
        }
    }

    /// Adds what another run exercised.
    pub fn merge(&mut self, other: Stats) {
        self.schedules += other.schedules;
        self.runs += other.runs;
        self.calls += other.calls;
        self.dispatches += other.dispatches;
        for (mine, theirs) in self
            .dispatches_by_coalescing
            .iter_mut()
            .zip(other.dispatches_by_coalescing)
        {
            *mine += theirs;
        }
        for (kind, n) in other.faults {
            *self.faults.entry(kind).or_default() += n;
        }
        for (result, n) in other.results {
            *self.results.entry(result).or_default() += n;
        }
        self.slowest_drain = self.slowest_drain.max(other.slowest_drain);
    }

    /// `fault harness: N schedules, M calls, F faults injected (k kinds)`.
    pub fn summary(&self) -> String {
        format!(
            "fault harness: {} schedules, {} calls, {} faults injected ({} kinds)",
            self.schedules,
            self.calls,
            self.faults.values().sum::<usize>(),
            self.faults.len()
        )
    }
}

/// The number of cases from `var`, else `default`.
pub fn cases_from_env(var: &str, default: u32) -> u32 {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var} must be a number of cases, got {v:?}")),
        Err(_) => default,
    }
}

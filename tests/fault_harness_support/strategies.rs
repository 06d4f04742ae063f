//! Proptest strategies for faults, calls and layer settings.

use std::time::Duration;

use proptest::prelude::*;
use tower_idempotency::StoreErrorPolicy;

use super::fault_store::Fault;
use super::run::{CallSpec, Settings};
use super::worker::JobOutcome;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn fault_strategy(timeout: Duration) -> impl Strategy<Value = Fault> {
    let t = u64::try_from(timeout.as_millis()).expect("small timeout");
    prop_oneof![
        4 => Just(Fault::None),
        1 => (0..2 * t).prop_map(|n| Fault::Delay(ms(n))),
        1 => Just(Fault::ErrBeforeApply),
        1 => Just(Fault::ErrAfterApply),
        1 => (0..2 * t).prop_map(|n| Fault::SlowReply(ms(n))),
    ]
}

/// Calls on `keys` keys in four bursts spread over `spread_ms` (a few ms of jitter within a
/// burst, so coalescing has company), a third of them dropped at a random point.
pub fn call_strategy(keys: usize, spread_ms: u64, max_run_ms: u64) -> impl Strategy<Value = CallSpec> {
    (
        0..keys,
        0..4u64,
        0..3u64,
        prop::option::weighted(0.3, 0..spread_ms + max_run_ms),
        prop_oneof![Just(JobOutcome::Dispatched), Just(JobOutcome::Blocked)],
        0..max_run_ms,
    )
        .prop_map(move |(key, burst, jitter, drop_ms, outcome, run_ms)| CallSpec {
            key,
            start: ms(burst * spread_ms / 4 + jitter),
            drop_after: drop_ms.map(ms),
            outcome,
            run: ms(run_ms),
        })
}

pub fn settings_strategy() -> impl Strategy<Value = Settings> {
    (
        prop_oneof![3 => Just(StoreErrorPolicy::FailClosed), 2 => Just(StoreErrorPolicy::FailOpen)],
        prop::bool::weighted(0.15),
        any::<bool>(),
    )
        .prop_map(|(policy, shadow, renewal)| Settings {
            policy,
            shadow,
            renewal,
        })
}

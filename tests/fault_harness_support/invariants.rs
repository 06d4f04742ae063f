//! The invariants checked after every schedule, as functions over what the run recorded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tower_idempotency::StoreErrorPolicy;

use super::fault_store::Answers;
use super::run::{CallRecord, HUNG_AFTER};
use super::worker::{Dispatch, JobOutcome};

/// (a) Under fail-closed without shadow mode, at most one dispatch per key per claim lifetime.
///
/// A claim lifetime ends only when a job classified blocked has its claim released, which the
/// layer does after the inner service answered (the TTL is longer than the schedule). So, in
/// the order the inner service was entered, each dispatch needs a licence: the key's first
/// dispatch has one, and each blocked dispatch that *finished before* a later dispatch entered
/// grants one more. (Release failures retried in the background only free the key later, so
/// this never flags a correct run.)
pub fn check_one_dispatch_per_claim(dispatches: &[Dispatch]) -> Vec<String> {
    let mut by_key: BTreeMap<&str, Vec<&Dispatch>> = BTreeMap::new();
    for d in dispatches {
        by_key.entry(&d.key).or_default().push(d);
    }
    let mut violations = Vec::new();
    for (key, mut list) in by_key {
        list.sort_by_key(|d| d.entered);
        for (i, d) in list.iter().enumerate() {
            let released_before = list[..i]
                .iter()
                .filter(|p| matches!(p.finished, Some((t, JobOutcome::Blocked)) if t <= d.entered))
                .count();
            if i > released_before {
                violations.push(format!(
                    "(a) key {key}: dispatch #{} (call {}) entered while an earlier claim was kept; dispatches so far: {:?}",
                    i + 1,
                    d.id,
                    list[..=i]
                        .iter()
                        .map(|p| (p.id, p.finished.map(|(_, o)| o)))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    violations
}

/// (b) Every call was decided within the bound. A caller that went away undecided is a
/// violation only if it waited longer than the bound; a call that hung, always.
pub fn check_decisions(records: &[CallRecord], bound: Duration) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| {
            let waited = match r.decided {
                Some(at) => at.duration_since(r.started),
                None => match r.drop_after {
                    Some(after) if after > bound => after,
                    Some(_) => return None,
                    None => HUNG_AFTER,
                },
            };
            (waited > bound).then(|| {
                format!(
                    "(b) call {} on key {} was decided after {waited:?} (bound {bound:?}; result {:?})",
                    r.id, r.key, r.result
                )
            })
        })
        .collect()
}

/// (c) The keys that must dispatch on one more trigger once the store answers: called in the
/// schedule, and no dispatch of theirs kept a claim (every one finished blocked). Keys that
/// nobody dispatched are included: a call that failed closed may leave a phantom claim, which
/// the layer must clean up, or the caller's retry would be lost too.
pub fn keys_needing_dispatch(records: &[CallRecord], dispatches: &[Dispatch]) -> Vec<String> {
    let called: BTreeSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
    called
        .into_iter()
        .filter(|key| {
            dispatches
                .iter()
                .filter(|d| d.key == *key)
                .all(|d| matches!(d.finished, Some((_, JobOutcome::Blocked))))
        })
        .map(str::to_owned)
        .collect()
}

/// (e) With coalescing, a key is dispatched at most as many times as the store gave an answer
/// that allows a dispatch: `Acquired`, and under fail-open also an error. A follower must not
/// turn one answer into several dispatches. Not for shadow mode (which dispatches everything).
pub fn check_coalescing_bound(
    dispatches: &[Dispatch],
    answers: &HashMap<String, Answers>,
    namespace: &str,
    policy: StoreErrorPolicy,
) -> Vec<String> {
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for d in dispatches {
        *per_key.entry(&d.key).or_default() += 1;
    }
    per_key
        .into_iter()
        .filter_map(|(key, n)| {
            let a = answers.get(&format!("{namespace}{key}")).copied().unwrap_or_default();
            let allowing = a.acquired
                + if policy == StoreErrorPolicy::FailOpen {
                    a.errors
                } else {
                    0
                };
            (n > allowing).then(|| {
                format!(
                    "(e) key {key}: {n} dispatches from {allowing} store answers that allow one ({a:?}, {policy:?})"
                )
            })
        })
        .collect()
}

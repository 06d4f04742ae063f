//! The one owner of the protocol's background work: removing claims whose reply was lost or
//! whose caller went away, and retrying releases that failed.
//!
//! Bounded on every axis: jobs are de-duplicated by key (one entry per key, one item per token),
//! capped at [`MAX_PENDING`], each with a deadline no later than its claim's expiry, and run by a
//! single worker task per layer that exits when nothing is pending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::Chain;
use crate::observe::Observers;
use crate::store::{ClaimToken, ErasedStore};

/// At most this many claims are looked after at once; beyond it a claim is left to expire after
/// its TTL (logged at `warn`).
pub(crate) const MAX_PENDING: usize = 10_000;
/// How long a possibly landed claim is watched for after the store first answers "not there":
/// a `SET` still buffered on a replaced connection, or resent by the cluster client, can land
/// after that first answer.
pub(crate) const PHANTOM_WATCH: Duration = Duration::from_secs(10);
/// The longest pause between two checks of one claim; so a claim that lands while it is watched
/// is removed within this (plus one round trip).
pub(crate) const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(1);
const FIRST_RETRY: Duration = Duration::from_millis(50);
/// How long before its deadline a claim gets its last attempt.
const LAST_TRY_MARGIN: Duration = Duration::from_millis(10);
/// Tokens looked after per key; more concurrent lost claims on one key than this are left to
/// their TTL.
const MAX_TOKENS_PER_KEY: usize = 16;
/// Store calls in flight at once.
const BATCH: usize = 256;
/// A guard on one store call, for stores that do not bound their own latency.
const CALL_GUARD: Duration = Duration::from_secs(5);

/// What a background job does with its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    /// The claim may or may not have landed (lost reply, caller dropped): delete it if it is
    /// there, and keep watching for [`PHANTOM_WATCH`] after the store answers, in case it lands
    /// late.
    Cleanup,
    /// The claim is ours and must go (the job was blocked); a release failed. Retry until it is
    /// deleted or gone.
    Release,
}

/// The background owner of one layer.
pub(crate) struct Background {
    store: Arc<dyn ErasedStore>,
    state: Mutex<State>,
    wake: Notify,
    observers: Mutex<Option<Arc<Observers>>>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<Arc<str>, Job>,
    pending: usize,
    worker: Option<JoinHandle<()>>,
}

struct Job {
    items: Vec<Item>,
    next: Instant,
    delay: Duration,
}

struct Item {
    token: ClaimToken,
    work: Work,
    deadline: Instant,
    /// When the store first answered "not there" (cleanups only).
    answered: Option<Instant>,
}

impl Background {
    pub(crate) fn new(store: Arc<dyn ErasedStore>) -> Self {
        Self {
            store,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            observers: Mutex::new(None),
        }
    }

    /// Reports pending work and store latency to `observers` (the latest service's).
    pub(crate) fn observe(&self, observers: Arc<Observers>) {
        *self.observers.lock().unwrap_or_else(|p| p.into_inner()) = Some(observers);
    }

    fn observers(&self) -> Option<Arc<Observers>> {
        self.observers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims being looked after.
    pub(crate) fn pending(&self) -> usize {
        self.lock().pending
    }

    /// Hands a claim over: delete (`Cleanup`) or release (`Release`) `token`'s claim on `key`,
    /// giving up at `deadline`.
    pub(crate) fn submit(self: &Arc<Self>, key: Arc<str>, token: ClaimToken, work: Work, deadline: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %key, outcome = "left_to_expire", "no Tokio runtime for background work; the claim expires after its TTL");
            return;
        };
        let now = Instant::now();
        let mut state = self.lock();
        let State { jobs, pending, worker } = &mut *state;
        let job = jobs.entry(key.clone()).or_insert_with(|| Job {
            items: Vec::new(),
            next: now,
            delay: FIRST_RETRY,
        });
        if let Some(item) = job.items.iter_mut().find(|i| i.token == token) {
            item.deadline = item.deadline.max(deadline);
            if work == Work::Release {
                item.work = Work::Release;
            }
        } else if *pending >= MAX_PENDING || job.items.len() >= MAX_TOKENS_PER_KEY {
            tracing::warn!(key = %key, outcome = "left_to_expire", pending = *pending, "background work is at its cap; this claim expires after its TTL");
            if job.items.is_empty() {
                jobs.remove(&key);
            }
            return;
        } else {
            job.items.push(Item {
                token,
                work,
                deadline,
                answered: None,
            });
            *pending += 1;
        }
        job.next = now;
        let count = *pending;
        if worker.as_ref().is_none_or(JoinHandle::is_finished) {
            *worker = Some(runtime.spawn(self.clone().run()));
        }
        drop(state);
        if let Some(observers) = self.observers() {
            observers.background_pending(count);
        }
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let (due, next) = {
                let mut state = self.lock();
                let State { jobs, pending, worker } = &mut *state;
                jobs.retain(|key, job| {
                    job.items.retain(|item| {
                        let keep = item.deadline > now;
                        if !keep {
                            *pending -= 1;
                            if item.work == Work::Release || item.answered.is_none() {
                                tracing::warn!(key = %key, outcome = "left_to_expire", "background work reached its deadline; the claim expires after its TTL");
                            }
                        }
                        keep
                    });
                    !job.items.is_empty()
                });
                if jobs.is_empty() {
                    // Under the lock: a submit after this point starts a new worker.
                    *worker = None;
                    if let Some(observers) = self.observers() {
                        observers.background_pending(0);
                    }
                    return;
                }
                let mut due = Vec::new();
                let mut next = None::<Instant>;
                for (key, job) in jobs.iter() {
                    if job.next <= now && due.len() < BATCH {
                        due.extend(job.items.iter().map(|i| (key.clone(), i.token.clone())));
                    } else {
                        next = Some(next.map_or(job.next, |n| n.min(job.next)));
                    }
                    for item in &job.items {
                        next = Some(next.map_or(item.deadline, |n| n.min(item.deadline)));
                    }
                }
                (due, next.unwrap_or(now + MAX_CHECK_INTERVAL))
            };
            if due.is_empty() {
                let _ = tokio::time::timeout_at(next, self.wake.notified()).await;
                continue;
            }
            let observers = self.observers();
            let calls = due.into_iter().map(|(key, token)| {
                let (store, observers) = (self.store.clone(), observers.clone());
                async move {
                    let started = Instant::now();
                    let answer = tokio::time::timeout(CALL_GUARD, store.release(key.clone(), token.clone())).await;
                    if let Some(observers) = observers {
                        observers.store_call("cleanup", started.elapsed(), matches!(answer, Ok(Ok(_))));
                    }
                    (key, token, answer)
                }
            });
            let answers = join_all(calls).await;
            let now = Instant::now();
            let mut state = self.lock();
            let State { jobs, pending, .. } = &mut *state;
            let mut touched = std::collections::HashSet::new();
            for (key, token, answer) in answers {
                let Some(job) = jobs.get_mut(&key) else { continue };
                let Some(index) = job.items.iter().position(|i| i.token == token) else {
                    continue;
                };
                let item = &mut job.items[index];
                let done = match answer {
                    Ok(Ok(true)) if item.work == Work::Release => {
                        tracing::info!(key = %key, outcome = "released", "background: claim released");
                        true
                    }
                    Ok(Ok(true)) => {
                        // A resend may land it again: keep watching for the whole window.
                        tracing::info!(key = %key, outcome = "released", "background: removed a claim whose reply was lost or whose caller went away");
                        let first = *item.answered.get_or_insert(now);
                        now >= first + PHANTOM_WATCH
                    }
                    Ok(Ok(false)) => match item.work {
                        Work::Release => {
                            tracing::info!(key = %key, outcome = "released", "background: the claim was already gone");
                            true
                        }
                        Work::Cleanup => {
                            let first = *item.answered.get_or_insert(now);
                            now >= first + PHANTOM_WATCH
                        }
                    },
                    Ok(Err(error)) => {
                        tracing::debug!(key = %key, error = %Chain(&error), "background: store call failed; retrying");
                        false
                    }
                    Err(_) => {
                        tracing::debug!(key = %key, "background: store call did not answer; retrying");
                        false
                    }
                };
                if done {
                    job.items.swap_remove(index);
                    *pending -= 1;
                }
                touched.insert(key);
            }
            // One backoff step per key per round (however many tokens it has), and never past
            // the earliest deadline, so a claim gets its last attempt before it is given up.
            for key in touched {
                if let Some(job) = jobs.get_mut(&key) {
                    let earliest = job.items.iter().map(|i| i.deadline).min().unwrap_or(now);
                    // Items are dropped once their deadline has come: the last try is just before.
                    let last_chance = earliest.checked_sub(LAST_TRY_MARGIN).unwrap_or(earliest).max(now);
                    job.next = (now + job.delay).min(last_chance);
                    job.delay = (job.delay * 2).min(MAX_CHECK_INTERVAL);
                }
            }
            jobs.retain(|_, job| !job.items.is_empty());
            let count = *pending;
            drop(state);
            if let Some(observers) = &observers {
                observers.background_pending(count);
            }
        }
    }
}

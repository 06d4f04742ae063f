//! Shared by the fault, renewal and cluster tests: a dispatch counter per key, a load driver
//! that records every call's latency and outcome, and a log capture.
//!
//! Included with `mod faults_support;` (a folder, so Cargo does not build it as a test of its own).
#![allow(dead_code, unreachable_pub)]

pub mod scripted;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_idempotency::{IdempotencyError, IdempotencyKey, KeyError};

/// The extractor every fault test uses: the request is its key.
pub fn key_of(req: &String) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(req).map(Some)
}

/// Counts how many times the inner service ran, per key. The fault tests' "zero double
/// dispatch" is `max_per_key() <= 1`.
#[derive(Clone, Default, Debug)]
pub struct Dispatches(Arc<Mutex<HashMap<String, usize>>>, Arc<std::sync::atomic::AtomicUsize>);

impl Dispatches {
    /// An inner service that records its call and answers at once.
    pub fn service(&self) -> CountingService {
        self.service_taking(Duration::ZERO)
    }

    /// An inner service that records its call, then takes `run` to finish.
    pub fn service_taking(&self, run: Duration) -> CountingService {
        CountingService {
            dispatches: self.clone(),
            run,
        }
    }

    pub fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    /// How many inner calls ran to completion (a dropped inner future does not count).
    pub fn finished(&self) -> usize {
        self.1.load(Ordering::SeqCst)
    }

    pub fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }

    /// The key dispatched most often, with its count.
    pub fn max_per_key(&self) -> (String, usize) {
        self.0
            .lock()
            .unwrap()
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(k, n)| (k.clone(), *n))
            .unwrap_or_default()
    }
}

/// The inner service of the fault tests: counts its calls per key, then takes `run`.
#[derive(Clone)]
pub struct CountingService {
    dispatches: Dispatches,
    run: Duration,
}

impl Service<String> for CountingService {
    type Response = ();
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<(), Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: String) -> Self::Future {
        *self.dispatches.0.lock().unwrap().entry(key).or_default() += 1;
        let (run, finished) = (self.run, self.dispatches.1.clone());
        Box::pin(async move {
            if !run.is_zero() {
                tokio::time::sleep(run).await;
            }
            finished.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Dispatched,
    Duplicate,
    /// Failed closed; carries the store error's kind.
    StoreUnavailable(&'static str),
    Other(String),
}

impl Outcome {
    pub fn of<T, E: std::fmt::Debug>(result: &Result<T, IdempotencyError<E>>) -> Self {
        match result {
            Ok(_) => Outcome::Dispatched,
            Err(IdempotencyError::Duplicate { .. }) => Outcome::Duplicate,
            Err(IdempotencyError::StoreUnavailable { source, .. }) => Outcome::StoreUnavailable(source.kind()),
            Err(other) => Outcome::Other(format!("{other:?}")),
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, Outcome::StoreUnavailable(_))
    }
}

/// One call made by the load driver.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    /// When the call started, since the driver's origin.
    pub started: Duration,
    pub took: Duration,
    pub outcome: Outcome,
}

impl Record {
    pub fn finished(&self) -> Duration {
        self.started + self.took
    }
}

/// Calls `svc` with `key` and records how long it took and how it ended.
pub async fn timed_call<S, E>(svc: S, key: String, origin: Instant) -> Record
where
    S: Service<String, Response = (), Error = IdempotencyError<E>>,
    E: std::fmt::Debug,
{
    let start = Instant::now();
    let result = svc.oneshot(key.clone()).await;
    Record {
        key,
        started: start - origin,
        took: start.elapsed(),
        outcome: Outcome::of(&result),
    }
}

/// Keeps `workers` tasks busy until stopped. Each round, a worker triggers a fresh key twice at
/// the same moment (two racing triggers of the same job), records both calls, and moves on.
pub struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub origin: Instant,
}

impl Load {
    pub fn start<S, E>(svc: S, workers: usize, prefix: &str) -> Self
    where
        S: Service<String, Response = (), Error = IdempotencyError<E>> + Clone + Send + 'static,
        S::Future: Send,
        E: std::fmt::Debug + Send + 'static,
    {
        let origin = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|w| {
                let (svc, stop, records, prefix) = (svc.clone(), stop.clone(), records.clone(), prefix.to_owned());
                tokio::spawn(async move {
                    let mut round = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let key = format!("{prefix}-w{w}-r{round}");
                        let (a, b) = tokio::join!(
                            timed_call(svc.clone(), key.clone(), origin),
                            timed_call(svc.clone(), key, origin)
                        );
                        records.lock().unwrap().extend([a, b]);
                        round += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            records,
            tasks,
            origin,
        }
    }

    /// Time since the driver started.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    pub async fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("load worker panicked");
        }
        let mut records = std::mem::take(&mut *self.records.lock().unwrap());
        records.sort_by_key(|r| r.started);
        records
    }
}

/// The slowest call among `records`.
pub fn slowest(records: &[Record]) -> Option<&Record> {
    records.iter().max_by_key(|r| r.took)
}

/// Every `Dispatched` record's key appears in `dispatches` exactly once, and no key ran twice.
pub fn assert_no_double_dispatch(records: &[Record], dispatches: &Dispatches) {
    let (key, n) = dispatches.max_per_key();
    assert!(n <= 1, "key `{key}` was dispatched {n} times");
    let dispatched = records.iter().filter(|r| r.outcome == Outcome::Dispatched).count();
    assert_eq!(
        dispatched,
        dispatches.total(),
        "every dispatch the inner service saw must be a call that reported `dispatched`, and vice versa"
    );
}

/// Captures formatted `tracing` output so tests can assert what was logged.
///
/// One process-wide subscriber per test binary: thread-local subscribers (`set_default`) are not
/// reliable when tests run in parallel, because `tracing` caches per-callsite interest across
/// threads. Tests running at the same time share the buffer, so each asserts on lines that name
/// its own keys (the `idempotency{key=…}` span is part of every line).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// The capture of this test binary, installed on first use.
    pub fn global() -> LogCapture {
        static GLOBAL: std::sync::OnceLock<LogCapture> = std::sync::OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let capture = LogCapture::default();
                let sink = capture.clone();
                let subscriber = tracing_subscriber::fmt()
                    .with_max_level(tracing::Level::DEBUG)
                    .with_ansi(false)
                    .with_writer(move || sink.clone())
                    .finish();
                tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
                capture
            })
            .clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Lines at `level` (e.g. "ERROR") that mention `key` and contain `needle`.
    pub fn lines(&self, level: &str, key: &str, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(level) && l.contains(key) && l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A current-thread runtime with IO and time, for tests that run inside
/// `sentry::test::with_captured_events` (whose hub is bound to the calling thread).
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Reads a `cmdstat_<command>:calls=N` counter from `INFO commandstats`.
pub fn command_calls(info: &str, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

//! The inner service: records every dispatch (entry and answer), then answers as its job says.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::Service;
use tower_idempotency::{Idempotency, IdempotencyKey, IdempotencyLayer, KeyError, Settle};

/// What the inner service answers: the job ran, or a capacity gate blocked it (the classifier
/// releases the claim, so a later trigger may dispatch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Dispatched,
    Blocked,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: usize,
    pub key: String,
    pub outcome: JobOutcome,
    pub run: Duration,
}

/// One entry into the inner service.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub id: usize,
    pub key: String,
    pub entered: Instant,
    /// When the inner service answered, and what; `None` if its future was dropped first.
    pub finished: Option<(Instant, JobOutcome)>,
}

#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Dispatch>>>);

impl Recorder {
    pub fn dispatches(&self) -> Vec<Dispatch> {
        self.0.lock().unwrap().clone()
    }

    pub fn entered(&self, id: usize) -> Option<Instant> {
        self.0.lock().unwrap().iter().find(|d| d.id == id).map(|d| d.entered)
    }
}

#[derive(Debug, Clone)]
pub struct Worker(Recorder);

impl Worker {
    pub fn new(recorder: Recorder) -> Self {
        Self(recorder)
    }
}

impl Service<Job> for Worker {
    type Response = JobOutcome;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<JobOutcome, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, job: Job) -> Self::Future {
        self.0.0.lock().unwrap().push(Dispatch {
            id: job.id,
            key: job.key.clone(),
            entered: Instant::now(),
            finished: None,
        });
        let recorder = self.0.clone();
        Box::pin(async move {
            if !job.run.is_zero() {
                tokio::time::sleep(job.run).await;
            }
            let mut all = recorder.0.lock().unwrap();
            if let Some(d) = all.iter_mut().find(|d| d.id == job.id) {
                d.finished = Some((Instant::now(), job.outcome));
            }
            Ok(job.outcome)
        })
    }
}

pub type Extract = fn(&Job) -> Result<Option<IdempotencyKey>, KeyError>;
pub type Classify = fn(&Result<JobOutcome, Infallible>) -> Settle;
pub type HarnessLayer = IdempotencyLayer<Extract, Classify>;
pub type HarnessService = Idempotency<Worker, Extract, Classify>;

pub(super) fn key_of(job: &Job) -> Result<Option<IdempotencyKey>, KeyError> {
    IdempotencyKey::new(&job.key).map(Some)
}

pub(super) fn release_when_blocked(result: &Result<JobOutcome, Infallible>) -> Settle {
    match result {
        Ok(JobOutcome::Blocked) => Settle::Release,
        _ => Settle::Keep,
    }
}

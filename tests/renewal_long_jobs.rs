//! Claims that outlive long jobs: renewal keeps a running job's claim alive past its TTL, and a
//! lost claim is logged at error, reported, and either tolerated or aborts the job, as configured.
//! Against a real `redis-server`.

mod common;
mod faults_support;

use std::time::Duration;

use common::RedisServer;
use faults_support::{Dispatches, LogCapture, Outcome, command_calls, current_thread_runtime, key_of, timed_call};
use tokio::time::Instant;
use tower::Layer;
use tower_idempotency::{IdempotencyError, IdempotencyLayer, LostClaimPolicy, RedisStore};

const TTL: Duration = Duration::from_millis(500);
const RENEW_EVERY: Duration = Duration::from_millis(166); // about a third of the TTL
const JOB: Duration = Duration::from_secs(2);

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::builder(server.url())
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect to test redis")
}

async fn renewals_so_far(server: &RedisServer) -> u64 {
    let mut raw = common::raw_conn(server).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut raw)
        .await
        .expect("INFO");
    // Renewal runs the token-checked PEXPIRE script: EVALSHA (plus one EVAL-free reload).
    command_calls(&info, "evalsha")
}

#[tokio::test]
async fn renewal_keeps_a_claim_alive_through_a_job_four_times_longer_than_its_ttl() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::new(store(&server).await, key_of)
        .with_ttl(TTL)
        .with_renewal(RENEW_EVERY);
    let dispatches = Dispatches::default();
    let svc = layer.layer(dispatches.service_taking(JOB));
    let origin = Instant::now();
    let key = "octo/repo:7:abcdef1".to_owned();

    let long_job = tokio::spawn(timed_call(svc.clone(), key.clone(), origin));
    // Second triggers throughout the run, the last ones well past the original TTL.
    let mut seconds = Vec::new();
    for at in [300, 700, 1100, 1500, 1900] {
        tokio::time::sleep_until(origin + Duration::from_millis(at)).await;
        seconds.push(timed_call(svc.clone(), key.clone(), origin).await);
    }
    let job = long_job.await.expect("job task");
    let renewals = renewals_so_far(&server).await;
    eprintln!(
        "renewal: job took {:?} with TTL {TTL:?}; {} second triggers all {:?}; {renewals} renewals",
        job.took,
        seconds.len(),
        seconds.iter().map(|r| r.outcome.clone()).collect::<Vec<_>>()
    );

    assert_eq!(job.outcome, Outcome::Dispatched);
    assert!(job.took >= JOB, "the job ran for its full length");
    for r in &seconds {
        assert_eq!(
            r.outcome,
            Outcome::Duplicate,
            "a second trigger during the run must be a duplicate: {r:?}"
        );
    }
    assert_eq!(dispatches.of(&key), 1, "exactly one dispatch");
    // 2 s / 166 ms = 12 ticks; allow for scheduling, but renewal must really have been periodic.
    assert!(
        (8..=16).contains(&renewals),
        "expected about 12 renewals (every third of the TTL over 2 s), Redis saw {renewals}"
    );
    // After the job, the claim is kept (default classifier) and expires a TTL later.
    assert_eq!(
        timed_call(svc.clone(), key.clone(), origin).await.outcome,
        Outcome::Duplicate
    );
    tokio::time::sleep(TTL + Duration::from_millis(200)).await;
    assert_eq!(timed_call(svc, key.clone(), origin).await.outcome, Outcome::Dispatched);
}

/// The control for the test above: without renewal, the same job loses its claim after the TTL
/// and a second trigger dispatches the job again. If this ever stops failing over, the renewal
/// test above proves nothing.
#[tokio::test]
async fn without_renewal_a_job_longer_than_its_ttl_can_be_dispatched_twice() {
    let server = RedisServer::start();
    let layer = IdempotencyLayer::new(store(&server).await, key_of).with_ttl(TTL);
    let dispatches = Dispatches::default();
    let svc = layer.layer(dispatches.service_taking(JOB));
    let origin = Instant::now();
    let key = "octo/repo:7:abcdef1".to_owned();

    let long_job = tokio::spawn(timed_call(svc.clone(), key.clone(), origin));
    tokio::time::sleep(Duration::from_millis(900)).await;
    let second = tokio::spawn(timed_call(svc.clone(), key.clone(), origin));
    assert_eq!(long_job.await.unwrap().outcome, Outcome::Dispatched);
    assert_eq!(second.await.unwrap().outcome, Outcome::Dispatched);
    assert_eq!(dispatches.of(&key), 2);
}

struct LostRun {
    result: Outcome,
    took: Duration,
    lost_at: Duration,
    finished: usize,
    error_is_claim_lost: bool,
}

/// A 2 s job whose claim is taken over by someone else (another owner's token) 400 ms in.
fn run_with_lost_claim(
    policy: LostClaimPolicy,
    key: &str,
) -> (LostRun, LogCapture, Vec<sentry::protocol::Event<'static>>) {
    let logs = LogCapture::global();
    let mut run = None;
    let events = sentry::test::with_captured_events(|| {
        current_thread_runtime().block_on(async {
            let server = RedisServer::start();
            let layer = IdempotencyLayer::new(store(&server).await, key_of)
                .with_ttl(TTL)
                .with_renewal(RENEW_EVERY)
                .with_lost_claim_policy(policy);
            let dispatches = Dispatches::default();
            let svc = layer.layer(dispatches.service_taking(JOB));
            let key = key.to_owned();
            let start = Instant::now();
            let job = tokio::spawn({
                let (svc, key) = (svc.clone(), key.clone());
                async move { tower::ServiceExt::oneshot(svc, key).await }
            });
            tokio::time::sleep(Duration::from_millis(400)).await;
            // Someone else now owns the key (e.g. an operator, or a claim after a Redis failover).
            let mut raw = common::raw_conn(&server).await;
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg("someone-else")
                .query_async(&mut raw)
                .await
                .expect("take over the claim");
            let lost_at = start.elapsed();
            let result = job.await.expect("job task");
            let took = start.elapsed();
            run = Some(LostRun {
                error_is_claim_lost: matches!(result, Err(IdempotencyError::ClaimLost { .. })),
                result: Outcome::of(&result),
                took,
                lost_at,
                finished: dispatches.finished(),
            });
            // The new owner's claim is untouched: we never delete what is not ours.
            let holder: String = redis::cmd("GET").arg(&key).query_async(&mut raw).await.expect("GET");
            assert_eq!(holder, "someone-else");
        })
    });
    (run.expect("scenario ran"), logs, events)
}

fn assert_logged_and_reported(logs: &LogCapture, key: &str, events: &[sentry::protocol::Event<'static>]) {
    assert!(
        !logs.lines("ERROR", &format!("key={key}"), "claim lost").is_empty(),
        "a lost claim must be logged at error; logs:\n{}",
        logs.text()
    );
    let lost: Vec<_> = events
        .iter()
        .filter(|e| e.tags.get("idempotency_store_down").map(String::as_str) == Some("claim_lost"))
        .collect();
    assert_eq!(lost.len(), 1, "a lost claim must be reported once: {events:#?}");
    assert!(
        lost[0].message.as_deref().is_some_and(|m| m.contains(key)),
        "the report names the key: {:?}",
        lost[0].message
    );
}

#[test]
fn lost_claim_with_continue_policy_logs_reports_and_lets_the_job_finish() {
    let (run, logs, events) = run_with_lost_claim(LostClaimPolicy::Continue, "octo/repo:9:abcdef1");
    eprintln!(
        "lost claim, continue: job returned {:?} after {:?}",
        run.result, run.took
    );
    assert_eq!(
        run.result,
        Outcome::Dispatched,
        "the job finishes and its result is returned"
    );
    assert_eq!(run.finished, 1, "the inner call ran to completion");
    assert!(run.took >= JOB);
    assert_logged_and_reported(&logs, "octo/repo:9:abcdef1", &events);
}

#[test]
fn lost_claim_with_abort_policy_logs_reports_and_stops_the_job_within_one_renewal_tick() {
    let (run, logs, events) = run_with_lost_claim(LostClaimPolicy::Abort, "octo/repo:10:abcdef1");
    let detected = run.took - run.lost_at;
    eprintln!(
        "lost claim, abort: job returned {:?} {detected:?} after the takeover",
        run.result
    );
    assert!(
        run.error_is_claim_lost,
        "the caller gets ClaimLost, got {:?}",
        run.result
    );
    assert_eq!(run.finished, 0, "the inner future was dropped before it finished");
    assert!(
        detected <= RENEW_EVERY + Duration::from_millis(300),
        "the loss is noticed at the next renewal tick, not at the end of the job: {detected:?}"
    );
    assert_logged_and_reported(&logs, "octo/repo:10:abcdef1", &events);
}

/// A store error during renewal is not proof that the claim is lost: the job keeps running (even
/// with the abort policy) and renewal picks up again when Redis answers.
#[tokio::test]
async fn renewal_survives_a_brief_redis_freeze_without_aborting_the_job() {
    let server = RedisServer::start();
    let ttl = Duration::from_secs(1);
    let layer = IdempotencyLayer::new(store(&server).await, key_of)
        .with_ttl(ttl)
        .with_renewal(ttl / 3)
        .with_lost_claim_policy(LostClaimPolicy::Abort);
    let dispatches = Dispatches::default();
    let svc = layer.layer(dispatches.service_taking(JOB));
    let origin = Instant::now();
    let key = "octo/repo:11:abcdef1".to_owned();

    let job = tokio::spawn(timed_call(svc.clone(), key.clone(), origin));
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.freeze();
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.thaw();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = timed_call(svc.clone(), key.clone(), origin).await;
    let job = job.await.expect("job task");

    assert_eq!(
        job.outcome,
        Outcome::Dispatched,
        "a renewal timeout must not abort the job"
    );
    assert_eq!(dispatches.finished(), 1);
    assert_eq!(during.outcome, Outcome::Duplicate, "renewal resumed after the freeze");
    assert_eq!(dispatches.of(&key), 1);
}

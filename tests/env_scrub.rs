//! Regression pin: a process may scrub secrets such as `REDIS_URL` from its environment after
//! start. The store captures its configuration when it is built and must keep working —
//! including when it has to reconnect — without reading the environment again.
//! (Its own test binary: changing the environment is process-wide.)

mod common;

use std::time::Duration;

use common::RedisServer;
use tower_idempotency::RedisStore;
use tower_idempotency::store::{ClaimOutcome, ClaimToken, IdempotencyStore};

#[tokio::test]
async fn claims_keep_working_after_redis_url_is_removed_from_env() {
    let mut server = RedisServer::start();
    // SAFETY: this test binary has exactly one test, so no other thread reads the environment.
    unsafe { std::env::set_var("REDIS_URL", server.url()) };
    let url = std::env::var("REDIS_URL").unwrap();
    let store = RedisStore::connect(url).await.unwrap();
    // SAFETY: as above.
    unsafe { std::env::remove_var("REDIS_URL") };

    let ttl = Duration::from_secs(60);
    assert_eq!(
        store.claim("a", &ClaimToken::generate(), ttl).await.unwrap(),
        ClaimOutcome::Acquired
    );

    // Force a reconnect: the connection must be rebuilt from the captured configuration.
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match store.claim("b", &ClaimToken::generate(), ttl).await {
            Ok(outcome) => {
                assert_eq!(outcome, ClaimOutcome::Acquired);
                break;
            }
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "never reconnected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(std::env::var("REDIS_URL").is_err());
}

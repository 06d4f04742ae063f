//! The fault proxy itself, against a real `redis-server`: before other tests trust it to
//! inject a fault, check that it injects exactly that fault.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::RedisServer;
use common::fault_proxy::{FaultProxy, Mode};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;

fn upstream(server: &RedisServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], server.port()))
}

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?.get_multiplexed_async_connection().await
}

#[tokio::test]
async fn pass_forwards_both_ways_and_counts() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&server));
    let mut conn = connect(&proxy.url()).await.expect("connect through the proxy");
    let () = conn.set("k", "v").await.expect("SET through the proxy");
    let got: String = conn.get("k").await.expect("GET through the proxy");
    assert_eq!(got, "v");
    assert_eq!(server.cli(&["GET", "k"]), "v", "the SET reached the real server");
    assert_eq!(proxy.accepted(), 1);
    // At least SET and GET up, their two replies down.
    assert!(proxy.forwarded() >= 4, "forwarded {} chunks", proxy.forwarded());
    assert_eq!(proxy.resets(), 0);
}

#[tokio::test]
async fn lose_next_reply_applies_the_command_and_breaks_the_connection() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&server));
    let mut conn = connect(&proxy.url()).await.expect("connect");
    proxy.set_mode(Mode::LoseNextReply);
    let err = conn
        .set::<_, _, ()>("k", "v")
        .await
        .expect_err("the reply was lost, so the client must see an error");
    assert!(
        err.is_io_error() || err.is_connection_dropped(),
        "expected an IO error, got {err:?}"
    );
    assert_eq!(
        server.cli(&["GET", "k"]),
        "v",
        "the command landed although its reply was lost"
    );
    assert_eq!(proxy.replies_lost(), 1);
    assert_eq!(proxy.mode(), Mode::Pass, "one-shot: back to Pass once it fired");
    // A new connection works again.
    let mut conn = connect(&proxy.url()).await.expect("reconnect");
    let got: String = conn.get("k").await.expect("GET after the fault");
    assert_eq!(got, "v");
}

#[tokio::test]
async fn blackhole_makes_commands_hang_and_poisoned_connections_are_reset_after() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&server));
    let mut conn = connect(&proxy.url()).await.expect("connect");
    proxy.set_mode(Mode::Blackhole);
    let waited = tokio::time::timeout(Duration::from_millis(200), conn.set::<_, _, ()>("k", "v")).await;
    assert!(waited.is_err(), "a blackholed command must not be answered: {waited:?}");
    assert_eq!(
        server.cli(&["EXISTS", "k"]),
        "0",
        "a blackholed command must not reach Redis"
    );
    proxy.set_mode(Mode::Pass);
    // The connection that lost bytes is reset rather than left out of step.
    let after = tokio::time::timeout(Duration::from_secs(2), conn.get::<_, Option<String>>("k")).await;
    assert!(
        matches!(after, Ok(Err(_))),
        "the poisoned connection fails fast: {after:?}"
    );
    assert!(proxy.resets() >= 1);
    let mut fresh = connect(&proxy.url()).await.expect("connect after the blackhole");
    let got: Option<String> = fresh.get("k").await.expect("GET on a fresh connection");
    assert_eq!(got, None);
}

#[tokio::test]
async fn reset_fails_open_connections_and_new_ones_quickly() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&server));
    let mut conn = connect(&proxy.url()).await.expect("connect");
    let () = conn.set("k", "v").await.expect("SET");
    proxy.set_mode(Mode::Reset);
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(2), conn.get::<_, String>("k")).await;
    assert!(matches!(result, Ok(Err(_))), "expected an error, got {result:?}");
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(2), connect(&proxy.url())).await;
    assert!(
        matches!(result, Ok(Err(_))),
        "a new connection must be refused: {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "took {:?}",
        started.elapsed()
    );
    assert!(proxy.resets() >= 2);

    proxy.set_mode(Mode::Pass);
    let mut conn = connect(&proxy.url()).await.expect("connect after Reset ends");
    let got: String = conn.get("k").await.expect("GET");
    assert_eq!(got, "v");
}

#[tokio::test]
async fn delay_holds_each_direction() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&server));
    let mut conn = connect(&proxy.url()).await.expect("connect");
    proxy.set_mode(Mode::Delay(Duration::from_millis(60)));
    let started = Instant::now();
    let () = conn.set("k", "v").await.expect("a delayed SET still succeeds");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(120),
        "request and reply are each delayed: {took:?}"
    );
    assert!(took < Duration::from_millis(450), "{took:?}");
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(upstream(&server));
    let url = proxy.url();
    let mut conn = connect(&url).await.expect("connect");
    let () = conn.set("k", "v").await.expect("SET");
    drop(proxy);
    let result = tokio::time::timeout(Duration::from_secs(2), conn.get::<_, String>("k")).await;
    assert!(matches!(result, Ok(Err(_))), "expected an error, got {result:?}");
    let again = tokio::time::timeout(Duration::from_secs(2), connect(&url)).await;
    assert!(matches!(again, Ok(Err(_))), "nobody listens any more: {again:?}");
}

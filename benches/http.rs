//! HTTP benchmark: the payments route through `HttpIdempotencyLayer` vs the same route doing its
//! own single `SET NX` by hand.
//!
//! Starts its own `redis-server` on a free port and serves two axum apps on loopback:
//!
//! - `layer`: `POST /payments` through `HttpIdempotencyLayer` with
//!   `HeaderKey::idempotency_key().with_required(true)`, `Replay::new()` and `ProblemResponses`
//!   (as in `examples/payments_api.rs`); records are on (the default), so a payment costs the
//!   claim (`SET key <record> NX GET PX ttl`) and the completion of its record with the stored
//!   response (a second round trip), besides the handler's own `INCR`;
//! - `hand`: the same handler that first does its own `SET <key> 1 NX PX 60000` (409 when it
//!   was not set) — one round trip, no record, no replay — then the same work.
//!
//! Both use the same two multiplexed connections (the store's, for the claim or the hand-made
//! `SET`, and the app's, for `INCR`). Neither has `RunToCompletionLayer` (the example's layer
//! that detaches a handler from its client), so the two routes differ only by idempotency.
//!
//! Each app is driven by 64 (`--conc`) keep-alive HTTP/1.1 connections (hyper's client), one
//! request at a time per connection, a unique `Idempotency-Key` per request, for `--seconds`
//! (default 3) after a short warm-up; runs alternate (`layer, hand`, then `hand, layer`, …) for
//! `--rounds` (default 2) rounds and are summed. Client, servers and Redis share the machine.
//!
//! Prints one `run …` line per run, then
//! `HTTP c=64 layer=<req/s> hand=<req/s> ratio=<layer/hand> p99_layer_us=… p99_hand_us=…` and
//! `TARGET http layer/hand c=64 >= 0.85: <ratio> PASS|FAIL`.
//!
//! Run: `cargo bench --bench http [-- --seconds S --rounds R --conc C]`.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tower_idempotency::RedisStore;
use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, ProblemResponses, Replay};

use redis_server::RedisServer;

struct Args {
    seconds: f64,
    rounds: usize,
    conc: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 3.0,
        rounds: 2,
        conc: 64,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let (name, inline) = match argv[i].split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (argv[i].clone(), None),
        };
        if matches!(name.as_str(), "--seconds" | "--rounds" | "--conc") {
            let value = inline.or_else(|| {
                i += 1;
                argv.get(i).cloned()
            });
            let Some(v) = value else {
                fail(&format!("{name} needs a value"))
            };
            match name.as_str() {
                "--seconds" => match v.parse::<f64>() {
                    Ok(s) if s > 0.0 && s.is_finite() => args.seconds = s,
                    _ => fail(&format!("--seconds needs a positive number, got `{v}`")),
                },
                "--rounds" => match v.parse::<usize>() {
                    Ok(r) if r > 0 => args.rounds = r,
                    _ => fail(&format!("--rounds needs a positive integer, got `{v}`")),
                },
                _ => match v.parse::<usize>() {
                    Ok(c) if c > 0 => args.conc = c,
                    _ => fail(&format!("--conc needs a positive integer, got `{v}`")),
                },
            }
        }
        // cargo passes `--bench`; anything else unknown is ignored too.
        i += 1;
    }
    args
}

fn fail(msg: &str) -> ! {
    eprintln!("http: {msg}");
    std::process::exit(2)
}

// ---------------------------------------------------------------------------------------------
// The two apps

#[derive(Deserialize)]
struct NewPayment {
    amount: i64,
    currency: String,
}

#[derive(Serialize)]
struct Payment {
    id: String,
    amount: i64,
    currency: String,
}

#[derive(Clone)]
struct App {
    /// The app's own connection, for `INCR`.
    conn: redis::aio::ConnectionManager,
    /// The store's connection, for the hand-made `SET NX` (the layer claims on it too).
    claims: redis::aio::ConnectionManager,
    created: String,
}

/// The payment itself, as in `examples/payments_api.rs`.
async fn make_payment(app: &App, new: NewPayment) -> Result<(StatusCode, Json<Payment>), (StatusCode, String)> {
    let mut conn = app.conn.clone();
    let n: u64 = redis::cmd("INCR")
        .arg(&app.created)
        .query_async(&mut conn)
        .await
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot record the payment: {e}"),
            )
        })?;
    Ok((
        StatusCode::CREATED,
        Json(Payment {
            id: format!("pay_{n:08}_{:08x}", std::process::id()),
            amount: new.amount,
            currency: new.currency,
        }),
    ))
}

async fn create_payment(
    State(app): State<App>,
    Json(new): Json<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), (StatusCode, String)> {
    make_payment(&app, new).await
}

/// The same route with its own single `SET <key> 1 NX PX 60000`.
async fn create_payment_by_hand(
    State(app): State<App>,
    headers: HeaderMap,
    Json(new): Json<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), (StatusCode, String)> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .ok_or((StatusCode::BAD_REQUEST, "Idempotency-Key required".to_string()))?;
    let mut conn = app.claims.clone();
    let set: redis::Value = redis::cmd("SET")
        .arg(format!("hand:{key}"))
        .arg(1)
        .arg("NX")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("cannot claim: {e}")))?;
    if set != redis::Value::Okay {
        return Err((StatusCode::CONFLICT, "already seen".to_string()));
    }
    make_payment(&app, new).await
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("axum serve");
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// The client

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

struct Stats {
    secs: f64,
    ok: u64,
    other: u64,
    hist: Histogram<u64>,
}

impl Stats {
    fn empty() -> Self {
        Self {
            secs: 0.0,
            ok: 0,
            other: 0,
            hist: histogram(),
        }
    }

    fn merge(&mut self, o: Stats) {
        self.secs += o.secs;
        self.ok += o.ok;
        self.other += o.other;
        self.hist.add(&o.hist).expect("histograms share bounds");
    }

    fn req_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            (self.ok + self.other) as f64 / self.secs
        } else {
            0.0
        }
    }

    fn quantile_us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

const BODY: &[u8] = br#"{"amount":1250,"currency":"EUR"}"#;

/// One keep-alive connection sending requests one after another until `deadline`.
async fn connection(addr: SocketAddr, run: u64, conn_id: usize, start: Instant, deadline: Instant) -> Stats {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the app");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (mut sender, driver) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(driver);
    // All connections start together, once every one is open.
    tokio::time::sleep_until(start.into()).await;
    let mut stats = Stats::empty();
    let mut n: u64 = 0;
    loop {
        n += 1;
        let req = hyper::Request::post("/payments")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .header("idempotency-key", format!("r{run}-c{conn_id}-n{n}"))
            .body(Full::new(Bytes::from_static(BODY)))
            .expect("valid request");
        let sent = Instant::now();
        let resp = sender.send_request(req).await.expect("send the request");
        let status = resp.status();
        let _ = resp.into_body().collect().await.expect("read the response body");
        let now = Instant::now();
        let ns = u64::try_from(now.duration_since(sent).as_nanos()).unwrap_or(u64::MAX);
        stats.hist.saturating_record(ns.max(1));
        if status == hyper::StatusCode::CREATED {
            stats.ok += 1;
        } else {
            stats.other += 1;
        }
        if now >= deadline {
            return stats;
        }
    }
}

async fn drive(addr: SocketAddr, run: u64, c: usize, secs: f64) -> Stats {
    // Time to open the connections, outside the measurement.
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..c)
        .map(|i| tokio::spawn(connection(addr, run, i, start, deadline)))
        .collect();
    let mut stats = Stats::empty();
    for h in handles {
        stats.merge(h.await.expect("client task panicked"));
    }
    stats.secs = start.elapsed().as_secs_f64();
    stats
}

fn main() {
    let args = parse_args();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "# http: seconds={} rounds={} conc={} nproc={nproc} (client, both servers and redis-server on this machine)",
        args.seconds, args.rounds, args.conc
    );
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let store = RedisStore::builder(server.url())
            .connect()
            .await
            .expect("connect to the benchmark's redis-server");
        let conn = redis::Client::open(server.url())
            .expect("redis URL")
            .get_connection_manager()
            .await
            .expect("app connection");
        let app = App {
            conn,
            claims: store.connection(),
            created: "payments:created".into(),
        };
        let idempotency = HttpIdempotencyLayer::new(store, HeaderKey::idempotency_key().with_required(true))
            .with_namespace("payments:")
            .with_ttl(Duration::from_secs(60))
            .with_retention(Duration::from_secs(24 * 3600))
            .with_replay(Replay::new())
            .with_responses(ProblemResponses::new())
            .with_name("payments")
            .build()
            .expect("valid layer settings");
        let layer_app = Router::new()
            .route("/payments", post(create_payment).route_layer(idempotency))
            .with_state(app.clone());
        let hand_app = Router::new()
            .route("/payments", post(create_payment_by_hand))
            .with_state(app);
        let layer_addr = serve(layer_app).await;
        let hand_addr = serve(hand_app).await;

        let warmup = (args.seconds * 0.1).clamp(0.2, 0.5);
        let mut layer = Stats::empty();
        let mut hand = Stats::empty();
        let mut run = 0u64;
        for round in 0..args.rounds {
            let order = if round % 2 == 0 { ["layer", "hand"] } else { ["hand", "layer"] };
            for name in order {
                let addr = if name == "layer" { layer_addr } else { hand_addr };
                run += 1;
                let _ = drive(addr, run, args.conc, warmup).await;
                run += 1;
                let s = drive(addr, run, args.conc, args.seconds).await;
                println!(
                    "run round={round} app={name} c={} secs={:.2} req={} created={} other={} req_per_s={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1}",
                    args.conc,
                    s.secs,
                    s.ok + s.other,
                    s.ok,
                    s.other,
                    s.req_per_s(),
                    s.quantile_us(0.5),
                    s.quantile_us(0.99),
                    s.quantile_us(0.999),
                );
                if name == "layer" {
                    layer.merge(s);
                } else {
                    hand.merge(s);
                }
            }
        }
        let ratio = layer.req_per_s() / hand.req_per_s();
        println!(
            "HTTP c={} layer={:.0} hand={:.0} ratio={ratio:.3} p99_layer_us={:.1} p99_hand_us={:.1}",
            args.conc,
            layer.req_per_s(),
            hand.req_per_s(),
            layer.quantile_us(0.99),
            hand.quantile_us(0.99),
        );
        println!(
            "TARGET http layer/hand c={} >= 0.85: {ratio:.3} {}",
            args.conc,
            if ratio >= 0.85 { "PASS" } else { "FAIL" }
        );
        if layer.other + hand.other > 0 {
            println!(
                "# non-201 answers: layer={} hand={} (every key is unique: expected 0)",
                layer.other, hand.other
            );
        }
    });
    drop(rt);
    drop(server);
}

//! The reference for HTTP APIs keyed by `Idempotency-Key`: `POST /payments` with replay.
//!
//! ```text
//! cargo run --example payments_api -- [--listen 127.0.0.1:3001] [--redis URL] [--namespace payments:] [--handler-delay-ms 0]
//! ```
//!
//! - `POST /payments` with `{"amount": <int>, "currency": "<str>"}` and an `Idempotency-Key`
//!   header answers `201` with `{"id": "<new id>", "amount": …, "currency": …}`.
//! - A retry with the same key and body gets the **same** status and body, with
//!   `idempotency-replayed: true` — also from another process on the same Redis.
//! - Same key, different body → `422`; while the first is in flight → `409` with `Retry-After`;
//!   no key → `400`; all as `application/problem+json`.
//! - A handler that answers `5xx` (or `4xx`, e.g. a body that is not a payment) stores nothing:
//!   the retry runs it again.
//! - A client that disconnects does not cancel its payment: it runs to completion and its
//!   response is stored, so the retry gets it. Ctrl-C waits for payments in flight.
//! - Every payment created is counted in Redis (`INCR <namespace>created`), so a test can see
//!   that a replay created nothing. `GET /healthz` answers `200`.
//!
//! Redis: `--redis`, else `REDIS_URL` (read once, at start), else `redis://127.0.0.1:6379`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::RedisStore;
use tower_idempotency::http::{HeaderKey, HttpIdempotencyLayer, ProblemResponses, Replay};

struct Args {
    listen: SocketAddr,
    redis: String,
    namespace: String,
    handler_delay: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: ([127, 0, 0, 1], 3001).into(),
        redis: String::new(),
        namespace: "payments:".into(),
        handler_delay: Duration::ZERO,
    };
    let mut redis = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--redis" => redis = Some(value()?),
            "--namespace" => args.namespace = value()?,
            "--handler-delay-ms" => {
                let ms: u64 = value()?.parse().map_err(|e| format!("--handler-delay-ms: {e}"))?;
                args.handler_delay = Duration::from_millis(ms);
            }
            "-h" | "--help" => {
                return Err(
                    "usage: payments_api [--listen ADDR] [--redis URL] [--namespace NS] [--handler-delay-ms N]".into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    // The environment is read once, here.
    args.redis = redis
        .or_else(|| std::env::var("REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    Ok(args)
}

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
    conn: redis::aio::ConnectionManager,
    created: String,
    delay: Duration,
}

async fn create_payment(
    State(app): State<App>,
    Json(new): Json<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), (StatusCode, String)> {
    tokio::time::sleep(app.delay).await;
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
    let payment = Payment {
        id: format!("pay_{n:08}_{:08x}", std::process::id()),
        amount: new.amount,
        currency: new.currency,
    };
    tracing::info!(id = %payment.id, amount = payment.amount, currency = %payment.currency, "payment created");
    Ok((StatusCode::CREATED, Json(payment)))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = RedisStore::connect(args.redis.as_str()).await?;
    let conn = redis::Client::open(args.redis.as_str())?
        .get_connection_manager()
        .await?;
    let app = App {
        conn,
        created: format!("{}created", args.namespace),
        delay: args.handler_delay,
    };
    let idempotency = HttpIdempotencyLayer::new(store, HeaderKey::idempotency_key().with_required(true))
        .with_namespace(args.namespace.clone())
        .with_ttl(Duration::from_secs(60))
        .with_retention(Duration::from_secs(24 * 3600))
        .with_replay(Replay::new())
        .with_responses(ProblemResponses::new())
        .with_name("payments")
        // A payment whose client went away still completes in its own task (the default), and
        // its response is stored for the retry; at most 1024 run at once.
        .with_max_in_flight(1024)
        .build()?;
    let handlers = idempotency.handlers();
    let router = Router::new()
        .route("/payments", post(create_payment).route_layer(idempotency))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("payments_api listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Graceful shutdown: payments in flight finish before the process exits.
    if let Some(handlers) = handlers {
        handlers.wait().await;
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

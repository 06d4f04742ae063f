//! The reference webhook routers, GitHub and GitLab: receive deliveries, claim (repository, PR,
//! head SHA) in Redis through `HttpIdempotencyLayer`, and dispatch each review once by `XADD` to
//! a stream.
//!
//! Shared by `examples/github_webhook.rs` and `examples/gitlab_webhook.rs` (the binaries),
//! `examples/incident_replay.rs` (which runs the GitHub router in a child process) and the tests
//! (included with `#[path]`), so all of them run the same code. Self-contained: it needs the
//! crate with the `http` and `redis` features, `axum`, `tokio`, `redis`, `serde` and
//! `tracing-subscriber`.
//!
//! # Contract
//!
//! ```text
//! github_webhook [--listen ADDR] [--redis URL] [--namespace NS] [--ttl-secs N] [--stream NAME] [--capacity N]
//!                [--redis-cluster URL,URL,…]
//! gitlab_webhook (the same flags) [--detached-pipelines]
//! ```
//!
//! | flag | default |
//! |---|---|
//! | `--listen` | `127.0.0.1:3000` |
//! | `--redis` | `REDIS_URL` from the environment (read once at start), else `redis://127.0.0.1:6379` |
//! | `--namespace` | `github-dispatch:` / `gitlab-dispatch:` |
//! | `--ttl-secs` | `300` |
//! | `--stream` | `reviews` |
//! | `--capacity` | unlimited |
//! | `--redis-cluster URL,URL,…` | unset; when set, claims and the stream live in that Redis Cluster (feature `redis-cluster`) |
//! | `--detached-pipelines` (GitLab only) | off: merge-request pipelines pass through (see below) |
//!
//! The webhook secret comes from `GITHUB_WEBHOOK_SECRET` (GitHub) or `GITLAB_WEBHOOK_TOKEN`
//! (GitLab), read once at start. Unset: signatures are not checked, and a warning says so. Set but
//! **empty**: the router refuses to start (exit code 2, the message names the variable), since an
//! empty secret would let anyone sign deliveries.
//!
//! Dispatching events:
//! - GitHub: `check_suite` completed with conclusion `success`, `workflow_run` completed with
//!   conclusion `success` (automated triggers: one review per (repository, PR, head SHA)), and
//!   `pull_request` `review_requested` — a **human override**: a person's review request takes
//!   the key over even while the automated claim holds it and dispatches a fresh review of the
//!   same commit, once per delivery (`X-GitHub-Delivery`, scoped by `X-GitHub-Hook-ID`); after
//!   it, automated triggers for that commit are still duplicates. An override never uses up the
//!   automated dispatch: if it comes first, the automated trigger still dispatches once.
//! - GitLab: `Merge Request Hook` `open`, and `update` that pushed commits
//!   (`object_attributes.oldrev` present); `Pipeline Hook` of a merge-request pipeline with
//!   status `success` — with `--detached-pipelines` only. Without it, merge-request pipelines
//!   pass through: GitLab's pipeline hook does not say whether its SHA is the merge request's
//!   head or a merged-results / merge-train commit (see `GitLabDispatchKey`). Set it only for
//!   projects that run neither merged results pipelines nor merge trains.
//!
//! Every other event is ignored and takes no claim.
//!
//! | request | answer |
//! |---|---|
//! | `POST /webhooks/github` (`/webhooks/gitlab`), dispatching event, claim won | `XADD <stream> * project P pr N sha S event E delivery D`; `202` `{"status":"dispatched","key":"…"}` |
//! | … and the stream already holds `--capacity` entries | `429` `{"status":"blocked"}`; the claim is released. The length check and the `XADD` are one Lua script, so concurrent deliveries cannot overshoot the capacity |
//! | … and the stream cannot be written | `503` `{"status":"unavailable"}`; the claim is released unless the command may have landed |
//! | an event that dispatches nothing | `200` `{"status":"ignored"}` |
//! | a duplicate | `200` `{"status":"duplicate","key":"…"}`, header `idempotency-status: duplicate` |
//! | the claim store is unavailable (fail closed) | `503` `{"status":"unavailable"}`, `Retry-After` |
//! | malformed body, missing field, bad key, missing `X-GitHub-Event` / `X-Gitlab-Event` | `400` `{"error":"…"}` |
//! | a body that is not JSON by its `Content-Type` (GitHub's form-encoded deliveries) | `415` `{"error":"… set the webhook's content type to `application/json`"}` |
//! | body over 25 MB (a declared `Content-Length` is refused before reading) | `413` |
//! | missing, malformed or wrong `X-Hub-Signature-256` / `X-Gitlab-Token` (secret set) | `403`, before the body is read when the header alone shows it |
//! | `GET /healthz` | `200` `{"status":"ok"}` |
//! | `GET /metrics` | `200`, Prometheus text format: `idempotency_outcomes{layer,outcome}`, `idempotency_store_duration{layer,operation,result}`, `idempotency_hold_duration{layer}`, `idempotency_background_pending{layer}` (see `tower_idempotency::observe`) |
//!
//! Logs go through `tracing-subscriber` with an env filter (`RUST_LOG`, default `info`).
#![allow(dead_code)]

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header::RETRY_AFTER};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use redis::aio::ConnectionManager;
use serde::Serialize;
use tokio::net::TcpListener;
use tower_idempotency::http::{
    Blocked, DispatchRules, DispatchTarget, GitHubDispatchKey, GitHubSignature, GitLabDispatchKey, GitLabToken,
    HttpIdempotencyLayer, JsonResponses,
};
use tower_idempotency::store::IdempotencyStore;
use tower_idempotency::{IdempotencyKey, MemoryStore, RedisStore, StoreError};

/// `--listen` default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
/// `--redis` default when `REDIS_URL` is unset.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// `--namespace` default.
pub const DEFAULT_NAMESPACE: &str = "github-dispatch:";
/// `--ttl-secs` default.
pub const DEFAULT_TTL_SECS: u64 = 300;
/// `--stream` default.
pub const DEFAULT_STREAM: &str = "reviews";
/// The environment variable `--redis` defaults to.
pub const REDIS_URL_ENV: &str = "REDIS_URL";
/// The environment variable holding the webhook secret.
pub const SECRET_ENV: &str = "GITHUB_WEBHOOK_SECRET";
/// Where deliveries are posted.
pub const WEBHOOK_PATH: &str = "/webhooks/github";
/// `--namespace` default of the GitLab router.
pub const GITLAB_DEFAULT_NAMESPACE: &str = "gitlab-dispatch:";
/// The environment variable holding the GitLab webhook's secret token.
pub const GITLAB_SECRET_ENV: &str = "GITLAB_WEBHOOK_TOKEN";
/// Where GitLab deliveries are posted.
pub const GITLAB_WEBHOOK_PATH: &str = "/webhooks/gitlab";

/// Which forge the router receives deliveries from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// GitHub: `X-GitHub-Event`, `X-Hub-Signature-256`.
    GitHub,
    /// GitLab: `X-Gitlab-Event`, `X-Gitlab-Token`.
    GitLab,
}

impl Provider {
    /// The program's name.
    pub fn program(self) -> &'static str {
        match self {
            Provider::GitHub => "github_webhook",
            Provider::GitLab => "gitlab_webhook",
        }
    }

    /// The environment variable holding the secret.
    pub fn secret_env(self) -> &'static str {
        match self {
            Provider::GitHub => SECRET_ENV,
            Provider::GitLab => GITLAB_SECRET_ENV,
        }
    }

    /// Where deliveries are posted.
    pub fn webhook_path(self) -> &'static str {
        match self {
            Provider::GitHub => WEBHOOK_PATH,
            Provider::GitLab => GITLAB_WEBHOOK_PATH,
        }
    }

    /// The `--namespace` default.
    pub fn default_namespace(self) -> &'static str {
        match self {
            Provider::GitHub => DEFAULT_NAMESPACE,
            Provider::GitLab => GITLAB_DEFAULT_NAMESPACE,
        }
    }

    /// The usage text.
    pub fn usage(self) -> String {
        match self {
            Provider::GitHub => USAGE.to_owned(),
            Provider::GitLab => GITLAB_USAGE.to_owned(),
        }
    }
}
/// The health check.
pub const HEALTH_PATH: &str = "/healthz";

/// The usage text.
pub const USAGE: &str = "\
usage: github_webhook [--listen ADDR] [--redis URL] [--namespace NS] [--ttl-secs N] [--stream NAME] [--capacity N]

  --listen ADDR     address to listen on (default 127.0.0.1:3000)
  --redis URL       Redis for claims and the stream (default: $REDIS_URL, else redis://127.0.0.1:6379)
  --namespace NS    prefix of claim keys (default github-dispatch:)
  --ttl-secs N      claim lifetime in seconds (default 300)
  --stream NAME     stream reviews are dispatched to (default reviews)
  --capacity N      answer 429 and release the claim when the stream holds N entries (default unlimited)
  --redis-cluster URL,URL,...
                    claims and the stream in a Redis Cluster (seed nodes) instead of --redis;
                    needs the redis-cluster feature

environment: GITHUB_WEBHOOK_SECRET (signatures are not checked when unset; empty: refused), REDIS_URL, RUST_LOG";

/// The GitLab router's usage text.
pub const GITLAB_USAGE: &str = "\
usage: gitlab_webhook [--listen ADDR] [--redis URL] [--namespace NS] [--ttl-secs N] [--stream NAME] [--capacity N]
                      [--detached-pipelines]

  --listen ADDR     address to listen on (default 127.0.0.1:3000)
  --redis URL       Redis for claims and the stream (default: $REDIS_URL, else redis://127.0.0.1:6379)
  --namespace NS    prefix of claim keys (default gitlab-dispatch:)
  --ttl-secs N      claim lifetime in seconds (default 300)
  --stream NAME     stream reviews are dispatched to (default reviews)
  --capacity N      answer 429 and release the claim when the stream holds N entries (default unlimited)
  --redis-cluster URL,URL,...
                    claims and the stream in a Redis Cluster (seed nodes) instead of --redis;
                    needs the redis-cluster feature
  --detached-pipelines
                    dispatch merge-request pipelines that succeeded, keyed on their SHA; only for
                    projects that run neither merged results pipelines nor merge trains

environment: GITLAB_WEBHOOK_TOKEN (tokens are not checked when unset; empty: refused), REDIS_URL, RUST_LOG";

/// Everything the router needs, decided once at start.
#[derive(Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// GitHub or GitLab.
    pub provider: Provider,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Redis for claims and for the review stream.
    pub redis_url: String,
    /// Prefix of claim keys.
    pub namespace: String,
    /// Claim lifetime.
    pub ttl: Duration,
    /// The review stream.
    pub stream: String,
    /// `XLEN` at which dispatches are blocked; `None`: unlimited.
    pub capacity: Option<u64>,
    /// The webhook secret; `None`: signatures are not checked.
    pub secret: Option<Vec<u8>>,
    /// Seed nodes of a Redis Cluster; when set, claims and the stream live there, not at
    /// `redis_url`.
    pub redis_cluster: Option<Vec<String>>,
    /// GitLab only: key merge-request pipelines on their SHA (the project runs neither merged
    /// results pipelines nor merge trains).
    pub detached_pipelines: bool,
}

impl fmt::Debug for RouterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterConfig")
            .field("provider", &self.provider)
            .field("listen", &self.listen)
            .field("redis_url", &self.redis_url)
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("stream", &self.stream)
            .field("capacity", &self.capacity)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("redis_cluster", &self.redis_cluster)
            .field("detached_pipelines", &self.detached_pipelines)
            .finish()
    }
}

/// Why the command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `-h` / `--help` was given.
    #[error("help requested")]
    Help,
    /// A flag that takes a value had none.
    #[error("`{0}` needs a value")]
    MissingValue(String),
    /// A flag's value could not be used.
    #[error("invalid value `{value}` for `{flag}`: {reason}")]
    InvalidValue {
        /// The flag.
        flag: String,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// An argument that is not a known flag.
    #[error("unknown argument `{0}`")]
    UnknownArgument(String),
    /// The secret's environment variable is set but empty.
    #[error(
        "{0} is set but empty: an empty secret would let anyone sign deliveries; set it to the webhook's secret, or unset it to run without signature checks"
    )]
    EmptySecret(&'static str),
}

/// Why the router could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The Redis URL is unusable.
    #[error("cannot use Redis at `{url}`")]
    Redis {
        /// The URL.
        url: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Binding or serving failed.
    #[error("cannot serve on {addr}")]
    Serve {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl RouterConfig {
    /// The GitHub router's defaults, with Redis at `redis_url` and no secret.
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self::for_provider(Provider::GitHub, redis_url)
    }

    /// The GitLab router's defaults, with Redis at `redis_url` and no token.
    pub fn gitlab(redis_url: impl Into<String>) -> Self {
        Self::for_provider(Provider::GitLab, redis_url)
    }

    /// `provider`'s defaults, with Redis at `redis_url` and no secret.
    pub fn for_provider(provider: Provider, redis_url: impl Into<String>) -> Self {
        RouterConfig {
            provider,
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            redis_url: redis_url.into(),
            namespace: provider.default_namespace().to_owned(),
            ttl: Duration::from_secs(DEFAULT_TTL_SECS),
            stream: DEFAULT_STREAM.to_owned(),
            capacity: None,
            secret: None,
            redis_cluster: None,
            detached_pipelines: false,
        }
    }

    /// The GitHub router's configuration for `args` (without the program name). See
    /// [`parse_for`](Self::parse_for).
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        redis_url_env: Option<String>,
        secret_env: Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::parse_for(Provider::GitHub, args, redis_url_env, secret_env)
    }

    /// `provider`'s configuration for `args` (without the program name). `redis_url_env` and
    /// `secret_env` are the values of `REDIS_URL` and of the secret's variable
    /// (`GITHUB_WEBHOOK_SECRET`, `GITLAB_WEBHOOK_TOKEN`), read once by the caller. An empty
    /// `REDIS_URL` counts as unset; an empty secret is refused ([`ConfigError::EmptySecret`]).
    pub fn parse_for(
        provider: Provider,
        args: impl IntoIterator<Item = String>,
        redis_url_env: Option<String>,
        secret_env: Option<String>,
    ) -> Result<Self, ConfigError> {
        let redis_url = redis_url_env
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned());
        let mut cfg = RouterConfig::for_provider(provider, redis_url);
        cfg.secret = match secret_env {
            Some(secret) if secret.is_empty() => return Err(ConfigError::EmptySecret(provider.secret_env())),
            other => other.map(String::into_bytes),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                return Err(ConfigError::Help);
            }
            if arg == "--detached-pipelines" && provider == Provider::GitLab {
                cfg.detached_pipelines = true;
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
                _ => (arg.clone(), None),
            };
            if !matches!(
                flag.as_str(),
                "--listen" | "--redis" | "--namespace" | "--ttl-secs" | "--stream" | "--capacity" | "--redis-cluster"
            ) {
                return Err(ConfigError::UnknownArgument(arg));
            }
            let value = match inline {
                Some(value) => value,
                None => args.next().ok_or_else(|| ConfigError::MissingValue(flag.clone()))?,
            };
            match flag.as_str() {
                "--listen" => cfg.listen = parse_value(&flag, &value)?,
                "--redis" => cfg.redis_url = non_empty(&flag, value)?,
                "--namespace" => cfg.namespace = value,
                "--ttl-secs" => {
                    let secs: u64 = parse_value(&flag, &value)?;
                    if secs == 0 {
                        return Err(invalid(&flag, &value, "the TTL must be at least 1 second"));
                    }
                    cfg.ttl = Duration::from_secs(secs);
                }
                "--stream" => cfg.stream = non_empty(&flag, value)?,
                "--capacity" => cfg.capacity = Some(parse_value(&flag, &value)?),
                "--redis-cluster" => {
                    let nodes: Vec<String> = value
                        .split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(String::from)
                        .collect();
                    if nodes.is_empty() {
                        return Err(invalid(&flag, &value, "expected one or more comma-separated node URLs"));
                    }
                    if !cfg!(feature = "redis-cluster") {
                        return Err(invalid(
                            &flag,
                            &value,
                            "this build lacks the redis-cluster feature; rebuild with `--features redis-cluster`",
                        ));
                    }
                    cfg.redis_cluster = Some(nodes);
                }
                _ => return Err(ConfigError::UnknownArgument(arg)),
            }
        }
        Ok(cfg)
    }

    /// The configuration of this process: its arguments, `REDIS_URL` and the secret's variable,
    /// each read once, now.
    pub fn from_process(provider: Provider) -> Result<Self, ConfigError> {
        let redis_url = std::env::var(REDIS_URL_ENV).ok();
        let secret = std::env::var(provider.secret_env()).ok();
        Self::parse_for(provider, std::env::args().skip(1), redis_url, secret)
    }
}

fn invalid(flag: &str, value: &str, reason: impl fmt::Display) -> ConfigError {
    ConfigError::InvalidValue {
        flag: flag.to_owned(),
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

fn parse_value<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    value.parse().map_err(|e| invalid(flag, value, e))
}

fn non_empty(flag: &str, value: String) -> Result<String, ConfigError> {
    if value.is_empty() {
        Err(invalid(flag, &value, "must not be empty"))
    } else {
        Ok(value)
    }
}

/// The GitHub events that dispatch a review; every other event is ignored and takes no claim.
pub fn dispatch_rules() -> DispatchRules {
    DispatchRules::new()
        .allow("check_suite", Some("completed"), Some("success"))
        .allow("workflow_run", Some("completed"), Some("success"))
        .allow_override("pull_request", Some("review_requested"), None)
}

/// The GitLab events that dispatch a review: a merge request opened, or updated with new
/// commits; a merge-request pipeline that succeeded (keyed only with `--detached-pipelines`).
pub fn gitlab_dispatch_rules() -> DispatchRules {
    DispatchRules::new()
        .allow("merge_request", Some("open"), None)
        .allow("merge_request", Some("update"), Some("new_commits"))
        .allow("pipeline", None, Some("success"))
}

/// Dispatches a review when the stream holds fewer than the capacity, in one step: a length
/// check followed by a separate `XADD` lets concurrent deliveries all pass the check.
///
/// KEYS[1]: the review stream. ARGV[1]: the capacity (`-1`: unlimited). ARGV[2..]: the entry's
/// field/value pairs. Returns the new entry's id, or `false` (nil) when the stream is full.
const DISPATCH_SCRIPT: &str = r"
local capacity = tonumber(ARGV[1])
if capacity >= 0 and redis.call('XLEN', KEYS[1]) >= capacity then
  return false
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
";

/// What the webhook handler needs.
#[derive(Clone)]
struct Dispatcher {
    conn: StreamConn,
    stream: Arc<str>,
    capacity: Option<u64>,
    script: Arc<redis::Script>,
}

/// The JSON the router answers with; fields in this order.
#[derive(Serialize)]
struct Reply<'a> {
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
}

fn reply(status: StatusCode, word: &str, key: Option<&str>) -> Response {
    (status, Json(Reply { status: word, key })).into_response()
}

/// The connection the review stream is written on: one Redis, or a cluster.
#[derive(Clone)]
pub enum StreamConn {
    /// A single Redis (multiplexed, reconnecting).
    Single(ConnectionManager),
    /// A Redis Cluster.
    #[cfg(feature = "redis-cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl From<ConnectionManager> for StreamConn {
    fn from(conn: ConnectionManager) -> Self {
        StreamConn::Single(conn)
    }
}

#[cfg(feature = "redis-cluster")]
impl From<redis::cluster_async::ClusterConnection> for StreamConn {
    fn from(conn: redis::cluster_async::ClusterConnection) -> Self {
        StreamConn::Cluster(conn)
    }
}

impl redis::aio::ConnectionLike for StreamConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            StreamConn::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "redis-cluster")]
            StreamConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            StreamConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "redis-cluster")]
            StreamConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            StreamConn::Single(c) => c.get_db(),
            #[cfg(feature = "redis-cluster")]
            StreamConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The router for `cfg`, with claims in Redis at `cfg.redis_url` (or in the cluster of
/// `cfg.redis_cluster`).
///
/// A single Redis is connected lazily: the router starts while Redis is down and answers `503`
/// until it is back. A cluster is connected at start, since the client needs its slot map.
pub async fn build(cfg: &RouterConfig) -> Result<Router, RouterError> {
    #[cfg(feature = "redis-cluster")]
    if let Some(nodes) = &cfg.redis_cluster {
        let store = RedisStore::cluster_builder(nodes.iter().map(String::as_str))
            .connect()
            .await
            .map_err(|source| RouterError::Redis {
                url: nodes.join(","),
                source,
            })?;
        let conn = store.connection();
        return Ok(build_with_store(cfg, store, conn));
    }
    let store = RedisStore::builder(cfg.redis_url.as_str())
        .connect_lazy()
        .map_err(|source| RouterError::Redis {
            url: cfg.redis_url.clone(),
            source,
        })?;
    let conn = store.connection();
    Ok(build_with_store(cfg, store, conn))
}

/// The router for `cfg` with claims in `store` and the review stream on `conn`.
///
/// `cfg.secret` is normally non-empty ([`RouterConfig::parse_for`] refuses an empty one); an
/// empty secret set directly makes the verifier refuse every delivery (fail closed).
pub fn build_with_store<St: IdempotencyStore>(cfg: &RouterConfig, store: St, conn: impl Into<StreamConn>) -> Router {
    let path = cfg.provider.webhook_path();
    if cfg.secret.is_none() {
        tracing::warn!(
            variable = cfg.provider.secret_env(),
            path,
            "webhook secret is not set: deliveries are NOT authenticated, and anyone who can reach the webhook path can claim keys"
        );
    }
    let dispatcher = Dispatcher {
        conn: conn.into(),
        stream: Arc::from(cfg.stream.as_str()),
        capacity: cfg.capacity,
        script: Arc::new(redis::Script::new(DISPATCH_SCRIPT)),
    };
    let route = post(dispatch);
    // Installed before the layer wraps the route, so its metrics are registered with it.
    let metrics = prometheus();
    let router = match cfg.provider {
        Provider::GitHub => Router::new().route(path, route).route_layer(
            HttpIdempotencyLayer::new(store, GitHubDispatchKey::new().with_filter(dispatch_rules()))
                .with_verifier(cfg.secret.as_ref().map(GitHubSignature::new))
                .with_responses(JsonResponses::webhook())
                .with_namespace(cfg.namespace.as_str())
                .with_name("github-webhook")
                .with_ttl(cfg.ttl),
        ),
        Provider::GitLab => Router::new().route(path, route).route_layer(
            HttpIdempotencyLayer::new(
                store,
                GitLabDispatchKey::new()
                    .with_filter(gitlab_dispatch_rules())
                    .with_detached_pipelines(cfg.detached_pipelines),
            )
            .with_verifier(cfg.secret.as_ref().map(GitLabToken::new))
            .with_responses(JsonResponses::webhook())
            .with_namespace(cfg.namespace.as_str())
            .with_name("gitlab-webhook")
            .with_ttl(cfg.ttl),
        ),
    };
    router
        .route(HEALTH_PATH, get(health))
        .route(
            METRICS_PATH,
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics {
                        Some(handle) => (
                            StatusCode::OK,
                            [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            handle.render(),
                        )
                            .into_response(),
                        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    }
                }
            }),
        )
        .with_state(dispatcher)
}

/// Where the router serves its metrics, in Prometheus text format.
pub const METRICS_PATH: &str = "/metrics";

/// The process's Prometheus recorder, installed on first use; `None` when another recorder was
/// installed first (then `/metrics` answers `503`).
fn prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(
            || match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
                Ok(handle) => {
                    tower_idempotency::observe::describe_metrics();
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(error = %error, "no Prometheus recorder: /metrics is unavailable");
                    None
                }
            },
        )
        .clone()
}

/// The router `examples/incident_replay.rs` runs: defaults except `namespace` and `stream`, no
/// signature check; with `memory_store`, claims live in a per-process map (what the incident
/// had) while the stream is still in Redis.
pub async fn replay_router(
    redis_url: &str,
    namespace: &str,
    stream: &str,
    memory_store: bool,
) -> Result<Router, RouterError> {
    let mut cfg = RouterConfig::new(redis_url);
    cfg.namespace = namespace.to_owned();
    cfg.stream = stream.to_owned();
    if !memory_store {
        return build(&cfg).await;
    }
    let store = RedisStore::builder(redis_url)
        .connect_lazy()
        .map_err(|source| RouterError::Redis {
            url: redis_url.to_owned(),
            source,
        })?;
    Ok(build_with_store(&cfg, MemoryStore::new(), store.connection()))
}

async fn health() -> Response {
    reply(StatusCode::OK, "ok", None)
}

async fn dispatch(
    State(dispatcher): State<Dispatcher>,
    key: Option<Extension<IdempotencyKey>>,
    target: Option<Extension<DispatchTarget>>,
) -> Response {
    // The layer put both here only for a dispatching event whose claim we won.
    let (Some(Extension(key)), Some(Extension(target))) = (key, target) else {
        return reply(StatusCode::OK, "ignored", None);
    };
    let mut conn = dispatcher.conn.clone();
    // The capacity check and the XADD run as one script: checked separately, concurrent
    // deliveries would all see room and all be added.
    let capacity = dispatcher.capacity.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX));
    let added: Result<Option<String>, _> = dispatcher
        .script
        .key(&*dispatcher.stream)
        .arg(capacity)
        .arg("project")
        .arg(&target.project)
        .arg("pr")
        .arg(target.pull_request)
        .arg("sha")
        .arg(&target.head_sha)
        .arg("event")
        .arg(&target.event)
        .arg("delivery")
        .arg(target.delivery.as_deref().unwrap_or_default())
        .invoke_async(&mut conn)
        .await;
    match added {
        Ok(Some(id)) => {
            tracing::info!(key = %key, outcome = "dispatched", stream = %dispatcher.stream, id, "review dispatched");
            reply(StatusCode::ACCEPTED, "dispatched", Some(key.as_str()))
        }
        Ok(None) => {
            tracing::info!(key = %key, outcome = "blocked", capacity, stream = %dispatcher.stream, "stream at capacity; claim released");
            reply(StatusCode::TOO_MANY_REQUESTS, "blocked", None)
        }
        Err(e) => stream_unavailable(&key, "dispatch script (XLEN + XADD)", &e),
    }
}

/// `503`. The claim is released (the response is marked [`Blocked`]) when the command surely did
/// not run, so a redelivery can dispatch; when it may have landed (a timeout, a connection cut
/// mid-flight), the claim is kept: a second dispatch is the failure this router exists to prevent.
fn stream_unavailable(key: &IdempotencyKey, command: &str, error: &redis::RedisError) -> Response {
    let may_have_applied = (error.is_io_error() || error.is_timeout()) && !error.is_connection_refusal();
    tracing::error!(key = %key, outcome = "stream_unavailable", command, error = %error, may_have_applied, "cannot write the review stream");
    let mut response = reply(StatusCode::SERVICE_UNAVAILABLE, "unavailable", None);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("5"));
    if !may_have_applied {
        response.extensions_mut().insert(Blocked);
    }
    response
}

/// Binds `cfg.listen`, prints the address, and serves until Ctrl-C (or SIGTERM).
pub async fn serve(cfg: RouterConfig) -> Result<(), RouterError> {
    let serve_error = |source| RouterError::Serve {
        addr: cfg.listen.to_string(),
        source,
    };
    let listener = TcpListener::bind(cfg.listen).await.map_err(serve_error)?;
    let addr = listener.local_addr().map_err(serve_error)?;
    let router = build(&cfg).await?;
    tracing::info!(%addr, program = cfg.provider.program(), redis = %cfg.redis_url, namespace = %cfg.namespace, stream = %cfg.stream, capacity = ?cfg.capacity, ttl_secs = cfg.ttl.as_secs(), "webhook router listening");
    println!("listening on http://{addr}");
    serve_on(listener, router, shutdown_signal()).await.map_err(serve_error)
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve_on(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Completes on Ctrl-C, or SIGTERM on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Logs through `tracing-subscriber`, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Already initialised (e.g. by a test harness): keep that one.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

/// The whole program: configuration from this process, logging, serve.
pub async fn run(provider: Provider) -> ExitCode {
    let redis_url = std::env::var(REDIS_URL_ENV).ok();
    let secret = std::env::var(provider.secret_env()).ok();
    run_with(provider, std::env::args().skip(1), redis_url, secret).await
}

/// The program for these arguments and environment values: `2` (with the message on stderr) for
/// a configuration it refuses, `1` when it cannot serve, `0` after a clean shutdown.
pub async fn run_with(
    provider: Provider,
    args: impl IntoIterator<Item = String>,
    redis_url_env: Option<String>,
    secret_env: Option<String>,
) -> ExitCode {
    let cfg = match RouterConfig::parse_for(provider, args, redis_url_env, secret_env) {
        Ok(cfg) => cfg,
        Err(ConfigError::Help) => {
            println!("{}", provider.usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{}", provider.usage());
            return ExitCode::from(2);
        }
    };
    init_tracing();
    match serve(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(&format!(": {s}"));
                source = s.source();
            }
            tracing::error!(error = %message, program = provider.program(), "webhook router stopped");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

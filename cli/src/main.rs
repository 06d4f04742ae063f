//! `tower-idempotency`: look at and free the claims `tower-idempotency` keeps in Redis.
//!
//! ```text
//! tower-idempotency list   [--limit N]                       claims under the namespace
//! tower-idempotency show    KEY                              one claim
//! tower-idempotency release KEY [--why TEXT] [--who NAME]    delete a claim, whoever holds it
//! tower-idempotency wedged --time-left-over-ms N [--limit N] claims that will not free themselves soon
//! ```
//!
//! Every command takes `--redis URL` (default: `$REDIS_URL`, else `redis://127.0.0.1:6379`) or
//! `--redis-cluster URL,URL,…`, `--namespace NS` (the layer's namespace; `KEY` is given without
//! it) and `--json` (one JSON object per line). Exit status: 0 success, 1 the key does not exist,
//! 2 bad usage, Redis could not be reached or answered with an error, or `release` of a key that
//! is not a claim.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tower_idempotency::RedisStore;
use tower_idempotency::StoreError;
use tower_idempotency::store::{KeyInfo, KeyState, ScanKeyspace, redact_password};

/// The default when neither `--redis`, `--redis-cluster` nor `REDIS_URL` is given.
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Exit status when the key does not exist.
const EXIT_NO_SUCH_KEY: u8 = 1;
/// Exit status for bad usage (also clap's) and for a Redis that cannot be reached or errs.
const EXIT_FAILURE: u8 = 2;

/// Inspect, list and force-release tower-idempotency claims in Redis.
///
/// Exit status: 0 success, 1 the key does not exist, 2 bad usage or Redis unreachable.
#[derive(Debug, Parser)]
#[command(name = "tower-idempotency", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes, before or after its name.
#[derive(Debug, Args)]
struct Global {
    /// Redis URL (`redis://`, `rediss://`, `unix://`). Default: $REDIS_URL, else redis://127.0.0.1:6379.
    #[arg(long, global = true, value_name = "URL", conflicts_with = "redis_cluster")]
    redis: Option<String>,

    /// Redis Cluster node URLs, comma-separated (any subset of the primaries).
    #[arg(long, global = true, value_name = "URL,…", value_delimiter = ',')]
    redis_cluster: Option<Vec<String>>,

    /// The layer's key namespace (`IdempotencyLayer::with_namespace`); KEY arguments are given
    /// without it. Default: none.
    #[arg(
        long,
        global = true,
        value_name = "NS",
        default_value = "",
        hide_default_value = true
    )]
    namespace: String,

    /// One JSON object per line instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Bound on connecting and on each Redis call, in milliseconds.
    #[arg(long, global = true, value_name = "MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    timeout_ms: u64,

    #[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
    #[command(flatten)]
    tls: TlsArgs,
}

/// Certificates for `rediss://` URLs (built with `tls-rustls` or `tls-native-tls`).
#[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
#[derive(Debug, Args)]
struct TlsArgs {
    /// PEM file of the CA to trust for the server's certificate, instead of the system's roots.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca_cert: Option<std::path::PathBuf>,

    /// PEM client certificate, for servers that require one (with --tls-key).
    #[arg(long, global = true, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, global = true, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// The certificate files' contents.
#[derive(Default)]
#[cfg_attr(not(any(feature = "tls-rustls", feature = "tls-native-tls")), allow(dead_code))]
struct TlsFiles {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

#[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
fn read_tls_files(global: &Global) -> Result<TlsFiles, String> {
    let args = &global.tls;
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
    };
    let ca = args
        .tls_ca_cert
        .as_deref()
        .map(|p| read("--tls-ca-cert", p))
        .transpose()?;
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((read("--tls-cert", cert)?, read("--tls-key", key)?)),
        _ => None,
    };
    Ok(TlsFiles { ca, identity })
}

#[cfg(not(any(feature = "tls-rustls", feature = "tls-native-tls")))]
fn read_tls_files(_global: &Global) -> Result<TlsFiles, String> {
    Ok(TlsFiles::default())
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List claims under the namespace (SCAN, bounded by --limit; every primary on a cluster).
    List {
        /// Stop after this many keys.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show one claim: state, owner, time left. Exit 1 if it does not exist.
    Show {
        /// The key, without the namespace.
        key: String,
    },
    /// Delete a claim whoever holds it, so the next trigger dispatches. Logged at warn with who
    /// and why. Exit 1 if it does not exist. Only for claims whose job you know is dead.
    Release {
        /// The key, without the namespace.
        key: String,
        /// Why the claim is released (logged). Say it: the log is how the next person learns
        /// why a job may have run twice.
        #[arg(long, default_value = "not given")]
        why: String,
        /// Who releases it (logged). Default: $USER, else `unknown`.
        #[arg(long, env = "USER", default_value = "unknown")]
        who: String,
    },
    /// Claims that will not free themselves soon: no expiry, or more time left than the
    /// threshold (pass the longest TTL your layers use). A claim's age is not stored.
    Wedged {
        /// Report claims with more than this many milliseconds left.
        #[arg(long, value_name = "MS")]
        time_left_over_ms: u64,
        /// Look at no more than this many keys.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,redis=error")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let timeout = Duration::from_millis(cli.global.timeout_ms);
    #[allow(unused_variables)]
    let tls = match read_tls_files(&cli.global) {
        Ok(tls) => tls,
        Err(message) => return fail(&message),
    };
    match &cli.global.redis_cluster {
        Some(nodes) => {
            let shown: Vec<String> = nodes.iter().map(|n| redact_password(n)).collect();
            #[allow(unused_mut)]
            let mut builder = RedisStore::cluster_builder(nodes.iter().cloned()).timeout(timeout);
            #[cfg(feature = "tls-rustls")]
            {
                if let Some(ca) = tls.ca.clone() {
                    builder = builder.tls_root_certificate(ca);
                }
                if let Some((cert, key)) = tls.identity.clone() {
                    builder = builder.tls_client_certificate(cert, key);
                }
            }
            #[cfg(all(feature = "tls-native-tls", not(feature = "tls-rustls")))]
            if tls.ca.is_some() || tls.identity.is_some() {
                return fail("--tls-ca-cert and --tls-cert with --redis-cluster need the tls-rustls feature");
            }
            match builder.connect().await {
                Ok(store) => execute(&store, &cli).await,
                Err(e) => connect_failed(&shown.join(","), &e),
            }
        }
        None => {
            let url = cli
                .global
                .redis
                .clone()
                .or_else(|| std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()))
                .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned());
            #[allow(unused_mut)]
            let mut builder = RedisStore::builder(url.as_str()).timeout(timeout).reconnect_backoff(
                0,
                Duration::from_millis(10),
                Duration::from_millis(10),
            );
            #[cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]
            {
                if let Some(ca) = tls.ca.clone() {
                    builder = builder.tls_root_certificate(ca);
                }
                if let Some((cert, key)) = tls.identity.clone() {
                    builder = builder.tls_client_certificate(cert, key);
                }
            }
            match builder.connect().await {
                Ok(store) => execute(&store, &cli).await,
                Err(e) => connect_failed(&redact_password(&url), &e),
            }
        }
    }
}

async fn execute<C: ScanKeyspace>(store: &RedisStore<C>, cli: &Cli) -> ExitCode {
    let ns = &cli.global.namespace;
    let json = cli.global.json;
    let result = match &cli.command {
        Command::List { limit } => store.list(ns, *limit).await.map(|claims| {
            print_many(&claims, json);
            ExitCode::SUCCESS
        }),
        Command::Wedged {
            time_left_over_ms,
            limit,
        } => store
            .wedged(ns, Duration::from_millis(*time_left_over_ms), *limit)
            .await
            .map(|claims| {
                print_many(&claims, json);
                ExitCode::SUCCESS
            }),
        Command::Show { key } => {
            let full = format!("{ns}{key}");
            store.inspect(&full).await.map(|info| match info {
                Some(info) => {
                    print_one(&info, json, None);
                    ExitCode::SUCCESS
                }
                None => no_such_key(&full),
            })
        }
        Command::Release { key, why, who } => {
            let full = format!("{ns}{key}");
            release(store, &full, who, why, json).await
        }
    };
    result.unwrap_or_else(|e| fail(&format!("redis error: {}", chain(&e))))
}

async fn release<C: ScanKeyspace>(
    store: &RedisStore<C>,
    key: &str,
    who: &str,
    why: &str,
    json: bool,
) -> Result<ExitCode, StoreError> {
    // Read first, so the output shows what was released.
    let Some(info) = store.inspect(key).await? else {
        return Ok(no_such_key(key));
    };
    if info.state == KeyState::NotAClaim {
        return Ok(fail(&format!(
            "{} is not a claim (not a Redis string); not deleting it",
            key.escape_debug()
        )));
    }
    if !store.force_release(key, who, why).await? {
        // Expired or released between the two calls.
        return Ok(no_such_key(key));
    }
    print_one(&info, json, Some(true));
    Ok(ExitCode::SUCCESS)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The JSON form of one key. `ttl_ms` is `null` for a key without expiry; `age_ms` is `null`
/// (records do not store it), `fencing_token` when the claim has none (fencing off) and
/// `outcome_bytes` when no outcome is stored.
fn to_json(info: &KeyInfo, released: Option<bool>) -> serde_json::Value {
    let mut v = json!({
        "key": info.key,
        "state": info.state.as_str(),
        "owner": info.owner,
        "ttl_ms": info.time_left.map(ms),
        "age_ms": info.age.map(ms),
        "fencing_token": info.fencing_token,
        "outcome_bytes": info.outcome_size,
    });
    if let (Some(released), Some(obj)) = (released, v.as_object_mut()) {
        obj.insert("released".into(), released.into());
    }
    v
}

fn time_left_text(info: &KeyInfo) -> String {
    match info.time_left {
        Some(left) => format!("{:.3}s", left.as_secs_f64()),
        None => "no expiry".into(),
    }
}

fn print_many(claims: &[KeyInfo], json: bool) {
    let mut out = std::io::stdout().lock();
    for info in claims {
        let _ = if json {
            writeln!(out, "{}", to_json(info, None))
        } else {
            writeln!(
                out,
                "{}\t{}\t{}\t{}",
                info.key.escape_debug(),
                info.state.as_str(),
                info.owner.as_deref().unwrap_or("-").escape_debug(),
                time_left_text(info)
            )
        };
    }
    if !json {
        let _ = writeln!(std::io::stderr(), "{} key(s)", claims.len());
    }
}

fn print_one(info: &KeyInfo, json: bool, released: Option<bool>) {
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(out, "{}", to_json(info, released))
    } else {
        let not_stored = "not stored";
        let fence = info
            .fencing_token
            .map_or_else(|| "none (fencing off)".to_owned(), |f| f.to_string());
        let outcome = info
            .outcome_size
            .map_or_else(|| "none".to_owned(), |n| format!("{n} bytes"));
        writeln!(
            out,
            "key:           {}\nstate:         {}\nowner:         {}\ntime left:     {}\nage:           {not_stored}\nfencing token: {fence}\noutcome size:  {outcome}{}",
            info.key.escape_debug(),
            info.state.as_str(),
            info.owner.as_deref().unwrap_or("-").escape_debug(),
            time_left_text(info),
            if released == Some(true) {
                "\nreleased:      yes"
            } else {
                ""
            },
        )
    };
}

fn no_such_key(key: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "no such key: {}", key.escape_debug());
    ExitCode::from(EXIT_NO_SUCH_KEY)
}

fn connect_failed(target: &str, e: &StoreError) -> ExitCode {
    fail(&format!("cannot connect to Redis at {target}: {}", chain(e)))
}

fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {message}");
    ExitCode::from(EXIT_FAILURE)
}

/// `error: cause: cause`, the whole source chain on one line.
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Some errors repeat their source's text in their own; say it once.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn redact_hides_passwords_in_urls() {
        assert_eq!(redact_password("redis://u:pw@h:1"), "redis://u:***@h:1");
        assert_eq!(redact_password("redis://h:1"), "redis://h:1");
    }
}

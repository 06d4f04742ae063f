//! The tool against a real `redis-server --tls-port` (certificates generated per run): with
//! `--tls-ca-cert` it reads claims over `rediss://`; without the CA it exits 2 and says it could
//! not connect; a missing certificate file is exit 2 too. Built with a TLS feature only
//! (`cargo test -p tower-idempotency-cli --all-features`); skipped, with the reason printed, when
//! the local redis-server has no TLS.
#![cfg(any(feature = "tls-rustls", feature = "tls-native-tls"))]

#[path = "../../tests/common/redis_server.rs"]
mod redis_server;
#[path = "../../tests/common/tls_pki.rs"]
mod tls_pki;

use std::process::{Command, Output};

use redis_server::RedisServer;
use tls_pki::{Pki, start_tls_server};

const BIN: &str = env!("CARGO_BIN_EXE_tower-idempotency");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .output()
        .expect("run the tower-idempotency binary")
}

#[test]
fn rediss_with_the_private_ca_reads_claims_and_without_it_exits_2() {
    require_tls!();
    let pki = Pki::generate("cli");
    let (server, port) = start_tls_server(&pki, true);
    server.cli(&["SET", "review:job", "owner:tls", "PX", "60000"]);
    let url = format!("rediss://127.0.0.1:{port}");
    let (ca, cert, key) = (pki.file("ca.crt"), pki.file("client.crt"), pki.file("client.key"));

    let out = run(&[
        "show",
        "job",
        "--namespace",
        "review:",
        "--json",
        "--redis",
        &url,
        "--tls-ca-cert",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""owner":"owner:tls""#));

    let out = run(&[
        "show",
        "job",
        "--namespace",
        "review:",
        "--redis",
        &url,
        "--timeout-ms",
        "1000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect to Redis at rediss://127.0.0.1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(&["list", "--redis", &url, "--tls-ca-cert", "/nonexistent/ca.crt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read --tls-ca-cert /nonexistent/ca.crt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

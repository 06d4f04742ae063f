//! Certificates and TLS servers for the TLS tests (tests/tls.rs, cli/tests/cli_tls.rs),
//! included with `#[path]`: a CA, a server certificate and a client certificate generated per
//! run with rcgen, a check that the local redis-server was built with TLS, and a redis-server
//! with a TLS port. Expects `crate::RedisServer` (tests/common/redis_server.rs).
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::RedisServer;

/// PEM files for one test: a CA, a server certificate for `127.0.0.1`/`localhost` signed by
/// it, and a client certificate signed by it. Removed on drop.
pub struct Pki {
    dir: PathBuf,
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl Pki {
    pub fn generate(name: &str) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut server_params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        server_params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        // ClientAuth too: cluster nodes present this certificate to each other on the TLS bus.
        server_params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let server_cert = server_params.signed_by(&server_key, &ca).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "tower-idempotency");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &ca).unwrap();

        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.crt"), server_cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("client.crt"), client_cert.pem()).unwrap();
        std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether the local redis-server was built with TLS. Started with `--tls-port 0 --port 0`,
/// one with TLS exits at once saying it is configured to listen nowhere; one without refuses
/// `tls-port` as a bad directive.
pub fn redis_tls_support() -> Result<(), String> {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    SUPPORT
        .get_or_init(|| {
            let mut child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("redis-server could not be run: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    let out = child.wait_with_output().map_err(|e| e.to_string())?;
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    if text.to_ascii_lowercase().contains("bad directive") {
                        return Err(format!(
                            "this redis-server was built without TLS (BUILD_TLS=yes) and refuses --tls-port: {}",
                            text.trim()
                        ));
                    }
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // Still running: it accepted the TLS settings.
            let _ = child.kill();
            let _ = child.wait();
            Ok(())
        })
        .clone()
}

/// Skips the calling test, with the reason, when redis-server has no TLS — on a user's machine.
/// In CI (`CI` set) a missing TLS build fails the test instead: CI installs a redis-server with
/// TLS, and a test that cannot run its assertions must not pass there.
#[macro_export]
macro_rules! require_tls {
    () => {
        if let Err(reason) = $crate::tls_pki::redis_tls_support() {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server without TLS in CI: {reason}"
            );
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

/// A redis-server with its plain port (for the harness's readiness check) and a TLS port.
pub fn start_tls_server(pki: &Pki, auth_clients: bool) -> (RedisServer, u16) {
    let tls_port = free_port().to_string();
    let (cert, key, ca) = (pki.file("server.crt"), pki.file("server.key"), pki.file("ca.crt"));
    let auth = if auth_clients { "yes" } else { "no" };
    let server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        auth,
    ]);
    (server, tls_port.parse().unwrap())
}

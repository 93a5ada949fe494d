//! The access matrix: every way in without the right certificate is refused,
//! logged with its reason, counted in `/metrics`, and writes nothing.
//!
//! | who | where | refused by | counted in |
//! |---|---|---|---|
//! | no certificate | replication, admin | TLS handshake | `handshake_failures_total{reason="certificate"}` |
//! | certificate of a foreign CA | replication, admin | TLS handshake | same |
//! | expired certificate of the real CA | replication | TLS handshake | same |
//! | server certificate used as a client | replication | TLS handshake (key usage) | same |
//! | revoked certificate (`cert revoke`, `--crl`) | replication, admin | TLS handshake | same |
//! | source a writing source b | replication | session (`SourceMismatch`) | `sessions_rejected_total{code="source_mismatch"}` |
//! | a source's certificate | admin API over `--admin-tls` | 403 | `admin_requests_refused_total{reason="source_certificate"}` |
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use blockrep_core::SourceId;
use blockrep_proto::{ErrorCode, Message, PROTOCOL_VERSION};
use blockrep_testkit::{Pki, RawClient, ServerProcess, random_bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    pki: Pki,
    work: tempfile::TempDir,
    server: ServerProcess,
}

const HANDSHAKE_CERTIFICATE: &str = r#"blockrep_handshake_failures_total{reason="certificate"}"#;

impl Fixture {
    /// A server with `--admin-tls` and a CRL revoking the certificate of
    /// source `revoked`.
    fn new() -> Self {
        let pki = Pki::new(&["a", "b", "revoked"]);
        blockrep_pki::issue_admin(pki.path()).unwrap();
        let output = Command::new(BIN)
            .args(["cert", "revoke", "--dir"])
            .arg(pki.path())
            .args(["--source", "revoked"])
            .output()
            .unwrap();
        assert_success(&output);
        assert!(stdout(&output).contains("revoked"), "{}", stdout(&output));
        let crl = pki.path().join("crl.pem");
        let AgentRig {
            pki, work, server, ..
        } = rig_with(pki, &["--admin-tls", "--crl", crl.to_str().unwrap()]);
        Self { pki, work, server }
    }

    fn admin(&self) -> std::net::SocketAddr {
        self.server.admin_addr.unwrap()
    }

    fn head_exists(&self, source: &str) -> bool {
        self.work
            .path()
            .join("data/sources")
            .join(source)
            .join("head")
            .exists()
    }

    /// `GET /metrics` over admin TLS with the admin certificate.
    async fn metrics(&self) -> String {
        let (code, body) = https(
            self.admin(),
            &self.pki,
            Some("admin"),
            "GET",
            "/metrics",
            None,
        )
        .await
        .unwrap();
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Waits until `series` has grown by at least `by` from `before`.
    async fn wait_metric(&self, series: &str, before: f64, by: f64) -> f64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = metric(&self.metrics().await, series);
            if now >= before + by {
                return now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{series} stayed at {now} (was {before}); log: {}",
                self.server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The real agent with an explicit certificate and key; must fail.
    fn agent_refused(&self, source: &str, cert: &Path, key: &Path) -> String {
        let disk = self.work.path().join(format!("{source}.raw"));
        std::fs::write(&disk, random_bytes(256 << 10, 5)).unwrap();
        let output = Command::new(BIN)
            .args(["agent", "--once", "--disk"])
            .arg(&disk)
            .args([
                "--to",
                &self.server.addr.to_string(),
                "--source",
                source,
                "--ca",
            ])
            .arg(self.pki.cert("ca"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .output()
            .unwrap();
        assert!(
            !output.status.success(),
            "agent was let in: {}",
            stdout(&output)
        );
        stderr(&output)
    }

    /// One refusal at the TLS handshake of the replication listener: the
    /// handshake fails, the log says why, the metric moves, nothing is written.
    async fn assert_handshake_refused(
        &self,
        target: &str,
        cert: Option<(&Path, &Path)>,
        why: &str,
    ) {
        let before = metric(&self.metrics().await, HANDSHAKE_CERTIFICATE);
        let log_before = self.server.log().matches("TLS handshake rejected").count();
        match RawClient::connect(self.server.addr, &self.pki.cert("ca"), cert).await {
            Err(_) => {}
            Ok(mut client) => {
                // TLS 1.3: the client finishes first; the alert comes on read.
                let _ = client.send(&hello(target)).await;
                match client.recv().await {
                    Err(_) | Ok(None) => {}
                    Ok(Some(message)) => panic!("{why}: the server answered {message:?}"),
                }
            }
        }
        self.wait_metric(HANDSHAKE_CERTIFICATE, before, 1.0).await;
        // This attempt's line: a refusal of the previous case (the agent's)
        // may be logged after the attempt started, so look at every new one.
        let logged = wait_until(Duration::from_secs(10), || {
            self.server
                .log()
                .lines()
                .filter(|l| l.contains("TLS handshake rejected"))
                .skip(log_before)
                .any(|l| l.contains(why))
        });
        assert!(logged, "{why}: not logged: {}", self.server.log());
        assert!(
            !self.head_exists(target),
            "{why}: a head was written for {target}"
        );
    }
}

fn hello(source: &str) -> Message {
    Message::Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        source: SourceId::new(source).unwrap(),
        disk_size_bytes: 1 << 20,
        chunk_size_bytes: 65_536,
    }
}

/// The value of one series (name with labels) in Prometheus text, 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// One HTTP/1.1 request over TLS to the admin listener, presenting the
/// certificate `name` of `pki` (or none).
async fn https(
    addr: std::net::SocketAddr,
    pki: &Pki,
    name: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in blockrep_pki::read_certs(&pki.cert("ca")).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match name {
        Some(name) => builder
            .with_client_auth_cert(
                blockrep_pki::read_certs(&pki.cert(name)).unwrap(),
                blockrep_pki::read_key(&pki.key(name)).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("admin API did not answer"))?;
    // A peer that closes without close_notify still sent a whole response.
    if let Err(e) = read
        && response.is_empty()
    {
        return Err(e);
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    Ok((code, body.to_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_that_are_not_a_valid_client_identity_fail_the_handshake() {
    let f = Fixture::new();
    // No certificate at all.
    f.assert_handshake_refused("a", None, "no certificates")
        .await;

    // A certificate of another CA, even one naming a real source. Both CAs
    // carry blockrep's CA name, so the chain is built and its signature fails.
    let foreign = Pki::new(&["a"]);
    f.assert_handshake_refused(
        "a",
        Some((&foreign.cert("a"), &foreign.key("a"))),
        "BadSignature",
    )
    .await;
    let text = f.agent_refused("a", &foreign.cert("a"), &foreign.key("a"));
    assert!(
        text.contains("not issued by the server's CA"),
        "unclear agent error: {text}"
    );

    // Expired, but signed by the real CA.
    f.pki
        .issue_with("old", &["urn:blockrep:source:old"], |params| {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
    f.assert_handshake_refused(
        "old",
        Some((&f.pki.cert("old"), &f.pki.key("old"))),
        "expired",
    )
    .await;
    let text = f.agent_refused("old", &f.pki.cert("old"), &f.pki.key("old"));
    assert!(
        text.contains("certificate has expired"),
        "unclear agent error: {text}"
    );

    // The server's own certificate (server-auth key usage only) as a client.
    f.assert_handshake_refused(
        "a",
        Some((&f.pki.cert("server"), &f.pki.key("server"))),
        "invalid peer certificate",
    )
    .await;

    // Revoked with `blockrep cert revoke`, loaded with `--crl`.
    f.assert_handshake_refused(
        "revoked",
        Some((&f.pki.cert("revoked"), &f.pki.key("revoked"))),
        "Revoked",
    )
    .await;
    let text = f.agent_refused("revoked", &f.pki.cert("revoked"), &f.pki.key("revoked"));
    assert!(
        text.contains("certificate has been revoked"),
        "unclear agent error: {text}"
    );

    // Certificates that were not revoked still work with the list loaded.
    let disk = f.work.path().join("a.raw");
    std::fs::write(&disk, random_bytes(1 << 20, 1)).unwrap();
    assert_success(&agent_once(&disk, f.server.addr, "a", f.pki.path(), &[]));
    assert!(f.head_exists("a"));
    for source in ["old", "revoked"] {
        assert!(!f.head_exists(source), "a head was written for {source}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_certificate_cannot_write_another_source() {
    let f = Fixture::new();
    let series = r#"blockrep_sessions_rejected_total{code="source_mismatch"}"#;
    let before = metric(&f.metrics().await, series);
    let mut client = RawClient::connect_as(f.server.addr, &f.pki, "a").await;
    client.send(&hello("b")).await.unwrap();
    match client.recv().await {
        Ok(Some(Message::Error { code, message })) => {
            assert_eq!(code, ErrorCode::SourceMismatch, "{message}");
        }
        other => panic!("expected SourceMismatch, got {other:?}"),
    }
    let text = f.agent_refused("b", &f.pki.cert("a"), &f.pki.key("a"));
    assert!(text.contains("does not match certificate"), "{text}");
    f.wait_metric(series, before, 2.0).await;
    let log = f.server.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("session rejected"))
        .unwrap_or_else(|| panic!("not logged: {log}"));
    assert!(line.contains("certificate is for"), "{line}");
    assert!(!f.head_exists("b"), "a head was written for b");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_over_tls_lets_in_only_the_admin_certificate() {
    let f = Fixture::new();
    let refused = r#"blockrep_admin_requests_refused_total{reason="source_certificate"}"#;
    let before = metric(&f.metrics().await, refused);
    // The source's agent certificate: 403 on reads and writes, nothing created.
    let (code, body) = https(f.admin(), &f.pki, Some("a"), "GET", "/v1/sources", None)
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("cannot use the admin API"), "{body}");
    let (code, body) = https(
        f.admin(),
        &f.pki,
        Some("a"),
        "POST",
        "/v1/snapshots",
        Some(r#"{"source":"a","name":"sneaky"}"#),
    )
    .await
    .unwrap();
    assert_eq!(code, 403, "{body}");
    f.wait_metric(refused, before, 2.0).await;
    assert!(
        f.server
            .wait_for_log("admin request refused", Duration::from_secs(5)),
        "{}",
        f.server.log()
    );
    assert!(f.server.log().contains("source a"), "{}", f.server.log());
    assert!(
        !f.work
            .path()
            .join("data/sources/a/snapshots/sneaky")
            .exists()
    );

    // Without a certificate, or with a foreign one, the handshake fails.
    let before = metric(&f.metrics().await, HANDSHAKE_CERTIFICATE);
    assert!(
        https(f.admin(), &f.pki, None, "GET", "/v1/sources", None)
            .await
            .is_err()
    );
    let foreign = Pki::new(&[]);
    blockrep_pki::issue_admin(foreign.path()).unwrap();
    let mixed = Pki::new(&[]);
    // The real CA (to trust the server) with the foreign admin certificate.
    std::fs::copy(f.pki.cert("ca"), mixed.cert("ca")).unwrap();
    std::fs::copy(foreign.cert("admin"), mixed.cert("admin")).unwrap();
    std::fs::copy(foreign.key("admin"), mixed.key("admin")).unwrap();
    assert!(
        https(f.admin(), &mixed, Some("admin"), "GET", "/v1/sources", None)
            .await
            .is_err()
    );
    f.wait_metric(HANDSHAKE_CERTIFICATE, before, 2.0).await;
    assert!(
        f.server
            .wait_for_log("admin TLS handshake rejected", Duration::from_secs(5))
    );

    // The CLI reaches it with --admin-tls-dir and the admin certificate...
    let admin = f.admin().to_string();
    let disk = f.work.path().join("a.raw");
    std::fs::write(&disk, random_bytes(1 << 20, 2)).unwrap();
    assert_success(&agent_once(&disk, f.server.addr, "a", f.pki.path(), &[]));
    let output = Command::new(BIN)
        .arg("--admin-tls-dir")
        .arg(f.pki.path())
        .args([
            "snapshot", "create", "--source", "a", "--name", "ok", "--admin", &admin,
        ])
        .output()
        .unwrap();
    assert_success(&output);
    assert!(f.work.path().join("data/sources/a/snapshots/ok").exists());
    // ...and without it (plain HTTP to a TLS listener) gets no answer.
    let output = Command::new(BIN)
        .args(["status", "--admin", &admin])
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_another_certificate_takes_effect_when_the_server_restarts() {
    let mut f = Fixture::new();
    let disk = f.work.path().join("b.raw");
    std::fs::write(&disk, random_bytes(1 << 20, 3)).unwrap();
    assert_success(&agent_once(&disk, f.server.addr, "b", f.pki.path(), &[]));
    let head = std::fs::read(f.work.path().join("data/sources/b/head")).unwrap();
    let output = Command::new(BIN)
        .args(["cert", "revoke", "--dir"])
        .arg(f.pki.path())
        .args(["--source", "b"])
        .output()
        .unwrap();
    assert_success(&output);
    assert!(stdout(&output).contains("2 revoked"), "{}", stdout(&output));
    f.server.kill();
    let crl = f.pki.path().join("crl.pem");
    f.server = ServerProcess::start_with(
        &bin(),
        &f.work.path().join("data"),
        f.pki.path(),
        &["--admin-tls", "--crl", crl.to_str().unwrap()],
    );
    std::fs::write(&disk, random_bytes(1 << 20, 4)).unwrap();
    let text = f.agent_refused("b", &f.pki.cert("b"), &f.pki.key("b"));
    assert!(text.contains("certificate"), "{text}");
    assert!(
        f.server.wait_for_log("Revoked", Duration::from_secs(5)),
        "{}",
        f.server.log()
    );
    assert_eq!(
        std::fs::read(f.work.path().join("data/sources/b/head")).unwrap(),
        head,
        "a revoked certificate changed the replica"
    );
    // The first revocation is still in the list.
    let text = f.agent_refused("revoked", &f.pki.cert("revoked"), &f.pki.key("revoked"));
    assert!(text.contains("certificate"), "{text}");
}

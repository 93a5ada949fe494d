//! Revocation without a restart, and per-address connection slots, driven as
//! an operator and an attacker would: the real server and agents over real
//! mutual TLS, `blockrep cert revoke`, SIGHUP, and raw TCP floods.
//!
//! | what | shown by |
//! |---|---|
//! | a revoked source's running session ends within 10 s; it cannot come back; other sources go on | `revoking_a_running_source_ends_its_session_without_a_restart` |
//! | SIGHUP reloads the list at once | `sighup_reloads_the_list` |
//! | a torn, garbage, foreign or missing list keeps the revocations in force | `a_broken_list_keeps_the_revocations_in_force` |
//! | one address cannot hold every connection slot | `one_address_cannot_hold_every_connection_slot` |
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use blockrep_testkit::{Pki, RawClient, ServerProcess, random_bytes, write_at};

const CHUNK: u32 = 65_536;
/// How soon after a revocation its sessions must have ended.
const REVOKED_SESSION_END_MAX: Duration = Duration::from_secs(10);

/// `blockrep cert revoke` for `source`.
fn revoke(pki: &Pki, source: &str) {
    let output = Command::new(BIN)
        .args(["cert", "revoke", "--dir"])
        .arg(pki.path())
        .args(["--source", source])
        .output()
        .unwrap();
    assert_success(&output);
}

/// A PKI for `sources` plus `spare`, whose revocation makes the first list,
/// and a server that loads it with `--crl` and `extra`.
fn start(sources: &[&str], work: &Path, extra: &[&str]) -> (Pki, ServerProcess) {
    let mut all = sources.to_vec();
    all.push("spare");
    let pki = Pki::new(&all);
    revoke(&pki, "spare");
    let crl = pki.path().join("crl.pem");
    let mut args = vec!["--crl", crl.to_str().unwrap(), "--retention", "off"];
    args.extend_from_slice(extra);
    let server = ServerProcess::start_with(&bin(), &work.join("data"), pki.path(), &args);
    (pki, server)
}

/// A continuous agent for `source` on a fresh 1 MiB disk; returns once its
/// first epoch is committed.
fn running_agent(
    server: &ServerProcess,
    pki: &Pki,
    work: &Path,
    source: &str,
) -> (AgentProcess, PathBuf) {
    let disk = work.join(format!("{source}.raw"));
    std::fs::write(
        &disk,
        random_bytes(1 << 20, u64::from(source.as_bytes()[0])),
    )
    .unwrap();
    let agent = spawn_agent(
        &disk,
        server.addr,
        source,
        pki.path(),
        &["--interval", "200ms"],
    );
    let root = disk_root(&disk, CHUNK);
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .epochs()
            .iter()
            .any(|(_, r)| *r == root)),
        "{source}: no first epoch; agent: {}; server: {}",
        agent.stderr.lock().unwrap(),
        server.log()
    );
    (agent, disk)
}

/// Changes the disk and waits for the agent to commit the new root.
fn replicates(agent: &AgentProcess, disk: &Path, seed: u64) -> bool {
    write_at(disk, 256 << 10, &random_bytes(CHUNK as usize, seed));
    let root = disk_root(disk, CHUNK);
    wait_until(Duration::from_secs(15), || {
        agent.epochs().iter().any(|(_, r)| *r == root)
    })
}

/// Waits up to `timeout` for the agent to exit; returns how long it took.
fn exits_within(agent: &mut AgentProcess, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if agent.try_wait().is_some() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// The head file of `source`, if any.
fn head(work: &Path, source: &str) -> Option<Vec<u8>> {
    std::fs::read(work.join("data/sources").join(source).join("head")).ok()
}

/// `agent --once` for `source` with its own (revoked) certificate: must be
/// refused at the handshake, and write nothing.
fn refused_again(server: &ServerProcess, pki: &Pki, work: &Path, source: &str, disk: &Path) {
    let before = head(work, source);
    write_at(disk, 0, &random_bytes(CHUNK as usize, 99));
    let output = agent_once(disk, server.addr, source, pki.path(), &[]);
    assert!(
        !output.status.success(),
        "{source} was let back in: {}",
        stdout(&output)
    );
    assert!(
        stderr(&output).contains("revoked"),
        "unclear refusal: {}",
        stderr(&output)
    );
    assert_eq!(
        head(work, source),
        before,
        "a revoked source moved its head"
    );
}

/// The server is the process it was, and healthy.
fn same_server_alive(server: &ServerProcess, pid: u32) {
    assert_eq!(server.pid(), pid);
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "server died");
    let (code, body) = admin_request(server.admin_addr.unwrap(), "GET", "/health", None);
    assert_eq!(code, 200, "{body}");
}

/// The operator revokes source `a` while its agent replicates continuously:
/// without a restart, `a`'s open session ends with `Unauthorized` within 10 s,
/// its agent cannot reconnect, and source `b` keeps replicating throughout.
#[test]
fn revoking_a_running_source_ends_its_session_without_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let (pki, server) = start(&["a", "b"], work.path(), &[]);
    let pid = server.pid();
    let (mut agent_a, disk_a) = running_agent(&server, &pki, work.path(), "a");
    let (agent_b, disk_b) = running_agent(&server, &pki, work.path(), "b");

    revoke(&pki, "a");
    let took = exits_within(&mut agent_a, REVOKED_SESSION_END_MAX).unwrap_or_else(|| {
        panic!(
            "a's agent still runs {REVOKED_SESSION_END_MAX:?} after the revocation; server: {}",
            server.log()
        )
    });
    let agent_text = agent_a.stderr.lock().unwrap().clone();
    assert!(
        agent_text.contains("revoked"),
        "unclear agent error: {agent_text}"
    );
    assert!(
        server
            .log()
            .contains("the client certificate of this session has been revoked"),
        "{}",
        server.log()
    );
    let text = metrics(&server);
    assert_eq!(
        metric(&text, "blockrep_sessions_revoked_total"),
        1.0,
        "{text}"
    );
    assert!(metric(&text, r#"blockrep_crl_reloads_total{result="ok"}"#) >= 1.0);
    assert_eq!(metric(&text, "blockrep_crl_revoked_certificates"), 2.0);
    assert!(
        metric(
            &text,
            r#"blockrep_sessions_rejected_total{code="unauthorized"}"#
        ) >= 1.0,
        "{text}"
    );
    println!("a's session ended {took:?} after the revocation");

    assert!(replicates(&agent_b, &disk_b, 1), "b stopped replicating");
    refused_again(&server, &pki, work.path(), "a", &disk_a);
    assert!(replicates(&agent_b, &disk_b, 2), "b stopped replicating");
    same_server_alive(&server, pid);
}

/// With polling out of the way (`--crl-poll-interval 1h`), a revocation takes
/// effect on SIGHUP, and SIGHUP does not stop the server.
#[test]
fn sighup_reloads_the_list() {
    let work = tempfile::tempdir().unwrap();
    let (pki, server) = start(&["a"], work.path(), &["--crl-poll-interval", "1h"]);
    let pid = server.pid();
    let (mut agent_a, disk_a) = running_agent(&server, &pki, work.path(), "a");

    revoke(&pki, "a");
    // Not polled: the session goes on until the signal.
    assert!(replicates(&agent_a, &disk_a, 1), "a stopped before SIGHUP");
    assert!(agent_a.try_wait().is_none());

    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        exits_within(&mut agent_a, REVOKED_SESSION_END_MAX).is_some(),
        "a's session outlived SIGHUP; server: {}",
        server.log()
    );
    assert!(
        server.wait_for_log("revocation list reloaded", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    assert!(server.log().contains("SIGHUP"), "{}", server.log());
    refused_again(&server, &pki, work.path(), "a", &disk_a);
    same_server_alive(&server, pid);
}

/// After `a` is revoked, the list file is overwritten with garbage, a torn
/// copy of itself, another CA's list, and removed; SIGHUP is sent over a
/// broken one too. Each broken list is logged and counted, `a` stays
/// revoked, `b` keeps replicating, the server keeps running.
#[test]
fn a_broken_list_keeps_the_revocations_in_force() {
    let work = tempfile::tempdir().unwrap();
    let (pki, server) = start(&["a", "b"], work.path(), &["--crl-poll-interval", "500ms"]);
    let pid = server.pid();
    let (mut agent_a, disk_a) = running_agent(&server, &pki, work.path(), "a");
    let (agent_b, disk_b) = running_agent(&server, &pki, work.path(), "b");
    revoke(&pki, "a");
    assert!(exits_within(&mut agent_a, REVOKED_SESSION_END_MAX).is_some());

    let crl = pki.path().join("crl.pem");
    let good = std::fs::read(&crl).unwrap();
    let foreign = {
        let other = Pki::new(&["x"]);
        revoke(&other, "x");
        std::fs::read(other.path().join("crl.pem")).unwrap()
    };
    let failed = r#"blockrep_crl_reloads_total{result="failed"}"#;
    // Each with the reason the log gives for it.
    let broken: [(&str, Option<Vec<u8>>); 4] = [
        (
            "no certificate revocation list found",
            Some(b"this is not a revocation list\n".to_vec()),
        ),
        ("bad PEM", Some(good[..good.len() / 2].to_vec())),
        ("is not signed by the CA", Some(foreign)),
        ("cannot read", None),
    ];
    for (n, (what, bytes)) in broken.into_iter().enumerate() {
        match bytes {
            // Written in place, as a careless editor or a full disk would.
            Some(bytes) => std::fs::write(&crl, bytes).unwrap(),
            None => std::fs::remove_file(&crl).unwrap(),
        }
        let logged = wait_until(Duration::from_secs(10), || {
            server
                .log()
                .lines()
                .any(|l| l.contains("revocation list not reloaded") && l.contains(what))
        });
        assert!(logged, "{what}: not logged; log: {}", server.log());
        assert!(metric(&metrics(&server), failed) >= (n + 1) as f64);
        refused_again(&server, &pki, work.path(), "a", &disk_a);
        assert!(replicates(&agent_b, &disk_b, n as u64), "{what}: b stopped");
    }
    assert!(server.log().contains("the list in force stays in force"));

    // SIGHUP over a broken list: logged, nothing else changes.
    std::fs::write(&crl, b"garbage again").unwrap();
    let polled = metric(&metrics(&server), failed);
    assert!(wait_until(Duration::from_secs(10), || metric(
        &metrics(&server),
        failed
    ) > polled));
    std::thread::sleep(Duration::from_secs(1));
    let before = metric(&metrics(&server), failed);
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(wait_until(Duration::from_secs(10), || metric(
        &metrics(&server),
        failed
    ) > before));
    refused_again(&server, &pki, work.path(), "a", &disk_a);

    // The good list back: loads, and still revokes `a` only.
    std::fs::write(&crl, &good).unwrap();
    let ok = r#"blockrep_crl_reloads_total{result="ok"}"#;
    let before = metric(&metrics(&server), ok);
    assert!(wait_until(Duration::from_secs(10), || metric(
        &metrics(&server),
        ok
    ) > before));
    refused_again(&server, &pki, work.path(), "a", &disk_a);
    assert!(replicates(&agent_b, &disk_b, 10), "b stopped");
    same_server_alive(&server, pid);
}

/// Raw TCP connections, without a byte of TLS, from one loopback address.
async fn flood_from(
    from: [u8; 4],
    to: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
        held.push(socket.connect(to).await.unwrap());
    }
    held
}

/// Whether the server closed the connection (EOF or reset) within 2 s.
async fn closed_at_once(tcp: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// An attacker at 127.0.0.2 opens raw TCP connections and never speaks TLS.
/// With one address allowed every slot (as before `--connections-per-address`
/// existed) it locks the honest agent at 127.0.0.1 out; with the per-address
/// share it holds its share only, each connection over it is closed at once
/// and counted, and the honest agent replicates.
#[tokio::test(flavor = "multi_thread")]
async fn one_address_cannot_hold_every_connection_slot() {
    const SLOTS: usize = 24;
    const SHARE: usize = 16;
    let pki = Pki::new(&["a"]);
    let work = tempfile::tempdir().unwrap();
    let wait_open = |server: &ServerProcess, n: usize| {
        let admin = server.admin_addr.unwrap();
        wait_until(Duration::from_secs(10), || {
            metric(
                &admin_request(admin, "GET", "/metrics", None).1,
                "blockrep_connections",
            ) == n as f64
        })
    };

    // The attack as it worked before: one address, every slot.
    let slots = SLOTS.to_string();
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("before"),
        pki.path(),
        &[
            "--connections-max",
            &slots,
            "--connections-per-address",
            &slots,
            "--handshake-timeout",
            "60s",
        ],
    );
    let held = flood_from([127, 0, 0, 2], server.addr, SLOTS).await;
    assert!(wait_open(&server, SLOTS), "{}", metrics(&server));
    let (ca, cert, key) = (pki.cert("ca"), pki.cert("a"), pki.key("a"));
    let honest = RawClient::connect(server.addr, &ca, Some((&cert, &key))).await;
    assert!(honest.is_err(), "the flood did not lock the agent out");
    drop(held);
    drop(server);

    // With a share per address.
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("data"),
        pki.path(),
        &[
            "--connections-max",
            &slots,
            "--connections-per-address",
            &SHARE.to_string(),
            "--handshake-timeout",
            "60s",
        ],
    );
    let _held = flood_from([127, 0, 0, 2], server.addr, SHARE).await;
    assert!(wait_open(&server, SHARE), "{}", metrics(&server));
    let over = flood_from([127, 0, 0, 2], server.addr, SLOTS - SHARE).await;
    for mut tcp in over {
        assert!(
            closed_at_once(&mut tcp).await,
            "a connection over the share was kept"
        );
    }
    let text = metrics(&server);
    assert_eq!(
        metric(&text, "blockrep_connections_refused_per_address_total"),
        (SLOTS - SHARE) as f64,
        "{text}"
    );
    assert_eq!(metric(&text, "blockrep_connections"), SHARE as f64);
    assert!(
        server.wait_for_log("this address holds its share", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    // The honest agent, from 127.0.0.1, while the attacker holds its share.
    let disk = work.path().join("a.raw");
    std::fs::write(&disk, random_bytes(1 << 20, 7)).unwrap();
    let output = tokio::task::spawn_blocking({
        let (disk, addr, tls) = (disk.clone(), server.addr, pki.path().to_owned());
        move || agent_once(&disk, addr, "a", &tls, &[])
    })
    .await
    .unwrap();
    assert_success(&output);
    assert!(head(work.path(), "a").is_some());
}

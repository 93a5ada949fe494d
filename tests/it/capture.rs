//! Capture mode (`agent --serve`): the workload writes through the agent's
//! NBD export with real clients (qemu-io, qemu-img, nbdinfo), and the replica
//! follows without a scan of the disk.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::{Pki, ServerProcess, random_bytes};

const MIB: usize = 1 << 20;
const CHUNK: u32 = 65_536;

/// Whether the NBD clients these tests drive are installed (with
/// BLOCKREP_REQUIRE_TOOLS set, their absence fails the test).
fn have_clients() -> bool {
    have_tool("qemu-io") && have_tool("qemu-img") && have_tool("nbdinfo")
}

/// The `nbd+unix` URI of `source`'s export on `socket`.
fn unix_uri(source: &str, socket: &Path) -> String {
    format!("nbd+unix:///{source}?socket={}", socket.display())
}

/// Runs qemu-io on `uri` (raw) with `commands`, each a `-c` argument.
fn qemu_io(uri: &str, commands: &[String]) -> Output {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(uri).output().unwrap()
}

/// qemu-io writes `pattern` over `len` bytes at `offset` and flushes; the
/// write must succeed.
fn write_pattern(uri: &str, offset: u64, len: u64, pattern: u8) {
    let output = qemu_io(
        uri,
        &[format!("write -P {pattern} {offset} {len}"), "flush".into()],
    );
    assert!(
        output.status.success() && !stdout(&output).contains("failed"),
        "qemu-io write failed: {}\n{}",
        stdout(&output),
        stderr(&output)
    );
}

/// A capture-mode agent of `source` serving `disk` on `serve`.
struct Capturing {
    agent: AgentProcess,
}

fn start_capture(
    disk: &Path,
    server: std::net::SocketAddr,
    source: &str,
    tls: &Path,
    serve: &str,
) -> Capturing {
    let extra = [
        "--serve",
        serve,
        "--interval",
        "200ms",
        "--chunk-size",
        "64KiB",
    ];
    Capturing {
        agent: spawn_agent(disk, server, source, tls, &extra),
    }
}

impl Capturing {
    fn stderr(&self) -> String {
        self.agent.stderr.lock().unwrap().clone()
    }

    /// Waits until the agent says it serves the disk.
    fn wait_serving(&self) {
        assert!(
            wait_until(Duration::from_secs(30), || self
                .stderr()
                .contains("serving the disk over NBD")),
            "{}",
            self.stderr()
        );
    }

    /// Waits for the agent to exit by itself; its status.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut status = None;
        assert!(
            wait_until(timeout, || {
                status = self.agent.try_wait();
                status.is_some()
            }),
            "the agent did not exit: {}",
            self.stderr()
        );
        status.unwrap()
    }
}

/// Waits until the socket accepts connections (the agent serves before it
/// connects to the server). A socket file left by a killed agent exists but
/// refuses, so existing is not enough.
fn wait_for_socket(socket: &Path, agent: &Capturing) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        }),
        "no socket at {}: {}",
        socket.display(),
        agent.stderr()
    );
}

/// Waits until the server's head for `source` is the disk's root as it is now.
fn wait_converged(admin: std::net::SocketAddr, source: &str, disk: &Path, agent: &Capturing) {
    let expected = disk_root(disk, CHUNK);
    assert!(
        wait_until(Duration::from_secs(60), || admin_source(admin, source)
            .and_then(|view| view.root)
            .as_deref()
            == Some(expected.as_str())),
        "the replica did not reach the disk's root {expected}: {:?}\n{}",
        admin_source(admin, source),
        agent.stderr()
    );
}

/// A source's certificates, its disk and the socket its export is served on,
/// in a work directory that also holds the server's data; no server yet.
struct Fixture {
    source: String,
    pki: Pki,
    work: tempfile::TempDir,
    disk: PathBuf,
    socket: PathBuf,
}

/// The fixture, or `None` (the test skips) where the NBD clients are
/// missing.
fn fixture(source: &str, disk_bytes: usize) -> Option<Fixture> {
    if !have_clients() {
        return None;
    }
    let pki = Pki::new(&[source]);
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(disk_bytes, 7)).unwrap();
    let socket = work.path().join("disk.sock");
    Some(Fixture {
        source: source.to_owned(),
        pki,
        work,
        disk,
        socket,
    })
}

impl Fixture {
    /// The server's data directory.
    fn data(&self) -> PathBuf {
        self.work.path().join("data")
    }

    /// A server keeping its data in the work directory.
    fn server(&self) -> ServerProcess {
        ServerProcess::start(&bin(), &self.data(), self.pki.path())
    }

    /// The `nbd+unix` URI of the source's export.
    fn uri(&self) -> String {
        unix_uri(&self.source, &self.socket)
    }

    /// A capture-mode agent of the source to `to`, serving its disk on `serve`.
    fn capture_on(&self, to: std::net::SocketAddr, serve: &str) -> Capturing {
        start_capture(&self.disk, to, &self.source, self.pki.path(), serve)
    }

    /// A capture-mode agent serving the disk on the fixture's socket, once
    /// that socket accepts connections.
    fn capture(&self, to: std::net::SocketAddr) -> Capturing {
        let agent = self.capture_on(to, &format!("unix:{}", self.socket.display()));
        wait_for_socket(&self.socket, &agent);
        agent
    }
}

#[test]
fn qemu_writes_through_the_export_reach_the_replica_byte_for_byte_at_every_flushed_cut() {
    let Some(f) = fixture("vm", 16 * MIB) else {
        return;
    };
    let data = f.data();
    let server = f.server();
    let admin = server.admin_addr.unwrap();
    let agent = f.capture(server.addr);
    let uri = f.uri();
    wait_converged(admin, "vm", &f.disk, &agent);
    // Rounds of patterns, each flushed: the cut that follows holds them all.
    for (round, (offset, len)) in [
        (0u64, 4096u64),
        (3 * MIB as u64 + 512, 70_000),
        (15 * MIB as u64, MIB as u64),
    ]
    .into_iter()
    .enumerate()
    {
        write_pattern(&uri, offset, len, 0x41 + round as u8);
        // The write is on the disk when acknowledged (nothing else writes it).
        let on_disk = std::fs::read(&f.disk).unwrap();
        let start = offset as usize;
        assert!(
            on_disk[start..start + len as usize]
                .iter()
                .all(|&b| b == 0x41 + round as u8)
        );
        wait_converged(admin, "vm", &f.disk, &agent);
        // And the replica holds those bytes: exported and compared whole.
        let out = f.work.path().join(format!("replica-{round}.raw"));
        assert_success(&export(&data, "vm", &out));
        assert!(
            std::fs::read(&out).unwrap() == on_disk,
            "round {round}: the exported replica differs from the disk"
        );
    }
    // The export's default name opens it too; reads return what was written.
    let output = qemu_io(
        &format!("nbd+unix://?socket={}", f.socket.display()),
        &["read -P 0x41 0 4096".into()],
    );
    assert!(
        output.status.success() && !stdout(&output).contains("failed"),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    // No epoch scanned the disk: the epochs after the first sent about what
    // was written, not the disk.
    let lines = agent.agent.lines();
    assert!(
        lines.iter().any(|l| l.starts_with("epoch ")),
        "no epoch printed: {lines:?}"
    );
    // The small writes (rounds 0 and 1's tail) went as patches of the
    // written blocks, planned from the cut alone: no block values were asked
    // of the server for them.
    assert!(
        agent.agent.sum("patches_sent") >= 2,
        "too few patches: {lines:?}"
    );
    assert_eq!(
        agent.agent.sum("block_values_bytes_received"),
        0,
        "capture asked for block values: {lines:?}"
    );
}

#[test]
fn the_socket_is_private_and_tcp_must_be_loopback_without_tls() {
    let Some(f) = fixture("db", 4 * MIB) else {
        return;
    };
    let server = f.server();
    // A stale socket left by a killed agent is replaced.
    drop(std::os::unix::net::UnixListener::bind(&f.socket).unwrap());
    let agent = f.capture_on(server.addr, &format!("unix:{}", f.socket.display()));
    agent.wait_serving();
    let metadata = std::fs::metadata(&f.socket).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    drop(agent);

    // Not loopback, no TLS: refused before anything is served.
    let (d, t) = (f.disk.to_str().unwrap(), f.pki.path().to_str().unwrap());
    let addr = server.addr.to_string();
    let open = format!("0.0.0.0:{}", closed_addr().port());
    let mut args = vec!["agent"];
    args.extend(agent_args(d, &addr, "db", t));
    args.extend(["--serve", open.as_str()]);
    let output = Command::new(bin()).args(&args).output().unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("not a loopback address")
            && stderr(&output).contains("--serve-tls"),
        "{}",
        stderr(&output)
    );

    // A loopback TCP address serves the disk: nbdinfo and qemu-img see it.
    let local = closed_addr().to_string();
    let agent = f.capture_on(server.addr, &local);
    agent.wait_serving();
    let size = run_tool("nbdinfo", &["--size", &format!("nbd://{local}/db")]);
    assert_eq!(size.trim(), (4 * MIB).to_string());
    let info = run_tool("qemu-img", &["info", &format!("nbd://{local}/db")]);
    assert!(info.contains("4 MiB"), "{info}");
    // A name that is not the source's is not served.
    let output = Command::new("nbdinfo")
        .args(["--size", &format!("nbd://{local}/other")])
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[test]
fn a_clean_restart_sends_only_what_was_written_and_a_killed_agent_rescans_once_and_converges() {
    let Some(f) = fixture("app", 32 * MIB) else {
        return;
    };
    let server = f.server();
    let admin = server.admin_addr.unwrap();
    let uri = f.uri();

    let mut agent = f.capture(server.addr);
    wait_converged(admin, "app", &f.disk, &agent);
    write_pattern(&uri, 5 * MIB as u64, 8192, 0x11);
    wait_converged(admin, "app", &f.disk, &agent);
    // Written after the last cut and not yet sent when the agent stops: the
    // saved dirty set must carry it over.
    write_pattern(&uri, 9 * MIB as u64, 4096, 0x12);
    agent.agent.signal("TERM");
    assert!(
        agent.wait(Duration::from_secs(30)).success(),
        "{}",
        agent.stderr()
    );
    assert!(!f.socket.exists(), "the socket outlived the agent");

    let mut agent = f.capture(server.addr);
    write_pattern(&uri, 20 * MIB as u64, 4096, 0x13);
    wait_converged(admin, "app", &f.disk, &agent);
    assert!(
        !agent.stderr().contains("reads the whole disk"),
        "a clean restart rescanned: {}",
        agent.stderr()
    );
    // Two chunks at most were written: far less than the 32 MiB disk.
    let sent = agent.agent.sum("raw_bytes_sent");
    assert!(sent <= 4 * u64::from(CHUNK), "sent {sent} bytes");

    // Killed: the next start reads the whole disk once (consistently) and
    // converges, with writes going on meanwhile.
    agent.agent.signal("KILL");
    agent.wait(Duration::from_secs(10));
    write_pattern_direct(&f.disk, 11 * MIB as u64, 0x14);
    let agent = f.capture(server.addr);
    write_pattern(&uri, 30 * MIB as u64, 4096, 0x15);
    wait_converged(admin, "app", &f.disk, &agent);
    assert!(
        agent.stderr().contains("reads the whole disk"),
        "no full cut after a kill: {}",
        agent.stderr()
    );
}

/// Writes one block straight to the image while no agent runs (what a
/// write acknowledged just before a kill looks like on the disk).
fn write_pattern_direct(disk: &Path, offset: u64, pattern: u8) {
    blockrep_testkit::write_at(disk, offset, &[pattern; 4096]);
}

#[test]
fn cutover_in_capture_mode_stops_writes_and_the_launch_equals_the_disk() {
    let Some(f) = fixture("erp", 8 * MIB) else {
        return;
    };
    let server = nbd_server(&f.pki, &f.data());
    let admin = server.admin_addr.unwrap();
    let uri = f.uri();
    let mut agent = f.capture(server.addr);
    wait_converged(admin, "erp", &f.disk, &agent);

    // A workload that keeps writing until its writes fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (written, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (stop, written, refused, uri) = (
            Arc::clone(&stop),
            Arc::clone(&written),
            Arc::clone(&refused),
            uri.clone(),
        );
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let offset = (n * 69_632) % (8 * MIB as u64 - 65_536);
                let output = qemu_io(
                    &uri,
                    &[
                        format!("write -P {} {offset} 65536", n % 250 + 1),
                        "flush".into(),
                    ],
                );
                if output.status.success() && !stdout(&output).contains("failed") {
                    written.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        })
    };
    assert!(wait_until(Duration::from_secs(30), || written
        .load(Ordering::Relaxed)
        >= 5));
    let force = Some(r#"{"force":true}"#);
    let (code, body) = admin_request(admin, "POST", "/v1/sources/erp/cutover", force);
    assert!(code == 200 || code == 202, "{code} {body}");
    assert!(
        agent.wait(Duration::from_secs(60)).success(),
        "{}",
        agent.stderr()
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let lines = agent.agent.lines();
    let launch = lines
        .iter()
        .flat_map(|l| l.split_whitespace())
        .find_map(|f| f.strip_prefix("launch="))
        .unwrap_or_else(|| panic!("no launch in {lines:?}"))
        .to_owned();
    // The disk as the frozen export left it is exactly the cutover launch:
    // no write landed after the last cut.
    let launch_uri = format!("nbd://{}/{launch}", server.nbd_addr.unwrap());
    assert!(
        qemu_img_identical(&f.disk, &launch_uri),
        "the cutover launch differs from the disk"
    );
    assert!(written.load(Ordering::Relaxed) >= 5);
}

#[test]
fn writes_keep_succeeding_while_the_server_is_down_and_replicate_once_it_is_up() {
    let Some(f) = fixture("edge", 8 * MIB) else {
        return;
    };
    let listen = closed_addr();
    let uri = f.uri();
    // No server yet: the agent serves the disk anyway and keeps retrying.
    let agent = f.capture(listen);
    for round in 0..5u64 {
        write_pattern(&uri, round * MIB as u64, 65_536, 0x60 + round as u8);
        let output = qemu_io(
            &uri,
            &[format!(
                "read -P {} {} 65536",
                0x60 + round,
                round * MIB as u64
            )],
        );
        assert!(
            output.status.success() && !stdout(&output).contains("failed"),
            "{}",
            stdout(&output)
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .stderr()
            .contains("reconnecting")),
        "{}",
        agent.stderr()
    );
    let server = ServerProcess::start_on(&bin(), &listen.to_string(), &f.data(), f.pki.path(), &[]);
    wait_converged(server.admin_addr.unwrap(), "edge", &f.disk, &agent);
}

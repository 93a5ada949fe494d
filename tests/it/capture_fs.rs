//! A real kernel file system in capture mode: ext4 on a loop device over
//! `nbdfuse` over the agent's export (`agent --serve unix:SOCK`), the way a
//! workload without the `nbd` kernel module would use it.
//!
//! A writer creates, fsyncs, renames and deletes files and rewrites a
//! database file in place, recording when each operation became durable (see
//! tests/common/fs_writer.rs). The agent cuts an epoch every second; the test
//! snapshots each acknowledged point. Every point must be a file system a
//! restore can use, `e2fsck` clean after journal replay, holding every
//! operation made durable before its cut (the ack log's
//! `scan_started_unix_ms`), and labelled crash-consistent.
//!
//! The second test SIGKILLs the agent mid-run: the workload's I/O fails
//! (nbdfuse does not reconnect), the workload's stack comes down, the agent
//! restarts on the same disk after its unclean stop, and nothing made durable
//! before the kill may be missing from the disk or from any later point.
//!
//! Root only (loop devices, mounts, FUSE); skipped otherwise, unless
//! BLOCKREP_REQUIRE_TOOLS is set, as in CI, where a missing tool or not being
//! root fails instead.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::ack_log::read_acks;
use blockrep_testkit::fs_writer::{DurableLog, Verified, Writer, now_unix_ms, verify};
use blockrep_testkit::loopfs::{
    EXT4_LOOP_TOOLS, FsKind, LoopMount, check_and_mount, loop_fs_ready,
};
use blockrep_testkit::nbdfuse::NbdFuse;
use blockrep_testkit::{Pki, ServerProcess};

const MIB: u64 = 1 << 20;
const SOURCE: &str = "fs";
const DISK_BYTES: u64 = 64 * MIB;
/// What the tests run beyond an ext4 on a loop device.
const FUSE_TOOLS: [&str; 2] = ["nbdfuse", "fusermount3"];
/// How long the points may take to appear (debug builds on a busy machine).
const POINTS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the workload's I/O may take to fail once the agent is killed.
const IO_FAILS_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the test can run: root, the tools, and the FUSE device.
fn capture_fs_ready(test: &str) -> bool {
    if !loop_fs_ready(test, &[&EXT4_LOOP_TOOLS[..], &FUSE_TOOLS].concat()) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        assert!(
            !require_external_tools(),
            "{test} needs /dev/fuse for nbdfuse (BLOCKREP_REQUIRE_TOOLS is set)"
        );
        eprintln!("skipping {test}: no /dev/fuse");
        return false;
    }
    true
}

/// The server, the agent's disk and what the agent is told.
struct Rig {
    work: tempfile::TempDir,
    pki: Pki,
    server: ServerProcess,
    disk: PathBuf,
    socket: PathBuf,
    ack_log: PathBuf,
}

impl Rig {
    /// A server and an empty 64 MiB disk (no file system yet: it is made
    /// through the export).
    fn new() -> Self {
        let pki = Pki::new(&[SOURCE]);
        let work = tempfile::tempdir().unwrap();
        let server = ServerProcess::start_with(
            &bin(),
            &work.path().join("data"),
            pki.path(),
            // Every acknowledged root stays; no snapshots but the test's own.
            &["--gc-interval", "off", "--retention", "off"],
        );
        let disk = work.path().join("source.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        Self {
            socket: work.path().join("agent.sock"),
            ack_log: work.path().join("acks.log"),
            disk,
            pki,
            server,
            work,
        }
    }

    /// Starts the agent in capture mode; returns once its export's socket is
    /// there.
    fn start_agent(&self) -> AgentProcess {
        let _ = std::fs::remove_file(&self.socket);
        let serve = format!("unix:{}", self.socket.display());
        let mut agent = spawn_agent(
            &self.disk,
            self.server.addr,
            SOURCE,
            self.pki.path(),
            &[
                "--serve",
                &serve,
                "--interval",
                "1s",
                "--ack-log",
                self.ack_log.to_str().unwrap(),
            ],
        );
        let ready = wait_until(Duration::from_secs(30), || {
            self.socket.exists() || agent.try_wait().is_some()
        });
        assert!(
            ready && self.socket.exists(),
            "the agent serves no {:?}; stdout: {:#?}\nstderr: {}",
            self.socket,
            agent.lines(),
            agent.stderr.lock().unwrap()
        );
        agent
    }

    /// The agent's export as an NBD URI (the export is named by the source).
    fn uri(&self) -> String {
        format!("nbd+unix:///{SOURCE}?socket={}", self.socket.display())
    }

    fn admin(&self) -> std::net::SocketAddr {
        self.server.admin_addr.unwrap()
    }

    /// Exports snapshot `name` of the replica to a file.
    fn export_snapshot(&self, name: &str) -> PathBuf {
        let copy = self.work.path().join(format!("{name}.img"));
        let output = Command::new(bin())
            .args(["export", "--data"])
            .arg(self.work.path().join("data"))
            .args(["--source", SOURCE, "--snapshot", name, "--out"])
            .arg(&copy)
            .output()
            .unwrap();
        assert_success(&output);
        copy
    }
}

/// The workload's disk: the agent's export through nbdfuse, a loop device
/// over nbdfuse's file, and ext4 mounted from it.
struct Workload {
    /// Dropped first: the mount lives on the file nbdfuse serves.
    mount: Option<LoopMount>,
    fuse: Option<NbdFuse>,
}

impl Workload {
    /// Attaches the agent's export and mounts its ext4 (made first when
    /// `mkfs`; otherwise mounting replays the journal if it needs to).
    fn attach(rig: &Rig, mkfs: bool) -> Self {
        let fuse = NbdFuse::start(&rig.work.path().join("fuse"), &rig.uri());
        if mkfs {
            FsKind::Ext4.mkfs(&fuse.file());
        }
        let mount = LoopMount::mount(&fuse.file(), &rig.work.path().join("mnt"), false, "");
        Self {
            mount: Some(mount),
            fuse: Some(fuse),
        }
    }

    /// Where the file system is mounted.
    fn root(&self) -> &Path {
        self.mount.as_ref().unwrap().path()
    }

    /// Makes directory `name` in the file system, durably, for a writer.
    fn writer_dir(&self, name: &str) -> PathBuf {
        let dir = self.root().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::File::open(self.root())
            .unwrap()
            .sync_all()
            .unwrap();
        dir
    }

    /// Unmounts, detaches the loop device and stops nbdfuse. After the
    /// export went away the unmount may have to be lazy (the loop device then
    /// goes with the mount); a clean stack must come down strictly.
    fn detach(mut self, clean: bool) {
        let mount = self.mount.take().unwrap();
        if clean {
            mount.unmount();
        } else {
            // Plain unmount, else lazy, then detach (autoclear if still busy).
            drop(mount);
        }
        self.fuse.take().unwrap().stop();
    }
}

/// A recovery point: a snapshot of an acknowledged root.
#[derive(Debug, Clone)]
struct Point {
    snapshot: String,
    root: String,
    /// The snapshot's `consistency` in the admin API's JSON.
    consistency: Option<String>,
    /// The cut's instant.
    cut_unix_ms: u64,
    /// When the agent had the commit's acknowledgement.
    acked_unix_ms: u64,
}

/// Snapshots the head each time a new complete commit whose cut came at or
/// after `after_unix_ms` is acknowledged, until `wanted` snapshots with
/// distinct roots exist (names `{prefix}N`); then resolves them against the
/// ack log. Fails if the agent exits or the points take too long.
fn collect_points(
    rig: &Rig,
    agent: &mut AgentProcess,
    prefix: &str,
    after_unix_ms: u64,
    wanted: usize,
) -> Vec<Point> {
    let admin = rig.admin();
    let points = AckedPoints {
        admin,
        source: SOURCE,
        ack_log: &rig.ack_log,
        prefix,
        timeout: POINTS_TIMEOUT,
    };
    let taken = points.take(agent, wanted, |a| a.scan_started_unix_ms >= after_unix_ms);
    let acks = read_acks(&rig.ack_log);
    let snapshots = snapshots_json(admin);
    taken
        .into_iter()
        .map(|(name, root)| {
            let snapshot = snapshots
                .iter()
                .find(|s| s["name"] == name.as_str())
                .unwrap_or_else(|| panic!("no snapshot {name} in {snapshots:#?}"));
            // The first acknowledgement of the root after `after_unix_ms`
            // (a root committed again is the same disk content).
            let ack = acks
                .iter()
                .find(|a| a.complete && a.root == root && a.scan_started_unix_ms >= after_unix_ms)
                .unwrap_or_else(|| panic!("snapshot {name} names no acknowledged root: {acks:#?}"));
            Point {
                snapshot: name,
                root,
                consistency: snapshot["consistency"].as_str().map(str::to_owned),
                cut_unix_ms: ack.scan_started_unix_ms,
                acked_unix_ms: ack.unix_ms,
            }
        })
        .collect()
}

/// A writer's record and the directory (relative to the file system's root)
/// it wrote in.
struct Written<'a> {
    dir: &'a str,
    log: &'a DurableLog,
}

/// Checks ext4 image `image` as a restore would (e2fsck after journal
/// replay) and, mounted read-only, checks it against every writer's record
/// for a view at `view_unix_ms` acknowledged at `acked_unix_ms`. Returns what
/// was checked per writer, or what is wrong.
fn examine_image(
    image: &Path,
    mount_point: &Path,
    written: &[Written],
    view_unix_ms: u64,
    acked_unix_ms: u64,
) -> Result<Vec<Verified>, String> {
    let mounted = check_and_mount(FsKind::Ext4, image, mount_point)
        .map_err(|damage| format!("the file system is damaged: {damage}"))?;
    let mut checked = Vec::new();
    let mut problems = Vec::new();
    for w in written {
        match verify(
            w.log,
            &mounted.path().join(w.dir),
            view_unix_ms,
            acked_unix_ms,
        ) {
            Ok(verified) => checked.push(verified),
            Err(found) => problems.push(format!(
                "{}: it lacks what was durable before its view ({} problems): {:#?}",
                w.dir,
                found.len(),
                &found[..found.len().min(20)]
            )),
        }
    }
    mounted.unmount();
    if problems.is_empty() {
        Ok(checked)
    } else {
        Err(problems.join("\n"))
    }
}

/// Exports `point`, checks it (see [`examine_image`]) and its label; every
/// writer's check must have read files and pages.
fn check_point(rig: &Rig, point: &Point, written: &[Written]) {
    assert_eq!(
        point.consistency.as_deref(),
        Some("crash-consistent"),
        "snapshot {} of a capture run: {point:?}",
        point.snapshot
    );
    let copy = rig.export_snapshot(&point.snapshot);
    let mount_point = rig.work.path().join(format!("{}.mnt", point.snapshot));
    let result = examine_image(
        &copy,
        &mount_point,
        written,
        point.cut_unix_ms,
        point.acked_unix_ms,
    );
    std::fs::remove_file(&copy).unwrap();
    match result {
        Ok(verified) => {
            for (v, w) in verified.iter().zip(written) {
                assert!(
                    v.pages > 0,
                    "point {point:?} checked no page of {}: {v:?}",
                    w.dir
                );
            }
            assert!(
                verified.iter().any(|v| v.files_read > 0),
                "point {point:?} read no file: {verified:?}"
            );
            eprintln!("point {} ({}): {verified:?}", point.snapshot, point.root);
        }
        Err(problem) => panic!("point {point:?}: {problem}"),
    }
}

/// Starts a writer in a new directory `dir` of the workload's file system
/// and waits until it has made some operations durable; returns it and the
/// time it was going (points cut after that hold its directory).
fn start_writer(workload: &Workload, dir: &str, seed: u64) -> (Writer, u64) {
    let writer = Writer::start(&workload.writer_dir(dir), seed);
    assert!(
        wait_until(Duration::from_secs(30), || writer.operations() > 20
            && writer.files() > 0),
        "the writer does not get going through nbdfuse"
    );
    // Points cut from now on hold durable files to check, however slowly a
    // loaded machine let the writer start.
    (writer, now_unix_ms())
}

#[test]
fn ext4_over_nbdfuse_points_are_clean_and_hold_every_durable_write() {
    if !capture_fs_ready("capture-mode ext4 test") {
        return;
    }
    let rig = Rig::new();
    let mut agent = rig.start_agent();
    let workload = Workload::attach(&rig, true);
    let (writer, started) = start_writer(&workload, "a", 0xca97_0001);

    let points = collect_points(&rig, &mut agent, "p", started, 5);
    let log = writer.stop();
    workload.detach(true);
    agent.stop_cleanly();

    let written = [Written {
        dir: "a",
        log: &log,
    }];
    for point in &points {
        check_point(&rig, point, &written);
    }
}

#[test]
fn ext4_over_nbdfuse_survives_an_agent_sigkill() {
    if !capture_fs_ready("capture-mode SIGKILL test") {
        return;
    }
    let rig = Rig::new();
    let mut agent = rig.start_agent();
    let workload = Workload::attach(&rig, true);
    let (writer, started) = start_writer(&workload, "a", 0xca97_0002);
    let before = collect_points(&rig, &mut agent, "a", started, 2);

    // Kill the agent under the running writer: its I/O must fail, as the
    // disk is gone from under the file system.
    agent.child.kill().unwrap();
    agent.wait();
    let killed_unix_ms = now_unix_ms();
    assert!(
        wait_until(IO_FAILS_TIMEOUT, || writer.finished()),
        "the writer still succeeds {IO_FAILS_TIMEOUT:?} after the agent was killed"
    );
    let (log_a, ended) = writer.stop_either_way();
    let error = ended.expect_err("the writer ended by itself, so an operation failed");
    eprintln!(
        "the writer failed after the kill: {error}; {} file and {} page operations were durable",
        log_a.files.len(),
        log_a.pages.len()
    );
    workload.detach(false);

    // Everything fsynced before the kill is on the disk itself.
    let disk_copy = rig.work.path().join("after-kill.img");
    std::fs::copy(&rig.disk, &disk_copy).unwrap();
    let on_disk = examine_image(
        &disk_copy,
        &rig.work.path().join("after-kill.mnt"),
        &[Written {
            dir: "a",
            log: &log_a,
        }],
        u64::MAX,
        u64::MAX,
    );
    if let Err(problem) = on_disk {
        panic!("the disk after the kill: {problem}");
    }
    std::fs::remove_file(&disk_copy).unwrap();

    // The restarted agent sees its unclean stop: its first point is the disk
    // as it is now (nothing writes to it), byte for byte, which a cut of only
    // the blocks it knew as dirty would not be.
    let restarted_unix_ms = now_unix_ms();
    let mut agent = rig.start_agent();
    let first = collect_points(&rig, &mut agent, "restart", restarted_unix_ms, 1);
    let said = agent.stderr.lock().unwrap().clone();
    assert!(
        said.contains("did not stop cleanly"),
        "the restarted agent does not say it found its state in use: {said}"
    );
    assert_eq!(
        first[0].consistency.as_deref(),
        Some("crash-consistent"),
        "{first:?}"
    );
    let copy = rig.export_snapshot(&first[0].snapshot);
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&rig.disk).unwrap(),
        "the first point after the restart ({:?}) is not the disk; agent stderr: {}",
        first[0],
        agent.stderr.lock().unwrap()
    );
    std::fs::remove_file(&copy).unwrap();

    // The workload comes back (journal replay at mount) and writes on.
    let workload = Workload::attach(&rig, false);
    let (writer, started) = start_writer(&workload, "b", 0xca97_0003);
    let after = collect_points(&rig, &mut agent, "b", started, 3);
    let log_b = writer.stop();
    workload.detach(true);
    agent.stop_cleanly();

    for point in &before {
        check_point(
            &rig,
            point,
            &[Written {
                dir: "a",
                log: &log_a,
            }],
        );
    }
    assert!(
        after.iter().all(|p| p.cut_unix_ms > killed_unix_ms),
        "{after:#?}"
    );
    for point in &after {
        check_point(
            &rig,
            point,
            &[
                Written {
                    dir: "a",
                    log: &log_a,
                },
                Written {
                    dir: "b",
                    log: &log_b,
                },
            ],
        );
    }
}

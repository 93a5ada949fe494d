//! Recovery points of a real kernel file system under a live writer.
//!
//! A source image on an outer XFS (so that it can be cloned) carries an inner
//! ext4 or XFS, mounted through its own loop device, where a writer creates,
//! fsyncs, renames and deletes files and rewrites a database file in place,
//! recording when each operation became durable. A continuous agent replicates
//! the image meanwhile; the test snapshots each acknowledged point. Every point
//! taken from a frozen view must then be a file system that a restore can use:
//! `e2fsck`/`xfs_repair` clean after journal or log replay, and holding every
//! operation made durable before its view was taken. Points read live are
//! labelled `live` (they may be torn, which is what the label says).
//!
//! Root only (loop devices, mounts); skipped otherwise, unless
//! BLOCKREP_REQUIRE_TOOLS is set, as in CI, where a missing tool or not being
//! root fails instead.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::ack_log::read_acks;
use blockrep_testkit::fs_writer::{DurableLog, Verified, Writer, verify};
use blockrep_testkit::loopfs::{EXT4_LOOP_TOOLS, FsKind, NestedFs, check_and_mount, loop_fs_ready};
use blockrep_testkit::{Pki, ServerProcess};

const MIB: u64 = 1 << 20;
const SOURCE: &str = "fs";
/// What the tests run beyond an ext4 on a loop device: XFS's tools.
const XFS_TOOLS: [&str; 2] = ["mkfs.xfs", "xfs_repair"];

/// Everything the tests run: the loop devices, both file systems' tools.
fn tools() -> Vec<&'static str> {
    [&EXT4_LOOP_TOOLS[..], &XFS_TOOLS].concat()
}
/// How long the points may take to appear (debug builds on a busy machine).
const POINTS_TIMEOUT: Duration = Duration::from_secs(90);

/// A recovery point: a snapshot of an acknowledged root.
#[derive(Debug, Clone)]
struct Point {
    snapshot: String,
    root: String,
    /// The snapshot's `consistency` in the admin API's JSON.
    consistency: Option<String>,
    /// When the root's view was taken (its scan start).
    view_unix_ms: u64,
    /// When the agent had the commit's acknowledgement.
    acked_unix_ms: u64,
}

/// What a replication run under the writer left to check.
struct Run {
    work: tempfile::TempDir,
    _pki: Pki,
    server: ServerProcess,
    points: Vec<Point>,
    log: DurableLog,
    /// The source's `consistency` in the admin API's JSON at the end.
    head_consistency: Option<String>,
}

impl Run {
    fn data(&self) -> PathBuf {
        self.work.path().join("data")
    }
}

/// Makes the nested file systems, starts the writer and a continuous agent
/// with `--snapshot mode`, snapshots each acknowledged point until `wanted`
/// points with distinct roots exist, then stops everything and unmounts.
fn replicate_under_writer(kind: FsKind, image_bytes: u64, mode: &str, wanted: usize) -> Run {
    let pki = Pki::new(&[SOURCE]);
    let work = tempfile::tempdir().unwrap();
    // The outer XFS: at least mkfs.xfs's minimum, with room for the image and
    // what its clones stop sharing while the writer runs.
    let outer_bytes = (image_bytes + 128 * MIB).max(400 * MIB);
    let fs = NestedFs::new(work.path(), outer_bytes, image_bytes, kind);
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("data"),
        pki.path(),
        // Every acknowledged root stays; no snapshots but the test's own.
        &["--gc-interval", "off", "--retention", "off"],
    );
    let admin = server.admin_addr.unwrap();
    let writer = Writer::start(fs.inner(), 0x5eed_0000 + image_bytes);
    assert!(
        wait_until(Duration::from_secs(20), || writer.operations() > 50),
        "the writer does not get going"
    );

    let ack_log = work.path().join("acks.log");
    let mut agent = spawn_agent(
        fs.image(),
        server.addr,
        SOURCE,
        pki.path(),
        &[
            "--interval",
            "500ms",
            "--snapshot",
            mode,
            "--ack-log",
            ack_log.to_str().unwrap(),
        ],
    );

    // Snapshot the head each time a new complete commit is acknowledged.
    let points = AckedPoints {
        admin,
        source: SOURCE,
        ack_log: &ack_log,
        prefix: "p",
        timeout: POINTS_TIMEOUT,
    };
    points.take(&mut agent, wanted, |_| true);
    agent.stop_cleanly();
    let log = writer.stop();
    // A frozen view lives only as long as its epoch: none is left behind.
    let outer = fs.image().parent().unwrap();
    let left: Vec<String> = std::fs::read_dir(outer)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "source.img")
        .collect();
    assert!(left.is_empty(), "left beside the image: {left:?}");
    // The agent and the writer are gone: nothing holds a file any more.
    fs.unmount();

    let acks = read_acks(&ack_log);
    let snapshots = snapshots_json(admin);
    let points = snapshots
        .iter()
        .map(|s| {
            let root = s["root"].as_str().unwrap().to_owned();
            let ack = acks
                .iter()
                .find(|a| a.complete && a.root == root)
                .unwrap_or_else(|| panic!("snapshot {s} names no acknowledged root: {acks:#?}"));
            Point {
                snapshot: s["name"].as_str().unwrap().to_owned(),
                root,
                consistency: s["consistency"].as_str().map(str::to_owned),
                view_unix_ms: ack.scan_started_unix_ms,
                acked_unix_ms: ack.unix_ms,
            }
        })
        .collect();
    let (code, body) = admin_request(admin, "GET", "/v1/sources", None);
    assert_eq!(code, 200, "{body}");
    let sources: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let head_consistency = sources
        .iter()
        .find(|s| s["source"] == SOURCE)
        .and_then(|s| s["consistency"].as_str())
        .map(str::to_owned);
    Run {
        work,
        _pki: pki,
        server,
        points,
        log,
        head_consistency,
    }
}

/// Exports `point`, checks its file system as a restore would, and checks it
/// against the writer's log; returns what was checked, or what is wrong.
fn examine_point(run: &Run, kind: FsKind, point: &Point) -> Result<Verified, String> {
    let copy = run.work.path().join(format!("{}.img", point.snapshot));
    let output = Command::new(bin())
        .args(["export", "--data"])
        .arg(run.data())
        .args(["--source", SOURCE, "--snapshot", &point.snapshot, "--out"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_success(&output);
    let mount_point = run.work.path().join(format!("{}.mnt", point.snapshot));
    let checked = check_and_mount(kind, &copy, &mount_point);
    let result = match checked {
        Err(damage) => Err(format!(
            "the file system is damaged: {damage}\n(operations durable before the view: {})",
            operations_before(&run.log, point.view_unix_ms)
        )),
        Ok(mounted) => {
            let result = verify(
                &run.log,
                mounted.path(),
                point.view_unix_ms,
                point.acked_unix_ms,
            );
            mounted.unmount();
            result.map_err(|problems| {
                format!(
                    "it lacks what was durable before its view ({} problems): {:#?}",
                    problems.len(),
                    &problems[..problems.len().min(20)]
                )
            })
        }
    };
    std::fs::remove_file(&copy).unwrap();
    result
}

/// [`examine_point`], which must find the point whole.
fn check_point(run: &Run, kind: FsKind, point: &Point) {
    match examine_point(run, kind, point) {
        Ok(verified) => {
            assert!(
                verified.files_read > 0 && verified.pages > 0,
                "point {point:?} checked nothing: {verified:?}"
            );
            eprintln!("point {} ({}): {verified:?}", point.snapshot, point.root);
        }
        Err(problem) => panic!("point {point:?}: {problem}"),
    }
}

fn operations_before(log: &DurableLog, unix_ms: u64) -> usize {
    log.files
        .iter()
        .filter(|e| e.durable_unix_ms < unix_ms)
        .count()
        + log
            .pages
            .iter()
            .filter(|e| e.durable_unix_ms < unix_ms)
            .count()
}

/// Every point carries `label`, and so does the head.
fn assert_labels(run: &Run, label: &str) {
    for point in &run.points {
        assert_eq!(
            point.consistency.as_deref(),
            Some(label),
            "snapshot {} of a --snapshot run: {point:?}",
            point.snapshot
        );
    }
    assert_eq!(
        run.head_consistency.as_deref(),
        Some(label),
        "the source's head in /v1/sources"
    );
}

#[test]
fn ext4_points_from_auto_views_are_clean_and_hold_every_durable_write() {
    if !loop_fs_ready("ext4 point-in-time test", &tools()) {
        return;
    }
    let run = replicate_under_writer(FsKind::Ext4, 64 * MIB, "auto", 6);
    for point in &run.points {
        check_point(&run, FsKind::Ext4, point);
    }
    assert_labels(&run, "crash-consistent");
    drop(run.server);
}

#[test]
fn xfs_points_from_reflink_views_are_clean_and_hold_every_durable_write() {
    if !loop_fs_ready("XFS point-in-time test", &tools()) {
        return;
    }
    let run = replicate_under_writer(FsKind::Xfs, FsKind::Xfs.min_image_bytes(), "reflink", 3);
    // The last point and one before it: each check replays a 300 MiB image.
    for point in run.points.iter().rev().take(2) {
        check_point(&run, FsKind::Xfs, point);
    }
    assert_labels(&run, "crash-consistent");
}

#[test]
fn live_reads_of_a_busy_ext4_are_labelled_live() {
    if !loop_fs_ready("live-read label test", &tools()) {
        return;
    }
    let run = replicate_under_writer(FsKind::Ext4, 64 * MIB, "none", 6);
    // A live read may be torn: nothing is claimed about its file system, only
    // that the label says so. What the points hold is shown, not asserted.
    let mut torn = 0;
    for point in &run.points {
        match examine_point(&run, FsKind::Ext4, point) {
            Ok(verified) => eprintln!("live point {}: whole, {verified:?}", point.snapshot),
            Err(problem) => {
                torn += 1;
                eprintln!("live point {}: torn: {problem}", point.snapshot);
            }
        }
    }
    eprintln!(
        "live points: {torn} of {} torn (damaged, or missing what was durable before the scan)",
        run.points.len()
    );
    assert_labels(&run, "live");
}

//! Recovery points of a machine are one instant of all its disks: a writer
//! appends numbered records alternately to two disks (record n to disk n mod
//! 2, each write complete before the next starts) while the agent replicates
//! them with reflink views taken inside one quiesce (the writer stopped);
//! in every acknowledged recovery point the records form a prefix 0..k with
//! no gap on either disk. The same holds in capture mode, the writer going
//! through the agent's exports (nbdfuse) and every cut taken of both disks
//! at one instant.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::ack_log::read_acks;
use blockrep_testkit::loopfs::{loop_fs_ready, scratch_xfs};
use blockrep_testkit::nbdfuse::NbdFuse;

const MIB: usize = 1 << 20;
const RECORD: usize = 512;

/// The writer: record n (n + 1, so that no record is zeros, repeated over
/// its 512 bytes) at slot n / 2 of disk n mod 2, written and complete
/// before record n + 1 starts.
const WRITER: &str = r#"
import os, sys, time
flags = os.O_WRONLY | (os.O_SYNC if len(sys.argv) > 4 and sys.argv[4] == "sync" else 0)
a = os.open(sys.argv[1], flags)
b = os.open(sys.argv[2], flags)
n = 0
limit = int(sys.argv[3])
while n < limit:
    record = (n + 1).to_bytes(8, "little") * 64
    os.pwrite(a if n % 2 == 0 else b, record, (n // 2) * 512)
    n += 1
    if n % 16 == 0:
        time.sleep(0.005)
"#;

/// How many records of `disk` (its index) are in place from the first slot:
/// slot i of disk d holds record 2i + d, stored as 2i + d + 1.
fn records_from_start(image: &[u8], disk: u64) -> u64 {
    let mut count = 0;
    for slot in image.chunks_exact(RECORD) {
        let n = u64::from_le_bytes(slot[..8].try_into().unwrap());
        if n != 2 * count + disk + 1 || slot[..8].repeat(64) != slot {
            break;
        }
        count += 1;
    }
    count
}

/// Whether any record lies past the first `in_place` slots: a hole in the
/// disk's sequence.
fn records_after_gap(image: &[u8], in_place: u64) -> bool {
    image
        .chunks_exact(RECORD)
        .skip(in_place as usize)
        .any(|slot| slot.iter().any(|&b| b != 0))
}

#[test]
fn every_machine_point_holds_a_prefix_of_records_written_alternately_to_two_disks() {
    if !(loop_fs_ready("machine views on XFS", &["mkfs.xfs", "losetup", "mount"])
        && have_tool("python3"))
    {
        return;
    }
    let xfs_dir = tempfile::tempdir().unwrap();
    let xfs = scratch_xfs(xfs_dir.path());
    let disks = [xfs.path().join("a.raw"), xfs.path().join("b.raw")];
    for disk in &disks {
        std::fs::write(disk, vec![0u8; 4 * MIB]).unwrap();
    }
    // Clones of both disks left by an agent killed before it removed them:
    // each disk's are swept when it is first cloned.
    let stale = [
        xfs.path().join(".a.raw.blockrep-view-4194305-0"),
        xfs.path().join(".b.raw.blockrep-view-4194305-1"),
    ];
    for clone in &stale {
        std::fs::write(clone, b"left behind").unwrap();
    }
    let rig = rig(&["web"], &["--gc-interval", "off"]);
    let script = rig.path("writer.py");
    std::fs::write(&script, WRITER).unwrap();
    // 8,192 records per disk fill 4 MiB: the writer runs until then, about
    // five seconds at its pace.
    let mut writer = std::process::Command::new("python3")
        .arg(&script)
        .args(&disks)
        .arg("16384")
        .spawn()
        .unwrap();
    let pid = writer.id();
    // Stopped before the views are made, and only once it is stopped (a
    // signal is delivered when the process next runs): no write after.
    let quiesce = format!(
        "kill -STOP {pid}; until grep -qE '^State:.*(T|Z)' /proc/{pid}/status 2>/dev/null \
         || [ ! -e /proc/{pid} ]; do sleep 0.001; done"
    );
    let thaw = format!("kill -CONT {pid}");
    let ack_log = rig.path("acks.log");
    let a = format!("a={}", disks[0].display());
    let b = format!("b={}", disks[1].display());
    let mut agent = rig.spawn_agent(
        Path::new(&a),
        "web",
        &[
            "--disk",
            &b,
            "--snapshot",
            "reflink",
            "--quiesce-cmd",
            &quiesce,
            "--thaw-cmd",
            &thaw,
            "--interval",
            "50ms",
            "--ack-log",
            ack_log.to_str().unwrap(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(120), || read_acks(&ack_log).len() >= 8),
        "fewer than 8 machine points: {:?}",
        agent.lines()
    );
    let status = writer.wait().unwrap();
    assert!(status.success());
    agent.stop_cleanly();
    for clone in &stale {
        assert!(!clone.exists(), "{} was not swept", clone.display());
    }
    assert!(
        agent
            .lines()
            .iter()
            .any(|l| l.contains("consistency=quiesced")),
        "no quiesced point: {:?}",
        agent.lines()
    );

    let checked = assert_every_point_is_a_prefix(&rig, &ack_log, 16384);
    assert!(checked >= 8, "{checked} points checked");
}

/// Exports every machine point the agent's acknowledgement log names and
/// asserts that its records form a prefix 0..k with no gap on either disk,
/// and that at least one point caught the writer part way through its
/// `records` (else the order was never put to the test); returns how many
/// points were checked.
fn assert_every_point_is_a_prefix(
    rig: &blockrep_testkit::AgentRig,
    ack_log: &Path,
    records: u64,
) -> usize {
    let acks = read_acks(ack_log);
    let mut checked = 0;
    let mut part_way = 0;
    for ack in &acks {
        let out = rig.path(&format!("point-{}", ack.epoch));
        let export = std::process::Command::new(bin())
            .args([
                "export",
                "--data",
                rig.data().to_str().unwrap(),
                "--root",
                &ack.root,
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert_success(&export);
        let a = std::fs::read(out.join("a.raw")).unwrap();
        let b = std::fs::read(out.join("b.raw")).unwrap();
        let (in_a, in_b) = (records_from_start(&a, 0), records_from_start(&b, 1));
        assert!(
            !records_after_gap(&a, in_a) && !records_after_gap(&b, in_b),
            "epoch {}: a record after a gap ({in_a} on a, {in_b} on b)",
            ack.epoch
        );
        // Record 2i (on a) is written before 2i + 1 (on b), before 2i + 2.
        assert!(
            in_a == in_b || in_a == in_b + 1,
            "epoch {}: {in_a} records on a and {in_b} on b are no prefix of one sequence",
            ack.epoch
        );
        part_way += usize::from((1..records).contains(&(in_a + in_b)));
        checked += 1;
    }
    assert!(
        part_way > 0,
        "no point of {checked} caught the writer part way"
    );
    checked
}

/// Whether nbdfuse can mount an export here.
fn fuse_ready(test: &str) -> bool {
    let tools = have_tool("nbdfuse") && have_tool("fusermount3") && have_tool("python3");
    if tools && Path::new("/dev/fuse").exists() {
        return true;
    }
    assert!(
        !require_external_tools(),
        "{test} needs nbdfuse, fusermount3, python3 and /dev/fuse (BLOCKREP_REQUIRE_TOOLS is set)"
    );
    eprintln!("skipping {test}: no nbdfuse or /dev/fuse");
    false
}

#[test]
fn every_capture_point_of_a_machine_holds_a_prefix_of_records_written_alternately_to_two_disks() {
    if !fuse_ready("machine capture order") {
        return;
    }
    let rig = rig(&["web"], &["--gc-interval", "off"]);
    let disks = [rig.path("a.raw"), rig.path("b.raw")];
    for disk in &disks {
        std::fs::write(disk, vec![0u8; 4 * MIB]).unwrap();
    }
    // The workload reaches each disk through the agent's export of its name
    // only; the agent cuts both at one instant every 50 ms.
    let socket = rig.path("web.sock");
    let ack_log = rig.path("acks.log");
    let a = format!("a={}", disks[0].display());
    let b = format!("b={}", disks[1].display());
    let serve = format!("unix:{}", socket.display());
    let mut agent = rig.spawn_agent(
        Path::new(&a),
        "web",
        &[
            "--disk",
            &b,
            "--serve",
            &serve,
            "--interval",
            "50ms",
            "--ack-log",
            ack_log.to_str().unwrap(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        }),
        "no socket: {:?}",
        agent.lines()
    );
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", socket.display());
    let fuse_a = NbdFuse::start(&rig.path("fuse-a"), &uri("a"));
    let fuse_b = NbdFuse::start(&rig.path("fuse-b"), &uri("b"));
    let script = rig.path("writer.py");
    std::fs::write(&script, WRITER).unwrap();
    // Each record written with O_SYNC: complete (on the export, and so in
    // the capture) before the next starts.
    let status = std::process::Command::new("python3")
        .arg(&script)
        .arg(fuse_a.file())
        .arg(fuse_b.file())
        .arg("4096")
        .arg("sync")
        .status()
        .unwrap();
    assert!(status.success(), "the writer failed");
    drop((fuse_a, fuse_b));
    // Converged: the head is both disks as the writer left them.
    let written: Vec<(&str, Vec<u8>)> = vec![
        ("a", std::fs::read(&disks[0]).unwrap()),
        ("b", std::fs::read(&disks[1]).unwrap()),
    ];
    let root = crate::machine::machine_root(&written).to_hex();
    assert!(
        wait_until(Duration::from_secs(60), || {
            admin_source(rig.admin(), "web").and_then(|s| s.root) == Some(root.clone())
        }),
        "the replica did not converge: {:?}",
        agent.lines()
    );
    // Status says the machine is in capture mode, with both disks' writes.
    let view = admin_source(rig.admin(), "web").unwrap();
    assert_eq!(view.mode, blockrep_server::SourceMode::Capture);
    let capture = view.capture.unwrap();
    assert!(capture.writes >= 4096, "{capture:?}");
    // The operator cuts the machine over: the agent stops writes to both
    // exports, cuts them a last time and leaves; the cutover launch is the
    // machine as written.
    // Forced: the workflow's test step is not what this test is about.
    let force = Some(r#"{"force":true}"#);
    let (code, body) = admin_request(rig.admin(), "POST", "/v1/sources/web/cutover", force);
    assert_eq!(code, 202, "{body}");
    let status = blockrep_testkit::wait_exit(&mut agent, Duration::from_secs(60));
    let lines = agent.lines();
    assert!(status.success(), "agent: {status}: {lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("cutover complete")),
        "{lines:?}"
    );
    let source = admin_source(rig.admin(), "web").unwrap();
    assert_eq!(source.state, blockrep_server::SourceState::CutOver);
    assert_eq!(source.cutover.unwrap().root, root);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("consistency=crash-consistent")),
        "no crash-consistent point: {lines:?}"
    );
    let checked = assert_every_point_is_a_prefix(&rig, &ack_log, 4096);
    assert!(checked >= 8, "{checked} points checked");
    // The last point holds every record: 2,048 on each disk.
    let last = read_acks(&ack_log).pop().unwrap();
    let out = rig.path("last");
    assert_success(
        &std::process::Command::new(bin())
            .args(["export", "--data", rig.data().to_str().unwrap()])
            .args(["--root", &last.root, "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    for (name, disk) in [("a", 0), ("b", 1)] {
        let image = std::fs::read(out.join(format!("{name}.raw"))).unwrap();
        assert_eq!(records_from_start(&image, disk), 2048, "disk {name}");
    }
}

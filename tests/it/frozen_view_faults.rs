//! Frozen views under faults: a signal mid-epoch still thaws and releases, a
//! view that fails once is tried again, and a fixed-name snapshot (one LVM or
//! ZFS name) is never asked for twice at once.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::scripts::{read_lines, write_script};
use blockrep_testkit::{Pki, random_bytes};

const MIB: usize = 1 << 20;

/// A snapshot script that copies the disk to `fixed.raw` (the one name it
/// has, like an LVM snapshot's) and refuses while that view still exists; a
/// release script that logs and removes it.
fn fixed_name_scripts(dir: &Path) -> (String, String) {
    let (snapshot, release) = (dir.join("snapshot.sh"), dir.join("release.sh"));
    let d = dir.display();
    write_script(
        &snapshot,
        &format!(
            "if [ -e {d}/fixed.raw ]; then echo 'fixed.raw already exists' >&2; exit 1; fi\n\
             cp \"$BLOCKREP_DISK\" {d}/fixed.raw\n\
             echo view >> {d}/snapshots.log\n\
             echo {d}/fixed.raw\n"
        ),
    );
    write_script(
        &release,
        &format!("echo \"$BLOCKREP_VIEW\" >> {d}/releases.log\nrm -f \"$BLOCKREP_VIEW\"\n"),
    );
    (
        snapshot.to_str().unwrap().to_owned(),
        release.to_str().unwrap().to_owned(),
    )
}

#[test]
fn sigterm_while_the_snapshot_command_runs_still_thaws_before_the_agent_exits() {
    let pki = Pki::new(&["frozen"]);
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(MIB, 1)).unwrap();
    // The view is made before any connection: no server is needed.
    let order = work.path().join("order.log");
    let quiesce = format!("echo quiesce >> {}", order.display());
    let thaw = format!("echo thaw >> {}", order.display());
    let mut agent = spawn_agent(
        &disk,
        closed_addr(),
        "frozen",
        pki.path(),
        &[
            "--snapshot-cmd",
            "sleep 60; echo /nonexistent",
            "--quiesce-cmd",
            &quiesce,
            "--thaw-cmd",
            &thaw,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || !read_lines(&order).is_empty()),
        "the quiesce command did not run: {}",
        agent.stderr.lock().unwrap()
    );
    std::thread::sleep(Duration::from_millis(300));
    agent.stop_cleanly();
    assert_eq!(
        read_lines(&order),
        vec!["quiesce", "thaw"],
        "{}",
        agent.stderr.lock().unwrap()
    );
}

#[test]
fn sigterm_of_a_once_agent_mid_epoch_releases_its_view() {
    let rig = rig(&["once"], &[]);
    let disk = rig.disk("disk.raw", &random_bytes(32 * MIB, 3));
    let (snapshot, release) = fixed_name_scripts(rig.work.path());
    // 32 MiB of random bytes at 4 MiB/s: an epoch of about 8 s.
    let mut agent = rig.spawn_agent(
        &disk,
        "once",
        &[
            "--once",
            "--max-rate",
            "4MiB/s",
            "--snapshot-cmd",
            &snapshot,
            "--release-cmd",
            &release,
        ],
    );
    let snapshots = rig.path("snapshots.log");
    assert!(
        wait_until(Duration::from_secs(30), || read_lines(&snapshots).len()
            == 1),
        "no view made: {}",
        agent.stderr.lock().unwrap()
    );
    std::thread::sleep(Duration::from_secs(2));
    let releases = rig.path("releases.log");
    assert!(read_lines(&releases).is_empty(), "released while in use");
    let status = agent.stop();
    let error = agent.stderr.lock().unwrap().clone();
    assert!(!status.success(), "it did not catch up: {status}");
    assert!(error.contains("stopped by a signal"), "{error}");
    assert_eq!(read_lines(&releases).len(), 1, "{error}");
    assert!(!rig.path("fixed.raw").exists());
}

#[test]
fn a_fixed_name_snapshot_is_released_before_the_cutover_takes_it_again() {
    let rig = nbd_rig(&["fixed"]);
    let disk = rig.disk("disk.raw", &random_bytes(MIB, 4));
    let (snapshot, release) = fixed_name_scripts(rig.work.path());
    let output = rig.agent_once(
        &disk,
        "fixed",
        &[
            "--cutover",
            "--snapshot-cmd",
            &snapshot,
            "--release-cmd",
            &release,
        ],
    );
    assert_success(&output);
    assert!(
        stdout(&output).contains("cutover complete"),
        "{}",
        stdout(&output)
    );
    // The first epoch, the scan that found the replica caught up, the cutover.
    let made = read_lines(&rig.path("snapshots.log")).len();
    assert!(made >= 3, "{made} views");
    assert_eq!(read_lines(&rig.path("releases.log")).len(), made);
}

#[test]
fn a_view_that_fails_once_is_retried_and_replication_goes_on() {
    let rig = rig(&["flaky"], &[]);
    let disk = rig.disk("disk.raw", &random_bytes(MIB, 5));
    let (snapshot, release) = fixed_name_scripts(rig.work.path());
    // Fails the first time (as lvcreate may, out of extents for a moment).
    let flaky = rig.path("flaky.sh");
    let marker = rig.path("failed-once");
    write_script(
        &flaky,
        &format!(
            "if [ ! -e {m} ]; then touch {m}; echo 'no space for the snapshot' >&2; exit 5; fi\n\
             exec {snapshot}\n",
            m = marker.display()
        ),
    );
    let mut agent = rig.spawn_agent(
        &disk,
        "flaky",
        &[
            "--interval",
            "300ms",
            "--snapshot-cmd",
            flaky.to_str().unwrap(),
            "--release-cmd",
            &release,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || !agent.epochs().is_empty()),
        "no epoch after a failed view: {:?}\n{}",
        agent.try_wait(),
        agent.stderr.lock().unwrap()
    );
    assert!(marker.exists());
    assert!(
        agent.stderr.lock().unwrap().contains("exit status: 5"),
        "{}",
        agent.stderr.lock().unwrap()
    );
    agent.stop_cleanly();
}

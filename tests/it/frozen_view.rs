//! Frozen views: the agent scans and sends a view of the disk taken at one
//! instant (a reflink clone, or an operator's snapshot command), releases it
//! whatever happens to the epoch, and labels each point by how it was taken.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::loopfs::{loop_fs_ready, scratch_xfs};
use blockrep_testkit::random_bytes;
use blockrep_testkit::scripts::{read_lines, write_script};
use blockrep_testkit::wait_exit;

const MIB: usize = 1 << 20;
const CHUNK: u32 = 65_536;

/// The `consistency=` of every epoch line the agent printed.
fn labels(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("epoch "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("consistency="))
                .map(str::to_owned)
        })
        .collect()
}

fn lines_of(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

/// A snapshot script that pauses the test's writer (the `pause`/`paused`
/// files), copies the disk to a new view file, keeps a second copy
/// (`view-N.keep`) for the test to compare with, logs the view, and prints its
/// path; and a release script that logs and removes the view.
struct Scripts {
    snapshot: PathBuf,
    release: PathBuf,
    snapshot_log: PathBuf,
    release_log: PathBuf,
}

fn scripts(dir: &Path) -> Scripts {
    let snapshot = dir.join("snapshot.sh");
    let release = dir.join("release.sh");
    let (snapshot_log, release_log) = (dir.join("snapshots.log"), dir.join("releases.log"));
    let d = dir.display();
    write_script(
        &snapshot,
        &format!(
            "n=$(wc -l < {d}/snapshots.log 2>/dev/null || echo 0)\n\
             view={d}/view-$n.raw\n\
             if [ -e {d}/writer ]; then\n\
               touch {d}/pause\n\
               until [ -e {d}/paused ]; do sleep 0.01; done\n\
             fi\n\
             cp \"$BLOCKREP_DISK\" \"$view\"\n\
             rm -f {d}/pause\n\
             cp \"$view\" {d}/view-$n.keep\n\
             echo \"$BLOCKREP_SOURCE $view\" >> {d}/snapshots.log\n\
             echo 'making the view: this line is not the path' \n\
             echo \"$view\"\n\
             echo\n"
        ),
    );
    write_script(
        &release,
        &format!(
            "echo \"$BLOCKREP_SOURCE $BLOCKREP_VIEW\" >> {d}/releases.log\nrm -f \"$BLOCKREP_VIEW\"\n"
        ),
    );
    Scripts {
        snapshot,
        release,
        snapshot_log,
        release_log,
    }
}

/// Writes random 4 KiB blocks all over `disk` until dropped, except while the
/// snapshot script holds it paused (it then acknowledges with `paused`).
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(dir: &Path, disk: &Path) -> Self {
        let (dir, disk) = (dir.to_owned(), disk.to_owned());
        std::fs::write(dir.join("writer"), b"").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let blocks = file.metadata().unwrap().len() / 4096;
            let mut writes = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                if dir.join("pause").exists() {
                    std::fs::write(dir.join("paused"), b"").unwrap();
                    while dir.join("pause").exists() && !stopped.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    std::fs::remove_file(dir.join("paused")).unwrap();
                    continue;
                }
                let block = u64::from_le_bytes(
                    blake3::hash(&writes.to_le_bytes()).as_bytes()[..8]
                        .try_into()
                        .unwrap(),
                ) % blocks;
                file.write_all_at(&random_bytes(4096, 7_000 + writes), block * 4096)
                    .unwrap();
                writes += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            writes
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_snapshot_command_view_is_what_is_replicated_and_every_view_is_released() {
    let rig = rig(&["vm"], &[]);
    let work = &rig.work;
    let disk = rig.disk("disk.raw", &random_bytes(8 * MIB, 1));
    let s = scripts(work.path());
    let writer = Writer::start(work.path(), &disk);
    let ack_log = work.path().join("acks.log");
    let mut agent = rig.spawn_agent(
        &disk,
        "vm",
        &[
            "--interval",
            "300ms",
            "--ack-log",
            ack_log.to_str().unwrap(),
            "--snapshot-cmd",
            s.snapshot.to_str().unwrap(),
            "--release-cmd",
            s.release.to_str().unwrap(),
        ],
    );
    agent.wait_for_epochs(3, Duration::from_secs(60));
    agent.stop_cleanly();
    let writes = writer.stop();
    assert!(writes > 0, "the writer never wrote");

    // Every view made was released, once, after the agent was done with it.
    let made = read_lines(&s.snapshot_log);
    let mut released = read_lines(&s.release_log);
    let mut made_sorted = made.clone();
    made_sorted.sort();
    released.sort();
    assert_eq!(made_sorted, released, "views made and released differ");
    for line in &made {
        let path = line.split_whitespace().nth(1).unwrap();
        assert!(line.starts_with("vm "), "{line}");
        assert!(!Path::new(path).exists(), "{path} was not released");
    }

    // Each committed root is the root of one of the views, byte for byte: the
    // live disk, written all along, was read neither by the scan nor at send
    // time. Every point is labelled crash-consistent.
    let epochs = agent.epochs();
    let labels = labels(&agent.lines());
    assert_eq!(labels.len(), epochs.len());
    assert!(labels.iter().all(|l| l == "crash-consistent"), "{labels:?}");
    let kept: Vec<(String, PathBuf)> = (0..made.len())
        .map(|n| {
            let path = work.path().join(format!("view-{n}.keep"));
            (disk_root(&path, CHUNK), path)
        })
        .collect();
    for (epoch, root) in &epochs {
        assert!(
            kept.iter().any(|(r, _)| r == root),
            "epoch {epoch} committed root {root}, which is no view's"
        );
    }
    let (_, last_root) = epochs.last().unwrap();
    let (_, view) = kept.iter().find(|(r, _)| r == last_root).unwrap();
    let exported = work.path().join("exported.raw");
    assert_success(
        &Command::new(bin())
            .args(["export", "--data"])
            .arg(rig.data())
            .args(["--root", last_root, "--out"])
            .arg(&exported)
            .output()
            .unwrap(),
    );
    let exported = std::fs::read(&exported).unwrap();
    assert!(
        exported == std::fs::read(view).unwrap(),
        "the replica is not the view"
    );
    assert!(
        exported != std::fs::read(&disk).unwrap(),
        "the live disk moved on after the view: the replica must not equal it"
    );
    assert!(!read_lines(&ack_log).is_empty());
}

#[test]
fn the_release_command_runs_after_a_bad_view_and_after_a_failed_epoch() {
    let rig = rig(&["db"], &[]);
    let (work, pki) = (&rig.work, &rig.pki);
    let disk = rig.disk("disk.raw", &random_bytes(2 * MIB, 2));
    let s = scripts(work.path());
    let release = s.release.to_str().unwrap();
    let addr = rig.server.addr;
    // A run of the agent whose views `snapshot` makes and the release script
    // releases.
    let once_with_view = |to, snapshot: &str| {
        agent_once(
            &disk,
            to,
            "db",
            pki.path(),
            &["--snapshot-cmd", snapshot, "--release-cmd", release],
        )
    };

    // A view of the wrong size: a clear error, and the view is released.
    let short = work.path().join("short.sh");
    write_script(
        &short,
        &format!(
            "head -c 1048576 \"$BLOCKREP_DISK\" > {0}/short.raw\necho {0}/short.raw\n",
            work.path().display()
        ),
    );
    let output = once_with_view(addr, short.to_str().unwrap());
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("is 1048576 bytes") && error.contains("2097152 bytes"),
        "{error}"
    );
    let short_view = format!("db {}/short.raw", work.path().display());
    assert_eq!(read_lines(&s.release_log), vec![short_view.clone()]);

    // The view is made, then the server cannot be reached: released too.
    let output = once_with_view(closed_addr(), s.snapshot.to_str().unwrap());
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("cannot connect"),
        "{}",
        stderr(&output)
    );
    let view0 = format!("db {}/view-0.raw", work.path().display());
    assert_eq!(read_lines(&s.snapshot_log), vec![view0.clone()]);
    assert_eq!(read_lines(&s.release_log), vec![short_view, view0]);

    // A snapshot command that fails or hangs: a clear error, no release (it
    // printed no view), and the thaw command runs all the same.
    let order = work.path().join("order.log");
    let quiesce = format!("echo quiesce >> {}", order.display());
    let thaw = format!("echo thaw >> {}", order.display());
    let started = std::time::Instant::now();
    let output = agent_once(
        &disk,
        addr,
        "db",
        pki.path(),
        &[
            "--snapshot-cmd",
            "sleep 30; echo /nonexistent",
            "--snapshot-cmd-timeout",
            "1s",
            "--quiesce-cmd",
            &quiesce,
            "--thaw-cmd",
            &thaw,
        ],
    );
    assert!(!output.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the command was not killed"
    );
    assert!(
        stderr(&output).contains("did not finish within 1s"),
        "{}",
        stderr(&output)
    );
    assert_eq!(read_lines(&order), vec!["quiesce", "thaw"]);
    let output = agent_once(
        &disk,
        addr,
        "db",
        pki.path(),
        &["--snapshot-cmd", "echo making; exit 3"],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("exit status: 3"),
        "{}",
        stderr(&output)
    );

    // Quiesced around a good view: the point says so, and the order holds.
    std::fs::remove_file(&order).unwrap();
    let logged_snapshot = format!(
        "echo snapshot >> {}; {}",
        order.display(),
        s.snapshot.display()
    );
    let output = agent_once(
        &disk,
        addr,
        "db",
        pki.path(),
        &[
            "--snapshot-cmd",
            &logged_snapshot,
            "--release-cmd",
            release,
            "--quiesce-cmd",
            &quiesce,
            "--thaw-cmd",
            &thaw,
        ],
    );
    assert_success(&output);
    assert_eq!(labels(&lines_of(&stdout(&output))), vec!["quiesced"]);
    let order = read_lines(&order);
    assert_eq!(&order[..3], ["quiesce", "snapshot", "thaw"]);
    // Each view made was released (the run scans once more to see it caught up).
    assert_eq!(
        read_lines(&s.snapshot_log).len() + 1,
        read_lines(&s.release_log).len()
    );

    // The flags that contradict each other are refused before anything runs.
    for extra in [
        &["--snapshot", "none", "--snapshot-cmd", "true"][..],
        &["--snapshot", "reflink", "--snapshot-cmd", "true"][..],
        &["--release-cmd", "true"][..],
    ] {
        let output = agent_once(&disk, addr, "db", pki.path(), extra);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{extra:?}: {}",
            stderr(&output)
        );
    }
    let output = agent_once(
        &disk,
        addr,
        "db",
        pki.path(),
        &["--snapshot", "none", "--quiesce-cmd", "true"],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--snapshot none"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn sigterm_mid_epoch_releases_the_view_before_the_agent_exits() {
    let rig = rig(&["slow"], &[]);
    let disk = rig.disk("disk.raw", &random_bytes(32 * MIB, 3));
    let s = scripts(rig.work.path());
    // 32 MiB of random bytes at 4 MiB/s: an epoch of about 8 s.
    let mut agent = rig.spawn_agent(
        &disk,
        "slow",
        &[
            "--max-rate",
            "4MiB/s",
            "--snapshot-cmd",
            s.snapshot.to_str().unwrap(),
            "--release-cmd",
            s.release.to_str().unwrap(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || read_lines(&s.snapshot_log)
            .len()
            == 1),
        "no view made: {}",
        agent.stderr.lock().unwrap()
    );
    // Past the scan, into the sending.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        read_lines(&s.release_log).is_empty(),
        "released while in use"
    );
    agent.stop_cleanly();
    assert!(
        agent.epochs().is_empty(),
        "the epoch finished before SIGTERM"
    );
    let view = format!("slow {}/view-0.raw", rig.work.path().display());
    assert_eq!(read_lines(&s.release_log), vec![view]);
    assert!(!rig.path("view-0.raw").exists());
}

/// Temporary clones (`.<image>.blockrep-view-*`) beside `image`.
fn clones_beside(image: &Path) -> Vec<String> {
    let prefix = format!(
        ".{}.blockrep-view-",
        image.file_name().unwrap().to_str().unwrap()
    );
    std::fs::read_dir(image.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn reflink_views_on_xfs_are_crash_consistent_and_leave_no_clone_behind() {
    if !loop_fs_ready("reflink views on XFS", &["mkfs.xfs", "losetup", "mount"]) {
        return;
    }
    // An XFS (which clones files) on a loop device; declared after its
    // directory, so it is unmounted and detached first, also on a panic.
    let xfs_dir = tempfile::tempdir().unwrap();
    let xfs = scratch_xfs(xfs_dir.path());
    let disk = xfs.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(16 * MIB, 4)).unwrap();
    // A clone left by an agent killed before it could remove it.
    let stale = xfs.path().join(".disk.raw.blockrep-view-4194305-0");
    std::fs::write(&stale, b"left behind").unwrap();
    let rig = rig(&["xfs", "blk"], &[]);

    let output = rig.agent_once(&disk, "xfs", &["--snapshot", "reflink"]);
    assert_success(&output);
    assert_eq!(
        labels(&lines_of(&stdout(&output))),
        vec!["crash-consistent"]
    );
    assert!(
        clones_beside(&disk).is_empty(),
        "{:?}",
        clones_beside(&disk)
    );
    rig.assert_replica_is("xfs", &disk);

    // auto clones too where it can, and says nothing about live reads.
    blockrep_testkit::write_at(&disk, 5 * CHUNK as u64, &random_bytes(4096, 5));
    let output = rig.agent_once(&disk, "xfs", &[]);
    assert_success(&output);
    assert_eq!(
        labels(&lines_of(&stdout(&output))),
        vec!["crash-consistent"]
    );
    assert!(
        !stderr(&output).contains("read live"),
        "{}",
        stderr(&output)
    );
    assert!(clones_beside(&disk).is_empty());

    // A block device cannot be cloned: reflink mode says what to use instead.
    let output = rig.agent_once(Path::new(xfs.device()), "blk", &["--snapshot", "reflink"]);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("is a block device") && error.contains("--snapshot-cmd"),
        "{error}"
    );
}

#[test]
fn reflink_mode_without_reflink_fails_clearly_and_auto_warns_once_and_reads_live() {
    // tmpfs cannot clone files.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        assert!(!require_external_tools(), "/dev/shm (tmpfs) is required");
        eprintln!("skipping: no /dev/shm");
        return;
    }
    let rig = rig(&["plain"], &[]);
    let shm_dir = tempfile::tempdir_in(shm).unwrap();
    let disk = shm_dir.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(4 * MIB, 6)).unwrap();

    let output = rig.agent_once(&disk, "plain", &["--snapshot", "reflink"]);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("tmpfs file system")
            && error.contains("cannot make a reflink clone")
            && error.contains("--snapshot auto or none")
            && error.contains("--snapshot-cmd"),
        "{error}"
    );
    assert!(
        clones_beside(&disk).is_empty(),
        "{:?}",
        clones_beside(&disk)
    );

    // auto: one warning at start, then live reads, labelled so, epoch after epoch.
    let mut agent = rig.spawn_agent(&disk, "plain", &["--interval", "200ms"]);
    for n in 0..3u64 {
        assert!(
            wait_until(Duration::from_secs(30), || agent.epochs().len() as u64 > n),
            "epoch {n} missing: {}",
            agent.stderr.lock().unwrap()
        );
        blockrep_testkit::write_at(&disk, n * CHUNK as u64, &random_bytes(4096, 10 + n));
    }
    assert!(wait_until(Duration::from_secs(30), || agent.epochs().len() >= 4));
    agent.signal("TERM");
    wait_exit(&mut agent, Duration::from_secs(30));
    let labels = labels(&agent.lines());
    assert!(
        labels.len() >= 4 && labels.iter().all(|l| l == "live"),
        "{labels:?}"
    );
    let log = agent.stderr.lock().unwrap().clone();
    assert_eq!(log.matches("can only be read live").count(), 1, "{log}");
    assert!(log.contains("tmpfs"), "{log}");
    assert!(
        clones_beside(&disk).is_empty(),
        "{:?}",
        clones_beside(&disk)
    );
}

#[test]
fn the_cutover_point_is_quiesced_only_after_the_pre_cutover_command() {
    let rig = nbd_rig(&["stopped", "running", "viewed"]);
    let s = scripts(rig.work.path());
    let cut_over = |source: &str, extra: &[&str]| {
        let disk = rig.disk(&format!("{source}.raw"), &random_bytes(MIB, 8));
        let mut args = vec!["--cutover"];
        args.extend(extra);
        let output = rig.agent_once(&disk, source, &args);
        assert_success(&output);
        let text = stdout(&output);
        let line = text
            .lines()
            .find(|l| l.starts_with("cutover complete"))
            .unwrap_or_else(|| panic!("no cutover: {text}"))
            .to_owned();
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("consistency="))
            .unwrap()
            .to_owned()
    };
    // The workload was stopped: even a live read is one quiesced state.
    assert_eq!(
        cut_over(
            "stopped",
            &["--snapshot", "none", "--pre-cutover-cmd", "true"]
        ),
        "quiesced"
    );
    // Nothing stopped it and nothing froze the disk: live.
    assert_eq!(cut_over("running", &["--snapshot", "none"]), "live");
    // A view without a stopped workload: crash-consistent, not quiesced.
    assert_eq!(
        cut_over(
            "viewed",
            &[
                "--snapshot-cmd",
                s.snapshot.to_str().unwrap(),
                "--release-cmd",
                s.release.to_str().unwrap()
            ]
        ),
        "crash-consistent"
    );
}

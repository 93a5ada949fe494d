//! The migration lifecycle end to end: initial sync, writer, test launch,
//! cutover with a pre-cutover command, writes to the cutover volume over NBD,
//! failback; fencing, conflicts and interrupted failbacks.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use blockrep_server::{LaunchView, SnapshotView, SourceState};
use blockrep_testkit::{ServerProcess, mixed_image, random_bytes, write_at};

const MIB: usize = 1 << 20;
const CHUNK: u64 = 65_536;

fn post(server: &ServerProcess, path: &str, body: &str) -> String {
    let (code, text) = admin_request(server.admin_addr.unwrap(), "POST", path, Some(body));
    assert!((200..300).contains(&code), "{path}: {code} {text}");
    text
}

fn failback_cmd(
    disk: &Path,
    server: &ServerProcess,
    source: &str,
    launch: &str,
    tls: &Path,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["failback", "--disk"])
        .arg(disk)
        .args([
            "--from",
            &server.addr.to_string(),
            "--source",
            source,
            "--launch",
            launch,
            "--tls-dir",
        ])
        .arg(tls)
        .args(extra)
        .output()
        .unwrap()
}

fn field(text: &str, key: &str) -> u64 {
    text.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .parse()
        .unwrap()
}

/// Cuts `source` over with its agent run as `--once --cutover`.
fn cut_over(disk: &Path, server: &ServerProcess, source: &str, tls: &Path) -> String {
    let output = agent_once(disk, server.addr, source, tls, &["--cutover"]);
    assert_success(&output);
    let text = stdout(&output);
    text.split_whitespace()
        .find_map(|f| f.strip_prefix("launch="))
        .unwrap()
        .to_owned()
}

#[test]
fn whole_lifecycle_sync_test_launch_cutover_nbd_writes_failback() {
    if !(have_tool("qemu-img") && have_tool("qemu-io") && have_tool("nbdcopy")) {
        return;
    }
    whole_lifecycle(&nbd_rig(&["app"]), &|| blockrep_core::IdSpace::PLAIN);
}

/// The lifecycle of source `app` on `rig` (a server serving NBD, without
/// automatic snapshots): continuous replication under a writer, a test
/// launch read by nbdcopy, an operator's cutover, writes to the cutover
/// volume through NBD, and a failback that brings the disk to it. Returns
/// the disk's path (equal to the cutover volume at the end). `space` gives
/// the source's id space once it replicated (keyed where the server
/// encrypts it), in which the server's roots are.
pub(crate) fn whole_lifecycle(
    rig: &blockrep_testkit::AgentRig,
    space: &dyn Fn() -> blockrep_core::IdSpace,
) -> std::path::PathBuf {
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, mixed_image(16 * MIB + 4096, 31)).unwrap();
    let admin = server.admin_addr.unwrap();

    // Continuous replication under a writer that the pre-cutover command stops.
    let stop_file = work.path().join("stop");
    let stopped_file = work.path().join("stopped");
    let writer = {
        let (disk, stop_file, stopped_file) =
            (disk.clone(), stop_file.clone(), stopped_file.clone());
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let mut seq = 1u64;
            while !stop_file.exists() {
                let mut block = random_bytes(4096, seq);
                block[..8].copy_from_slice(&seq.to_le_bytes());
                std::os::unix::fs::FileExt::write_all_at(&file, &block, (seq * 131 % 4096) * 4096)
                    .unwrap();
                seq += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            file.sync_all().unwrap();
            std::fs::write(&stopped_file, b"").unwrap();
        })
    };
    let hook = format!(
        "touch {stop}; while [ ! -e {stopped} ]; do sleep 0.01; done",
        stop = stop_file.display(),
        stopped = stopped_file.display()
    );
    let mut agent = spawn_agent(
        &disk,
        server.addr,
        "app",
        pki.path(),
        &["--interval", "100ms", "--pre-cutover-cmd", &hook],
    );
    assert!(
        wait_until(Duration::from_secs(30), || agent.epochs().len() >= 3),
        "no replication"
    );

    // A test launch: its NBD content is exactly the snapshot's.
    let snapshot: SnapshotView = serde_json::from_str(&post(
        server,
        "/v1/snapshots",
        r#"{"source":"app","name":"drill"}"#,
    ))
    .unwrap();
    let test_launch: LaunchView = serde_json::from_str(&post(
        server,
        "/v1/launches",
        r#"{"source":"app","snapshot":"drill","name":"drill-1","allow_live":true}"#,
    ))
    .unwrap();
    let drill_copy = work.path().join("drill.raw");
    run_tool(
        "nbdcopy",
        &[
            test_launch.nbd_uri.as_deref().unwrap(),
            drill_copy.to_str().unwrap(),
        ],
    );
    assert_eq!(
        disk_root_in(&drill_copy, CHUNK as u32, space()),
        snapshot.root,
        "test launch differs from its snapshot"
    );

    // The operator confirms the test; then cuts over; the agent stops the
    // writer, syncs, and exits.
    let ready = cli(server, pki, &["source", "mark-ready", "--source", "app"]);
    assert_success(&ready);
    assert!(
        stdout(&ready).contains("ready_for_cutover"),
        "{}",
        stdout(&ready)
    );
    let cutover = std::process::Command::new(BIN)
        .args([
            "cutover",
            "--source",
            "app",
            "--admin",
            &admin.to_string(),
            "--admin-token",
            pki.path().join("admin.token").to_str().unwrap(),
            "--timeout",
            "60s",
        ])
        .output()
        .unwrap();
    assert_success(&cutover);
    assert!(
        stdout(&cutover).contains("downtime_ms="),
        "{}",
        stdout(&cutover)
    );
    let status = agent.wait();
    assert!(status.success(), "agent: {}", agent.stderr.lock().unwrap());
    writer.join().unwrap();
    let agent_out = agent.lines().join("\n");
    assert!(agent_out.contains("cutover complete"), "{agent_out}");
    for key in [
        "downtime_ms",
        "final_scan_ms",
        "transfer_ms",
        "commit_ms",
        "launch_ready_ms",
    ] {
        field(&agent_out, key);
    }
    let view = admin_source(admin, "app").unwrap();
    assert_eq!(view.state, SourceState::CutOver);
    let record = view.cutover.clone().unwrap();
    assert!(
        record.downtime_ms > 0 && record.downtime_ms >= record.commit_ms,
        "{record:?}"
    );

    // The cutover volume equals the disk as it was when the writer stopped.
    let uri = format!("nbd://{}/{}", server.nbd_addr.unwrap(), record.launch);
    assert!(
        qemu_img_identical(&uri, &disk),
        "cutover volume differs from the disk at stop time"
    );

    // The workload runs on the cutover volume now: writes over NBD.
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 100000 5000",
            "-c",
            "write -P 0x6b 9000000 200000",
            "-c",
            "flush",
            &uri,
        ],
    );
    let touched: std::collections::BTreeSet<u64> = [(100_000u64, 5000u64), (9_000_000, 200_000)]
        .iter()
        .flat_map(|&(o, l)| (o / CHUNK)..=((o + l - 1) / CHUNK))
        .collect();

    // Failback brings the original disk to the cutover volume, sending only what changed.
    let output = failback_cmd(
        &disk,
        server,
        "app",
        &record.launch,
        pki.path(),
        &["--once"],
    );
    assert_success(&output);
    let text = stdout(&output);
    assert_eq!(
        field(&text, "chunks_written"),
        touched.len() as u64,
        "{text}"
    );
    assert!(text.contains("failback complete"), "{text}");
    let volume = work.path().join("volume.raw");
    run_tool("nbdcopy", &[&uri, volume.to_str().unwrap()]);
    assert!(
        std::fs::read(&volume).unwrap() == std::fs::read(&disk).unwrap(),
        "disk differs from the cutover volume"
    );
    assert_eq!(
        admin_source(admin, "app").unwrap().state,
        SourceState::FailedBack
    );
    let token = pki.path().join("admin.token");
    let token = token.to_str().unwrap();
    let table = run_tool(
        BIN,
        &[
            "status",
            "--admin",
            &admin.to_string(),
            "--admin-token",
            token,
        ],
    );
    assert!(table.contains("failed_back"), "{table}");
    disk
}

#[test]
fn after_cutover_the_old_agent_is_fenced_until_reset() {
    let rig = nbd_rig(&["web"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, mixed_image(4 * MIB, 41)).unwrap();
    let admin = server.admin_addr.unwrap();
    let launch = cut_over(&disk, server, "web", pki.path());
    assert!(launch.starts_with("web-cutover"), "{launch}");
    let head = admin_source(admin, "web").unwrap().root;

    write_at(&disk, 0, &random_bytes(8192, 5));
    let refused = agent_once(&disk, server.addr, "web", pki.path(), &[]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("fenced"), "{}", stderr(&refused));
    assert_eq!(
        admin_source(admin, "web").unwrap().root,
        head,
        "replica changed after cutover"
    );
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "web", &out));
    assert_ne!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());

    // The operator resets the source: replication resumes.
    let reset = std::process::Command::new(BIN)
        .args([
            "cutover",
            "--reset",
            "--source",
            "web",
            "--admin",
            &admin.to_string(),
            "--admin-token",
            pki.path().join("admin.token").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&reset);
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    assert_success(&export(&data, "web", &out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap());
}

#[test]
fn failback_stops_on_changes_made_to_the_disk_after_cutover() {
    let rig = nbd_rig(&["db"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, mixed_image(4 * MIB, 51)).unwrap();
    let launch = cut_over(&disk, server, "db", pki.path());
    // Someone kept writing to the original disk after cutover.
    write_at(&disk, 3 * CHUNK + 10, b"late write");
    write_at(&disk, 40 * CHUNK, &random_bytes(2 * CHUNK as usize, 9));
    let before = std::fs::read(&disk).unwrap();
    let output = failback_cmd(&disk, server, "db", &launch, pki.path(), &["--once"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("3 chunks")
            && message.contains("196608..262144")
            && message.contains("2621440..2752512"),
        "{message}"
    );
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "failback wrote despite the conflict"
    );

    let output = failback_cmd(
        &disk,
        server,
        "db",
        &launch,
        pki.path(),
        &["--once", "--overwrite-source-changes"],
    );
    assert_success(&output);
    assert_eq!(field(&stdout(&output), "source_changes_overwritten"), 3);
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "db", &out));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap(),
        "disk differs from the cutover state"
    );
}

#[test]
fn interrupted_failback_resumes_with_only_what_still_differs() {
    if !have_tool("nbdcopy") {
        return;
    }
    let rig = nbd_rig(&["big"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    let size = 96 * MIB;
    std::fs::write(&disk, random_bytes(size, 61)).unwrap();
    let admin = server.admin_addr.unwrap();
    let launch = cut_over(&disk, server, "big", pki.path());
    // The launch is rewritten entirely: every chunk differs.
    let new_content = work.path().join("new.raw");
    std::fs::write(&new_content, random_bytes(size, 62)).unwrap();
    let uri = format!("nbd://{}/{launch}", server.nbd_addr.unwrap());
    run_tool("nbdcopy", &[new_content.to_str().unwrap(), &uri]);

    let child = std::process::Command::new(BIN)
        .args(["failback", "--once", "--disk"])
        .arg(&disk)
        .args([
            "--from",
            &server.addr.to_string(),
            "--source",
            "big",
            "--launch",
            &launch,
            "--tls-dir",
        ])
        .arg(pki.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = child;
    let sent = || {
        admin_source(admin, "big")
            .unwrap()
            .failback_bytes_sent_total
    };
    assert!(
        wait_until(Duration::from_secs(60), || sent() >= (size / 3) as u64),
        "failback made no progress"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(sent() < size as u64, "failback finished before the kill");
    assert_ne!(
        admin_source(admin, "big").unwrap().state,
        SourceState::FailedBack
    );

    let output = failback_cmd(&disk, server, "big", &launch, pki.path(), &["--once"]);
    assert_success(&output);
    let total = sent();
    assert!(
        total as f64 <= 1.25 * size as f64,
        "sent {total} bytes for {size} differing bytes"
    );
    assert!(std::fs::read(&disk).unwrap() == std::fs::read(&new_content).unwrap());
    assert_eq!(
        admin_source(admin, "big").unwrap().state,
        SourceState::FailedBack
    );
}

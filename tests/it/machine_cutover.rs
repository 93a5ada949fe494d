//! A machine of three disks (one not a chunk multiple, one sparse) through
//! the whole migration: replicated, snapshotted and launched as of a past
//! point, cut over as one point of every disk, written to over NBD as the
//! workload would, and failed back disk by disk from the launch's volumes,
//! with one conflict report for every disk changed since cutover.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::machine::{MIB, assert_export_is, machine_agent_once, machine_disk_args, three_disks};
use blockrep_server::{LaunchView, SourceState};
use blockrep_testkit::{AgentRig, write_at};

/// The launch called `name`, from the admin API.
fn launch_named(rig: &AgentRig, name: &str) -> LaunchView {
    let (code, body) = admin_request(rig.admin(), "GET", "/v1/launches", None);
    assert_eq!(code, 200, "{body}");
    let launches: Vec<LaunchView> = serde_json::from_str(&body).unwrap();
    launches
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no launch {name}"))
}

/// `blockrep failback` of every disk of `disks` (files `NAME.img` of the
/// rig, named by `NAME`) from `launch`, with `extra` arguments.
fn failback_machine(
    rig: &AgentRig,
    disks: &[(&str, Vec<u8>)],
    launch: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut command = std::process::Command::new(BIN);
    command.arg("failback");
    for (name, _) in disks {
        command
            .arg("--disk")
            .arg(format!("{name}={}", disk_path(rig, name).display()));
    }
    command
        .args(["--from", &rig.server.addr.to_string(), "--source", "web"])
        .args(["--launch", launch, "--tls-dir"])
        .arg(rig.pki.path())
        .args(extra)
        .output()
        .unwrap()
}

fn disk_path(rig: &AgentRig, name: &str) -> PathBuf {
    rig.path(&format!("{name}.img"))
}

/// A write made over NBD with qemu-io to `uri`, and the same to `disk`.
fn nbd_write(uri: &str, disk: &mut [u8], offset: usize, len: usize, pattern: u8) {
    let command = format!("write -P {pattern:#x} {offset} {len}");
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", &command, "-c", "flush", uri],
    );
    disk[offset..offset + len].fill(pattern);
}

#[test]
fn a_machine_is_launched_cut_over_and_failed_back_whole() {
    if !(have_tool("nbdcopy") && have_tool("qemu-io")) {
        return;
    }
    let rig = nbd_rig(&["web"]);
    let mut disks = three_disks();
    machine_agent_once(&rig, &disks);
    let one = create_snapshot(&rig.server, "web", "one");
    let at_one = disks.clone();
    disks[0].1[..70_000].fill(7);
    disks[1].1[3 * MIB..].fill(8);
    disks[2].1[2 * MIB..2 * MIB + 4096].fill(9);
    machine_agent_once(&rig, &disks);

    // A launch of the first snapshot is every disk as of that point.
    let drill = create_launch(&rig.server, "web", &one.name, "web-drill");
    let names: Vec<&str> = drill.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["boot", "data", "log"]);
    for ((name, disk), volume) in at_one.iter().zip(&drill.volumes) {
        assert_export_is(volume, &rig.path(&format!("{name}.drill")), disk);
    }

    // One more change, then the cutover: one final point of all three.
    disks[2].1[..4096].fill(10);
    let (first, mut rest) = machine_disk_args(&rig, &disks);
    rest.extend([
        "--cutover".to_owned(),
        "--pre-cutover-cmd".into(),
        "true".into(),
    ]);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let output = rig.agent_once(Path::new(&first), "web", &rest);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains("launch=web-cutover"), "{text}");
    let view = admin_source(rig.admin(), "web").unwrap();
    assert_eq!(view.state, SourceState::CutOver);
    assert_eq!(view.cutover.unwrap().launch, "web-cutover");
    let head = blockrep_store::Store::open_read_only(&rig.data())
        .unwrap()
        .head(&blockrep_core::SourceId::new("web").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(head.consistency, blockrep_core::Consistency::Quiesced);
    let cutover = launch_named(&rig, "web-cutover");
    assert_eq!(cutover.kind, "cutover");
    for ((name, disk), volume) in disks.iter().zip(&cutover.volumes) {
        assert_export_is(volume, &rig.path(&format!("{name}.cutover")), disk);
    }
    // Replication is fenced: a further epoch of the machine is refused.
    let mut changed = disks.clone();
    changed[1].1[..4096].fill(11);
    let (first, rest) = machine_disk_args(&rig, &changed);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let fenced = rig.agent_once(Path::new(&first), "web", &rest);
    assert!(!fenced.status.success(), "an epoch after the cutover");
    assert!(stderr(&fenced).contains("cut over"), "{}", stderr(&fenced));
    std::fs::write(disk_path(&rig, "data"), &disks[1].1).unwrap();

    // The workload runs on the launch: writes to two of its volumes.
    let mut target: Vec<Vec<u8>> = disks.iter().map(|(_, d)| d.clone()).collect();
    let uri = |i: usize| cutover.volumes[i].nbd_uri.clone().unwrap();
    nbd_write(&uri(0), &mut target[0], 100_000, 5000, 0x5a);
    nbd_write(&uri(2), &mut target[2], 4 * MIB, 70_000, 0x6b);

    // Two source disks changed since cutover: one report names both, and
    // nothing is written to any disk.
    write_at(&disk_path(&rig, "boot"), 2 * MIB as u64, &[0x33; 4096]);
    write_at(&disk_path(&rig, "log"), 5 * MIB as u64, &[0x44; 4096]);
    let before: Vec<Vec<u8>> = ["boot", "data", "log"]
        .iter()
        .map(|n| std::fs::read(disk_path(&rig, n)).unwrap())
        .collect();
    let refused = failback_machine(&rig, &disks, "web-cutover", &["--once"]);
    assert!(!refused.status.success(), "failback over source changes");
    let report = stderr(&refused);
    assert!(
        report.contains("boot.img")
            && report.contains("log.img")
            && !report.contains("data.img")
            && report.contains("--overwrite-source-changes"),
        "{report}"
    );
    for (name, bytes) in ["boot", "data", "log"].iter().zip(&before) {
        assert!(
            std::fs::read(disk_path(&rig, name)).unwrap() == *bytes,
            "{name} was written by a refused failback"
        );
    }

    // Allowed to overwrite them: every disk takes its volume's content.
    let output = failback_machine(
        &rig,
        &disks,
        "web-cutover",
        &["--once", "--overwrite-source-changes"],
    );
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains("failback complete"), "{text}");
    assert!(text.contains("source_changes_overwritten=2"), "{text}");
    for (i, (name, _)) in disks.iter().enumerate() {
        assert!(
            std::fs::read(disk_path(&rig, name)).unwrap() == target[i],
            "{name} differs from its launch volume after failback"
        );
        assert_export_is(
            &cutover.volumes[i],
            &rig.path(&format!("{name}.after")),
            &target[i],
        );
    }
    assert_eq!(
        admin_source(rig.admin(), "web").unwrap().state,
        SourceState::FailedBack
    );
}

//! Machines of several disks on the server: a three-volume machine committed
//! to a store (one volume not a chunk multiple, one sparse) is snapshotted and
//! launched through the admin API, each volume is served over NBD as
//! `LAUNCH/VOLUME` to real clients (nbdinfo, nbdcopy, qemu-io), and `export`
//! writes one volume or all of them.

use std::path::Path;

use crate::common::*;
use blockrep_core::SourceId;
use blockrep_store::Store;
use blockrep_testkit::{Pki, mixed_image, random_bytes};

const MIB: usize = 1 << 20;
const CHUNK: u32 = 64 * 1024;

/// The three disks: `boot` (mixed data, a chunk multiple), `data` (random,
/// not a chunk multiple), `log` (sparse: two short runs of data).
fn three_disks() -> Vec<(&'static str, Vec<u8>)> {
    let mut log = vec![0u8; 6 * MIB];
    log[MIB..MIB + 5000].copy_from_slice(&random_bytes(5000, 3));
    log[5 * MIB + 77..5 * MIB + 4173].copy_from_slice(&random_bytes(4096, 4));
    vec![
        ("boot", mixed_image(4 * MIB, 1)),
        ("data", random_bytes(3 * MIB + 12_345, 2)),
        ("log", log),
    ]
}

/// Commits the disks as epoch 1 of `source`, one machine, as a server does.
fn commit_machine(data: &Path, source: &str, disks: &[(&str, Vec<u8>)]) {
    let store = Store::open(data).unwrap();
    let source = SourceId::new(source).unwrap();
    blockrep_testkit::store::commit_machine(&store, &source, 1, CHUNK, disks);
}

#[test]
fn a_machines_launch_serves_each_volume_over_nbd() {
    if !(have_tool("nbdinfo") && have_tool("nbdcopy") && have_tool("qemu-io")) {
        return;
    }
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut disks = three_disks();
    commit_machine(&data, "web", &disks);
    let server = nbd_server(&pki, &data);
    let snapshot = create_snapshot(&server, "web", "s1");
    assert_eq!(snapshot.consistency, "crash-consistent");
    let launch = create_launch(&server, "web", &snapshot.name, "drill");
    // One export per volume, and none for the launch as a whole.
    assert_eq!(launch.nbd_uri, None);
    let names: Vec<&str> = launch.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["boot", "data", "log"]);
    let nbd = server.nbd_addr.unwrap();
    let list = run_tool("nbdinfo", &["--list", &format!("nbd://{nbd}")]);
    for name in ["drill/boot", "drill/data", "drill/log"] {
        assert!(list.contains(name), "{name} not listed: {list}");
    }

    // Every volume reads back as its disk.
    for (volume, (name, disk)) in launch.volumes.iter().zip(&disks) {
        let uri = volume.nbd_uri.clone().unwrap();
        assert_eq!(uri, format!("nbd://{nbd}/drill/{name}"));
        let size = run_tool("nbdinfo", &["--size", &uri]);
        assert_eq!(size.trim(), disk.len().to_string());
        let copy = work.path().join(format!("{name}.copy"));
        run_tool("nbdcopy", &[&uri, copy.to_str().unwrap()]);
        assert!(
            std::fs::read(&copy).unwrap() == *disk,
            "volume {name} differs"
        );
    }

    // A write to one volume (flushed) changes that volume only.
    let uri = launch.volumes[2].nbd_uri.clone().unwrap();
    let qemu = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 2M 64k",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(qemu.contains("wrote 65536"), "{qemu}");
    disks[2].1[2 * MIB..2 * MIB + 65536].fill(0x5a);
    for (volume, (name, disk)) in launch.volumes.iter().zip(&disks) {
        let copy = work.path().join(format!("{name}.after"));
        run_tool(
            "nbdcopy",
            &[volume.nbd_uri.as_deref().unwrap(), copy.to_str().unwrap()],
        );
        assert!(
            std::fs::read(&copy).unwrap() == *disk,
            "volume {name} after the write"
        );
    }
    // The CLI lists each volume's export under the launch.
    let output = cli(&server, &pki, &["launch", "list"]);
    assert_success(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    for volume in &launch.volumes {
        let uri = volume.nbd_uri.as_deref().unwrap();
        assert!(table.contains(uri), "{uri} not in {table}");
    }
    // A machine's launch has no export of its own name.
    let whole = std::process::Command::new("nbdinfo")
        .arg(format!("nbd://{nbd}/drill"))
        .output()
        .unwrap();
    assert!(!whole.status.success(), "the launch as a whole was served");
}

#[test]
fn export_writes_one_volume_or_every_volume_of_a_machine() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disks = three_disks();
    commit_machine(&data, "web", &disks);
    let data_arg = data.to_str().unwrap();

    let one = work.path().join("data.raw");
    assert_success(
        &std::process::Command::new(bin())
            .args([
                "export", "--data", data_arg, "--source", "web", "--volume", "data", "--out",
            ])
            .arg(&one)
            .output()
            .unwrap(),
    );
    assert!(std::fs::read(&one).unwrap() == disks[1].1);

    let all = work.path().join("all");
    assert_success(
        &std::process::Command::new(bin())
            .args(["export", "--data", data_arg, "--source", "web", "--out"])
            .arg(&all)
            .output()
            .unwrap(),
    );
    for (name, disk) in &disks {
        let image = all.join(format!("{name}.raw"));
        assert!(
            std::fs::read(&image).unwrap() == *disk,
            "{name}.raw differs"
        );
    }

    // An unknown volume is refused with the ones there are, and writes nothing.
    let missing = work.path().join("swap.raw");
    let output = std::process::Command::new(bin())
        .args([
            "export", "--data", data_arg, "--source", "web", "--volume", "swap", "--out",
        ])
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("boot, data, log"), "{stderr}");
    assert!(!missing.exists());
    // Several volumes into a file that exists is refused.
    let output = std::process::Command::new(bin())
        .args(["export", "--data", data_arg, "--source", "web", "--out"])
        .arg(&one)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("must be a directory"), "{stderr}");
    assert!(
        std::fs::read(&one).unwrap() == disks[1].1,
        "the file was touched"
    );
}

#[test]
fn a_one_disk_agent_cannot_continue_a_machine_and_leaves_it_whole() {
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disks = three_disks();
    commit_machine(&data, "web", &disks);
    let head_before = Store::open_read_only(&data)
        .unwrap()
        .head(&SourceId::new("web").unwrap())
        .unwrap()
        .unwrap();
    let server = nbd_server(&pki, &data);
    let disk = work.path().join("boot.raw");
    std::fs::write(&disk, &disks[0].1).unwrap();
    let output = agent_once(&disk, server.addr, "web", pki.path(), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a one-disk epoch was accepted");
    assert!(
        stderr.contains("machine of 3 volumes (boot, data, log)"),
        "{stderr}"
    );
    drop(server);
    let head_after = Store::open_read_only(&data)
        .unwrap()
        .head(&SourceId::new("web").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(head_after, head_before);
}

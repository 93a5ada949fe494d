//! Snapshots and launch volumes, served over NBD to real clients (nbdinfo,
//! nbdcopy, qemu-img, qemu-io).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::*;
use blockrep_server::SnapshotView;
use blockrep_testkit::{Pki, ServerProcess, mixed_image, random_bytes};

const MIB: usize = 1 << 20;

#[test]
fn launch_volume_is_served_to_real_nbd_clients() {
    if !(have_tool("nbdinfo") && have_tool("nbdcopy") && have_tool("qemu-img")) {
        return;
    }
    let rig = nbd_rig(&["web"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    let size = 24 * MIB + 4096 * 3 + 512;
    std::fs::write(&disk, mixed_image(size, 11)).unwrap();
    let at_snapshot = work.path().join("at-snapshot.raw");
    std::fs::copy(&disk, &at_snapshot).unwrap();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    let snapshot = create_snapshot(server, "web", "before-change");
    // The disk moves on; the snapshot does not.
    std::fs::write(&disk, random_bytes(size, 12)).unwrap();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    let launch = create_launch(server, "web", &snapshot.name, "test-1");
    let uri = launch.nbd_uri.clone().unwrap();
    assert_eq!(uri, format!("nbd://{}/test-1", server.nbd_addr.unwrap()));

    let info = run_tool("nbdinfo", &["--size", &uri]);
    assert_eq!(info.trim(), size.to_string());
    let list = run_tool(
        "nbdinfo",
        &["--list", &format!("nbd://{}", server.nbd_addr.unwrap())],
    );
    assert!(list.contains("test-1"), "{list}");
    assert!(
        qemu_img_identical(&uri, &at_snapshot),
        "qemu-img compare says the images differ"
    );
    let copy = work.path().join("copy.raw");
    run_tool("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&at_snapshot).unwrap(),
        "nbdcopy output differs"
    );

    // The CLI lists what the API holds.
    let table = run_tool(
        BIN,
        &[
            "launch",
            "list",
            "--admin",
            &server.admin_addr.unwrap().to_string(),
            "--admin-token",
            pki.path().join("admin.token").to_str().unwrap(),
        ],
    );
    assert!(table.contains("test-1") && table.contains(&uri), "{table}");
    let table = run_tool(
        BIN,
        &[
            "snapshot",
            "list",
            "--source",
            "web",
            "--admin",
            &server.admin_addr.unwrap().to_string(),
            "--admin-token",
            pki.path().join("admin.token").to_str().unwrap(),
        ],
    );
    assert!(table.contains("before-change"), "{table}");
}

#[test]
fn writes_through_nbd_survive_a_restart_and_never_touch_the_replica() {
    if !(have_tool("qemu-io") && have_tool("nbdcopy")) {
        return;
    }
    let pki = Pki::new(&["db"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, mixed_image(8 * MIB + 100, 21)).unwrap();
    let mut server = nbd_server(&pki, &data);
    assert_success(&agent_once(&disk, server.addr, "db", pki.path(), &[]));
    let snapshot = create_snapshot(&server, "db", "snap");
    let head_before = admin_source(server.admin_addr.unwrap(), "db").unwrap().root;
    let launch = create_launch(&server, "db", "snap", "drill");
    let uri = launch.nbd_uri.unwrap();

    // Unaligned, chunk-crossing writes, then a flush.
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 12345 70000",
            "-c",
            "flush",
            &uri,
        ],
    );
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xcd 8388600 100",
            "-c",
            "flush",
            &uri,
        ],
    );
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xab 12345 70000", &uri],
    );

    server.kill();
    // A new port: the old one, in the ephemeral range, may have been given
    // to an outgoing connection meanwhile, and no agent needs it.
    let server = ServerProcess::start_on(
        &bin(),
        "127.0.0.1:0",
        &data,
        pki.path(),
        &["--nbd-listen", "127.0.0.1:0"],
    );
    let uri = format!("nbd://{}/drill", server.nbd_addr.unwrap());
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 12345 70000",
            "-c",
            "read -P 0xcd 8388600 100",
            &uri,
        ],
    );
    let copy = work.path().join("copy.raw");
    run_tool("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    let mut expected = std::fs::read(&disk).unwrap();
    expected[12345..12345 + 70000].fill(0xab);
    expected[8_388_600..8_388_700].fill(0xcd);
    assert!(
        std::fs::read(&copy).unwrap() == expected,
        "launch content differs from the writes made"
    );

    // The replica and the snapshot are untouched.
    assert_eq!(
        admin_source(server.admin_addr.unwrap(), "db").unwrap().root,
        head_before
    );
    let after = snapshots(&server)
        .into_iter()
        .find(|s| s.name == "snap")
        .unwrap();
    assert_eq!(after.root, snapshot.root);
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "db", &out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap());
    // A second launch from the same snapshot starts from the snapshot, not from the first launch.
    let second = create_launch(&server, "db", "snap", "drill-2");
    let copy2 = work.path().join("copy2.raw");
    run_tool(
        "nbdcopy",
        &[&second.nbd_uri.unwrap(), copy2.to_str().unwrap()],
    );
    assert!(std::fs::read(&copy2).unwrap() == std::fs::read(&disk).unwrap());
}

#[test]
fn snapshot_under_a_writer_is_one_committed_epoch() {
    let rig = nbd_rig(&["app"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 * MIB]).unwrap();
    let agent = spawn_agent(
        &disk,
        server.addr,
        "app",
        pki.path(),
        &["--interval", "50ms"],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, disk) = (std::sync::Arc::clone(&stop), disk.clone());
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let mut seq = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let block = seq * 7919 % 2048;
                let mut bytes = [0u8; 4096];
                bytes[..8].copy_from_slice(&seq.to_le_bytes());
                std::os::unix::fs::FileExt::write_all_at(&file, &bytes, block * 4096).unwrap();
                seq += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    assert!(wait_until(Duration::from_secs(30), || agent.epochs().len() >= 3));
    // Five snapshots at least, and on until two of them are of different
    // epochs: a loaded machine may commit less often than every 600 ms.
    let mut taken: Vec<SnapshotView> = Vec::new();
    let epochs = |taken: &[SnapshotView]| {
        taken
            .iter()
            .map(|s| s.epoch)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while taken.len() < 5 || epochs(&taken) < 2 {
        assert!(
            Instant::now() < deadline,
            "snapshots did not follow replication: {taken:?}"
        );
        let name = format!("live-{}", taken.len());
        taken.push(create_snapshot(server, "app", &name));
        std::thread::sleep(Duration::from_millis(120));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // The agent prints an epoch once the server answered its commit, which
    // may be just after the last snapshot was taken of it.
    let acknowledged = |root: &str| agent.epochs().iter().any(|(_, r)| r == root);
    for snapshot in &taken {
        assert!(
            wait_until(Duration::from_secs(10), || acknowledged(&snapshot.root)),
            "snapshot {} root {} is not the root of any acknowledged epoch",
            snapshot.name,
            snapshot.root
        );
    }
}

//! End to end: the real binary replicates real files over mutual TLS on loopback.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use blockrep_testkit::{Pki, ServerProcess, mixed_image, random_bytes, write_at};

const MIB: usize = 1 << 20;

#[test]
fn initial_sync_then_delta_sync_sends_only_changed_chunks() {
    let rig = rig(&["web-1"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    // 64 MiB plus a tail that is not a multiple of the 64 KiB chunk size.
    let size = 64 * MIB + 12_345;
    std::fs::write(&disk, mixed_image(size, 1)).unwrap();

    let first = agent_once(&disk, server.addr, "web-1", pki.path(), &[]);
    assert_success(&first);
    assert!(sum_field(&first, "chunks_sent") > 0);
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "web-1", &out));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&disk).unwrap(),
        "export differs"
    );
    if have_qemu_img() {
        assert!(
            qemu_img_identical(&disk, &out),
            "qemu-img compare says the images differ"
        );
    } else {
        assert!(!require_external_tools(), "qemu-img is required");
    }
    // Zero regions are holes in the export, not written blocks.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap()) * 512;
    assert!(
        allocated < (size as u64) * 3 / 4,
        "export is not sparse: {allocated} bytes allocated"
    );

    // Change three known chunks: one text chunk, one random chunk, and the short
    // last chunk; and zero a fourth chunk that held data.
    write_at(&disk, (MIB + 5 * 65_536 + 100) as u64, b"changed text");
    write_at(
        &disk,
        (2 * MIB + 3 * 65_536) as u64,
        &random_bytes(65_536, 99),
    );
    write_at(&disk, (size - 10) as u64, b"tail!");
    write_at(&disk, (MIB + 7 * 65_536) as u64, &vec![0u8; 65_536]);
    let second = agent_once(&disk, server.addr, "web-1", pki.path(), &[]);
    assert_success(&second);
    // The random chunk travels whole; the two small changes as patches.
    assert_eq!(sum_field(&second, "chunks_sent"), 1, "{}", stdout(&second));
    assert_eq!(sum_field(&second, "patches_sent"), 2, "{}", stdout(&second));
    assert_eq!(
        sum_field(&second, "zero_chunks_sent"),
        1,
        "{}",
        stdout(&second)
    );
    assert_eq!(
        sum_field(&second, "server_chunks_received"),
        3,
        "server-side count"
    );
    assert!(
        sum_field(&second, "bytes_sent") < 4 * 66_000,
        "delta bytes: {}",
        stdout(&second)
    );
    assert_success(&export(&data, "web-1", &out));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&disk).unwrap(),
        "export differs after delta"
    );

    // Nothing changed: nothing is sent, and the agent says so.
    let third = agent_once(&disk, server.addr, "web-1", pki.path(), &[]);
    assert_success(&third);
    assert!(
        stdout(&third).contains("replica already equals disk"),
        "{}",
        stdout(&third)
    );
}

#[test]
fn export_reads_only_committed_state_while_the_server_runs() {
    let rig = rig(&["db"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, mixed_image(8 * MIB, 5)).unwrap();
    let out = work.path().join("export.raw");
    let missing = export(&data, "db", &out);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("no committed replica"),
        "{}",
        stderr(&missing)
    );
    assert_success(&agent_once(
        &disk,
        server.addr,
        "db",
        pki.path(),
        &["--chunk-size", "4KiB"],
    ));
    assert_success(&export(&data, "db", &out));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
}

#[test]
fn killed_server_keeps_the_previous_head_and_the_sync_completes_after_restart() {
    let pki = Pki::new(&["app"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    let size = 192 * MIB;
    let first_image = mixed_image(size, 7);
    std::fs::write(&disk, &first_image).unwrap();
    let mut server = ServerProcess::start(&bin(), &data, pki.path());
    assert_success(&agent_once(
        &disk,
        server.addr,
        "app",
        pki.path(),
        &["--compress", "none"],
    ));

    // Rewrite the whole disk with random data, then kill the server while the
    // agent is streaming it.
    let second_image = random_bytes(size, 8);
    std::fs::write(&disk, &second_image).unwrap();
    let agent = std::process::Command::new(BIN)
        .args(["agent", "--once", "--compress", "none", "--disk"])
        .arg(&disk)
        .args([
            "--to",
            &server.addr.to_string(),
            "--source",
            "app",
            "--tls-dir",
        ])
        .arg(pki.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        server.wait_for_log("head_epoch=1", Duration::from_secs(60)),
        "{}",
        server.log()
    );
    std::thread::sleep(Duration::from_millis(30));
    server.kill();
    let agent = agent.wait_with_output().unwrap();
    assert!(
        !server.log().contains("epoch=2"),
        "the sync finished before the kill: {}",
        server.log()
    );
    assert!(
        !agent.status.success(),
        "agent should report the lost server"
    );
    assert!(
        stderr(&agent).contains("connection lost") || stderr(&agent).contains("closed"),
        "{}",
        stderr(&agent)
    );

    // The previous head is intact and exportable, with the server down.
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "app", &out));
    assert!(
        std::fs::read(&out).unwrap() == first_image,
        "previous head damaged"
    );

    // Restarted, the server drops the torn pack tail and the sync completes.
    let server = ServerProcess::start(&bin(), &data, pki.path());
    let resumed = agent_once(
        &disk,
        server.addr,
        "app",
        pki.path(),
        &["--compress", "none"],
    );
    assert_success(&resumed);
    assert_success(&export(&data, "app", &out));
    assert!(
        std::fs::read(&out).unwrap() == second_image,
        "replica differs after resume"
    );
}

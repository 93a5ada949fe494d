//! Retention, garbage collection and verification against a real server.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::random_bytes;

const MIB: usize = 1 << 20;

fn export_snapshot_command(
    data: &Path,
    source: &str,
    snapshot: &str,
    out: &Path,
) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["export", "--data"])
        .arg(data)
        .args(["--source", source, "--snapshot", snapshot, "--out"])
        .arg(out)
        .output()
        .unwrap()
}

fn export_snapshot(data: &Path, source: &str, snapshot: &str, out: &Path) {
    assert_success(&export_snapshot_command(data, source, snapshot, out));
}

#[test]
fn expired_snapshots_are_collected_and_everything_still_referenced_survives() {
    let rig = rig(
        &["web"],
        &[
            "--retention",
            "1s:2s",
            "--retention-tick",
            "100ms",
            "--pack-size-max",
            "2MiB",
            "--gc-interval",
            "off",
        ],
    );
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    let images: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(8 * MIB, 100 + i)).collect();
    std::fs::write(&disk, &images[0]).unwrap();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    create_snapshot(server, "web", "keep");
    // Epoch 2 is held only by automatic snapshots, which expire after 2 s.
    std::fs::write(&disk, &images[1]).unwrap();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    assert!(
        wait_until(Duration::from_secs(10), || snapshots(server)
            .iter()
            .any(|s| s.kind == "auto" && s.epoch == 2)),
        "no automatic snapshot of epoch 2: {:?}",
        snapshots(server)
    );
    std::fs::write(&disk, &images[2]).unwrap();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    assert!(
        wait_until(Duration::from_secs(10), || !snapshots(server)
            .iter()
            .any(|s| s.epoch == 2)),
        "automatic snapshots of epoch 2 did not expire"
    );
    assert!(
        snapshots(server).iter().any(|s| s.name == "keep"),
        "a manual snapshot without TTL expired"
    );

    // A dry run from the command line reads only, while the server runs.
    let dry = std::process::Command::new(BIN)
        .args(["gc", "--dry-run", "--json", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_success(&dry);
    let dry: serde_json::Value = serde_json::from_str(&stdout(&dry)).unwrap();
    assert!(dry["bytes_freed"].as_u64().unwrap() > 0, "{dry}");
    // A writable GC from the command line is refused while the server holds the store.
    let busy = std::process::Command::new(BIN)
        .args(["gc", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        !busy.status.success() && stderr(&busy).contains("in use"),
        "{}",
        stderr(&busy)
    );

    let (code, body) = admin_request(server.admin_addr.unwrap(), "POST", "/v1/gc", None);
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let freed = report["bytes_freed"].as_u64().unwrap();
    assert!(
        freed >= 6 * MIB as u64,
        "epoch 2's 8 MiB were not reclaimed: {report}"
    );
    assert!(report["packs_compacted"].as_u64().unwrap() > 0, "{report}");

    // Everything still referenced reads back exactly.
    let out = work.path().join("out.raw");
    assert_success(&export(&data, "web", &out));
    assert!(
        std::fs::read(&out).unwrap() == images[2],
        "head damaged by GC"
    );
    export_snapshot(&data, "web", "keep", &out);
    assert!(
        std::fs::read(&out).unwrap() == images[0],
        "snapshot keep damaged by GC"
    );
    for snapshot in snapshots(server) {
        let output = export_snapshot_command(&data, "web", &snapshot.name, &out);
        // Retention keeps running (a snapshot a second, each kept 2 s): an
        // automatic one listed a moment ago may have expired since. It must
        // then be gone, not half there.
        if !output.status.success()
            && snapshot.kind == "auto"
            && stderr(&output).contains("has no snapshot")
        {
            assert!(
                !snapshots(server).iter().any(|s| s.name == snapshot.name),
                "export of {} failed while it is listed: {}",
                snapshot.name,
                stderr(&output)
            );
            continue;
        }
        assert_success(&output);
        let expected = &images[snapshot.epoch as usize - 1];
        assert!(
            std::fs::read(&out).unwrap() == *expected,
            "snapshot {} damaged by GC",
            snapshot.name
        );
    }
    let clean = std::process::Command::new(BIN)
        .args(["verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_success(&clean);
    assert!(
        stdout(&clean).contains("no damage found"),
        "{}",
        stdout(&clean)
    );
}

#[test]
fn verify_names_the_snapshot_a_damaged_chunk_affects() {
    let AgentRig {
        pki, work, server, ..
    } = rig(&["db"], &["--retention", "off"]);
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    let first = random_bytes(4 * MIB, 7);
    std::fs::write(&disk, &first).unwrap();
    assert_success(&agent_once(&disk, server.addr, "db", pki.path(), &[]));
    create_snapshot(&server, "db", "before");
    let mut second = first.clone();
    second[..MIB].copy_from_slice(&random_bytes(MIB, 8));
    std::fs::write(&disk, &second).unwrap();
    assert_success(&agent_once(&disk, server.addr, "db", pki.path(), &[]));
    drop(server);

    // Flip one byte of the stored copy of chunk 0 of the first image: only the
    // snapshot still refers to it.
    let needle = &first[1000..1064];
    let mut hit = false;
    for entry in std::fs::read_dir(data.join("packs")).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at + 10] ^= 0x01;
            std::fs::write(&path, bytes).unwrap();
            hit = true;
            break;
        }
    }
    assert!(hit, "chunk not found in any pack");
    let output = std::process::Command::new(BIN)
        .args(["verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success(), "verify passed a damaged store");
    let text = stdout(&output);
    assert!(
        text.contains("DAMAGED")
            && text.contains("snapshot db/before")
            && text.contains("chunk 0 (byte 0)"),
        "{text}"
    );
    assert!(
        !text.contains("source db head"),
        "the head does not use the damaged chunk: {text}"
    );
    // Narrowed to the head, verify is clean.
    let head_only = std::process::Command::new(BIN)
        .args(["verify", "--source", "db", "--snapshot", "before", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!head_only.status.success());
}

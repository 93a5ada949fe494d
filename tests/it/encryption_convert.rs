//! `blockrep source encrypt`: a source replicated in clear is converted to
//! encrypted at rest on a stopped server's store; nothing of it stays in
//! clear, everything reads as before, and its agent goes on replicating.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use crate::common::*;
use crate::encryption::{contains, every_file};
use blockrep_core::{Geometry, scan_buffer};
use blockrep_testkit::{AgentRig, Pki, ServerProcess, mixed_image, random_bytes, write_at};

const MIB: usize = 1 << 20;

#[test]
fn a_clear_source_is_converted_and_goes_on_replicating_encrypted() {
    let keys = tempfile::tempdir().unwrap();
    let kek = keys.path().join("kek");
    blockrep_keys::init_kek_file(&kek).unwrap();
    let key_dir = keys.path().join("keys");
    let key_args = [
        "--key-dir",
        key_dir.to_str().unwrap(),
        "--kek-file",
        kek.to_str().unwrap(),
    ];
    let mut rig = AgentRig::start_in(&bin(), Pki::new(&["app"]), &["--retention", "off"], None);
    let disk = rig.work.path().join("disk.raw");
    let first = mixed_image(6 * MIB, 17);
    std::fs::write(&disk, &first).unwrap();
    assert_success(&agent_once(
        &disk,
        rig.server.addr,
        "app",
        rig.pki.path(),
        &[],
    ));
    assert_success(&cli(
        &rig.server,
        &rig.pki,
        &["snapshot", "create", "--source", "app", "--name", "before"],
    ));
    rig.server.stop();
    let data = rig.work.path().join("data");
    let geometry = Geometry::new(first.len() as u64, 65_536).unwrap();
    let plain_ids: Vec<_> = scan_buffer(&first, geometry)
        .into_iter()
        .filter(|id| !id.is_zero())
        .collect();
    // The files of the store that hold the disk's text or a plain id.
    let in_clear = || {
        every_file(&data)
            .into_iter()
            .filter(|(_, bytes)| {
                contains(bytes, b"the quick brown fox")
                    || plain_ids.iter().any(|id| contains(bytes, &id.0))
            })
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    };
    assert!(
        !in_clear().is_empty(),
        "the clear store holds nothing the check finds"
    );

    let encrypt = || {
        Command::new(BIN)
            .args(["source", "encrypt", "app", "--data"])
            .arg(&data)
            .args(key_args)
            .output()
            .unwrap()
    };
    // Refused without a KEK, with nothing changed.
    let refused = Command::new(BIN)
        .args(["source", "encrypt", "app", "--data"])
        .arg(&data)
        .args(["--key-dir", key_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(!key_dir.exists());
    let converted = encrypt();
    assert_success(&converted);
    let said = stdout(&converted);
    assert!(
        said.contains("converted 1 snapshots, 0 launches and the head")
            && said.contains("removed the clear copies"),
        "{said}"
    );
    let left = in_clear();
    assert!(
        left.is_empty(),
        "still in clear after the conversion: {left:?}\n{said}"
    );
    // The seals made are counted in the key directory (reserved ahead).
    assert!(key_dir.join("app/00000001.seals").exists());
    // Again: refused, the conversion finished (a clear record now would be
    // one put there, not one left to convert).
    let again = encrypt();
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("encrypted already"), "{said}");

    // Verify and export read it with the keys only.
    let run = |args: &[&str], keys: bool| {
        let mut command = Command::new(BIN);
        command.args(args).arg("--data").arg(&data);
        if keys {
            command.args(key_args);
        }
        command.output().unwrap()
    };
    assert!(!run(&["verify"], false).status.success());
    assert_success(&run(&["verify"], true));
    let out = rig.work.path().join("before.raw");
    let snapshot = ["export", "--source", "app", "--snapshot", "before", "--out"];
    let mut args = snapshot.to_vec();
    args.push(out.to_str().unwrap());
    assert_success(&run(&args, true));
    assert!(
        std::fs::read(&out).unwrap() == first,
        "the snapshot differs"
    );

    // A server with the keys takes the source on, sealed: the agent's next
    // pass commits a change on top of the converted head.
    let server = ServerProcess::start_with(&bin(), &data, rig.pki.path(), &key_args);
    write_at(&disk, MIB as u64, &random_bytes(128 * 1024, 1018));
    assert_success(&agent_once(&disk, server.addr, "app", rig.pki.path(), &[]));
    let view = admin_source(server.admin_addr.unwrap(), "app").unwrap();
    assert!(view.encryption.is_some(), "{view:?}");
    assert_eq!(view.epoch, 3, "{view:?}");

    // A data key started while the server runs seals from the source's next
    // session on, without a restart.
    let mut rotate = Command::new(BIN);
    rotate
        .args(["key", "rotate", "--source", "app"])
        .args(key_args);
    assert_success(&rotate.output().unwrap());
    let records = blockrep_keys::KeyDir::open(&key_dir)
        .unwrap()
        .records(&blockrep_core::SourceId::new("app").unwrap())
        .unwrap();
    assert_eq!(records.len(), 2);
    write_at(&disk, 2 * MIB as u64, &random_bytes(64 * 1024, 1019));
    assert_success(&agent_once(&disk, server.addr, "app", rig.pki.path(), &[]));
    let view = admin_source(server.admin_addr.unwrap(), "app").unwrap();
    assert_eq!(view.epoch, 4, "{view:?}");
    assert_eq!(
        view.encryption.unwrap().key,
        records[1].reference.to_string()
    );
    assert!(key_dir.join("app/00000002.seals").exists());
    drop(server);
    let head = rig.work.path().join("head.raw");
    assert_success(&run(
        &["export", "--source", "app", "--out", head.to_str().unwrap()],
        true,
    ));
    assert!(
        std::fs::read(&head).unwrap() == std::fs::read(&disk).unwrap(),
        "the head after the conversion differs from the disk"
    );
}

//! Encryption at rest with the store in a bucket (SeaweedFS on loopback),
//! served by two servers that share the bucket and the key directory: the
//! second goes on with the data key the first made, and no object holds
//! the disk's text or a chunk's plain id.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::encryption::{contains, every_file};
use blockrep_core::{Geometry, scan_buffer};
use blockrep_testkit::ack_log::read_acks;
use blockrep_testkit::seaweedfs::SeaweedFs;
use blockrep_testkit::{AgentProcess, Pki, ServerProcess, mixed_image, random_bytes, write_at};

const MIB: usize = 1 << 20;

fn wait_for_acks(ack: &Path, count: usize, agent: &AgentProcess, what: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || read_acks(ack).len() >= count),
        "{what}: fewer than {count} acknowledged epochs: {:?}\nstderr: {}",
        read_acks(ack),
        agent.stderr.lock().unwrap()
    );
}

#[test]
fn two_servers_share_an_encrypted_bucket_and_its_key_directory() {
    let Some(mut weed) = SeaweedFs::start("encrypted bucket") else {
        return;
    };
    let access = weed.access("sealed");
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let kek = work.path().join("kek");
    blockrep_keys::init_kek_file(&kek).unwrap();
    let key_dir = work.path().join("keys");
    let (kek, key_dir) = (kek.to_str().unwrap(), key_dir.to_str().unwrap());
    let key_args = ["--key-dir", key_dir, "--kek-file", kek];
    let mut server_args = vec!["--lease-ttl", "2s", "--retention", "off"];
    server_args.extend(["--encrypt-at-rest"]);
    server_args.extend(key_args);
    let start = |name: &str| {
        ServerProcess::start_in(
            &bin(),
            "127.0.0.1:0",
            &work.path().join(name),
            pki.path(),
            &server_args,
            Some(&access),
        )
    };
    let (mut a, mut b) = (start("a"), start("b"));

    let disk = work.path().join("disk.raw");
    let image = mixed_image(8 * MIB, 41);
    std::fs::write(&disk, &image).unwrap();
    let ack = work.path().join("ack.log");
    let to = format!("{},{}", a.addr, b.addr);
    let mut agent = AgentProcess::spawn(
        &bin(),
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--to",
            &to,
            "--source",
            "web",
            "--tls-dir",
            pki.path().to_str().unwrap(),
            "--interval",
            "200ms",
            "--io-timeout",
            "2s",
            "--ack-log",
            ack.to_str().unwrap(),
        ],
    );
    wait_for_acks(&ack, 2, &agent, "replicating to A");
    let by_a = admin_source(a.admin_addr.unwrap(), "web").unwrap();
    let key_by_a = by_a
        .encryption
        .clone()
        .expect("A did not encrypt the source");

    // A dies; B takes the source, with the data key A made (read from the
    // shared key directory), and goes on from A's head.
    a.kill();
    write_at(&disk, 3 * MIB as u64, &random_bytes(256 * 1024, 42));
    let acked = read_acks(&ack).len();
    wait_for_acks(&ack, acked + 3, &agent, "after A was killed");
    agent.stop_cleanly();
    let by_b = admin_source(b.admin_addr.unwrap(), "web").unwrap();
    assert!(by_b.epoch > by_a.epoch, "{by_b:?} {by_a:?}");
    assert_eq!(by_b.encryption.unwrap().key, key_by_a.key);
    let last = read_acks(&ack).last().unwrap().root.clone();
    b.stop();

    // The bucket, read into an empty working copy with the keys, exports the
    // disk byte for byte and verifies clean; without them it refuses.
    let run = |args: &[&str], keys: bool| {
        let copy = tempfile::tempdir_in(work.path()).unwrap().keep();
        let mut command = Command::new(BIN);
        command.args(args).arg("--data").arg(copy.join("data"));
        access.apply(&mut command);
        if keys {
            command.args(key_args);
        }
        command.output().unwrap()
    };
    let out = work.path().join("out.raw");
    let export = ["export", "--root", &last, "--out", out.to_str().unwrap()];
    let refused = run(&export, false);
    assert!(!refused.status.success());
    assert!(!out.exists());
    assert_success(&run(&export, true));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap(),
        "the bucket's last root differs from the disk"
    );
    std::fs::remove_file(&out).unwrap();
    let verified = run(&["verify"], true);
    assert_success(&verified);
    assert!(
        stdout(&verified).contains("checked"),
        "{}",
        stdout(&verified)
    );

    // Nothing SeaweedFS stored, nor either server's working copy, holds the
    // disk's text or the plain id of any of its chunks; the clear head
    // record is there (the scan sees what the bucket holds).
    weed.stop();
    let geometry = Geometry::new(image.len() as u64, 65_536).unwrap();
    let plain_ids: Vec<_> = scan_buffer(&image, geometry)
        .into_iter()
        .filter(|id| !id.is_zero())
        .collect();
    assert!(plain_ids.len() > 50);
    let mut files = every_file(weed.dir());
    assert!(
        files.iter().any(|(_, bytes)| contains(bytes, b"BRHEAD")),
        "no head record in SeaweedFS's files: the scan does not see the objects"
    );
    files.extend(every_file(&work.path().join("a")));
    files.extend(every_file(&work.path().join("b")));
    for (name, bytes) in &files {
        assert!(
            !contains(bytes, b"the quick brown fox"),
            "{name} holds the disk's text"
        );
        for id in &plain_ids {
            assert!(!contains(bytes, &id.0), "{name} holds the plain id {id}");
        }
    }
}

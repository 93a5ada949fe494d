//! A server that encrypts its sources at rest: the whole lifecycle runs as
//! in clear (sync, continuous, test launch, cutover, NBD writes, failback),
//! while no file of its data directory holds the disk's text or a chunk's
//! plain id; `verify` and `export` need the key directory and its KEK; a
//! KEK that cannot be reached refuses the server's start.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::common::*;
use blockrep_core::{Geometry, SourceId, scan_buffer};
use blockrep_keys::{Kek, KeyDir};
use blockrep_testkit::{AgentRig, Pki, ServerProcess, mixed_image};

const MIB: usize = 1 << 20;

/// Every file under `dir`, with its bytes.
pub(crate) fn every_file(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_encrypted_source_runs_the_whole_lifecycle_and_its_store_shows_nothing() {
    if !(have_tool("qemu-img") && have_tool("qemu-io") && have_tool("nbdcopy")) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let kek_file = keys.path().join("kek");
    blockrep_keys::init_kek_file(&kek_file).unwrap();
    let key_dir = keys.path().join("keys");
    let (kek_path, key_dir_path) = (kek_file.to_str().unwrap(), key_dir.to_str().unwrap());
    let args = [
        "--nbd-listen",
        "127.0.0.1:0",
        "--retention",
        "off",
        "--encrypt-at-rest",
        "--key-dir",
        key_dir_path,
        "--kek-file",
        kek_path,
    ];
    let mut rig = AgentRig::start_in(&bin(), Pki::new(&["app"]), &args, None);
    // The server's roots are in the source's id space: the test, holding
    // the KEK, unwraps the source's data key to compute them.
    let kek = Kek::from_file(&kek_file).unwrap();
    let records = || {
        KeyDir::open(&key_dir)
            .unwrap()
            .records(&SourceId::new("app").unwrap())
            .unwrap()
    };
    let space = || {
        let key = records()[0].unwrap_with(&kek).unwrap();
        key.sealer().unwrap().id_space()
    };
    let disk = crate::lifecycle::whole_lifecycle(&rig, &space);

    // The source got one data key, wrapped under the KEK.
    let records = records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kek_id, kek.id());

    // The cutover volume is read through the seals, as NBD serves it.
    let admin = rig.server.admin_addr.unwrap();
    let (_, launches) = admin_request(admin, "GET", "/v1/launches", None);
    let launches: serde_json::Value = serde_json::from_str(&launches).unwrap();
    let cutover = launches
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "cutover")
        .unwrap()
        .clone();
    let uri = cutover["nbd_uri"].as_str().unwrap();
    // Status names the source's data key and the KEK.
    let view = admin_source(admin, "app").unwrap();
    let encryption = view.encryption.unwrap();
    assert_eq!(
        (encryption.key, encryption.kek_id.as_str()),
        (records[0].reference.to_string(), kek.id())
    );
    let status = cli(&rig.server, &rig.pki, &["status"]);
    assert!(
        stdout(&status).contains(&format!(
            "app: encrypted at rest, data key {}",
            records[0].reference
        )),
        "{}",
        stdout(&status)
    );
    assert!(qemu_img_identical(uri, &disk), "the cutover volume differs");
    rig.server.stop();

    // No file of the data directory holds the disk's text, or the plain id
    // of any chunk of the disk the agent first sent.
    let data = rig.work.path().join("data");
    let first = mixed_image(16 * MIB + 4096, 31);
    let geometry = Geometry::new(first.len() as u64, 65_536).unwrap();
    let plain_ids: Vec<_> = scan_buffer(&first, geometry)
        .into_iter()
        .filter(|id| !id.is_zero())
        .collect();
    assert!(plain_ids.len() > 100);
    let files = every_file(&data);
    assert!(files.iter().any(|(name, _)| name.ends_with(".pack")));
    for (name, bytes) in &files {
        assert!(
            !contains(bytes, b"the quick brown fox"),
            "{name} holds the disk's text"
        );
        for id in &plain_ids {
            assert!(!contains(bytes, &id.0), "{name} holds the plain id {id}");
        }
    }

    // verify and export read it with the keys, and refuse without them.
    let with_keys = |command: &mut Command| {
        command.args(["--key-dir", key_dir_path, "--kek-file", kek_path]);
    };
    let mut verify = Command::new(BIN);
    verify.args(["verify", "--data"]).arg(&data);
    let without = verify.output().unwrap();
    assert!(
        !without.status.success(),
        "verify read sealed blobs without their keys"
    );
    with_keys(&mut verify);
    let verified = verify.output().unwrap();
    assert_success(&verified);
    assert!(
        stdout(&verified).contains("checked"),
        "{}",
        stdout(&verified)
    );

    let out = rig.work.path().join("cutover.raw");
    let root = cutover["root"].as_str().unwrap();
    let mut export = Command::new(BIN);
    export
        .args(["export", "--data"])
        .arg(&data)
        .args(["--root", root, "--out"])
        .arg(&out);
    let refused = export.output().unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!out.exists());
    with_keys(&mut export);
    assert_success(&export.output().unwrap());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());

    // The KEK moves to a key service and the old KEK file is deleted: a
    // server given the service serves everything as before.
    let kms = crate::keys::service(keys.path(), "kms", "test-kms/key-2");
    let rotated = Command::new(BIN)
        .args([
            "key",
            "rotate",
            "--kek",
            "--key-dir",
            key_dir_path,
            "--kek-file",
            kek_path,
        ])
        .args(["--new-kek-cmd", &kms])
        .output()
        .unwrap();
    assert_success(&rotated);
    std::fs::remove_file(&kek_file).unwrap();
    let mut server = ServerProcess::start_with(
        &bin(),
        &data,
        rig.pki.path(),
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--retention",
            "off",
            "--key-dir",
            key_dir_path,
            "--kek-cmd",
            &kms,
        ],
    );
    let name = cutover["name"].as_str().unwrap();
    let uri = format!("nbd://{}/{name}", server.nbd_addr.unwrap());
    assert!(
        qemu_img_identical(&uri, &disk),
        "the cutover volume differs after re-wrap"
    );
    let view = admin_source(server.admin_addr.unwrap(), "app").unwrap();
    assert_eq!(view.encryption.unwrap().kek_id, "test-kms/key-2");
    server.stop();

    // A server whose key service fails does not start, and says why.
    let (status, log) = blockrep_testkit::refused_start(
        &bin(),
        &data,
        rig.pki.path(),
        &[
            "--key-dir",
            key_dir_path,
            "--kek-cmd",
            "echo 'kms unreachable' >&2; exit 3",
        ],
    );
    assert!(!status.success());
    assert!(log.contains("kms unreachable"), "{log}");

    // Shredding: a copy of the data directory taken before it holds nothing
    // readable of the source, even with the KEK (the key service) at hand.
    let copy = rig.work.path().join("data-copy");
    assert_success(
        &Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(&copy)
            .output()
            .unwrap(),
    );
    // Deleted first without --shred (its keys stay, and it says so), then
    // shredded: the second run finishes what the first left.
    let delete = |extra: &[&str]| {
        Command::new(BIN)
            .args([
                "source",
                "delete",
                "app",
                "--key-dir",
                key_dir_path,
                "--data",
            ])
            .arg(&data)
            .args(extra)
            .output()
            .unwrap()
    };
    let deleted = delete(&[]);
    assert_success(&deleted);
    assert!(
        stdout(&deleted).contains("its 1 data keys remain"),
        "{}",
        stdout(&deleted)
    );
    let shred = delete(&["--shred"]);
    assert_success(&shred);
    assert!(
        stdout(&shred).contains("deleted already"),
        "{}",
        stdout(&shred)
    );
    assert!(
        stdout(&shred).contains("destroyed 1 data keys"),
        "{}",
        stdout(&shred)
    );
    let gc = Command::new(BIN)
        .args(["gc", "--key-dir", key_dir_path, "--kek-cmd", &kms, "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_success(&gc);
    assert!(
        KeyDir::open(&key_dir)
            .unwrap()
            .records(&SourceId::new("app").unwrap())
            .unwrap()
            .is_empty()
    );
    let from_copy = Command::new(BIN)
        .args(["export", "--data"])
        .arg(&copy)
        .args(["--root", root, "--out"])
        .arg(rig.work.path().join("from-copy.raw"))
        .args(["--key-dir", key_dir_path, "--kek-cmd", &kms])
        .output()
        .unwrap();
    assert!(!from_copy.status.success());
    let error = String::from_utf8_lossy(&from_copy.stderr);
    assert!(error.contains("shredded"), "{error}");
    assert!(!rig.work.path().join("from-copy.raw").exists());
    // Shredding a source stored in clear (or gone) is refused.
    let again = delete(&["--shred"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no data keys"));
}

/// A head of an encrypted source rolled back behind the server's back (an
/// older head record put in place while it was stopped) reads as sound
/// blobs; the witness in the key directory tells: `verify` names it,
/// `export` and the server refuse it.
#[test]
fn a_rolled_back_head_of_an_encrypted_source_is_refused() {
    let keys = tempfile::tempdir().unwrap();
    let kek_file = keys.path().join("kek");
    blockrep_keys::init_kek_file(&kek_file).unwrap();
    let key_dir = keys.path().join("keys");
    let (kek_path, key_dir_path) = (kek_file.to_str().unwrap(), key_dir.to_str().unwrap());
    let key_args = ["--key-dir", key_dir_path, "--kek-file", kek_path];
    let mut server_args = vec!["--encrypt-at-rest"];
    server_args.extend(key_args);
    let mut rig = AgentRig::start_in(&bin(), Pki::new(&["app"]), &server_args, None);
    let disk = rig.work.path().join("disk.raw");
    std::fs::write(&disk, mixed_image(4 * MIB, 5)).unwrap();
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
        &["snapshot", "create", "--source", "app", "--name", "s1"],
    ));
    let data = rig.work.path().join("data");
    let head_path = data.join("sources/app/head");
    let old_head = std::fs::read(&head_path).unwrap();
    blockrep_testkit::write_at(&disk, 0, &blockrep_testkit::random_bytes(65_536, 9));
    assert_success(&agent_once(
        &disk,
        rig.server.addr,
        "app",
        rig.pki.path(),
        &[],
    ));
    rig.server.stop();

    // Clean before the rollback; then the older head is put back.
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--data")
            .arg(&data)
            .args(key_args)
            .output()
            .unwrap()
    };
    assert_success(&run(&["verify"]));
    std::fs::write(&head_path, &old_head).unwrap();
    let verify = run(&["verify"]);
    assert!(!verify.status.success());
    assert!(
        stdout(&verify).contains("ROLLED BACK") && stdout(&verify).contains("epoch 2"),
        "{}",
        stdout(&verify)
    );
    let out = rig.work.path().join("out.raw");
    let export = run(&["export", "--source", "app", "--out", out.to_str().unwrap()]);
    assert!(!export.status.success());
    assert!(String::from_utf8_lossy(&export.stderr).contains("rolled back"));
    assert!(!out.exists());

    // A snapshot record altered (its MAC no longer vouches for it) is
    // named by verify and not exported; one stripped of its MAC as well.
    let snapshot_path = data.join("sources/app/snapshots/s1");
    let snapshot = std::fs::read(&snapshot_path).unwrap();
    let mut altered = snapshot.clone();
    *altered.last_mut().unwrap() ^= 1;
    let stripped = snapshot[..snapshot.len() - 56].to_vec();
    for (bytes, why) in [
        (&altered, "fails authentication"),
        (&stripped, "not authenticated"),
    ] {
        std::fs::write(&snapshot_path, bytes).unwrap();
        let verify = run(&["verify"]);
        assert!(!verify.status.success());
        let said = String::from_utf8_lossy(&verify.stderr);
        assert!(
            said.contains("snapshot record s1") && said.contains(why),
            "{said}"
        );
        let export = run(&[
            "export",
            "--source",
            "app",
            "--snapshot",
            "s1",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!export.status.success());
        assert!(String::from_utf8_lossy(&export.stderr).contains(why));
        assert!(!out.exists());
    }
    std::fs::write(&snapshot_path, &snapshot).unwrap();

    // A server given the keys refuses the source's session.
    let server = ServerProcess::start_with(&bin(), &data, rig.pki.path(), &key_args);
    let refused = agent_once(&disk, server.addr, "app", rig.pki.path(), &[]);
    assert!(!refused.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(said.contains("rolled back"), "{said}");
}

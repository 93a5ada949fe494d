//! `blockrep key`: a KEK file made once, data keys listed, re-wrapped under a
//! key service's command (the old KEK file deleted after), a source's next
//! data key started; wrong and failing KEKs refused clearly with nothing
//! changed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use blockrep_core::SourceId;
use blockrep_keys::{Kek, KeyDir};

use crate::common::BIN;

fn blockrep(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A stand-in key service: it "wraps" by writing the key with its context
/// reversed (no secrecy: the test checks blockrep's side of the contract),
/// and refuses to unwrap for another context, as KMS does with an
/// encryption context.
pub(crate) fn service(dir: &Path, name: &str, id: &str) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"#!/bin/sh
case "$BLOCKREP_KEK_OP" in
  id) echo "{id}" ;;
  wrap) read k; printf '%s:%s\n' "$BLOCKREP_KEK_CONTEXT" "$k" | rev ;;
  unwrap) read w; w=$(printf '%s' "$w" | rev); c=${{w%%:*}}; k=${{w#*:}}
          [ "$c" = "$BLOCKREP_KEK_CONTEXT" ] || {{ echo "context mismatch" >&2; exit 3; }}
          echo "$k" ;;
esac
"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[test]
fn keys_are_made_listed_rewrapped_and_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let kek_file = dir.path().join("kek");
    let kek_path = kek_file.to_str().unwrap();
    let out = blockrep(&["key", "init", "--out", kek_path]);
    assert!(out.status.success(), "{}", text(&out));
    let meta = std::fs::metadata(&kek_file).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (32, 0o600));
    let before = std::fs::read(&kek_file).unwrap();
    let out = blockrep(&["key", "init", "--out", kek_path]);
    assert!(!out.status.success());
    assert!(text(&out).contains("exists"), "{}", text(&out));
    assert_eq!(std::fs::read(&kek_file).unwrap(), before);

    // Two encrypted sources, as a server makes them.
    let key_dir_path = dir.path().join("keys");
    let key_dir = KeyDir::open(&key_dir_path).unwrap();
    let kek = Kek::from_file(&kek_file).unwrap();
    let web = SourceId::new("web-1").unwrap();
    let db = SourceId::new("db-1").unwrap();
    let (web_record, _) = key_dir.create(&web, &kek, 1_700_000_000_000).unwrap();
    key_dir.create(&db, &kek, 1_700_000_000_000).unwrap();
    let keys = key_dir_path.to_str().unwrap();
    let out = blockrep(&["key", "list", "--key-dir", keys]);
    let listed = text(&out);
    assert!(out.status.success(), "{listed}");
    for needle in ["web-1", "db-1", kek.id(), &web_record.reference.to_string()] {
        assert!(listed.contains(needle), "{needle} not in {listed}");
    }

    // Re-wrap under a key service; then the old KEK file can go.
    let kms = service(dir.path(), "kms", "test-kms/key-2");
    let out = blockrep(&[
        "key",
        "rotate",
        "--kek",
        "--key-dir",
        keys,
        "--kek-file",
        kek_path,
        "--new-kek-cmd",
        &kms,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("re-wrapped 2"), "{}", text(&out));
    std::fs::remove_file(&kek_file).unwrap();
    let kms_kek = Kek::from_command(&kms).unwrap();
    for source in [&web, &db] {
        for record in key_dir.records(source).unwrap() {
            assert_eq!(record.kek_id, "test-kms/key-2");
            let key = record.unwrap_with(&kms_kek).unwrap();
            assert_eq!(key.reference(), record.reference);
        }
    }
    assert_eq!(
        key_dir.records(&web).unwrap()[0].reference,
        web_record.reference
    );

    // A new KEK that fails is refused with its reason; nothing changes.
    let failing = "echo 'AccessDeniedException: not authorized' >&2; exit 254";
    let out = blockrep(&[
        "key",
        "rotate",
        "--kek",
        "--key-dir",
        keys,
        "--kek-cmd",
        &kms,
        "--new-kek-cmd",
        failing,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("AccessDeniedException"),
        "{}",
        text(&out)
    );
    assert!(
        key_dir
            .records(&web)
            .unwrap()
            .iter()
            .all(|r| r.kek_id == "test-kms/key-2")
    );

    // The next data key of one source.
    let out = blockrep(&[
        "key",
        "rotate",
        "--source",
        "web-1",
        "--key-dir",
        keys,
        "--kek-cmd",
        &kms,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let records = key_dir.records(&web).unwrap();
    assert_eq!(records.len(), 2);
    assert_ne!(records[1].reference, records[0].reference);
    assert_eq!(key_dir.records(&db).unwrap().len(), 1);

    // A source without keys, and a KEK that is not the one in use.
    let out = blockrep(&[
        "key",
        "rotate",
        "--source",
        "mail-1",
        "--key-dir",
        keys,
        "--kek-cmd",
        &kms,
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not encrypted"), "{}", text(&out));
    let other = dir.path().join("other");
    blockrep_keys::init_kek_file(&other).unwrap();
    let out = blockrep(&[
        "key",
        "rotate",
        "--source",
        "web-1",
        "--key-dir",
        keys,
        "--kek-file",
        other.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("test-kms/key-2"), "{}", text(&out));
    assert_eq!(key_dir.records(&web).unwrap().len(), 2);

    // No KEK named, no key directory.
    let out = blockrep(&["key", "rotate", "--source", "web-1", "--key-dir", keys]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--kek-file or --kek-cmd"),
        "{}",
        text(&out)
    );
    let missing = dir.path().join("nowhere");
    let out = blockrep(&["key", "list", "--key-dir", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(!missing.exists());
}

/// `scripts/kek-aws-kms.sh` keeps blockrep's contract: its conversions
/// (hex to bytes to KMS and back) round-trip a key, and the context reaches
/// KMS as the encryption context. KMS itself cannot be reached from here;
/// an `aws` first on PATH stands in for it, keeping the context beside the
/// bytes and refusing another, as KMS does.
#[test]
fn the_aws_kms_example_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("aws");
    std::fs::write(
        &fake,
        r#"#!/bin/sh
op=$2; ctx=""
while [ $# -gt 0 ]; do
  case "$1" in --encryption-context) ctx=$2; shift ;; esac; shift
done
case "$op" in
  encrypt) { printf '%s|' "$ctx"; cat; } | base64 -w0; echo ;;
  decrypt) n=$(printf '%s|' "$ctx" | wc -c); blob=$(mktemp); cat > "$blob"
           [ "$(head -c "$n" "$blob")" = "$ctx|" ] || { echo "InvalidCiphertextException" >&2; rm -f "$blob"; exit 254; }
           tail -c +"$((n + 1))" "$blob" | base64 -w0; echo; rm -f "$blob" ;;
esac
"#,
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kek-aws-kms.sh");
    let command = format!(
        "PATH={}:$PATH {} arn:aws:kms:eu-west-1:111122223333:key/test",
        dir.path().display(),
        script.display()
    );
    let kek = Kek::from_command(&command).unwrap();
    assert_eq!(kek.id(), "arn:aws:kms:eu-west-1:111122223333:key/test");
    let key_dir = KeyDir::open(&dir.path().join("keys")).unwrap();
    let web = SourceId::new("web-1").unwrap();
    let (record, key) = key_dir.create(&web, &kek, 1).unwrap();
    assert_eq!(key.reference(), record.reference);
    let read = key_dir.records(&web).unwrap();
    assert_eq!(
        read[0].unwrap_with(&kek).unwrap().reference(),
        record.reference
    );

    // The record copied to another source does not unwrap there.
    let db_dir = dir.path().join("keys/db-1");
    std::fs::create_dir(&db_dir).unwrap();
    std::fs::copy(
        dir.path().join("keys/web-1/00000001.key"),
        db_dir.join("00000001.key"),
    )
    .unwrap();
    let db = SourceId::new("db-1").unwrap();
    let error = key_dir.records(&db).unwrap()[0]
        .unwrap_with(&kek)
        .unwrap_err();
    assert!(
        error.to_string().contains("InvalidCiphertextException"),
        "{error}"
    );
}

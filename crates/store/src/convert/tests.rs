use std::path::Path;

use blockrep_core::{Consistency, Geometry, VolumeName};
use blockrep_keys::{Kek, KeyDir, init_kek_file};

use super::*;
use crate::testutil::every_file;
use crate::{GcOptions, LaunchKind, VolumeCommit};

const CHUNK: usize = 65_536;

/// Four chunks: marked text (zstd shrinks it), a zero chunk, marked again.
fn disk(marker: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..4u32 {
        if i == 2 {
            out.resize(out.len() + CHUNK, 0);
            continue;
        }
        let start = out.len();
        while out.len() < start + CHUNK {
            out.extend_from_slice(format!("{marker}-{i}-{} ", out.len()).as_bytes());
        }
        out.truncate(start + CHUNK);
    }
    out
}

fn exported(store: &Store, root: &ChunkId, dir: &Path) -> Vec<u8> {
    let out = dir.join("export.raw");
    store.export_root(root, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// A clear single-disk source (head, snapshot, written launch) and a clear
/// machine are converted: everything reads as before, a second run finds
/// nothing to do, and once GC drops the clear blobs no file of the store
/// holds their text.
#[test]
fn a_clear_source_is_converted_whole_and_nothing_of_it_stays_in_clear() {
    let (web, db) = (SourceId::new("web").unwrap(), SourceId::new("db").unwrap());
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let store = Arc::new(Store::open(&data).unwrap());
    let geometry = Geometry::new(4 * CHUNK as u64, CHUNK as u32).unwrap();
    let commit = |source: &SourceId, epoch: u64, bytes: &[u8]| {
        let (root, pages) = store.insert_image(bytes, geometry).unwrap();
        store
            .commit(source, epoch, &root, &pages, 7, 1_000)
            .unwrap();
    };
    commit(&web, 1, &disk("MARKER-one"));
    store
        .create_snapshot(&web, Some("s1"), None, 2_000)
        .unwrap();
    store
        .create_launch(&web, "s1", "drill", LaunchKind::Test, 2_000)
        .unwrap();
    let volume = store.open_launch("drill").unwrap();
    volume.write(100, b"MARKER-written").unwrap();
    volume.flush(3_000).unwrap();
    drop(volume);
    commit(&web, 2, &disk("MARKER-two"));
    let names = [VolumeName::new("a").unwrap(), VolumeName::new("b").unwrap()];
    let (a, b) = (disk("MARKER-vol-a"), disk("MARKER-vol-b"));
    let (root_a, pages_a) = store.insert_image(&a, geometry).unwrap();
    let (root_b, pages_b) = store.insert_image(&b, geometry).unwrap();
    let volumes = [
        VolumeCommit {
            name: &names[0],
            root: &root_a,
            pages: &pages_a,
        },
        VolumeCommit {
            name: &names[1],
            root: &root_b,
            pages: &pages_b,
        },
    ];
    store
        .commit_machine(
            &db,
            1,
            &volumes,
            7,
            true,
            Consistency::CrashConsistent,
            1_000,
        )
        .unwrap();
    let mut launched = disk("MARKER-one");
    launched[100..114].copy_from_slice(b"MARKER-written");

    // The keys, made and held as `blockrep source encrypt` does.
    init_kek_file(&work.path().join("kek")).unwrap();
    let kek = Kek::from_file(&work.path().join("kek")).unwrap();
    let keys = KeyDir::open(&work.path().join("keys")).unwrap();
    for source in [&web, &db] {
        keys.create(source, &kek, 1).unwrap();
    }
    store.keyring().extend_from(&keys, &kek).unwrap();
    store.keyring().witness_in(keys.clone());

    let report = store.encrypt_source(&web, 4_000).unwrap();
    assert_eq!(
        (report.snapshots, report.launches, report.head),
        (1, 1, true)
    );
    assert!(report.chunks_sealed >= 5, "{report:?}");
    // Finished: run again it refuses (a clear record now would be forged).
    let again = store.encrypt_source(&web, 5_000).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::AlreadyExists, "{again}");
    assert!(store.encrypt_source(&db, 4_000).unwrap().head);

    // Everything reads as before, through the seals, one epoch on.
    let head = store.head(&web).unwrap().unwrap();
    assert_eq!((head.epoch, head.scan_started_unix_ms), (3, 7));
    assert_eq!(
        exported(&store, &head.root, work.path()),
        disk("MARKER-two")
    );
    let snapshot = store.snapshot(&web, "s1").unwrap().unwrap();
    assert_eq!(
        exported(&store, &snapshot.root, work.path()),
        disk("MARKER-one")
    );
    let drill = store.launch("drill").unwrap().unwrap();
    assert_eq!(drill.generation, 1);
    assert_eq!(exported(&store, &drill.root, work.path()), launched);
    assert_eq!(drill.base_root, snapshot.root);
    let machine = store.head(&db).unwrap().unwrap();
    assert_eq!(machine.consistency, Consistency::CrashConsistent);
    let volumes = store.volume_roots(&machine.root).unwrap();
    assert_eq!(exported(&store, &volumes[0].1, work.path()), a);
    assert_eq!(exported(&store, &volumes[1].1, work.path()), b);

    // The clear blobs are garbage now; once collected, nothing is in clear.
    let every_pack = GcOptions {
        live_share_min: 1.0,
        ..GcOptions::default()
    };
    let collected = store.gc(&every_pack).unwrap();
    assert!(collected.blobs_dead >= 10, "{collected:?}");
    assert!(store.verify(None, None).unwrap().is_clean());
    for (name, bytes) in every_file(&data) {
        assert!(
            !bytes.windows(6).any(|w| w == b"MARKER"),
            "{name} holds a marker"
        );
    }
    drop(store);
    // Without the keys, nothing of either source reads.
    let store = Store::open(&data).unwrap();
    let out = work.path().join("out.raw");
    assert_eq!(
        store.export(&web, &out).unwrap_err().kind(),
        ErrorKind::KeyUnavailable
    );
    assert!(store.snapshot(&web, "s1").is_err());
}

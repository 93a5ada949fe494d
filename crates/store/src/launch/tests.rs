//! Tests of `launch.rs`.

use std::io;

use super::*;
use crate::testutil::{commit_disk, pack_bytes, sample_disk, source};
use blockrep_core::Geometry;
use proptest::prelude::*;
use std::fs;
use std::path::Path;

const CHUNK: u64 = 4096;
/// Ten whole chunks and a short last one.
const DISK_LEN: u64 = 10 * CHUNK + 777;

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    disk: Vec<u8>,
}

/// A store with one committed source, a snapshot "base" of it and a test
/// launch "drill" from that snapshot.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let geometry = Geometry::new(DISK_LEN, CHUNK as u32).unwrap();
    let disk = sample_disk(DISK_LEN as usize, 3);
    commit_disk(&store, &source(), &disk, geometry, 1);
    store
        .create_snapshot(&source(), Some("base"), None, 1)
        .unwrap();
    store
        .create_launch(
            &source(),
            "base",
            "drill",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    Fixture { dir, store, disk }
}

fn read_all(volume: &LaunchVolume) -> Vec<u8> {
    let mut out = vec![0xaa; volume.size_bytes() as usize];
    volume.read(0, &mut out).unwrap();
    out
}

fn reopen(dir: &Path) -> Arc<Store> {
    Arc::new(Store::open(dir).unwrap())
}

#[test]
fn records_round_trip_and_detect_damage() {
    let info = LaunchInfo {
        name: "cut".into(),
        source: source(),
        snapshot: "cutover-3-99".into(),
        kind: LaunchKind::Cutover,
        base_root: ChunkId([1; 32]),
        base_epoch: 3,
        created_unix_ms: 99,
        root: ChunkId([2; 32]),
        generation: 5,
        flushed_unix_ms: 100,
        consistency: Consistency::CrashConsistent,
    };
    let (meta, head) = (info.encode_meta(), info.encode_head());
    assert_eq!((meta.len(), head.len()), (META_LEN, HEAD_LEN));
    assert_eq!(LaunchInfo::decode(&meta, &head).unwrap(), info);
    for i in 0..meta.len() {
        let mut damaged = meta.clone();
        damaged[i] ^= 0x01;
        assert!(
            LaunchInfo::decode(&damaged, &head).is_err(),
            "meta flip at {i}"
        );
    }
    for i in 0..head.len() {
        let mut damaged = head.clone();
        damaged[i] ^= 0x01;
        assert!(
            LaunchInfo::decode(&meta, &damaged).is_err(),
            "head flip at {i}"
        );
    }
}

#[test]
fn create_list_delete() {
    let f = fixture();
    let snapshot = f.store.snapshot(&source(), "base").unwrap().unwrap();
    let drill = f.store.launch("drill").unwrap().unwrap();
    assert_eq!(drill.base_root, snapshot.root);
    assert_eq!(drill.root, snapshot.root);
    assert_eq!((drill.generation, drill.base_epoch), (0, 1));
    assert_eq!(drill.snapshot, "base");
    let cut = f
        .store
        .create_launch(
            &source(),
            "base",
            "cut",
            LaunchKind::Cutover,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    assert_eq!(cut.kind, LaunchKind::Cutover);
    assert_eq!(
        f.store.list_launches(None).unwrap(),
        vec![cut.clone(), drill.clone()]
    );
    assert_eq!(f.store.list_launches(Some(&source())).unwrap().len(), 2);
    let other = SourceId::new("other").unwrap();
    assert!(f.store.list_launches(Some(&other)).unwrap().is_empty());

    let kind_of = |r: Result<LaunchInfo, Error>| r.unwrap_err().kind();
    assert_eq!(
        kind_of(f.store.create_launch(
            &source(),
            "base",
            "drill",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms()
        )),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind_of(f.store.create_launch(
            &source(),
            "gone",
            "x",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms()
        )),
        ErrorKind::NotFound
    );
    for bad in ["", "../x", ".x", "A", "a/b"] {
        assert_eq!(
            kind_of(f.store.create_launch(
                &source(),
                "base",
                bad,
                LaunchKind::Test,
                blockrep_core::clock::now_unix_ms()
            )),
            ErrorKind::Invalid,
            "{bad:?}"
        );
    }

    // A launch outlives its snapshot: it records the root itself.
    f.store.delete_snapshot(&source(), "base").unwrap();
    let volume = f.store.open_launch("cut").unwrap();
    assert_eq!(read_all(&volume), f.disk);
    assert_eq!(
        f.store.delete_launch("cut").unwrap_err().kind(),
        ErrorKind::Busy
    );
    drop(volume);
    f.store.delete_launch("cut").unwrap();
    assert_eq!(
        f.store.delete_launch("cut").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(f.store.list_launches(None).unwrap(), vec![drill]);
    let entries: Vec<_> = fs::read_dir(f.dir.path().join("launches"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec!["drill"], "no leftovers of create or delete");
}

#[test]
fn a_launch_open_twice_is_one_volume() {
    let f = fixture();
    let a = f.store.open_launch("drill").unwrap();
    let b = f.store.open_launch("drill").unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    drop((a, b));
    let c = f.store.open_launch("drill").unwrap();
    assert_eq!(read_all(&c), f.disk);
    assert_eq!(
        f.store.open_launch("nope").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    fn shareable<T: Send + Sync>(_: &T) {}
    shareable(&c);
}

#[test]
fn unaligned_writes_match_a_model() {
    let f = fixture();
    let volume = f.store.open_launch("drill").unwrap();
    assert_eq!(volume.size_bytes(), DISK_LEN);
    let mut model = f.disk.clone();
    let writes: &[(u64, usize)] = &[
        (0, 1),                                   // first byte
        (4095, 2),                                // across the first boundary
        (3 * CHUNK - 7, 2 * CHUNK as usize + 19), // three chunks, both ends partial
        (5 * CHUNK, CHUNK as usize),              // exactly one chunk
        (DISK_LEN - 1000, 1000),                  // into and through the short last chunk
        (DISK_LEN - 1, 1),                        // the very last byte
        (10 * CHUNK + 5, 3),                      // inside the short last chunk
        (6 * CHUNK + 100, 0),                     // empty
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13 + 1) as u8 | 1).collect();
        volume.write(offset, &data).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        assert_eq!(read_all(&volume), model, "after write {i}");
    }
    volume.write_zeroes(2 * CHUNK + 1, CHUNK + 3).unwrap();
    model[2 * CHUNK as usize + 1..3 * CHUNK as usize + 4].fill(0);
    volume.trim(7 * CHUNK, 2 * CHUNK).unwrap();
    model[7 * CHUNK as usize..9 * CHUNK as usize].fill(0);
    assert_eq!(read_all(&volume), model);
    // Reads at odd offsets and lengths too.
    for &(offset, len) in &[(1u64, 5000usize), (4095, 1), (DISK_LEN - 778, 778), (9, 0)] {
        let mut buf = vec![0u8; len];
        volume.read(offset, &mut buf).unwrap();
        assert_eq!(buf, &model[offset as usize..offset as usize + len]);
    }
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    assert_eq!(read_all(&volume), model);
    drop(volume);
    let store = reopen(f.dir.path());
    assert_eq!(read_all(&store.open_launch("drill").unwrap()), model);
}

#[test]
fn out_of_range_is_invalid_input() {
    let f = fixture();
    let volume = f.store.open_launch("drill").unwrap();
    let invalid = |r: io::Result<()>| r.unwrap_err().kind() == io::ErrorKind::InvalidInput;
    let mut buf = [0u8; 2];
    assert!(invalid(volume.read(DISK_LEN - 1, &mut buf)));
    assert!(invalid(volume.read(DISK_LEN + 1, &mut [])));
    assert!(invalid(volume.read(u64::MAX, &mut buf)));
    assert!(invalid(volume.write(DISK_LEN - 1, &[1, 2])));
    assert!(invalid(volume.write(u64::MAX - 1, &[1, 2, 3])));
    assert!(invalid(volume.write_zeroes(0, DISK_LEN + 1)));
    assert!(invalid(volume.trim(u64::MAX, u64::MAX)));
    volume.read(DISK_LEN, &mut []).unwrap();
    volume.write(DISK_LEN - 2, &[1, 2]).unwrap();
    // The failed writes changed nothing.
    let mut model = f.disk.clone();
    model[DISK_LEN as usize - 2..].copy_from_slice(&[1, 2]);
    assert_eq!(read_all(&volume), model);
}

#[test]
fn flushed_writes_survive_a_power_loss_and_unflushed_ones_do_not() {
    let f = fixture();
    let mut model = f.disk.clone();
    {
        let volume = f.store.open_launch("drill").unwrap();
        volume.write(100, b"flushed").unwrap();
        model[100..107].copy_from_slice(b"flushed");
        volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
        assert_eq!(volume.info().generation, 1);
        volume.write(5000, b"lost").unwrap();
        volume.write_zeroes(0, CHUNK).unwrap();
        // Dropped without a flush, then a power loss.
    }
    let _reboot = overlay::tests::Reboot::new();
    let store = reopen(f.dir.path());
    let volume = store.open_launch("drill").unwrap();
    assert_eq!(read_all(&volume), model);
    let info = volume.info();
    assert_eq!(info.generation, 1);
    assert_eq!(store.launch("drill").unwrap().unwrap(), info);
    // A flush with nothing written moves nothing.
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    assert_eq!(volume.info(), info);
    // Writing back what is there changes no root either.
    volume.write(100, b"flushed").unwrap();
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    assert_eq!(volume.info(), info);
}

#[test]
fn launch_writes_never_change_the_base() {
    let f = fixture();
    let head_before = f.store.head(&source()).unwrap().unwrap();
    let snapshot_before = f.store.snapshot(&source(), "base").unwrap().unwrap();
    let snapshot_file = f
        .dir
        .path()
        .join("sources")
        .join(source().as_str())
        .join("snapshots")
        .join("base");
    let head_file = f
        .dir
        .path()
        .join("sources")
        .join(source().as_str())
        .join("head");
    let files_before = (
        fs::read(&snapshot_file).unwrap(),
        fs::read(&head_file).unwrap(),
    );

    let volume = f.store.open_launch("drill").unwrap();
    volume.write(0, &vec![0x5a; DISK_LEN as usize]).unwrap();
    volume.write_zeroes(CHUNK, 3 * CHUNK).unwrap();
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    let own_root = volume.info().root;
    assert_ne!(own_root, snapshot_before.root);

    assert_eq!(f.store.head(&source()).unwrap().unwrap(), head_before);
    assert_eq!(
        f.store.snapshot(&source(), "base").unwrap().unwrap(),
        snapshot_before
    );
    assert_eq!(
        (
            fs::read(&snapshot_file).unwrap(),
            fs::read(&head_file).unwrap()
        ),
        files_before
    );
    let out = f.dir.path().join("export.raw");
    f.store.export(&source(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), f.disk);
    // A second launch of the same snapshot still starts from the base.
    f.store
        .create_launch(
            &source(),
            "base",
            "second",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    assert_eq!(read_all(&f.store.open_launch("second").unwrap()), f.disk);

    let roots = f.store.referenced_roots().unwrap();
    let mut expected = vec![head_before.root, own_root];
    expected.sort();
    assert_eq!(
        roots, expected,
        "head = snapshot = bases, plus the launch's own"
    );
}

#[test]
fn sequential_small_reads_decode_a_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let geometry = Geometry::new(4 << 16, 1 << 16).unwrap();
    let disk: Vec<u8> = (0..4usize << 16).map(|i| (i % 251) as u8 + 1).collect();
    commit_disk(&store, &source(), &disk, geometry, 1);
    store
        .create_snapshot(&source(), Some("s"), None, 1)
        .unwrap();
    store
        .create_launch(
            &source(),
            "s",
            "l",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    let volume = store.open_launch("l").unwrap();
    let mut piece = [0u8; 4096];
    for offset in (0..2 << 16).step_by(4096) {
        volume.read(offset as u64, &mut piece).unwrap();
        assert_eq!(piece, disk[offset..offset + 4096]);
    }
    assert_eq!(volume.lock_state().chunk_reads, 2);
    // A partial write after a read reuses the decoded chunk too.
    volume.write(70_000, b"patch").unwrap();
    assert_eq!(volume.lock_state().chunk_reads, 2);
}

#[test]
fn written_chunks_are_compressed_when_it_pays_and_zeroes_cost_nothing() {
    let f = fixture();
    let volume = f.store.open_launch("drill").unwrap();
    let blobs = f.store.blob_count();
    volume.write_zeroes(0, 4 * CHUNK).unwrap();
    volume.write(4 * CHUNK, &vec![0u8; CHUNK as usize]).unwrap();
    assert_eq!(
        f.store.blob_count(),
        blobs,
        "writes store nothing until a fold"
    );
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    let ids = f.store.chunk_ids(&volume.flushed_root()).unwrap();
    assert!(
        ids[..5].iter().all(ChunkId::is_zero),
        "zero chunks are named zero"
    );
    // Only the new index page and root were stored.
    assert_eq!(f.store.blob_count(), blobs + 2);
    let packs = pack_bytes(f.dir.path());
    volume
        .write(5 * CHUNK, &vec![0x11; CHUNK as usize])
        .unwrap();
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    let grown = pack_bytes(f.dir.path()) - packs;
    assert!(
        grown < CHUNK / 4,
        "a repetitive chunk is stored compressed: {grown}"
    );
    // The chunk, a page and a root.
    assert_eq!(f.store.blob_count(), blobs + 5);
}

#[test]
fn a_read_only_store_reads_but_refuses_writes() {
    let f = fixture();
    let reader = Arc::new(Store::open_read_only(f.dir.path()).unwrap());
    let volume = reader.open_launch("drill").unwrap();
    assert_eq!(read_all(&volume), f.disk);
    assert!(volume.write(0, b"x").is_err());
    assert!(reader.delete_launch("drill").is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Read { offset: u64, len: u64 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets cluster near chunk boundaries and the end, where bugs hide.
    let offset = prop_oneof![
        0..DISK_LEN,
        (0..=10u64, -3i64..=3).prop_map(|(chunk, delta)| {
            (chunk * CHUNK).saturating_add_signed(delta).min(DISK_LEN)
        }),
        (DISK_LEN - 800)..=DISK_LEN,
    ];
    let len = prop_oneof![0..10u64, 0..2 * CHUNK + 10, Just(CHUNK)];
    prop_oneof![
        4 => (offset.clone(), len.clone(), any::<u8>()).prop_map(|(offset, len, seed)| {
            let len = len.min(DISK_LEN - offset);
            // Mostly patterned bytes; seed 0 writes zeroes through `write`.
            let data = (0..len).map(|i| if seed == 0 { 0 } else { (i as u8) ^ seed }).collect();
            Op::Write { offset, data }
        }),
        2 => (offset.clone(), len.clone()).prop_map(|(offset, len)| Op::Zero {
            offset,
            len: len.min(DISK_LEN - offset),
        }),
        2 => (offset, len).prop_map(|(offset, len)| Op::Read {
            offset,
            len: len.min(DISK_LEN - offset),
        }),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_a_model(ops in proptest::collection::vec(op(), 1..40)) {
        let f = fixture();
        let volume = f.store.open_launch("drill").unwrap();
        let mut model = f.disk.clone();
        let mut flushed = f.disk.clone();
        for op in &ops {
            match op {
                Op::Write { offset, data } => {
                    volume.write(*offset, data).unwrap();
                    let start = *offset as usize;
                    model[start..start + data.len()].copy_from_slice(data);
                }
                Op::Zero { offset, len } => {
                    volume.write_zeroes(*offset, *len).unwrap();
                    model[*offset as usize..(*offset + *len) as usize].fill(0);
                }
                Op::Read { offset, len } => {
                    let mut buf = vec![0xee; *len as usize];
                    volume.read(*offset, &mut buf).unwrap();
                    prop_assert_eq!(&buf[..], &model[*offset as usize..(*offset + *len) as usize]);
                }
                Op::Flush => {
                    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
                    flushed.clone_from(&model);
                }
            }
        }
        prop_assert_eq!(read_all(&volume), model);
        drop(volume);
        let _reboot = overlay::tests::Reboot::new();
        let store = reopen(f.dir.path());
        prop_assert!(read_all(&store.open_launch("drill").unwrap()) == flushed);
        let out = f.dir.path().join("export.raw");
        store.export(&source(), &out).unwrap();
        prop_assert_eq!(fs::read(&out).unwrap(), f.disk);
    }
}

//! Tests of live materialization: the target ends equal to the volume
//! whatever clients do meanwhile, reads stop touching the store, and a stop
//! resumes from the journal.

use std::sync::Arc;

use blockrep_core::Geometry;
use proptest::prelude::*;

use crate::error::ErrorKind;
use crate::launch::LaunchKind;
use crate::store::Store;
use crate::testutil::{commit_disk, root_disk, sample_disk, source};

const CHUNK: u64 = 16 << 10;
/// Twelve whole chunks, and a last one that ends inside a 4 KiB block.
pub(in crate::launch) const DISK_LEN: u64 = 12 * CHUNK + 5000;

pub(in crate::launch) fn fixture() -> (tempfile::TempDir, Arc<Store>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("data")).unwrap());
    let geometry = Geometry::new(DISK_LEN, CHUNK as u32).unwrap();
    let mut disk = sample_disk(DISK_LEN as usize, 5);
    // A zero chunk, which the copy writes as a hole.
    disk[4 * CHUNK as usize..5 * CHUNK as usize].fill(0);
    commit_disk(&store, &source(), &disk, geometry, 1);
    store
        .create_snapshot(&source(), Some("s"), None, 1)
        .unwrap();
    store
        .create_launch(&source(), "s", "l", LaunchKind::Test, 1)
        .unwrap();
    (dir, store, disk)
}

fn read_all(volume: &crate::LaunchVolume) -> Vec<u8> {
    let mut out = vec![0xaa; DISK_LEN as usize];
    volume.read(0, &mut out).unwrap();
    out
}

#[test]
fn a_materialized_volume_equals_its_target_and_reads_no_chunk() {
    let (dir, store, mut model) = fixture();
    let target = dir.path().join("copy.raw");
    let volume = store.open_launch("l").unwrap();
    // Written before: folded at the start, and zeroes.
    volume.write(5000, &[1; 7000]).unwrap();
    model[5000..12000].fill(1);
    volume.write_zeroes(2 * CHUNK, CHUNK).unwrap();
    model[2 * CHUNK as usize..3 * CHUNK as usize].fill(0);
    let progress = volume.materialize_to(&target, 2).unwrap();
    assert_eq!((progress.copied_bytes, progress.done), (0, false));
    assert_eq!(progress.remote_bytes, DISK_LEN);
    assert_eq!(store.launch("l").unwrap().unwrap().generation, 1, "folded");
    // Asked again: the same materialization; another target is refused.
    assert_eq!(volume.materialize_to(&target, 3).unwrap(), progress);
    let other = volume.materialize_to(&dir.path().join("other.raw"), 3);
    assert_eq!(other.unwrap_err().kind(), ErrorKind::Invalid);
    let step = volume.materialize_step(5).unwrap();
    assert_eq!(step.copied_bytes, 5 * CHUNK);
    assert!(!step.done);
    // Written between steps: a copied chunk and one not copied yet.
    volume.write(CHUNK + 10, &[2; 100]).unwrap();
    model[CHUNK as usize + 10..CHUNK as usize + 110].fill(2);
    volume.write(9 * CHUNK, &[3; 4096]).unwrap();
    model[9 * CHUNK as usize..9 * CHUNK as usize + 4096].fill(3);
    while !volume.materialize_step(3).unwrap().done {}
    let progress = volume.materialize_progress().unwrap();
    assert_eq!(
        (progress.copied_bytes, progress.remote_bytes, progress.done),
        (DISK_LEN, 0, true)
    );
    assert_eq!(std::fs::read(&target).unwrap(), model, "the target");
    // Every read now comes from the target: no chunk, no page.
    let before = (store.chunk_cache_stats(), volume.lock_state().chunk_reads);
    store.set_chunk_cache_bytes(0);
    assert_eq!(read_all(&volume), model);
    let after = store.chunk_cache_stats();
    assert_eq!((after.hits, after.misses), (before.0.hits, before.0.misses));
    assert_eq!(volume.lock_state().chunk_reads, before.1);
    // A fold after it changes no byte of either.
    volume.fold(9).unwrap();
    assert_eq!(volume.overlay_bytes(), 0);
    volume.sync(9).unwrap();
    assert_eq!(read_all(&volume), model);
    assert_eq!(std::fs::read(&target).unwrap(), model);
    // The store's own copy agrees: the launch's folded root is the model.
    let root = store.launch("l").unwrap().unwrap().root;
    assert_eq!(root_disk(&store, &root), model);
    assert!(store.verify(None, None).unwrap().is_clean());
}

#[test]
fn a_stop_resumes_from_the_recorded_chunks() {
    let (dir, store, mut model) = fixture();
    let target = dir.path().join("copy.raw");
    let volume = store.open_launch("l").unwrap();
    volume.materialize_to(&target, 2).unwrap();
    assert_eq!(volume.materialize_step(4).unwrap().copied_bytes, 4 * CHUNK);
    volume.write(11 * CHUNK + 1, &[4; 20]).unwrap();
    model[11 * CHUNK as usize + 1..11 * CHUNK as usize + 21].fill(4);
    volume.sync(3).unwrap();
    drop(volume);
    let listed = store.launch_materializations().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].progress.copied_bytes,
        4 * CHUNK,
        "from the journal"
    );
    drop(store);
    // A torn record at the journal's end is cut off.
    let journal = dir.path().join("data/overlays/l/copied");
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes.extend_from_slice(b"MCPY\x01\x02");
    std::fs::write(&journal, &bytes).unwrap();
    let store = Arc::new(Store::open(&dir.path().join("data")).unwrap());
    let volume = store.open_launch("l").unwrap();
    let progress = volume.materialize_progress().unwrap();
    assert_eq!(progress.copied_bytes, 4 * CHUNK);
    assert_eq!(progress.target, target);
    let mut copied = 0;
    loop {
        let step = volume.materialize_step(2).unwrap();
        copied += step.copied_bytes;
        if step.done {
            break;
        }
    }
    assert_eq!(copied, DISK_LEN - 4 * CHUNK, "only what was left");
    assert_eq!(read_all(&volume), model, "after the restart");
    assert_eq!(std::fs::read(&target).unwrap(), model);
}

#[test]
fn after_a_power_loss_unflushed_writes_are_copied_again_from_the_root() {
    let (dir, store, mut model) = fixture();
    let target = dir.path().join("copy.raw");
    let volume = store.open_launch("l").unwrap();
    volume.materialize_to(&target, 2).unwrap();
    while !volume.materialize_step(8).unwrap().done {}
    volume.write(3 * CHUNK, &[5; 4096]).unwrap();
    model[3 * CHUNK as usize..3 * CHUNK as usize + 4096].fill(5);
    volume.sync(3).unwrap();
    let synced = model.clone();
    // Not flushed: in the target's page cache, which outlives the "power
    // loss" here, so the target holds bytes the volume must not show.
    volume.write(7 * CHUNK + 4096, &[6; 4096]).unwrap();
    drop(volume);
    drop(store);
    let _reboot = crate::launch::overlay::tests::Reboot::new();
    let store = Arc::new(Store::open(&dir.path().join("data")).unwrap());
    let volume = store.open_launch("l").unwrap();
    let progress = volume.materialize_progress().unwrap();
    assert_eq!(
        progress.remote_bytes, CHUNK,
        "the cut chunk is copied again"
    );
    while !volume.materialize_step(8).unwrap().done {}
    assert_eq!(read_all(&volume), synced);
    assert_eq!(std::fs::read(&target).unwrap(), synced);
    volume.fold(4).unwrap();
    let root = store.launch("l").unwrap().unwrap().root;
    assert_eq!(root_disk(&store, &root), synced);
    drop(volume);
    drop(store);
    // The record to copy again is durable: a later open agrees.
    let store = Arc::new(Store::open(&dir.path().join("data")).unwrap());
    let volume = store.open_launch("l").unwrap();
    assert!(volume.materialize_progress().unwrap().done);
}

#[test]
fn reads_copy_what_they_fetch() {
    let (dir, store, model) = fixture();
    let target = dir.path().join("copy.raw");
    let volume = store.open_launch("l").unwrap();
    volume.materialize_to(&target, 2).unwrap();
    let mut buf = vec![0; 100];
    volume.read(6 * CHUNK + 50, &mut buf).unwrap();
    assert_eq!(
        buf,
        model[6 * CHUNK as usize + 50..6 * CHUNK as usize + 150]
    );
    assert_eq!(volume.materialize_progress().unwrap().copied_bytes, CHUNK);
    let on_disk = std::fs::read(&target).unwrap();
    assert_eq!(
        on_disk[6 * CHUNK as usize..7 * CHUNK as usize],
        model[6 * CHUNK as usize..7 * CHUNK as usize]
    );
}

#[test]
fn bad_targets_are_refused_and_change_nothing() {
    let (dir, store, _model) = fixture();
    let volume = store.open_launch("l").unwrap();
    let relative = volume.materialize_to(std::path::Path::new("copy.raw"), 2);
    assert_eq!(relative.unwrap_err().kind(), ErrorKind::Invalid);
    let existing = dir.path().join("mine.raw");
    std::fs::write(&existing, b"a file of the user's").unwrap();
    let error = volume.materialize_to(&existing, 2).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Invalid);
    assert!(error.to_string().contains("exists"), "{error}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"a file of the user's");
    assert!(volume.materialize_progress().is_none());
    assert!(store.launch_materializations().unwrap().is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, len: u64, byte: u8 },
    Zero { at: u64, len: u64 },
    Step(u64),
    Read { at: u64, len: u64 },
    Fold,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..DISK_LEN).prop_flat_map(|at| (Just(at), 1..=(DISK_LEN - at).min(3 * CHUNK)));
    prop_oneof![
        (range.clone(), any::<u8>()).prop_map(|((at, len), byte)| Op::Write { at, len, byte }),
        range.clone().prop_map(|(at, len)| Op::Zero { at, len }),
        (1..4u64).prop_map(Op::Step),
        range.prop_map(|(at, len)| Op::Read { at, len }),
        Just(Op::Fold),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Whatever clients do while it copies, the target ends equal to the
    /// volume, which reads as the model throughout.
    #[test]
    fn the_target_ends_equal_to_the_volume(ops in proptest::collection::vec(op(), 1..30)) {
        let (dir, store, mut model) = fixture();
        let target = dir.path().join("copy.raw");
        let volume = store.open_launch("l").unwrap();
        volume.materialize_to(&target, 2).unwrap();
        for op in ops {
            match op {
                Op::Write { at, len, byte } => {
                    volume.write(at, &vec![byte; len as usize]).unwrap();
                    model[at as usize..(at + len) as usize].fill(byte);
                }
                Op::Zero { at, len } => {
                    volume.write_zeroes(at, len).unwrap();
                    model[at as usize..(at + len) as usize].fill(0);
                }
                Op::Step(chunks) => {
                    volume.materialize_step(chunks).unwrap();
                }
                Op::Read { at, len } => {
                    let mut buf = vec![0; len as usize];
                    volume.read(at, &mut buf).unwrap();
                    prop_assert_eq!(&buf[..], &model[at as usize..(at + len) as usize]);
                }
                Op::Fold => {
                    volume.fold(5).unwrap();
                }
            }
        }
        while !volume.materialize_step(4).unwrap().done {}
        prop_assert_eq!(read_all(&volume), model.clone());
        prop_assert_eq!(std::fs::read(&target).unwrap(), model);
    }
}

#[test]
fn blocks_folded_just_before_the_start_survive_a_power_loss() {
    let (dir, store, mut model) = fixture();
    let volume = store.open_launch("l").unwrap();
    volume.write(2 * CHUNK, &[7; 4096]).unwrap();
    model[2 * CHUNK as usize..2 * CHUNK as usize + 4096].fill(7);
    volume.sync(2).unwrap();
    // The start folds (unmapping the block), then switches.
    volume
        .materialize_to(&dir.path().join("copy.raw"), 3)
        .unwrap();
    drop(volume);
    drop(store);
    let _reboot = crate::launch::overlay::tests::Reboot::new();
    let store = Arc::new(Store::open(&dir.path().join("data")).unwrap());
    let volume = store.open_launch("l").unwrap();
    assert_eq!(read_all(&volume), model);
}

#[test]
fn a_write_cut_between_its_bytes_and_its_record_leaves_target_and_root_agreeing() {
    let (dir, store, model) = fixture();
    let target = dir.path().join("copy.raw");
    let volume = store.open_launch("l").unwrap();
    volume.materialize_to(&target, 2).unwrap();
    while !volume.materialize_step(8).unwrap().done {}
    // A write into a copied chunk, cut by a kill after its bytes reached
    // the target: what the write path did before the bytes, then the bytes.
    let at = 5 * CHUNK + 4096;
    volume
        .lock_state()
        .mark_copied_written(volume.geometry(), at, at + 4096)
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[9; 4096], at).unwrap();
    drop(volume);
    drop(store);
    let store = Arc::new(Store::open(&dir.path().join("data")).unwrap());
    let volume = store.open_launch("l").unwrap();
    let shown = read_all(&volume);
    // Either content is a disk's right after a crash; the store must agree.
    assert!(shown == model || shown[at as usize..at as usize + 4096] == [9; 4096]);
    volume.fold(3).unwrap();
    let root = store.launch("l").unwrap().unwrap().root;
    assert_eq!(
        root_disk(&store, &root),
        shown,
        "the root and the target differ"
    );
    assert_eq!(std::fs::read(&target).unwrap(), shown);
}

#[test]
fn an_encrypted_source_is_not_materialized() {
    let (dir, store, _model) = fixture();
    let volume = store.open_launch("l").unwrap();
    let key = blockrep_keys::DataKey::generate().unwrap();
    volume.lock_state().sealer = Some(Arc::new(key.sealer().unwrap()));
    let refused = volume.materialize_to(&dir.path().join("copy.raw"), 2);
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::Invalid);
    assert!(!dir.path().join("copy.raw").exists());
}

//! Tests of the overlay as a volume uses it, and of folding.

use std::sync::Arc;

use blockrep_core::Geometry;
use proptest::prelude::*;

use crate::launch::LaunchKind;
use crate::store::Store;
use crate::testutil::{commit_disk, sample_disk, source};

const CHUNK: u64 = 16 << 10;
/// Five whole chunks, and a last one that ends inside a 4 KiB block.
const DISK_LEN: u64 = 5 * CHUNK + 5000;

fn fixture() -> (tempfile::TempDir, Arc<Store>, Vec<u8>) {
    fixture_of(DISK_LEN)
}

/// A store holding a disk of `len` bytes, its snapshot `s` and launch `l`.
fn fixture_of(len: u64) -> (tempfile::TempDir, Arc<Store>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let geometry = Geometry::new(len, CHUNK as u32).unwrap();
    let disk = sample_disk(len as usize, 5);
    commit_disk(&store, &source(), &disk, geometry, 1);
    store
        .create_snapshot(&source(), Some("s"), None, 1)
        .unwrap();
    store
        .create_launch(&source(), "s", "l", LaunchKind::Test, 1)
        .unwrap();
    (dir, store, disk)
}

fn read_all(store: &Arc<Store>) -> Vec<u8> {
    let volume = store.open_launch("l").unwrap();
    let mut out = vec![0xaa; DISK_LEN as usize];
    volume.read(0, &mut out).unwrap();
    out
}

#[test]
fn synced_writes_survive_a_power_loss_without_a_fold() {
    let (dir, store, mut model) = fixture();
    let volume = store.open_launch("l").unwrap();
    // Across a block boundary, unaligned; a whole chunk of zeroes; the
    // short last block.
    volume.write(5000, &[1; 7000]).unwrap();
    model[5000..12000].fill(1);
    volume.write_zeroes(CHUNK, CHUNK).unwrap();
    model[CHUNK as usize..2 * CHUNK as usize].fill(0);
    volume.write(DISK_LEN - 10, &[2; 10]).unwrap();
    model[DISK_LEN as usize - 10..].fill(2);
    volume.sync(5).unwrap();
    let synced = model.clone();
    volume.write(3 * CHUNK + 100, &[3; 5000]).unwrap();
    model[3 * CHUNK as usize + 100..3 * CHUNK as usize + 5100].fill(3);
    assert_eq!(read_all(&store), model, "a write reads back at once");
    assert_eq!(
        store.launch("l").unwrap().unwrap().generation,
        0,
        "no fold yet"
    );
    drop(volume);
    drop(store);
    // After a power loss: what the sync covered.
    let _reboot = crate::launch::overlay::tests::Reboot::new();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    assert_eq!(read_all(&store), synced);
}

#[test]
fn reads_and_writes_go_on_while_a_flush_waits_for_the_disk() {
    use std::sync::mpsc::channel;
    use std::time::Duration;
    let (dir, store, mut model) = fixture();
    let volume = store.open_launch("l").unwrap();
    volume.write(0, &[1; 4096]).unwrap();
    model[..4096].fill(1);
    let (paused_tx, paused) = channel();
    let (resume, resume_rx) = channel();
    *volume.sync_pause.lock().unwrap() = Some((paused_tx, resume_rx));
    let flusher = {
        let volume = Arc::clone(&volume);
        std::thread::spawn(move || volume.sync(3))
    };
    paused
        .recv_timeout(Duration::from_secs(10))
        .expect("the flush syncs the data written so far without the volume's lock");
    // While the flush waits for the disk, a read and a write are served.
    let (done_tx, done) = channel();
    let io = {
        let volume = Arc::clone(&volume);
        std::thread::spawn(move || {
            let mut back = [0u8; 4096];
            volume.read(0, &mut back).unwrap();
            volume.write(8192, &[2; 4096]).unwrap();
            done_tx.send(back).unwrap();
        })
    };
    let back = done.recv_timeout(Duration::from_secs(10));
    resume.send(()).unwrap();
    assert_eq!(back.expect("served during the flush"), [1; 4096]);
    io.join().unwrap();
    model[8192..12288].fill(2);
    flusher.join().unwrap().unwrap();
    drop(volume);
    drop(store);
    // The write made during the flush is covered by it as well: the flush
    // finished after it.
    let _reboot = crate::launch::overlay::tests::Reboot::new();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    assert_eq!(read_all(&store), model);
}

#[test]
fn a_fold_moves_the_head_empties_the_overlay_and_changes_no_byte() {
    let (dir, store, mut model) = fixture();
    let volume = store.open_launch("l").unwrap();
    volume.write(100, &[9; 300]).unwrap();
    model[100..400].fill(9);
    volume.write_zeroes(2 * CHUNK, 3 * CHUNK + 5000).unwrap();
    model[2 * CHUNK as usize..].fill(0);
    let before = store.blob_count();
    let root = volume.fold(7).unwrap();
    assert_eq!(volume.overlay_bytes(), 0);
    let info = store.launch("l").unwrap().unwrap();
    assert_eq!((info.generation, info.flushed_unix_ms), (1, 7));
    assert_eq!(info.root, root.id());
    let ids = store.chunk_ids(&root).unwrap();
    assert!(
        ids[2..].iter().all(|id| id.is_zero()),
        "zero chunks cost nothing"
    );
    // The written chunk, a page and a root.
    assert_eq!(store.blob_count(), before + 3);
    assert!(
        store.blobs.checked(&ids[0]),
        "a chunk the fold hashed and stored is read by its crc32"
    );
    assert_eq!(read_all(&store), model);
    assert!(store.verify(None, None).unwrap().is_clean());
    // A second fold with nothing written does nothing.
    volume.fold(8).unwrap();
    assert_eq!(store.launch("l").unwrap().unwrap().generation, 1);
    drop(volume);
    drop(store);
    let store = Arc::new(Store::open(dir.path()).unwrap());
    assert_eq!(read_all(&store), model);
}

#[test]
fn writes_racing_folds_are_all_kept() {
    let (dir, store, mut model) = fixture();
    let volume = store.open_launch("l").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let folder = {
        let (volume, stop) = (Arc::clone(&volume), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut folds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                volume.fold(folds).unwrap();
                folds += 1;
            }
            folds
        })
    };
    let mut rng = blockrep_core::rng::SplitMix64::new(11);
    for i in 0..3000u64 {
        let offset = rng.next_u64() % (DISK_LEN - 1);
        let len = (rng.next_u64() % 9000 + 1).min(DISK_LEN - offset);
        let fill = (i % 250) as u8 + 1;
        if i % 7 == 0 {
            volume.write_zeroes(offset, len).unwrap();
            model[offset as usize..(offset + len) as usize].fill(0);
        } else {
            volume.write(offset, &vec![fill; len as usize]).unwrap();
            model[offset as usize..(offset + len) as usize].fill(fill);
        }
        if i % 100 == 0 {
            volume.sync(i).unwrap();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let folds = folder.join().unwrap();
    assert!(folds > 1, "the folds ran beside the writes: {folds}");
    assert_eq!(read_all(&store), model);
    volume.fold(u64::MAX).unwrap();
    assert_eq!(volume.overlay_bytes(), 0);
    drop(volume);
    drop(store);
    let store = Arc::new(Store::open(dir.path()).unwrap());
    assert_eq!(read_all(&store), model, "all of it in the store");
    assert!(store.verify(None, None).unwrap().is_clean());
}

/// Every content each 4 KiB block held since the last sync, the synced
/// one first: after a power loss a block shows one of them, as a disk's
/// sector shows one of the writes it was given since the last flush.
fn versions(model: &[u8]) -> Vec<Vec<Vec<u8>>> {
    model
        .chunks(4096)
        .map(|block| vec![block.to_vec()])
        .collect()
}

fn note_versions(history: &mut [Vec<Vec<u8>>], model: &[u8], offset: u64, len: u64) {
    for block in offset / 4096..=(offset + len - 1) / 4096 {
        let start = block as usize * 4096;
        let end = (start + 4096).min(model.len());
        history[block as usize].push(model[start..end].to_vec());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any sequence of writes, zeroes, syncs and folds reads like a byte
    /// array given the same writes, and after a power loss keeps what was
    /// synced.
    #[test]
    fn a_volume_reads_like_a_byte_array(ops in proptest::collection::vec(
        (0u8..5, 0..DISK_LEN, 1u64..20_000, any::<u8>()), 1..40)) {
        let (dir, store, mut model) = fixture();
        let volume = store.open_launch("l").unwrap();
        let mut history = versions(&model);
        for (kind, offset, len, fill) in ops {
            let len = len.min(DISK_LEN - offset);
            match kind {
                0 => {
                    volume.write(offset, &vec![fill; len as usize]).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(fill);
                    note_versions(&mut history, &model, offset, len);
                }
                1 => {
                    volume.write_zeroes(offset, len).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                    note_versions(&mut history, &model, offset, len);
                }
                2 => {
                    volume.sync(1).unwrap();
                    history = versions(&model);
                }
                3 => {
                    // A fold and a sync: all of it durable.
                    volume.flush(1).unwrap();
                    history = versions(&model);
                }
                _ => {
                    // A fold alone moves the head, but promises nothing
                    // about what the overlay shows over it until a sync.
                    volume.fold(1).unwrap();
                }
            }
        }
        prop_assert_eq!(&read_all(&store), &model);
        drop(volume);
        drop(store);
        let _reboot = crate::launch::overlay::tests::Reboot::new();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let reopened = read_all(&store);
        for (block, (got, seen)) in reopened.chunks(4096).zip(&history).enumerate() {
            prop_assert!(
                seen.iter().any(|version| version == got),
                "block {} shows content it never held since the last sync: {:?} not in {:?}",
                block,
                &got[..8],
                seen.iter().map(|v| v[..8].to_vec()).collect::<Vec<_>>()
            );
            // A block no write touched since the sync is exactly as synced.
            if seen.len() == 1 {
                prop_assert!(got == seen[0].as_slice());
            }
        }
    }
}

#[test]
fn a_fold_after_a_reboot_stays_folded_when_the_server_is_killed() {
    let (dir, store, _) = fixture();
    let volume = store.open_launch("l").unwrap();
    volume.write(0, &[7; 8192]).unwrap();
    volume.sync(1).unwrap();
    drop(volume);
    drop(store);
    let _reboot = crate::launch::overlay::tests::Reboot::new();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let volume = store.open_launch("l").unwrap();
    assert_eq!(volume.overlay_bytes(), 8192);
    volume.fold(2).unwrap();
    assert_eq!(volume.overlay_bytes(), 0);
    // Killed without a sync, in the same boot: the unmaps are kept, so the
    // next fold has nothing to do.
    drop(volume);
    drop(store);
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let volume = store.open_launch("l").unwrap();
    assert_eq!(volume.overlay_bytes(), 0);
    let mut head = [0u8; 8192];
    volume.read(0, &mut head).unwrap();
    assert_eq!(head, [7; 8192]);
}

#[test]
fn the_chunk_cache_keeps_to_its_budget() {
    let (_dir, store, disk) = fixture();
    // Room for two chunks and their overhead, not three.
    store.set_chunk_cache_bytes(2 * CHUNK + 1024);
    let volume = store.open_launch("l").unwrap();
    let mut all = vec![0u8; DISK_LEN as usize];
    for offset in (0..DISK_LEN).step_by(4096) {
        let end = (offset + 4096).min(DISK_LEN);
        volume
            .read(offset, &mut all[offset as usize..end as usize])
            .unwrap();
    }
    assert_eq!(all, disk);
    let stats = store.chunk_cache_stats();
    assert!(stats.used_bytes <= stats.budget_bytes, "{stats:?}");
    // No cache at all: every read decodes, and reads still come back right.
    store.set_chunk_cache_bytes(0);
    let misses = store.chunk_cache_stats().misses;
    let mut piece = [0u8; 100];
    volume.read(CHUNK + 7, &mut piece).unwrap();
    volume.read(CHUNK + 7, &mut piece).unwrap();
    assert_eq!(piece[..], disk[CHUNK as usize + 7..CHUNK as usize + 107]);
    assert_eq!(store.chunk_cache_stats().misses, misses + 2);
}

#[test]
fn no_readahead_for_what_the_overlay_holds_nor_for_reads_far_apart() {
    const LEN: u64 = 256 * CHUNK;
    let (_dir, store, disk) = fixture_of(LEN);
    let volume = store.open_launch("l").unwrap();
    // The first half written over: a sequential reader of it reads nothing
    // from the store, and asks nothing ahead, up to the half's last window.
    let half = LEN / 2;
    volume.write(0, &vec![9; half as usize]).unwrap();
    let mut piece = vec![0u8; 4096];
    for offset in (0..half - 64 * CHUNK).step_by(4096) {
        volume.read(offset, &mut piece).unwrap();
        assert_eq!(piece, [9; 4096]);
    }
    // 4 KiB reads a quarter of a MiB apart are random, not sequential.
    for offset in [half, half + (16 << 16), half + (8 << 16), half + (24 << 16)] {
        volume.read(offset, &mut piece).unwrap();
        assert_eq!(piece[..], disk[offset as usize..offset as usize + 4096]);
    }
    // The readahead thread decodes within microseconds of being asked.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        store.chunk_cache_stats().readahead_chunks,
        0,
        "{:?}",
        store.chunk_cache_stats()
    );
    // Reads one after another are sequential, and have chunks past the 16
    // reads they may have in flight (4 chunks here) decoded ahead: of the
    // last 4, which this reader never reaches.
    for offset in (LEN - 8 * CHUNK..LEN - 4 * CHUNK).step_by(4096) {
        volume.read(offset, &mut piece).unwrap();
    }
    assert!(wait(|| store.chunk_cache_stats().readahead_chunks > 0));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        store.chunk_cache_stats().readahead_chunks <= 4,
        "{:?}",
        store.chunk_cache_stats()
    );
}

fn wait(condition: impl Fn() -> bool) -> bool {
    (0..200).any(|_| {
        condition() || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            false
        }
    })
}

#[test]
fn a_volume_opened_again_remembers_when_it_last_served() {
    let (_dir, store, _model) = fixture();
    let volume = store.open_launch("l").unwrap();
    assert_eq!(volume.idle_for(), std::time::Duration::MAX, "never served");
    volume.write(0, &[1; 4096]).unwrap();
    drop(volume);
    // Every NBD connection opens the volume again: the background fold
    // must not take it as idle since forever.
    let volume = store.open_launch("l").unwrap();
    assert!(volume.idle_for() < std::time::Duration::from_secs(60));
    drop(volume);
    // Deleted, the launch is forgotten: one made again of its name never
    // served.
    store.delete_launch("l").unwrap();
    assert!(store.catalog.launch_last_io.lock().unwrap().is_empty());
    store
        .create_launch(&source(), "s", "l", LaunchKind::Test, 2)
        .unwrap();
    let volume = store.open_launch("l").unwrap();
    assert_eq!(volume.idle_for(), std::time::Duration::MAX);
}

//! The engine driven as the epoch loop and a workload would: cuts, commits,
//! writer threads on the export, restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blockrep_core::{ChunkId, Consistency, Geometry};

use super::*;

const BLOCK: u64 = CAPTURE_BLOCK_BYTES;

/// A disk file of `blocks` blocks, each filled with its number.
fn disk(dir: &Path, blocks: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let content: Vec<u8> = (0..blocks * BLOCK).map(|i| (i / BLOCK) as u8).collect();
    std::fs::write(&path, content).unwrap();
    path
}

fn open(path: &Path) -> Arc<Capture> {
    Capture::open(path, CaptureOptions::beside(path)).unwrap()
}

fn geometry(capture: &Capture, chunk_bytes: u32) -> Geometry {
    Geometry::new(capture.size_bytes(), chunk_bytes).unwrap()
}

fn read_chunk(cut: &Cut, geometry: Geometry, index: u64) -> std::io::Result<Vec<u8>> {
    let range = geometry.chunk_range(index).unwrap();
    let mut buf = vec![0; range.len()];
    cut.read_at(range.start as u64, &mut buf)?;
    Ok(buf)
}

#[test]
fn a_cut_reads_the_disk_as_of_its_instant_while_writers_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 512);
    let capture = open(&path);
    let export = capture.export();
    let geometry = geometry(&capture, 64 * 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|seed| {
            let (export, stop) = (Arc::clone(&export), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut rng = blockrep_core::rng::SplitMix64::new(seed + 1);
                let mut data = vec![0u8; 20_000];
                while !stop.load(Ordering::Relaxed) {
                    let len = 1 + rng.next_u64() % 20_000;
                    let offset = rng.next_u64() % (512 * BLOCK - len);
                    if rng.next_u64().is_multiple_of(5) {
                        export.write_zeroes(offset, len).unwrap();
                    } else {
                        data.fill(rng.next_u64() as u8);
                        export.write(offset, &data[..len as usize]).unwrap();
                    }
                }
            })
        })
        .collect();
    let mut compared = 0;
    for round in 0..30 {
        std::thread::sleep(std::time::Duration::from_millis(3));
        let mut copy = Vec::new();
        let cut = capture.cut_at(round == 0, || copy = std::fs::read(&path).unwrap());
        for index in cut.chunks(geometry) {
            let range = geometry.chunk_range(index).unwrap();
            // Give the writers time to overwrite what the cut still reads.
            std::thread::sleep(std::time::Duration::from_micros(200));
            assert!(
                read_chunk(&cut, geometry, index).unwrap() == copy[range],
                "round {round}: chunk {index} is not the disk as of the cut"
            );
            cut.release(geometry, index);
            compared += 1;
        }
        assert_eq!(cut.consistency(), Consistency::CrashConsistent);
        cut.committed(ChunkId([round as u8; 32]));
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    assert!(compared > 30, "only {compared} chunks were compared");
    let stats = capture.stats();
    assert_eq!(stats.cuts, 30);
    assert!(stats.writes > 0 && stats.write_p50_us > 0 && stats.write_p99_us >= stats.write_p50_us);
    assert_eq!(stats.preserved_bytes, 0, "every cut ended");
}

#[test]
fn commits_keep_later_writes_and_uncommitted_cuts_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 64);
    let capture = open(&path);
    let export = capture.export();
    let geometry = geometry(&capture, 16 * 1024); // 4 blocks a chunk

    export.write(BLOCK, &[1; 100]).unwrap(); // block 1: chunk 0
    let first = capture.cut(false);
    assert!(!first.full());
    export.write(20 * BLOCK, &[2; 10]).unwrap(); // block 20, after the cut: chunk 5
    assert_eq!(first.chunks(geometry), vec![0]);
    assert_eq!(first.written_ranges(geometry, 0), vec![(4096, 4096)]);
    first.committed(ChunkId([1; 32]));
    assert_eq!(capture.stats().dirty_bytes, BLOCK, "block 20 stays dirty");

    export.write(33 * BLOCK, &[3; 3 * BLOCK as usize]).unwrap(); // blocks 33-35
    let dropped = capture.cut(false);
    assert_eq!(dropped.chunks(geometry), vec![5, 8]);
    assert_eq!(dropped.written_ranges(geometry, 8), vec![(4096, 3 * 4096)]);
    drop(dropped);
    let next = capture.cut(false);
    assert_eq!(
        next.chunks(geometry),
        vec![5, 8],
        "the dropped cut's blocks come back"
    );
    next.committed(ChunkId([2; 32]));
    assert_eq!(capture.stats().dirty_bytes, 0);

    // A replaced cut's commit does not clear what the newer cut sealed again.
    export.write(0, &[4; 10]).unwrap();
    let old = capture.cut(false);
    export.write(0, &[5; 10]).unwrap();
    let new = capture.cut(false);
    old.committed(ChunkId([3; 32]));
    assert_eq!(capture.stats().dirty_bytes, BLOCK);
    assert!(
        read_chunk(&old, geometry, 0).is_err(),
        "a replaced cut ends"
    );
    new.committed(ChunkId([4; 32]));
    assert_eq!(capture.stats().dirty_bytes, 0);

    let full = capture.cut(true);
    assert!(full.full());
    assert_eq!(full.chunks(geometry), (0..16).collect::<Vec<_>>());
    assert_eq!(full.written_ranges(geometry, 15), vec![(0, 4 * 4096)]);
    assert_eq!(capture.stats().dirty_bytes, 64 * BLOCK);
}

#[test]
fn ranges_clip_to_a_short_last_chunk_and_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    std::fs::write(&path, vec![9u8; 5 * BLOCK as usize + 100]).unwrap();
    let capture = open(&path);
    let export = capture.export();
    export.write(5 * BLOCK + 50, &[1; 50]).unwrap();
    assert!(
        export.write(5 * BLOCK + 90, &[1; 20]).is_err(),
        "past the end"
    );
    let cut = capture.cut(false);
    let geometry = geometry(&capture, 16 * 1024);
    assert_eq!(cut.chunks(geometry), vec![1]);
    assert_eq!(cut.written_ranges(geometry, 1), vec![(4096, 100)]);
    export.write(5 * BLOCK, &[2; 100]).unwrap();
    let chunk = read_chunk(&cut, geometry, 1).unwrap();
    assert_eq!(chunk.len(), 4096 + 100);
    assert!(chunk[4096..4096 + 50].iter().all(|b| *b == 9));
    assert!(chunk[4096 + 50..].iter().all(|b| *b == 1));
}

#[test]
fn past_the_preserve_budget_a_cut_is_live_never_silently_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let mut options = CaptureOptions::beside(&path);
    options.preserve_max_bytes = 2 * BLOCK;
    let capture = Capture::open(&path, options).unwrap();
    let export = capture.export();
    export.write(0, &[1; 4 * BLOCK as usize]).unwrap();
    let cut = capture.cut(false);
    export.write(0, &[2; 2 * BLOCK as usize]).unwrap();
    assert_eq!(
        cut.consistency(),
        Consistency::CrashConsistent,
        "within budget"
    );
    assert_eq!(capture.stats().preserved_bytes, 2 * BLOCK);
    export.write(2 * BLOCK, &[3; 10]).unwrap();
    assert_eq!(cut.consistency(), Consistency::Live);
    assert_eq!(
        capture.stats().preserved_bytes,
        0,
        "a live cut keeps nothing"
    );
    let mut buf = vec![0; 4 * BLOCK as usize];
    cut.read_at(0, &mut buf).unwrap();
    assert_eq!(buf[0], 2, "a live cut reads the live disk");
}

#[test]
fn preserved_blocks_spill_to_a_file_that_goes_with_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let stale = dir.path().join(".disk.img.blockrep-spill.99999999");
    std::fs::write(&stale, b"left by a crash").unwrap();
    let mut options = CaptureOptions::beside(&path);
    options.preserve_memory_bytes = BLOCK;
    let capture = Capture::open(&path, options).unwrap();
    assert!(!stale.exists(), "a dead process's spill file is removed");
    let export = capture.export();
    export.write(0, &[1; 8 * BLOCK as usize]).unwrap();
    let mut copy = vec![0; 8 * BLOCK as usize];
    capture.export().read(0, &mut copy).unwrap();
    let cut = capture.cut(false);
    export.write(0, &[2; 8 * BLOCK as usize]).unwrap();
    let spill = preserve::spill_path(&path);
    assert!(spill.exists(), "seven blocks spilled");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&spill).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut buf = vec![0; 8 * BLOCK as usize];
    cut.read_at(0, &mut buf).unwrap();
    assert!(buf == copy);
    assert_eq!(capture.stats().preserved_bytes, 8 * BLOCK);
    cut.committed(ChunkId([1; 32]));
    assert!(!spill.exists(), "the spill file goes when the cut ends");
    assert_eq!(capture.stats().preserved_bytes, 0);
}

#[test]
fn a_clean_save_restores_the_dirty_set_and_root_an_unclean_stop_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 32);
    let options = CaptureOptions::beside(&path);
    assert_eq!(
        options.state_path,
        dir.path().join(".disk.img.blockrep-capture")
    );
    let capture = open(&path);
    assert_eq!(capture.saved_root(), None, "first run");
    let export = capture.export();
    export.write(0, &[1; 10]).unwrap();
    let cut = capture.cut(false);
    export.write(9 * BLOCK, &[1; 10]).unwrap();
    cut.committed(ChunkId([7; 32]));
    drop(cut);
    export.write(30 * BLOCK, &[1; 10]).unwrap();
    capture.save().unwrap();
    let refused = export.write(0, &[1; 10]).unwrap_err();
    assert_eq!(
        refused.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error())
    );
    drop((export, capture));

    let capture = open(&path);
    assert_eq!(capture.saved_root(), Some(ChunkId([7; 32])));
    assert_eq!(capture.stats().dirty_bytes, 2 * BLOCK);
    let cut = capture.cut(false);
    assert_eq!(cut.chunks(geometry(&capture, 4096)), vec![9, 30]);
    drop((cut, capture));

    // Dropped without a save: the file stays in use.
    let capture = open(&path);
    assert_eq!(capture.saved_root(), None, "an unclean stop needs a rescan");
    capture.save().unwrap();
    drop(capture);
    assert_eq!(
        open(&path).saved_root(),
        None,
        "no root was ever committed since"
    );
}

#[test]
fn after_a_failed_flush_nothing_is_called_durable_and_the_state_stays_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 32);
    let capture = open(&path);
    capture.cut(true).committed(ChunkId([5; 32]));
    let export = capture.export();
    export.write(0, &[1; 10]).unwrap();
    export.flush().unwrap();
    // As a failed write-back leaves it (the kernel reports it to one
    // fdatasync only): every later flush fails, whatever fdatasync says.
    capture.flush_failed.store(true, Ordering::SeqCst);
    assert!(
        export.flush().is_err(),
        "a flush after a failed one succeeded"
    );
    assert!(export.write(BLOCK, &[2; 10]).is_err());
    assert!(
        capture.save().is_err(),
        "a clean state saved over lost writes"
    );
    drop((export, capture));
    // Still marked in use: the next run reads the whole disk again.
    assert_eq!(open(&path).saved_root(), None);
}

#[test]
fn a_corrupt_or_foreign_state_file_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 32);
    let state = CaptureOptions::beside(&path).state_path;
    let save_with_root = || {
        let capture = open(&path);
        capture.cut(true).committed(ChunkId([3; 32]));
        capture.save().unwrap();
    };
    save_with_root();
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[70] ^= 0x10;
    std::fs::write(&state, &bytes).unwrap();
    assert_eq!(open(&path).saved_root(), None, "corrupt");

    save_with_root();
    assert_eq!(open(&path).saved_root(), Some(ChunkId([3; 32])));
    save_with_root();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(40 * BLOCK)
        .unwrap();
    assert_eq!(open(&path).saved_root(), None, "another disk size");
}

#[test]
fn after_freeze_writes_fail_with_erofs_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let capture = open(&path);
    let export = capture.export();
    export.write(0, &[1; 10]).unwrap();
    capture.freeze();
    let erofs = Some(rustix::io::Errno::ROFS.raw_os_error());
    assert_eq!(export.write(0, &[2; 10]).unwrap_err().raw_os_error(), erofs);
    assert_eq!(
        export.write_zeroes(0, 10).unwrap_err().raw_os_error(),
        erofs
    );
    let mut buf = [0; 10];
    export.read(0, &mut buf).unwrap();
    assert_eq!(buf, [1; 10]);
    export.flush().unwrap();
    // Cutover: the last cut holds everything written before the freeze.
    let cut = capture.cut(false);
    assert_eq!(cut.chunks(geometry(&capture, 4096)), vec![0]);
}

#[test]
fn a_released_chunk_is_not_preserved_and_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 16);
    let capture = open(&path);
    let export = capture.export();
    let geometry = geometry(&capture, 16 * 1024);
    export.write(0, &[1; 8 * BLOCK as usize]).unwrap(); // chunks 0 and 1
    let cut = capture.cut(false);
    assert_eq!(cut.chunks(geometry), vec![0, 1]);
    export.write(0, &[2; 10]).unwrap();
    assert_eq!(capture.stats().preserved_bytes, BLOCK);
    cut.release(geometry, 0);
    assert_eq!(capture.stats().preserved_bytes, 0, "its blocks are dropped");
    export.write(BLOCK, &[2; 10]).unwrap();
    assert_eq!(
        capture.stats().preserved_bytes,
        0,
        "and no longer preserved"
    );
    assert!(read_chunk(&cut, geometry, 0).is_err());
    export.write(4 * BLOCK, &[2; 10]).unwrap();
    assert_eq!(capture.stats().preserved_bytes, BLOCK, "chunk 1 still is");
    assert!(
        read_chunk(&cut, geometry, 1)
            .unwrap()
            .iter()
            .all(|b| *b == 1)
    );
    assert!(read_chunk(&cut, geometry, 2).is_err(), "never sealed");
}

#[test]
fn before_the_chunk_size_is_known_the_cut_preserves_whole_4_mib_spans() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 2048); // 8 MiB
    let capture = open(&path);
    let export = capture.export();
    export.write(0, &[1; 10]).unwrap();
    let cut = capture.cut(false);
    // Chunk size unknown: block 100 may share block 0's chunk.
    export.write(100 * BLOCK, &[2; 10]).unwrap();
    export.write(1500 * BLOCK, &[2; 10]).unwrap(); // the next 4 MiB span
    assert_eq!(capture.stats().preserved_bytes, BLOCK);
    let geometry = geometry(&capture, 64 * 1024);
    assert_eq!(cut.chunks(geometry), vec![0]);
    assert_eq!(
        capture.stats().preserved_bytes,
        0,
        "block 100 is in chunk 6"
    );
    export.write(15 * BLOCK, &[2; 10]).unwrap();
    assert_eq!(capture.stats().preserved_bytes, BLOCK);
    let chunk = read_chunk(&cut, geometry, 0).unwrap();
    assert_eq!(chunk[15 * BLOCK as usize], 15);
    assert_eq!(chunk[0], 1);
}

#[test]
fn write_zeroes_of_a_whole_sparse_disk_preserves_only_what_the_cut_needs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 30).unwrap();
    drop(file);
    let capture = open(&path);
    let export = capture.export();
    export.write(12_345 * BLOCK, &[7; 4096]).unwrap();
    let cut = capture.cut(false);
    export.write_zeroes(0, 1 << 30).unwrap();
    assert_eq!(
        capture.stats().preserved_bytes,
        1024 * BLOCK,
        "one 4 MiB span"
    );
    assert_eq!(capture.stats().dirty_bytes, 1 << 30);
    let geometry = geometry(&capture, 1 << 20);
    let index = 12_345 * BLOCK / (1 << 20);
    let chunk = read_chunk(&cut, geometry, index).unwrap();
    assert!(chunk.contains(&7));
    let mut now = vec![1; 4096];
    export.read(12_345 * BLOCK, &mut now).unwrap();
    assert!(now.iter().all(|b| *b == 0));
}

#[test]
fn the_fuzz_seeds_write_and_check_cuts() {
    for (name, input) in fuzzing::seeds() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = fuzzing::drive_capture_export(dir.path(), &input);
        assert!(
            outcome.writes > 0 && outcome.cuts_checked > 1,
            "{name}: {outcome:?}"
        );
    }
}

#[test]
fn a_disk_is_captured_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let capture = open(&path);
    let refused = Capture::open(&path, CaptureOptions::beside(&path)).unwrap_err();
    assert!(refused.to_string().contains("already served"), "{refused}");
    drop(capture);
    open(&path);
}

#[test]
fn a_disk_written_while_the_capture_was_stopped_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), 8);
    let capture = open(&path);
    capture.cut(true).committed(ChunkId([1; 32]));
    capture.save().unwrap();
    drop(capture);
    // Something else writes the image (a VM booted from it directly).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(b"behind our back", 0).unwrap();
    drop(file);
    assert_eq!(open(&path).saved_root(), None);
}

#[test]
fn disks_cut_together_hold_a_prefix_of_writes_made_one_after_the_other_across_them() {
    const RECORDS: u64 = 2048;
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|name| {
            let path = dir.path().join(format!("{name}.img"));
            std::fs::write(&path, vec![0u8; (RECORDS / 2 * BLOCK) as usize]).unwrap();
            path
        })
        .collect();
    let captures: Vec<Arc<Capture>> = paths.iter().map(|p| open(p)).collect();
    let exports: Vec<_> = captures.iter().map(|c| c.export()).collect();
    let record = |n: u64| {
        let mut block = vec![0u8; BLOCK as usize];
        block[..4].copy_from_slice(b"REC!");
        block[4..12].copy_from_slice(&n.to_le_bytes());
        block
    };
    // Record n goes to disk n % 2, block n / 2, each write complete before
    // the next starts.
    let writer = {
        let exports = exports.clone();
        std::thread::spawn(move || {
            for n in 0..RECORDS {
                exports[(n % 2) as usize]
                    .write(n / 2 * BLOCK, &record(n))
                    .unwrap();
            }
        })
    };
    let mut checked = 0;
    while !writer.is_finished() || checked == 0 {
        let cuts = Capture::cut_together(&captures, &[true, true]);
        let mut present = Vec::with_capacity(RECORDS as usize);
        for n in 0..RECORDS {
            let mut block = vec![0u8; BLOCK as usize];
            cuts[(n % 2) as usize]
                .read_at(n / 2 * BLOCK, &mut block)
                .unwrap();
            present.push(block == record(n));
        }
        let held = present.iter().take_while(|p| **p).count();
        assert!(
            present[held..].iter().all(|p| !p),
            "cut {checked}: records 0..{held} and then record {} of disk {}: not one instant",
            held + present[held..].iter().position(|p| *p).unwrap(),
            (held + present[held..].iter().position(|p| *p).unwrap()) % 2
        );
        for cut in &cuts {
            cut.committed(ChunkId::ZERO);
        }
        checked += 1;
    }
    writer.join().unwrap();
    assert!(checked > 1, "only {checked} cut");
}

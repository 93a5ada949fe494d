//! Chunk hashing over a whole disk (a buffer in memory, or a file read by
//! [`crate::DiskImage`]), on every core.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::geometry::Geometry;
use crate::id::ChunkId;

/// Chunks per unit of work handed to a scan thread. Large enough that the work
/// queue's lock is negligible, small enough that the threads finish together.
const CHUNKS_PER_BATCH: usize = 64;

/// Whether `data` is all zero. Checks 256-byte blocks so the inner loop vectorizes,
/// and leaves at the first non-zero block, which for real data is the first one.
/// Whether every byte is zero; checked in 256-byte blocks so the loop
/// vectorizes.
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(256);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Id of one chunk: [`ChunkId::ZERO`] when all its bytes are zero, blake3 otherwise.
///
/// Zero chunks are recognized before hashing, so a sparse disk costs one memory pass
/// over its zero regions and no hashing.
pub fn hash_chunk(data: &[u8]) -> ChunkId {
    if is_all_zero(data) {
        ChunkId::ZERO
    } else {
        ChunkId::from(blake3::hash(data))
    }
}

/// Scans `disk` (whose length must equal the geometry's disk size) into one id per
/// chunk, using every available core.
pub fn scan_buffer(disk: &[u8], geometry: Geometry) -> Vec<ChunkId> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    scan_buffer_with_threads(disk, geometry, threads)
}

/// [`scan_buffer`] with an explicit thread count (at least one is used).
pub fn scan_buffer_with_threads(disk: &[u8], geometry: Geometry, threads: usize) -> Vec<ChunkId> {
    scan_with(disk, geometry, threads)
}

/// The scan of a buffer in memory.
pub(crate) fn scan_with(disk: &[u8], geometry: Geometry, threads: usize) -> Vec<ChunkId> {
    assert_eq!(
        disk.len() as u64,
        geometry.disk_size_bytes(),
        "scan buffer length must equal the geometry's disk size"
    );
    let chunk_size = geometry.chunk_size_bytes() as usize;
    let scanned = for_each_batch(
        geometry,
        threads,
        || (),
        |(), first_chunk, out| {
            for (offset, slot) in out.iter_mut().enumerate() {
                let start = (first_chunk + offset) * chunk_size;
                let end = (start + chunk_size).min(disk.len());
                *slot = hash_chunk(&disk[start..end]);
            }
            Ok::<(), std::convert::Infallible>(())
        },
    );
    match scanned {
        Ok(ids) => ids,
        Err(never) => match never {},
    }
}

/// Hashes every chunk of `geometry` on `threads` threads (at least one), in
/// batches of [`CHUNKS_PER_BATCH`]: `hash_batch(worker, first_chunk, ids)`
/// fills the ids of the batch that starts at chunk `first_chunk`, with a
/// per-thread `worker` state made by `new_worker` (e.g. a read buffer, so that
/// nothing is allocated per batch). The first error stops every thread and is
/// returned.
pub(crate) fn for_each_batch<W, E: Send>(
    geometry: Geometry,
    threads: usize,
    new_worker: impl Fn() -> W + Sync,
    hash_batch: impl Fn(&mut W, usize, &mut [ChunkId]) -> Result<(), E> + Sync,
) -> Result<Vec<ChunkId>, E> {
    let chunk_count = usize::try_from(geometry.chunk_count()).expect("chunk count fits usize");
    let mut ids = vec![ChunkId::ZERO; chunk_count];
    let batches = Mutex::new(ids.chunks_mut(CHUNKS_PER_BATCH).enumerate());
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    let worker = || {
        let mut state = new_worker();
        while !failed.load(Ordering::Relaxed) {
            // The lock is held only to take the next batch, never while hashing.
            let next = batches.lock().expect("scan queue lock").next();
            let Some((batch_index, out)) = next else {
                return;
            };
            if let Err(error) = hash_batch(&mut state, batch_index * CHUNKS_PER_BATCH, out) {
                failed.store(true, Ordering::Relaxed);
                first_error
                    .lock()
                    .expect("scan error lock")
                    .get_or_insert(error);
                return;
            }
        }
    };
    let threads = threads
        .max(1)
        .min(chunk_count.div_ceil(CHUNKS_PER_BATCH).max(1));
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(worker);
        }
        worker();
    });
    match first_error.into_inner().expect("scan error lock") {
        Some(error) => Err(error),
        None => Ok(ids),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_get_the_reserved_id() {
        let geometry = Geometry::new(3 * 4096 + 17, 4096).unwrap();
        let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
        disk[4096 + 4095] = 7;
        disk[3 * 4096 + 16] = 1;
        let ids = scan_buffer_with_threads(&disk, geometry, 3);
        assert_eq!(ids.len(), 4);
        assert!(ids[0].is_zero());
        assert_eq!(ids[1], ChunkId::from(blake3::hash(&disk[4096..8192])));
        assert!(ids[2].is_zero());
        assert_eq!(ids[3], ChunkId::from(blake3::hash(&disk[3 * 4096..])));
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let geometry = Geometry::new(300 * 4096 + 5, 4096).unwrap();
        let disk: Vec<u8> = (0..geometry.disk_size_bytes())
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let one = scan_buffer_with_threads(&disk, geometry, 1);
        for threads in [2, 4, 7] {
            assert_eq!(one, scan_buffer_with_threads(&disk, geometry, threads));
        }
    }

    #[test]
    fn zero_detection_matches_naive() {
        for len in [0usize, 1, 255, 256, 257, 4096] {
            let mut data = vec![0u8; len];
            assert!(is_all_zero(&data));
            if len > 0 {
                data[len - 1] = 1;
                assert!(!is_all_zero(&data));
            }
        }
    }
}

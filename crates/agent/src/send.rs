//! The send pipeline: worker threads copy, re-hash and compress changed chunks into
//! ready-to-write frames; the network task writes them in whatever order they come.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use blockrep_core::{ChunkId, Geometry, hash_chunk, hash_with_block_values, is_all_zero};
use blockrep_proto::{CHUNK_HEADER_LEN, Codec, NONCE_LEN, chunk_header, patch_frame, ref_proof};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::patch::{self, Bases};
use crate::{AdaptiveCompression, Compression, Error};

/// Bytes of frames in flight between the workers and the socket: bounds memory.
const WINDOW_BYTES: usize = 16 * 1024 * 1024;
/// Chunks a worker takes at a time.
const CHUNKS_PER_CLAIM: usize = 16;
/// After a chunk that did not compress, skip compression for this many chunks.
const INCOMPRESSIBLE_SKIP: u32 = 32;

/// Frame buffers kept for reuse at most: enough for the workers to find one
/// each time the writer has written a frame, never the whole window...
const POOL_BUFFERS_MAX: usize = 32;
/// ...and at most this many bytes of them, so that large chunks keep fewer
/// (but never fewer than [`POOL_BUFFERS_MIN`]).
const POOL_BYTES_MAX: usize = 8 << 20;
const POOL_BUFFERS_MIN: usize = 4;

/// Buffers of whole-chunk frames, handed back once written so that the
/// workers read the next chunks into them: a fresh buffer per chunk costs an
/// allocation, the zeroing of its 64 KiB and, as the allocator gives memory
/// back and takes it again, page faults, for every chunk sent.
pub(crate) struct FramePool {
    free: Mutex<Vec<BytesMut>>,
    /// Buffers with less room than this are not kept (references, zero
    /// chunks), nor handed out for less (a patch's compressed bytes).
    keep_from: usize,
    /// Buffers kept at most.
    keep_at_most: usize,
}

impl FramePool {
    /// A pool for frames of chunks of `geometry`.
    pub(crate) fn new(geometry: Geometry) -> Arc<Self> {
        let chunk = geometry.chunk_size_bytes() as usize;
        Arc::new(Self {
            free: Mutex::new(Vec::new()),
            keep_from: chunk / 2,
            keep_at_most: (POOL_BYTES_MAX / chunk.max(1)).clamp(POOL_BUFFERS_MIN, POOL_BUFFERS_MAX),
        })
    }

    /// A buffer of `len` bytes whose contents are whatever it held before:
    /// the caller overwrites all of them. Only a fresh buffer, or the part of
    /// a kept one past its last length, is zeroed.
    fn take(&self, len: usize) -> BytesMut {
        // A small buffer from the pool would be a whole chunk's room lost
        // with it (a patch's bytes are copied out and dropped).
        if len < self.keep_from {
            return BytesMut::zeroed(len);
        }
        let kept = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match kept {
            Some(mut buf) => {
                if buf.len() >= len {
                    buf.truncate(len);
                } else {
                    buf.resize(len, 0);
                }
                buf
            }
            None => BytesMut::zeroed(len),
        }
    }

    /// Keeps `buf` for a later [`FramePool::take`], if it is a chunk's size
    /// and the pool is not full.
    fn give_mut(&self, buf: BytesMut) {
        // Room, not length: a compressed frame's buffer is a whole chunk's.
        if buf.capacity() < self.keep_from {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep_at_most {
            free.push(buf);
        }
    }

    /// Takes back a written frame, if nothing else holds its bytes.
    pub(crate) fn give(&self, frame: Bytes) {
        if let Ok(buf) = frame.try_into_mut() {
            self.give_mut(buf);
        }
    }
}

/// One frame ready to write, and the id of the data it carries (which may differ
/// from the scan's if the disk changed since).
pub(crate) struct Encoded {
    pub index: u64,
    pub id: ChunkId,
    pub frame: Bytes,
    pub raw_len: u64,
    /// The frame is a reference (with its proof of possession), not data.
    pub reference: bool,
    /// The frame is a patch against the chunk the replica holds at `index`.
    pub patch: bool,
    /// The frame's data is zstd-compressed.
    pub compressed: bool,
}

/// Chunks the server admitted to holding (its `Have`), and the session's
/// nonce that proves this agent holds them too.
#[derive(Clone)]
pub(crate) struct References {
    pub held: Arc<HashSet<ChunkId>>,
    pub nonce: [u8; NONCE_LEN],
    /// The space chunk ids are named in (the session's).
    pub space: blockrep_core::IdSpace,
}

/// Starts the workers for `changed` chunks; frames arrive on the returned channel,
/// which closes when every chunk has been encoded. The writer hands each
/// frame back to the returned pool once written.
pub(crate) fn spawn_encoders(
    disk: Arc<crate::view::View>,
    geometry: Geometry,
    changed: Arc<Vec<u64>>,
    compression: Compression,
    adaptive: Arc<AdaptiveCompression>,
    references: References,
    bases: Arc<Bases>,
) -> (mpsc::Receiver<Result<Encoded, Error>>, Arc<FramePool>) {
    let pool = FramePool::new(geometry);
    let window = (WINDOW_BYTES / geometry.chunk_size_bytes() as usize).max(4);
    let (tx, rx) = mpsc::channel::<Result<Encoded, Error>>(window);
    let next = Arc::new(AtomicUsize::new(0));
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    for _ in 0..workers {
        let adaptive = Arc::clone(&adaptive);
        let references = references.clone();
        let bases = Arc::clone(&bases);
        let pool = Arc::clone(&pool);
        let (disk, changed, next, tx) = (
            Arc::clone(&disk),
            Arc::clone(&changed),
            Arc::clone(&next),
            tx.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut encoder = ChunkEncoder::new(compression, adaptive, references, pool);
            loop {
                let start = next.fetch_add(CHUNKS_PER_CLAIM, Ordering::Relaxed);
                if start >= changed.len() {
                    return;
                }
                let end = (start + CHUNKS_PER_CLAIM).min(changed.len());
                for &index in &changed[start..end] {
                    let encoded = encoder.encode(&disk, geometry, index, &bases);
                    let failed = encoded.is_err();
                    if tx.blocking_send(encoded).is_err() || failed {
                        return; // the session ended; stop quietly
                    }
                }
            }
        });
    }
    (rx, pool)
}

/// Why a compression is tried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// A whole chunk: subject to the adaptive decision and the skip after an
    /// incompressible chunk, which a failure here starts.
    Chunk,
    /// A chunk at least [`SPARSE_ZERO_BLOCKS_PERCENT`] of whose 4 KiB blocks
    /// are zero: always tried (unless compression is off), since zstd
    /// shrinks it to little more than its data at almost no cost. This is the
    /// delta of a chunk that had no data before (no base to patch against).
    Sparse,
    /// A patch's bytes: subject to the adaptive decision, but a failure does
    /// not start the skip.
    Patch,
}

/// A chunk with at least this share of zero 4 KiB blocks is always compressed.
const SPARSE_ZERO_BLOCKS_PERCENT: usize = 25;

impl Attempt {
    fn for_chunk(data: &[u8]) -> Self {
        let blocks = data.len().div_ceil(4096);
        let zero = data
            .chunks(4096)
            .filter(|block| block.iter().all(|&b| b == 0))
            .count();
        if blocks > 1 && zero * 100 >= blocks * SPARSE_ZERO_BLOCKS_PERCENT {
            Attempt::Sparse
        } else {
            Attempt::Chunk
        }
    }
}

struct ChunkEncoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    skip: u32,
    /// Set for `Compression::Auto`.
    adaptive: Option<Arc<AdaptiveCompression>>,
    references: References,
    pool: Arc<FramePool>,
}

impl ChunkEncoder {
    fn new(
        compression: Compression,
        adaptive: Arc<AdaptiveCompression>,
        references: References,
        pool: Arc<FramePool>,
    ) -> Self {
        let compressor = match compression {
            Compression::Auto | Compression::Zstd => zstd::bulk::Compressor::new(1).ok(),
            Compression::None => None,
        };
        Self {
            compressor,
            skip: 0,
            adaptive: (compression == Compression::Auto).then_some(adaptive),
            references,
            pool,
        }
    }

    fn encode(
        &mut self,
        disk: &crate::view::View,
        geometry: Geometry,
        index: u64,
        bases: &Bases,
    ) -> Result<Encoded, Error> {
        let range = geometry
            .chunk_range(index)
            .expect("changed chunks lie on the disk");
        let raw_len = range.len();
        // Read once, straight into the frame behind room for its header; then hash
        // that copy, so the id always matches the bytes that travel. pread rather
        // than the scan's mapping: scattered reads through a mapping leave whole
        // page-cache folios mapped, so resident memory would grow with the disk.
        // A hole of a sparse image reads as zeros: it is neither read nor
        // hashed, and travels as a zero chunk.
        let hole = disk.is_hole(range.start as u64, range.end as u64);
        let mut frame = if hole {
            BytesMut::zeroed(CHUNK_HEADER_LEN)
        } else {
            let mut frame = self.pool.take(CHUNK_HEADER_LEN + raw_len);
            disk.read_at(range.start as u64, &mut frame[CHUNK_HEADER_LEN..])
                .map_err(|e| {
                    let message = format!(
                        "cannot read chunk {index} (bytes {}..{}) of {}: {e}",
                        range.start,
                        range.end,
                        disk.path().display()
                    );
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        // The disk shrank since the scan: scan again, later.
                        Error::DiskUnsteady(format!("{message}: the disk shrank since the scan"))
                    } else {
                        Error::DiskChanged(message)
                    }
                })?;
            frame
        };
        // Capture mode: the blocks written since the head, asked before the
        // cut lets the chunk go.
        let written = if bases.known() {
            disk.written_ranges(geometry, index)
        } else {
            None
        };
        // Read once: a cut need not preserve this chunk's old content any more.
        disk.done_with(geometry, index);
        // A chunk with a base is hashed with its block values: the same single
        // pass gives the id and what a patch needs. Waits for the base's values
        // if they have not arrived yet.
        let base = bases.get(index);
        // A zero chunk travels as such: neither hashed nor planned.
        let (id, values) = match base {
            _ if hole || is_all_zero(&frame[CHUNK_HEADER_LEN..]) => (ChunkId::ZERO, None),
            // Known bases need no values: the written blocks are the patch.
            Some(_) if bases.known() => (hash_chunk(&frame[CHUNK_HEADER_LEN..]), None),
            Some(_) => {
                let (id, values) = hash_with_block_values(&frame[CHUNK_HEADER_LEN..]);
                (id, Some(values))
            }
            None => (hash_chunk(&frame[CHUNK_HEADER_LEN..]), None),
        };
        let id = self.references.space.map(id);
        let mut reference = false;
        let mut patched = false;
        let mut compressed_data = false;
        let (frame, raw_sent) = if id.is_zero() {
            let header = chunk_header(index, &id, Codec::Zero, raw_len as u32, &[]);
            self.pool.give_mut(frame);
            (BytesMut::from(&header[..]), 0)
        } else if self.references.held.contains(&id) {
            // The server holds these bytes: a reference, with the proof that
            // this agent holds them too (the id alone proves nothing).
            let proof = ref_proof(&self.references.nonce, &frame[CHUNK_HEADER_LEN..]);
            let header = chunk_header(index, &id, Codec::Ref, raw_len as u32, &proof);
            let mut out = BytesMut::with_capacity(CHUNK_HEADER_LEN + proof.len());
            out.extend_from_slice(&header);
            out.extend_from_slice(&proof);
            self.pool.give_mut(frame);
            reference = true;
            (out, 0)
        } else if let Some(base) = &base
            && let Some(patch::Plan { ranges, payload }) = match (written, &values) {
                (Some(written), _) => patch::plan_ranges(written, &frame[CHUNK_HEADER_LEN..]),
                (None, Some(values)) => patch::plan(base, values, &frame[CHUNK_HEADER_LEN..]),
                (None, None) => None,
            }
        {
            patched = true;
            let sent = payload.len() as u64;
            // A patch's bytes are few: whether they compress says little about
            // the chunks that follow, so a failure does not pause compression.
            let (codec, data) = match self.try_compress(&payload, Attempt::Patch) {
                Some(compressed) => {
                    compressed_data = true;
                    (Codec::Zstd, compressed.freeze().slice(CHUNK_HEADER_LEN..))
                }
                None => (Codec::Raw, Bytes::from(payload)),
            };
            let out = patch_frame(index, &base.id, &id, codec, raw_len as u32, &ranges, &data);
            self.pool.give_mut(frame);
            (BytesMut::from(out), sent)
        } else if let Some(mut compressed) = self.try_compress(
            &frame[CHUNK_HEADER_LEN..],
            Attempt::for_chunk(&frame[CHUNK_HEADER_LEN..]),
        ) {
            let data = &compressed[CHUNK_HEADER_LEN..];
            let header = chunk_header(index, &id, Codec::Zstd, raw_len as u32, data);
            compressed[..CHUNK_HEADER_LEN].copy_from_slice(&header);
            self.pool.give_mut(frame);
            compressed_data = true;
            (compressed, raw_len as u64)
        } else {
            let data = &frame[CHUNK_HEADER_LEN..];
            let header = chunk_header(index, &id, Codec::Raw, raw_len as u32, data);
            frame[..CHUNK_HEADER_LEN].copy_from_slice(&header);
            (frame, raw_len as u64)
        };
        Ok(Encoded {
            index,
            id,
            frame: frame.freeze(),
            raw_len: raw_sent,
            reference,
            patch: patched,
            compressed: compressed_data,
        })
    }

    /// Compresses `data` into a new frame buffer (header room first) when it
    /// shrinks by at least an eighth: the output buffer is only that large, so
    /// zstd stops as soon as it cannot pay, and nothing is copied afterwards.
    fn try_compress(&mut self, data: &[u8], attempt: Attempt) -> Option<BytesMut> {
        let compressor = self.compressor.as_mut()?;
        if attempt != Attempt::Sparse {
            if self.skip > 0 {
                self.skip -= 1;
                return None;
            }
            if let Some(adaptive) = &self.adaptive
                && !adaptive.should_try(data.len())
            {
                return None;
            }
        }
        let limit = data.len() - data.len() / 8 - 1;
        let mut out = self.pool.take(CHUNK_HEADER_LEN + limit);
        let started = std::time::Instant::now();
        let result = compressor.compress_to_buffer(data, &mut out[CHUNK_HEADER_LEN..]);
        // A sparse chunk's extreme ratio says nothing about the data's; it is
        // kept out of the measurements.
        if attempt != Attempt::Sparse
            && let Some(adaptive) = &self.adaptive
        {
            // A chunk that does not fit counts as not compressing at all.
            let output = *result.as_ref().unwrap_or(&data.len());
            adaptive.record_compression(data.len(), output, started.elapsed());
            if !adaptive.enabled() {
                self.pool.give_mut(out);
                return None; // a sample, taken only to measure
            }
        }
        match result {
            Ok(written) => {
                out.truncate(CHUNK_HEADER_LEN + written);
                Some(out)
            }
            Err(_) => {
                self.pool.give_mut(out);
                if attempt == Attempt::Chunk {
                    self.skip = INCOMPRESSIBLE_SKIP;
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame handed back once written is the next chunk's buffer: the
    /// same allocation, not zeroed again (what it held is still there, for
    /// the read to overwrite). A frame still held elsewhere, or one too
    /// short to hold a chunk, is not kept.
    #[test]
    fn a_written_frame_is_read_into_again() {
        let geometry = Geometry::new(1 << 20, 65_536).unwrap();
        let pool = FramePool::new(geometry);
        let len = CHUNK_HEADER_LEN + 65_536;
        let mut frame = pool.take(len);
        frame.fill(0xA5);
        let frame = frame.freeze();
        let at = frame.as_ptr();
        pool.give(frame);
        let again = pool.take(len);
        assert_eq!(again.as_ptr(), at, "a fresh allocation");
        assert!(again.iter().all(|&b| b == 0xA5), "zeroed again");
        // A shorter frame (a compressed chunk) truncates it; taking the full
        // length back zeroes only the part past that.
        let mut shorter = again;
        shorter.truncate(1000);
        pool.give_mut(shorter);
        let grown = pool.take(len);
        assert_eq!(grown.as_ptr(), at);
        assert!(grown[..1000].iter().all(|&b| b == 0xA5));
        assert!(grown[1000..].iter().all(|&b| b == 0));

        // A small buffer (a patch's compressed bytes) is never a kept one.
        pool.give_mut(grown);
        assert_ne!(pool.take(100).as_ptr(), at);
        let grown = pool.take(len);
        assert_eq!(grown.as_ptr(), at, "the small take used the kept buffer");

        let held = grown.freeze();
        pool.give(held.clone());
        assert_ne!(pool.take(len).as_ptr(), at, "a frame still held was kept");
        pool.give(Bytes::from(vec![1u8; CHUNK_HEADER_LEN + 32]));
        assert!(pool.free.lock().unwrap().is_empty(), "a reference was kept");
        drop(held);
    }

    /// The pool keeps a bounded number of buffers, however many come back:
    /// fewer of larger chunks, never more than its bytes allow but a few.
    #[test]
    fn the_pool_keeps_at_most_its_bound() {
        for (chunk, bound) in [(65_536usize, POOL_BUFFERS_MAX), (1 << 20, 8), (4 << 20, 4)] {
            let pool = FramePool::new(Geometry::new(64 << 20, chunk as u32).unwrap());
            for _ in 0..POOL_BUFFERS_MAX * 2 {
                pool.give_mut(BytesMut::zeroed(CHUNK_HEADER_LEN + chunk));
            }
            assert_eq!(pool.free.lock().unwrap().len(), bound, "chunks of {chunk}");
        }
    }
}

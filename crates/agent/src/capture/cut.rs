//! The state of one cut shared by its [`super::Cut`] handle and the writers:
//! the sealed blocks (fixed at the cut), which chunks it still needs, and the
//! old content preserved for them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use blockrep_core::{CHUNK_SIZE_MAX_BYTES, Geometry};

use super::preserve::{Inserted, PreserveStore};
use super::{CAPTURE_BLOCK_BYTES, bitmap, lock};

/// Blocks in the largest chunk: the grain a cut needs blocks in until it
/// learns the real chunk size.
const GRAIN_MAX_BLOCKS: u64 = CHUNK_SIZE_MAX_BYTES as u64 / CAPTURE_BLOCK_BYTES;

#[derive(Debug)]
pub(super) struct CutShared {
    pub(super) generation: u64,
    pub(super) full: bool,
    /// Blocks sealed at the cut; never changes.
    pub(super) sealed: Vec<u64>,
    block_count: u64,
    /// Set once the cut needs nothing more (committed, replaced or dropped):
    /// writers skip it without taking the mutex.
    ended: AtomicBool,
    state: Mutex<CutState>,
}

#[derive(Debug)]
struct CutState {
    /// Blocks per chunk of `needed`.
    grain_blocks: u64,
    /// Whether `grain_blocks` came from a geometry (else the largest chunk).
    grain_learnt: bool,
    /// One bit per chunk (of `grain_blocks`) the cut still needs.
    needed: Vec<u64>,
    /// Preservation stopped (budget spent or the disk unreadable).
    live: bool,
    ended: bool,
    store: PreserveStore,
}

/// The chunks of `grain` blocks that hold a sealed block.
fn needed_chunks(sealed: &[u64], block_count: u64, grain: u64, full: bool) -> Vec<u64> {
    let chunk_count = block_count.div_ceil(grain);
    if full {
        return bitmap::full(chunk_count);
    }
    let mut needed = vec![0; bitmap::words_for(chunk_count)];
    let mut from = 0;
    while let Some(block) = bitmap::next_set(sealed, from, block_count) {
        bitmap::set(&mut needed, block / grain);
        from = (block / grain + 1) * grain;
    }
    needed
}

fn block_len(size_bytes: u64, block: u64) -> usize {
    // At most one block: fits.
    (size_bytes - block * CAPTURE_BLOCK_BYTES).min(CAPTURE_BLOCK_BYTES) as usize
}

impl CutShared {
    pub(super) fn new(
        generation: u64,
        full: bool,
        sealed: Vec<u64>,
        block_count: u64,
        store: PreserveStore,
    ) -> Self {
        let needed = needed_chunks(&sealed, block_count, GRAIN_MAX_BLOCKS, full);
        Self {
            generation,
            full,
            sealed,
            block_count,
            ended: AtomicBool::new(false),
            state: Mutex::new(CutState {
                grain_blocks: GRAIN_MAX_BLOCKS,
                grain_learnt: false,
                needed,
                live: false,
                ended: false,
                store,
            }),
        }
    }

    /// Narrows what the cut needs to the chunks of `geometry`, the first
    /// time a geometry is seen: its chunks lie inside the 4 MiB spans needed
    /// so far, so nothing needed is lost. Later geometries do not change it.
    pub(super) fn learn_grain(&self, geometry: Geometry) {
        let mut state = lock(&self.state);
        if state.grain_learnt {
            return;
        }
        state.grain_learnt = true;
        let grain = (u64::from(geometry.chunk_size_bytes()) / CAPTURE_BLOCK_BYTES).max(1);
        if grain == state.grain_blocks {
            return;
        }
        state.grain_blocks = grain;
        state.needed = needed_chunks(&self.sealed, self.block_count, grain, self.full);
        // Blocks preserved for chunks no longer needed are dropped.
        for block in state.store.blocks() {
            if !bitmap::get(&state.needed, block / grain) {
                state.store.remove(block);
            }
        }
    }

    /// Before a write of blocks covering bytes `offset..end`: keeps the old
    /// content of every block the cut needs and has not kept yet.
    pub(super) fn preserve(&self, file: &File, size_bytes: u64, offset: u64, end: u64) {
        if self.ended.load(Ordering::Acquire) {
            return;
        }
        let mut state = lock(&self.state);
        if state.ended || state.live {
            return;
        }
        let first_block = offset / CAPTURE_BLOCK_BYTES;
        let end_block = end.div_ceil(CAPTURE_BLOCK_BYTES);
        let grain = state.grain_blocks;
        let end_chunk = end_block.div_ceil(grain);
        let mut from = first_block / grain;
        while let Some(chunk) = bitmap::next_set(&state.needed, from, end_chunk) {
            from = chunk + 1;
            let blocks = (chunk * grain).max(first_block)..((chunk + 1) * grain).min(end_block);
            for block in blocks {
                let len = block_len(size_bytes, block);
                let kept = state.store.insert(block, |buffer| {
                    file.read_exact_at(&mut buffer[..len], block * CAPTURE_BLOCK_BYTES)
                });
                let reason = match kept {
                    Ok(Inserted::Kept) => continue,
                    Ok(Inserted::OverBudget) => {
                        "the preserve budget (--preserve-max) is spent".into()
                    }
                    Err(e) => format!("cannot preserve block {block}: {e}"),
                };
                tracing::warn!(
                    cut = self.generation,
                    "{reason}: this epoch reads the live disk and is labelled live"
                );
                state.live = true;
                state.store.clear();
                return;
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` as of the cut: the disk, then the
    /// preserved blocks over it.
    pub(super) fn read_at(
        &self,
        file: &File,
        size_bytes: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= size_bytes)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "read of {} bytes at {offset} is past the end of the disk",
                        buf.len()
                    ),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        file.read_exact_at(buf, offset)?;
        let state = lock(&self.state);
        if state.ended {
            return Err(io::Error::other(format!(
                "cut {} has ended (committed or replaced): its blocks are gone",
                self.generation
            )));
        }
        let first_block = offset / CAPTURE_BLOCK_BYTES;
        let end_block = end.div_ceil(CAPTURE_BLOCK_BYTES);
        let grain = state.grain_blocks;
        for chunk in first_block / grain..end_block.div_ceil(grain) {
            if !bitmap::get(&state.needed, chunk) {
                return Err(io::Error::other(format!(
                    "bytes {offset}..{end} are not held by cut {} (released, or never sealed)",
                    self.generation
                )));
            }
        }
        if state.store.is_empty() {
            return Ok(());
        }
        for block in first_block..end_block {
            let block_start = block * CAPTURE_BLOCK_BYTES;
            let from = block_start.max(offset);
            let to = (block_start + CAPTURE_BLOCK_BYTES).min(end);
            // Offsets within one block or within `buf`: both fit.
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            state
                .store
                .read(block, (from - block_start) as usize, dst)?;
        }
        Ok(())
    }

    /// Indices of the chunks of `geometry` with a sealed block.
    pub(super) fn chunks(&self, geometry: Geometry) -> Vec<u64> {
        let chunk_count = geometry.chunk_count();
        if self.full {
            return (0..chunk_count).collect();
        }
        let per_chunk = (u64::from(geometry.chunk_size_bytes()) / CAPTURE_BLOCK_BYTES).max(1);
        let mut chunks = Vec::new();
        let mut from = 0;
        while let Some(block) = bitmap::next_set(&self.sealed, from, self.block_count) {
            let chunk = block / per_chunk;
            if chunk >= chunk_count {
                break;
            }
            chunks.push(chunk);
            from = (chunk + 1) * per_chunk;
        }
        chunks
    }

    /// The sealed blocks of chunk `index` as merged byte ranges in the chunk.
    pub(super) fn written_ranges(&self, geometry: Geometry, index: u64) -> Vec<(u32, u32)> {
        let Some(len) = geometry.chunk_len(index) else {
            return Vec::new();
        };
        let chunk_start = geometry.chunk_offset(index);
        let chunk_end = chunk_start + u64::from(len);
        let end_block = chunk_end
            .div_ceil(CAPTURE_BLOCK_BYTES)
            .min(self.block_count);
        let mut ranges = Vec::new();
        let mut from = chunk_start / CAPTURE_BLOCK_BYTES;
        while let Some(first) = bitmap::next_set(&self.sealed, from, end_block) {
            let mut run_end = first + 1;
            while run_end < end_block && bitmap::get(&self.sealed, run_end) {
                run_end += 1;
            }
            let start = first * CAPTURE_BLOCK_BYTES - chunk_start;
            let stop = (run_end * CAPTURE_BLOCK_BYTES).min(chunk_end) - chunk_start;
            // Within one chunk (a u32 length).
            ranges.push((start as u32, (stop - start) as u32));
            from = run_end;
        }
        ranges
    }

    /// The cut needs chunk `index` of `geometry` no more: every chunk of its
    /// grain inside that chunk stops being needed and loses its blocks.
    pub(super) fn release(&self, geometry: Geometry, index: u64) {
        let Some(len) = geometry.chunk_len(index) else {
            return;
        };
        let first_block = geometry.chunk_offset(index) / CAPTURE_BLOCK_BYTES;
        let end_block = (geometry.chunk_offset(index) + u64::from(len))
            .div_ceil(CAPTURE_BLOCK_BYTES)
            .min(self.block_count);
        let mut state = lock(&self.state);
        let grain = state.grain_blocks;
        for chunk in first_block.div_ceil(grain)..end_block.div_ceil(grain) {
            let chunk_end = ((chunk + 1) * grain).min(self.block_count);
            if chunk_end > end_block {
                // Only part of a larger grain chunk: keep needing it.
                continue;
            }
            bitmap::clear(&mut state.needed, chunk);
            if !state.store.is_empty() {
                for block in chunk * grain..chunk_end {
                    state.store.remove(block);
                }
            }
        }
    }

    pub(super) fn preserved_bytes(&self) -> u64 {
        lock(&self.state).store.len() * CAPTURE_BLOCK_BYTES
    }

    pub(super) fn is_live(&self) -> bool {
        lock(&self.state).live
    }

    /// The cut needs nothing more: its preserved blocks and spill file go.
    pub(super) fn end(&self) {
        self.ended.store(true, Ordering::Release);
        let mut state = lock(&self.state);
        state.ended = true;
        state.store.clear();
    }
}

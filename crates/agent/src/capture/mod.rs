//! Write capture: the agent sits in the disk's write path (`agent --serve`).
//!
//! The workload reaches the source disk through the agent's NBD export
//! ([`Capture::export`]); every write goes to the disk and marks its 4 KiB
//! blocks dirty. An epoch is a [`Cut`]: at one instant (no write in flight)
//! everything written and not yet committed is sealed, and from then on a
//! write to a chunk the cut still needs first preserves the block's old
//! content, so the cut reads exactly the disk as of its instant. An epoch
//! therefore costs the bytes written, whatever the disk's size, and every
//! recovery point it commits is crash-consistent by construction (or
//! labelled `live` when the preserve budget ran out).
//!
//! The dirty set is saved beside the disk on a clean stop and loaded on the
//! next start; while the agent runs the saved file is marked in use, so a
//! start after an unclean stop knows it must rescan (consistently: a full
//! cut, [`Capture::cut`] with `full`).

#![allow(clippy::todo)] // the interface, before the engine lands

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockrep_core::{ChunkId, Consistency, Geometry};

use crate::Error;

/// Granularity of the dirty set and of preservation.
pub const CAPTURE_BLOCK_BYTES: u64 = 4096;
/// Default [`CaptureOptions::preserve_memory_bytes`].
pub const PRESERVE_MEMORY_DEFAULT: u64 = 64 << 20;
/// Default [`CaptureOptions::preserve_max_bytes`].
pub const PRESERVE_MAX_DEFAULT: u64 = 1 << 30;

/// How write capture keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    /// Where the dirty set is saved between runs (default: a hidden file
    /// beside the disk, `.NAME.blockrep-capture`).
    pub state_path: PathBuf,
    /// Preserved blocks held in memory before they spill to a file beside
    /// the disk.
    pub preserve_memory_bytes: u64,
    /// Most preserved bytes (memory and spill) one cut may hold; past it the
    /// cut stops preserving and its epoch is labelled `live`.
    pub preserve_max_bytes: u64,
}

impl CaptureOptions {
    /// Defaults for the disk at `disk`.
    pub fn beside(disk: &Path) -> Self {
        let _ = disk;
        todo!("capture engine")
    }
}

/// What the capture has done, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Bytes written and not yet in a committed epoch (dirty blocks × 4 KiB).
    pub dirty_bytes: u64,
    /// Bytes of old content preserved for the cut in flight.
    pub preserved_bytes: u64,
    /// Cuts made since the capture was opened.
    pub cuts: u64,
    /// Writes (and write-zeroes) served since the capture was opened.
    pub writes: u64,
    /// Median write latency since the previous [`Capture::stats`] call, µs.
    pub write_p50_us: u64,
    /// 99th percentile write latency since the previous call, µs.
    pub write_p99_us: u64,
}

/// The capture state of one disk, shared by its NBD export and the epoch loop.
#[derive(Debug)]
pub struct Capture {
    _private: (),
}

impl Capture {
    /// Opens `disk` (an image file or a block device) read-write for serving,
    /// loads the dirty set saved by a clean stop and marks the saved file in
    /// use (durably) before any write is accepted.
    pub fn open(disk: &Path, options: CaptureOptions) -> Result<Arc<Self>, Error> {
        let _ = (disk, options);
        todo!("capture engine")
    }

    /// The disk's size in bytes (fixed while served).
    pub fn size_bytes(&self) -> u64 {
        todo!("capture engine")
    }

    /// The disk's path.
    pub fn path(&self) -> &Path {
        todo!("capture engine")
    }

    /// The NBD export the workload uses as its disk. Writes go to the disk
    /// and the dirty set; `FLUSH` (and `FUA`) make them durable on the disk
    /// before they are answered. Never waits on the network.
    pub fn export(self: &Arc<Self>) -> Arc<dyn blockrep_nbd::Export> {
        todo!("capture engine")
    }

    /// The root the loaded dirty set is relative to: `Some(root)` when the
    /// last run stopped cleanly after committing `root`, so the disk equals
    /// `root` plus the dirty blocks; `None` when that is unknown (first run,
    /// unclean stop, a state file of another disk), and a full cut is needed.
    pub fn saved_root(&self) -> Option<ChunkId> {
        todo!("capture engine")
    }

    /// Cuts an epoch now: waits for writes in flight, then seals every block
    /// written and not yet committed (every block of the disk with `full`).
    /// One cut at a time: a new cut replaces an uncommitted earlier one, whose
    /// blocks it includes.
    pub fn cut(self: &Arc<Self>, full: bool) -> Arc<Cut> {
        let _ = full;
        todo!("capture engine")
    }

    /// Stops accepting writes (cutover): waits for writes in flight; later
    /// writes fail with `EROFS`. Reads go on.
    pub fn freeze(&self) {
        todo!("capture engine")
    }

    /// Counters, and the write latencies since the previous call.
    pub fn stats(&self) -> CaptureStats {
        todo!("capture engine")
    }

    /// Saves the dirty set (every block not in a committed epoch) and the
    /// last committed root, durably, and marks the state not in use: the next
    /// start needs no rescan. Called on a clean stop, after the export has
    /// stopped serving.
    pub fn save(&self) -> Result<(), Error> {
        todo!("capture engine")
    }
}

/// One epoch's sealed blocks, readable as of the instant of the cut.
#[derive(Debug)]
pub struct Cut {
    _private: (),
}

impl Cut {
    /// Whether this is a full cut (every block).
    pub fn full(&self) -> bool {
        todo!("capture engine")
    }

    /// Indices of the chunks (in `geometry`) with at least one sealed block,
    /// ascending.
    pub fn chunks(&self, geometry: Geometry) -> Vec<u64> {
        let _ = geometry;
        todo!("capture engine")
    }

    /// The sealed blocks of chunk `index` as byte ranges `(offset in the
    /// chunk, length)`, 4 KiB aligned, merged and clipped to the chunk.
    pub fn written_ranges(&self, geometry: Geometry, index: u64) -> Vec<(u32, u32)> {
        let _ = (geometry, index);
        todo!("capture engine")
    }

    /// Reads `buf.len()` bytes at `offset` as they were at the cut.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let _ = (offset, buf);
        todo!("capture engine")
    }

    /// The epoch needs chunk `index` no more: its preserved blocks are
    /// dropped and later writes to it are not preserved (reading it through
    /// this cut afterwards is an error).
    pub fn release(&self, geometry: Geometry, index: u64) {
        let _ = (geometry, index);
        todo!("capture engine")
    }

    /// `CrashConsistent`, or `Live` once a write could not be preserved
    /// within the budget.
    pub fn consistency(&self) -> Consistency {
        todo!("capture engine")
    }

    /// The epoch of this cut was committed as `root`: its blocks leave the
    /// dirty set (blocks written since the cut stay), and `root` is what a
    /// later [`Capture::save`] records.
    pub fn committed(&self, root: ChunkId) {
        let _ = root;
        todo!("capture engine")
    }
}

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

//!
//! # The rule that makes a cut exact
//!
//! Every write (and write-zeroes) holds the *write gate* shared for its whole
//! duration: preserve, write, mark dirty. [`Capture::cut`] and
//! [`Capture::freeze`] take it exclusively, so a cut happens between writes.
//! The epoch reads whole chunks, so a cut *needs* every block of a chunk with
//! a sealed block until [`Cut::release`]. A write to a needed block that is
//! not yet preserved first copies the block's content from the disk into the
//! cut's preserve store, under the cut's mutex and before its own write
//! starts; [`Cut::read_at`] reads the disk, then overlays the preserved
//! blocks under the same mutex. Any block the read may have seen new was
//! preserved before the write that changed it, so the overlay restores it.
//!
//! The chunk size is learnt from the first [`Geometry`] a cut is given
//! (`chunks`, `written_ranges`, `release`). Until then a cut needs every
//! block of each 4 MiB-aligned span with a sealed block: chunks are powers of
//! two of at most 4 MiB, aligned, so that is a superset of any geometry's
//! chunks, and preserving more is always safe.
//!
//! # State
//!
//! * `current`: blocks written since the last cut (atomic bits, set by
//!   writers under the shared gate).
//! * `pending`: blocks sealed by a cut and not committed. A cut moves
//!   `current` into `pending` and seals all of `pending`; committing the
//!   latest cut removes its sealed blocks from `pending`. A cut dropped
//!   uncommitted leaves them there, for the next cut to read as of its own
//!   instant.
//! * Saved to the state file ([`state_file`]) as `pending | current` with
//!   the last committed root.

mod bitmap;
mod cut;
mod export;
#[doc(hidden)]
pub mod fuzzing;
mod latency;
mod preserve;
mod state_file;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use blockrep_core::{ChunkId, Consistency, Geometry};

use crate::Error;
use cut::CutShared;
use latency::Latency;

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
        let name = disk
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        Self {
            state_path: disk.with_file_name(format!(".{name}.blockrep-capture")),
            preserve_memory_bytes: PRESERVE_MEMORY_DEFAULT,
            preserve_max_bytes: PRESERVE_MAX_DEFAULT,
        }
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

/// What writers see under the write gate.
#[derive(Debug, Default)]
struct Gate {
    /// Set by [`Capture::freeze`] (and [`Capture::save`]): writes fail.
    frozen: bool,
    /// The latest cut; writers preserve for it while it is not ended.
    cut: Option<Arc<CutShared>>,
}

/// Sealed, uncommitted blocks and what was committed.
#[derive(Debug)]
struct Pending {
    bits: Vec<u64>,
    /// Generation (1, 2, ...) of the latest cut: only it may clear `bits`.
    latest_generation: u64,
    /// Generation of the newest committed cut, 0 for none this run.
    committed_generation: u64,
    committed_root: Option<ChunkId>,
}

/// The capture state of one disk, shared by its NBD export and the epoch loop.
pub struct Capture {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    block_count: u64,
    options: CaptureOptions,
    saved_root: Option<ChunkId>,
    gate: RwLock<Gate>,
    /// Blocks written since the last cut.
    current: Vec<AtomicU64>,
    pending: Mutex<Pending>,
    cuts: AtomicU64,
    writes: AtomicU64,
    latency: Latency,
    /// A flush of the disk failed: the kernel may have dropped the pages it
    /// could not write, so a later flush that succeeds would not mean they
    /// are on disk. Every later flush and write fails, and the clean state
    /// is not saved (the next run reads the whole disk).
    flush_failed: AtomicBool,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("path", &self.path)
            .field("size_bytes", &self.size_bytes)
            .field("options", &self.options)
            .field("saved_root", &self.saved_root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock is our bug; the data (bits and counters)
    // is still coherent enough to go on and to save.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn capture_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Capture(format!("{what} {}: {e}", path.display()))
}

impl Capture {
    /// Opens `disk` (an image file or a block device) read-write for serving,
    /// loads the dirty set saved by a clean stop and marks the saved file in
    /// use (durably) before any write is accepted.
    pub fn open(disk: &Path, options: CaptureOptions) -> Result<Arc<Self>, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(disk)
            .map_err(|e| capture_error("cannot open the disk", disk, e))?;
        // One capture per disk: a second agent serving it would write behind
        // this one's back, and its cuts would miss those writes.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                Error::Capture(format!(
                    "{} is already served by another write capture (lock: {e})",
                    disk.display()
                ))
            },
        )?;
        // Seeking to the end sizes a block device as well as a file.
        let size_bytes = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| capture_error("cannot size the disk", disk, e))?;
        let block_count = size_bytes.div_ceil(CAPTURE_BLOCK_BYTES);
        preserve::remove_stale_spills(disk);
        let (bits, saved_root) = match state_file::load(&options.state_path, size_bytes) {
            Ok(saved) if saved.disk_modified_ns != state_file::modified_ns(&file) => {
                tracing::warn!(
                    state = %options.state_path.display(),
                    "the disk was modified since the dirty set was saved: it must be read whole once"
                );
                (vec![0; bitmap::words_for(block_count)], None)
            }
            Ok(saved) => (saved.bits, saved.root),
            Err(reason) => {
                tracing::warn!(
                    state = %options.state_path.display(),
                    "no usable saved dirty set ({reason}): the disk must be read whole once"
                );
                (vec![0; bitmap::words_for(block_count)], None)
            }
        };
        // From here a crash must look unclean: mark the file in use (with no
        // bitmap, which an in-use file never needs) before serving.
        state_file::write_durably(
            &options.state_path,
            &state_file::encode(true, size_bytes, None, 0, &[]),
        )
        .map_err(|e| capture_error("cannot write the capture state", &options.state_path, e))?;
        Ok(Arc::new(Self {
            path: disk.to_path_buf(),
            file,
            size_bytes,
            block_count,
            saved_root,
            gate: RwLock::new(Gate::default()),
            current: (0..bits.len()).map(|_| AtomicU64::new(0)).collect(),
            pending: Mutex::new(Pending {
                bits,
                latest_generation: 0,
                committed_generation: 0,
                committed_root: None,
            }),
            options,
            cuts: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flush_failed: AtomicBool::new(false),
            latency: Latency::new(),
        }))
    }

    /// The disk's size in bytes (fixed while served).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The disk's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The NBD export the workload uses as its disk. Writes go to the disk
    /// and the dirty set; `FLUSH` (and `FUA`) make them durable on the disk
    /// before they are answered. Never waits on the network.
    pub fn export(self: &Arc<Self>) -> Arc<dyn blockrep_nbd::Export> {
        Arc::new(export::CaptureExport::new(Arc::clone(self)))
    }

    /// The root the loaded dirty set is relative to: `Some(root)` when the
    /// last run stopped cleanly after committing `root`, so the disk equals
    /// `root` plus the dirty blocks; `None` when that is unknown (first run,
    /// unclean stop, a state file of another disk), and a full cut is needed.
    pub fn saved_root(&self) -> Option<ChunkId> {
        self.saved_root
    }

    /// Cuts an epoch now: waits for writes in flight, then seals every block
    /// written and not yet committed (every block of the disk with `full`).
    /// One cut at a time: a new cut replaces an uncommitted earlier one, whose
    /// blocks it includes.
    pub fn cut(self: &Arc<Self>, full: bool) -> Arc<Cut> {
        self.cut_at(full, || ())
    }

    /// Cuts several disks' captures (a machine's) at one instant: the write
    /// gates of all of them are held at once, so no write to any of the
    /// disks is in flight or starts while each is sealed. A write to one disk
    /// that completed before a write to another began is therefore in every
    /// cut that holds the later one. The gates are taken in the order given;
    /// a writer holds only its own disk's gate, so none waits on two. `full`
    /// says, disk by disk, which cuts take every block.
    pub fn cut_together(captures: &[Arc<Self>], full: &[bool]) -> Vec<Arc<Cut>> {
        Self::cut_together_at(captures, full, || ())
    }

    /// [`Capture::cut_together`], running `at_instant` while every gate is
    /// held: tests copy the disks there.
    fn cut_together_at(
        captures: &[Arc<Self>],
        full: &[bool],
        at_instant: impl FnOnce(),
    ) -> Vec<Arc<Cut>> {
        let mut gates: Vec<_> = captures.iter().map(|c| c.write_gate()).collect();
        let cuts = captures
            .iter()
            .zip(gates.iter_mut())
            .enumerate()
            .map(|(i, (capture, gate))| capture.seal(gate, full.get(i).copied().unwrap_or(true)))
            .collect();
        at_instant();
        drop(gates);
        cuts
    }

    /// [`Capture::cut`], running `at_instant` at the instant of the cut (no
    /// write in flight, none starting): tests copy the disk there.
    fn cut_at(self: &Arc<Self>, full: bool, at_instant: impl FnOnce()) -> Arc<Cut> {
        let mut gate = self.write_gate();
        let cut = self.seal(&mut gate, full);
        at_instant();
        drop(gate);
        cut
    }

    /// Seals the cut under the exclusive write `gate`.
    fn seal(self: &Arc<Self>, gate: &mut Gate, full: bool) -> Arc<Cut> {
        let mut pending = lock(&self.pending);
        for (sealed, current) in pending.bits.iter_mut().zip(&self.current) {
            *sealed |= current.swap(0, Ordering::Relaxed);
        }
        if full {
            pending.bits = bitmap::full(self.block_count);
        }
        let generation = self.cuts.fetch_add(1, Ordering::Relaxed) + 1;
        pending.latest_generation = generation;
        let sealed = pending.bits.clone();
        drop(pending);
        let shared = Arc::new(CutShared::new(
            generation,
            full,
            sealed,
            self.block_count,
            preserve::PreserveStore::new(
                preserve::spill_path(&self.path),
                self.options.preserve_memory_bytes,
                self.options.preserve_max_bytes,
            ),
        ));
        if let Some(previous) = gate.cut.replace(Arc::clone(&shared)) {
            previous.end();
        }
        Arc::new(Cut {
            shared,
            capture: Arc::clone(self),
        })
    }

    /// Stops accepting writes (cutover): waits for writes in flight; later
    /// writes fail with `EROFS`. Reads go on.
    pub fn freeze(&self) {
        self.write_gate().frozen = true;
    }

    /// Counters, and the write latencies since the previous call.
    pub fn stats(&self) -> CaptureStats {
        let dirty_blocks = {
            let pending = lock(&self.pending);
            pending
                .bits
                .iter()
                .zip(&self.current)
                .map(|(p, c)| u64::from((p | c.load(Ordering::Relaxed)).count_ones()))
                .sum::<u64>()
        };
        let preserved_bytes = self
            .read_gate()
            .cut
            .as_ref()
            .map_or(0, |cut| cut.preserved_bytes());
        let (write_p50_us, write_p99_us) = self.latency.take_p50_p99_us();
        CaptureStats {
            dirty_bytes: (dirty_blocks * CAPTURE_BLOCK_BYTES).min(self.size_bytes),
            preserved_bytes,
            cuts: self.cuts.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            write_p50_us,
            write_p99_us,
        }
    }

    /// Saves the dirty set (every block not in a committed epoch) and the
    /// last committed root, durably, and marks the state not in use: the next
    /// start needs no rescan. Called on a clean stop, after the export has
    /// stopped serving; it freezes the capture (a later write fails with
    /// `EROFS`), since a write after the save would be missing from it.
    pub fn save(&self) -> Result<(), Error> {
        let mut gate = self.write_gate();
        gate.frozen = true;
        // The state says the disk holds every write it counts: only once the
        // disk is flushed, and never after a flush failed.
        self.flush_disk()
            .map_err(|e| capture_error("not saving the capture state: flushing", &self.path, e))?;
        let pending = lock(&self.pending);
        let bits: Vec<u64> = pending
            .bits
            .iter()
            .zip(&self.current)
            .map(|(p, c)| p | c.load(Ordering::Relaxed))
            .collect();
        // With nothing committed this run, the dirty set is still relative to
        // the root it was loaded with.
        let root = if pending.committed_generation > 0 {
            pending.committed_root
        } else {
            self.saved_root
        };
        drop(pending);
        let modified_ns = state_file::modified_ns(&self.file);
        let bytes = state_file::encode(false, self.size_bytes, root, modified_ns, &bits);
        state_file::write_durably(&self.options.state_path, &bytes).map_err(|e| {
            capture_error("cannot save the capture state", &self.options.state_path, e)
        })?;
        drop(gate);
        Ok(())
    }

    /// `fdatasync` of the disk, unless one failed before (then the error
    /// again, whatever the kernel would say now).
    pub(super) fn flush_disk(&self) -> std::io::Result<()> {
        if self.flush_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "an earlier flush of the disk failed: restart the agent (the next run reads the whole disk)",
            ));
        }
        self.file.sync_data().inspect_err(|_| {
            self.flush_failed.store(true, Ordering::SeqCst);
        })
    }

    fn read_gate(&self) -> RwLockReadGuard<'_, Gate> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_gate(&self) -> RwLockWriteGuard<'_, Gate> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// A write of `len` bytes at `offset` done by `write`: under the shared
    /// gate, the old content the live cut needs is preserved first, the
    /// blocks are marked dirty, then `write` runs.
    fn write_with(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let started = Instant::now();
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= self.size_bytes)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("write of {len} bytes at {offset} is past the end of the disk"),
                )
            })?;
        if len == 0 {
            return Ok(());
        }
        if self.flush_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("an earlier flush of the disk failed"));
        }
        let gate = self.read_gate();
        if gate.frozen {
            return Err(std::io::Error::from_raw_os_error(
                rustix::io::Errno::ROFS.raw_os_error(),
            ));
        }
        if let Some(cut) = &gate.cut {
            cut.preserve(&self.file, self.size_bytes, offset, end);
        }
        // Marked before the write: a write that fails half way may still
        // have changed some blocks.
        bitmap::set_range_atomic(
            &self.current,
            offset / CAPTURE_BLOCK_BYTES,
            end.div_ceil(CAPTURE_BLOCK_BYTES),
        );
        let written = write(&self.file);
        drop(gate);
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.latency
            .record(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        written
    }
}

/// One epoch's sealed blocks, readable as of the instant of the cut.
pub struct Cut {
    shared: Arc<CutShared>,
    capture: Arc<Capture>,
}

impl std::fmt::Debug for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cut")
            .field("generation", &self.shared.generation)
            .field("full", &self.shared.full)
            .finish_non_exhaustive()
    }
}

impl Cut {
    /// Whether this is a full cut (every block).
    pub fn full(&self) -> bool {
        self.shared.full
    }

    /// Indices of the chunks (in `geometry`) with at least one sealed block,
    /// ascending.
    pub fn chunks(&self, geometry: Geometry) -> Vec<u64> {
        self.shared.learn_grain(geometry);
        self.shared.chunks(geometry)
    }

    /// The sealed blocks of chunk `index` as byte ranges `(offset in the
    /// chunk, length)`, 4 KiB aligned, merged and clipped to the chunk.
    pub fn written_ranges(&self, geometry: Geometry, index: u64) -> Vec<(u32, u32)> {
        self.shared.learn_grain(geometry);
        self.shared.written_ranges(geometry, index)
    }

    /// Reads `buf.len()` bytes at `offset` as they were at the cut.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.shared
            .read_at(&self.capture.file, self.capture.size_bytes, offset, buf)
    }

    /// The epoch needs chunk `index` no more: its preserved blocks are
    /// dropped and later writes to it are not preserved (reading it through
    /// this cut afterwards is an error).
    pub fn release(&self, geometry: Geometry, index: u64) {
        self.shared.learn_grain(geometry);
        self.shared.release(geometry, index);
    }

    /// `CrashConsistent`, or `Live` once a write could not be preserved
    /// within the budget.
    pub fn consistency(&self) -> Consistency {
        if self.shared.is_live() {
            Consistency::Live
        } else {
            Consistency::CrashConsistent
        }
    }

    /// The epoch of this cut was committed as `root`: its blocks leave the
    /// dirty set (blocks written since the cut stay), and `root` is what a
    /// later [`Capture::save`] records.
    pub fn committed(&self, root: ChunkId) {
        let mut pending = lock(&self.capture.pending);
        // A cut replaced by a later one must not clear blocks: the later cut
        // sealed them again, possibly rewritten since this one. Its root is
        // still a correct base, as the dirty set stays a superset.
        if pending.latest_generation == self.shared.generation {
            for (bits, sealed) in pending.bits.iter_mut().zip(&self.shared.sealed) {
                *bits &= !sealed;
            }
        }
        if self.shared.generation > pending.committed_generation {
            pending.committed_generation = self.shared.generation;
            pending.committed_root = Some(root);
        }
        drop(pending);
        self.shared.end();
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        // Its blocks stay pending; only the preserved copies go.
        self.shared.end();
    }
}

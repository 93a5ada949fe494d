//! Live materialization: a launch volume copied whole to a local file or
//! block device while it stays served and written, as PBS's live restore
//! and QEMU's block-stream do. Once the copy is complete the volume is
//! served from that file: no read touches the store any more.
//!
//! # How
//!
//! The *target* becomes the overlay's data file (`overlay.rs`): at the start
//! the volume is folded, the blocks still mapped are copied into the target,
//! and `target` in the overlay's directory names it. From then on writes go
//! to the target as they went to the overlay's sparse file, and the map
//! journal keeps telling which blocks clients wrote; nothing in the target
//! is ever punched, and blocks written as zeroes are zeroed in it at once.
//!
//! What clients did not write is copied a chunk at a time, by a background
//! copier ([`LaunchVolume::materialize_step`]) and by every read of a chunk
//! not copied yet (copy-on-read): the chunk's bytes are fetched without the
//! volume's lock, then, under it, written over the chunk's blocks that still
//! read as the base, if the chunk's id is still the one fetched and no write
//! to it is in flight (else it is copied later). A copied chunk reads from
//! the target. A fold changes no block's bytes, so it never undoes a copy:
//! what it folds is in the target already, and in a materialized volume a
//! fold makes the target durable before the new root is published.
//!
//! # The journal
//!
//! `copied` in the overlay's directory: a header (magic, volume size, chunk
//! size, crc32), then records of copied chunks (magic, first chunk, count,
//! crc32). Chunks are recorded only after the target's data is synced, so a
//! chunk the journal names is on disk in the target; a stop loses at most
//! the copies since the last record, which are made again. A torn or
//! damaged record ends the journal there.
//!
//! After a power loss the overlay's map loses its records past the last
//! flush, and a block they named reads as the base again while the target
//! may hold the unflushed bytes: the overlay lists those blocks (`cut`)
//! before it cuts the map, and their chunks are recorded to be copied
//! again (a record of the same shape with another magic) before the volume
//! serves.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_core::ChunkId;

use crate::chunk_cache::ChunkBytes;
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::store::Store;

use super::overlay::bits::Bits;
use super::overlay::{
    BlockState, OVERLAY_BLOCK_BYTES as BLOCK, Overlay, punch_or_zero, sync_dir, write_target,
};
use super::volume::{LaunchVolume, VolumeState};

mod journal;

use journal::read_progress;
pub(super) use journal::{Journal, load};

/// How long a start waits for reads and writes running outside the
/// volume's lock to end before it switches the data file.
const SWITCH_WAIT: Duration = Duration::from_secs(10);

/// How far a materialization is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterializeProgress {
    /// The file or block device the volume is copied to.
    pub target: PathBuf,
    /// The volume's size.
    pub size_bytes: u64,
    /// Bytes of the volume the target holds (whole chunks copied).
    pub copied_bytes: u64,
    /// Bytes still read from the store: `size_bytes - copied_bytes`.
    pub remote_bytes: u64,
    /// Whether the copy is complete: the volume is served from the target.
    pub done: bool,
}

/// What one [`LaunchVolume::materialize_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaterializeStep {
    /// Bytes it copied.
    pub copied_bytes: u64,
    /// Whether the copy is complete now.
    pub done: bool,
}

/// A materialization of a launch volume, as listed by
/// [`Store::launch_materializations`].
#[derive(Debug, Clone)]
pub struct Materialization {
    pub launch: String,
    /// The volume of a machine's launch; `None` for a single disk's.
    pub volume: Option<String>,
    pub progress: MaterializeProgress,
}

/// The chunks a materialization has copied, in memory.
#[derive(Debug)]
pub(super) struct Copied {
    target: PathBuf,
    size_bytes: u64,
    chunk_size: u64,
    chunks: u64,
    bits: Bits,
    count: u64,
    /// Copied since the journal last recorded.
    unrecorded: Vec<u64>,
    /// Where the background copier goes on.
    cursor: u64,
}

impl Copied {
    fn new(target: PathBuf, size_bytes: u64, chunk_size: u64) -> Self {
        let chunks = size_bytes.div_ceil(chunk_size);
        Self {
            target,
            size_bytes,
            chunk_size,
            chunks,
            bits: Bits::new(chunks),
            count: 0,
            unrecorded: Vec::new(),
            cursor: 0,
        }
    }

    /// Whether chunk `chunk` is in the target.
    pub(super) fn has(&self, chunk: u64) -> bool {
        chunk < self.chunks && self.bits.get(chunk)
    }

    pub(super) fn done(&self) -> bool {
        self.count == self.chunks
    }

    fn mark(&mut self, chunk: u64) {
        if !self.bits.get(chunk) {
            self.bits.set_range(chunk, 1, true);
            self.count += 1;
        }
    }

    fn unmark(&mut self, chunk: u64) {
        if self.bits.get(chunk) {
            self.bits.set_range(chunk, 1, false);
            self.count -= 1;
        }
    }

    fn progress(&self) -> MaterializeProgress {
        let mut copied = self.count * self.chunk_size;
        if self.chunks > 0 && self.bits.get(self.chunks - 1) {
            // The last chunk may be short.
            copied -= self.chunks * self.chunk_size - self.size_bytes;
        }
        MaterializeProgress {
            target: self.target.clone(),
            size_bytes: self.size_bytes,
            copied_bytes: copied,
            remote_bytes: self.size_bytes - copied,
            done: self.done(),
        }
    }

    /// The next chunk not copied from the cursor on (wrapping), if any.
    fn next_missing(&self) -> Option<u64> {
        if self.done() {
            return None;
        }
        (self.cursor..self.chunks)
            .chain(0..self.cursor)
            .find(|&chunk| !self.bits.get(chunk))
    }
}

/// Opens (or creates) `target` for a volume of `size_bytes`: a new file,
/// sized and owner-only, or a block device at least that large, opened
/// exclusively (not mounted, not another materialization's). The flag says
/// whether the file was created here.
fn open_target(target: &Path, size_bytes: u64) -> Result<(File, bool), Error> {
    let invalid = |why: String| Error::new(ErrorKind::Invalid, why);
    if !target.is_absolute() {
        return Err(invalid(format!(
            "materialize needs an absolute path on the server, not {}",
            target.display()
        )));
    }
    let fail = |what: &str, e: io::Error| Error::io(format!("{what} {}", target.display()), e);
    match std::fs::metadata(target) {
        Ok(meta) if meta.file_type().is_block_device() => {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
                .open(target)
                .map_err(|e| fail("cannot open (exclusively)", e))?;
            let device_bytes = file
                .seek(io::SeekFrom::End(0))
                .map_err(|e| fail("cannot size", e))?;
            if device_bytes < size_bytes {
                return Err(invalid(format!(
                    "{} holds {device_bytes} bytes, less than the volume's {size_bytes}",
                    target.display()
                )));
            }
            Ok((file, false))
        }
        Ok(_) => Err(invalid(format!(
            "{} exists: materialize writes a new file (or a block device); remove it or \
             choose another path",
            target.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(target)
                .map_err(|e| fail("cannot create", e))?;
            file.set_len(size_bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| fail("cannot size", e))?;
            if let Some(parent) = target.parent() {
                sync_dir(parent)?;
            }
            Ok((file, true))
        }
        Err(e) => Err(fail("cannot stat", e)),
    }
}

impl LaunchVolume {
    /// Starts copying this volume to `target` (see the module's docs): a new
    /// file, or a block device of at least the volume's size, on this
    /// server. Folds first, with `now_unix_ms` as the flush time. Asking
    /// again for the same target returns its progress; another target is
    /// `Invalid` while one is set. The copy itself is done by
    /// [`LaunchVolume::materialize_step`] and by reads.
    pub fn materialize_to(
        &self,
        target: &Path,
        now_unix_ms: u64,
    ) -> Result<MaterializeProgress, Error> {
        self.store.check_writable()?;
        if self.store.remote.is_some() {
            return Err(Error::new(
                ErrorKind::Invalid,
                "a launch of a server whose store is in a bucket cannot be materialized: its \
                 volume moves with the source's lease to other servers",
            ));
        }
        if self.lock_state().sealer.is_some() {
            return Err(Error::new(
                ErrorKind::Invalid,
                "a launch of an encrypted source cannot be materialized: the file would hold \
                 its data in clear",
            ));
        }
        if let Some(progress) = self.same_target(target)? {
            return Ok(progress);
        }
        let (file, created) = open_target(target, self.size_bytes())?;
        let started = self.start(target, file, now_unix_ms);
        if started.is_err() && created {
            // A retry must not find it "existing".
            let _ = std::fs::remove_file(target);
        }
        started
    }

    fn start(
        &self,
        target: &Path,
        file: File,
        now_unix_ms: u64,
    ) -> Result<MaterializeProgress, Error> {
        // What is folded need not be copied under the lock below.
        self.fold(now_unix_ms)
            .map_err(|e| Error::io("cannot fold before materializing", e))?;
        let deadline = Instant::now() + SWITCH_WAIT;
        loop {
            // The journal's lock first, as the copier takes them.
            let mut journal = lock(&self.journal);
            let mut state = self.lock_state();
            if let Some(progress) = self.same_target_locked(&state, target)? {
                return Ok(progress);
            }
            let busy = state
                .overlay
                .as_ref()
                .is_some_and(|overlay| overlay.is_busy(0, overlay.blocks()));
            if busy {
                drop(state);
                drop(journal);
                if Instant::now() > deadline {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        "the volume's I/O did not pause long enough to start materializing",
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return self.switch_to(&mut state, &mut journal, target, file);
        }
    }

    /// The progress of a materialization to `target` already set; `Invalid`
    /// when one to another target is.
    fn same_target(&self, target: &Path) -> Result<Option<MaterializeProgress>, Error> {
        let state = self.lock_state();
        self.same_target_locked(&state, target)
    }

    fn same_target_locked(
        &self,
        state: &VolumeState,
        target: &Path,
    ) -> Result<Option<MaterializeProgress>, Error> {
        match &state.copied {
            None => Ok(None),
            Some(copied) if copied.target == target => Ok(Some(copied.progress())),
            Some(copied) => Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "this volume is being materialized to {} already",
                    copied.target.display()
                ),
            )),
        }
    }

    /// Under the volume's lock, with nothing in flight: moves the mapped
    /// blocks into `file`, names it as the target and makes it the data file.
    fn switch_to(
        &self,
        state: &mut VolumeState,
        journal_slot: &mut Option<Journal>,
        target: &Path,
        file: File,
    ) -> Result<MaterializeProgress, Error> {
        let size = self.size_bytes();
        if state.overlay.is_none() {
            state.overlay = Some(Overlay::create(&self.overlay_dir, size)?);
        }
        let overlay = state.overlay.as_mut().expect("created above");
        // The fold's unmaps made durable first: after a power loss the map
        // must not name as written a block that is not copied below.
        overlay.sync()?;
        let old = overlay.reader();
        let fail = |what: &str, e: io::Error| Error::io(format!("{what} {}", target.display()), e);
        let mut buf = vec![0u8; 1 << 20];
        for (first, count, is_data) in overlay.mapped_runs() {
            let start = first * BLOCK;
            let end = ((first + count) * BLOCK).min(size);
            if !is_data {
                punch_or_zero(&file, start, end - start).map_err(|e| fail("cannot zero", e))?;
                continue;
            }
            let mut at = start;
            while at < end {
                let n = (end - at).min(buf.len() as u64) as usize;
                old.read_at(&mut buf[..n], at)?;
                file.write_all_at(&buf[..n], at)
                    .map_err(|e| fail("cannot write", e))?;
                at += n as u64;
            }
        }
        file.sync_data().map_err(|e| fail("cannot sync", e))?;
        let chunk_size = u64::from(self.geometry.chunk_size_bytes());
        let new_journal = Journal::create(&self.overlay_dir, size, chunk_size)?;
        write_target(&self.overlay_dir, target)?;
        overlay.switch_data(file);
        // The old data file is read no more (an open of the overlay removes
        // it too, after a stop right here).
        let _ = std::fs::remove_file(self.overlay_dir.join("data"));
        let copied = Copied::new(target.to_owned(), size, chunk_size);
        let progress = copied.progress();
        state.copied = Some(copied);
        *journal_slot = Some(new_journal);
        Ok(progress)
    }

    /// How far this volume's materialization is; `None` when it has none.
    pub fn materialize_progress(&self) -> Option<MaterializeProgress> {
        self.lock_state().copied.as_ref().map(Copied::progress)
    }

    /// Copies up to `max_chunks` chunks not copied yet into the target (a
    /// chunk being written is left for a later step), then records them.
    /// A volume not being materialized does nothing and reports done.
    pub fn materialize_step(&self, max_chunks: u64) -> Result<MaterializeStep, Error> {
        let mut copied_bytes = 0;
        for _ in 0..max_chunks {
            let (chunk, id, len) = {
                let mut state = self.lock_state();
                let Some(chunk) = state.copied.as_ref().and_then(Copied::next_missing) else {
                    break;
                };
                if let Some(copied) = state.copied.as_mut() {
                    copied.cursor = (chunk + 1) % copied.chunks;
                }
                let len = self
                    .geometry
                    .chunk_len(chunk)
                    .ok_or_else(|| Error::new(ErrorKind::Invalid, "copy past the last chunk"))?;
                (chunk, state.chunk_id(&self.store, chunk)?, len)
            };
            // Fetched without the lock; a chunk the cache holds is not read.
            let bytes = match id.is_zero() {
                true => None,
                false => Some(self.store.chunk_for_copy(&id, len)?),
            };
            let mut state = self.lock_state();
            if state.copy_chunk(
                &self.store,
                self.geometry,
                chunk,
                id,
                bytes.as_deref().map(Vec::as_slice),
            )? {
                copied_bytes += u64::from(len);
            }
        }
        self.record_copied()?;
        let done = self.lock_state().copied.as_ref().is_none_or(Copied::done);
        Ok(MaterializeStep { copied_bytes, done })
    }

    /// Copies chunks a read fetched from the store into the target; one
    /// that cannot be copied now is left to the copier.
    pub(super) fn copy_on_read(&self, state: &mut VolumeState, fetched: &[Fetched]) {
        for (chunk, id, bytes) in fetched {
            let _ = state.copy_chunk(&self.store, self.geometry, *chunk, *id, Some(bytes));
        }
    }

    /// Makes the target durable and records the chunks copied into it.
    fn record_copied(&self) -> Result<(), Error> {
        let mut journal = lock(&self.journal);
        let (mut chunks, io) = {
            let mut state = self.lock_state();
            let Some(copied) = state.copied.as_mut() else {
                return Ok(());
            };
            let chunks = std::mem::take(&mut copied.unrecorded);
            (chunks, state.overlay.as_ref().map(Overlay::reader))
        };
        if chunks.is_empty() {
            return Ok(());
        }
        let recorded = match (io, journal.as_mut()) {
            (Some(io), Some(journal)) => io.sync_data().and_then(|()| journal.record(&mut chunks)),
            _ => Err(Error::new(
                ErrorKind::Invalid,
                "a materialization without its target or journal",
            )),
        };
        if recorded.is_err() {
            // Recorded at the next step's try.
            if let Some(copied) = self.lock_state().copied.as_mut() {
                copied.unrecorded.extend(chunks);
            }
        }
        recorded
    }
}

/// A chunk a read fetched from the store: index, id and decoded bytes.
pub(super) type Fetched = (u64, ChunkId, ChunkBytes);

impl VolumeState {
    /// Marks the blocks of `start..end` (bytes) that lie in copied chunks as
    /// written before a write changes them in the target, where they read
    /// as the base until then: a stop between the bytes and their map
    /// record must not leave the target differing from the root with no
    /// record of it. (In a chunk not copied the bytes go first, as in any
    /// overlay: the chunk is copied from the root later, and no copy runs
    /// while the write is in flight.) Nothing to do when not materializing.
    pub(super) fn mark_copied_written(
        &mut self,
        geometry: blockrep_core::Geometry,
        start: u64,
        end: u64,
    ) -> Result<(), Error> {
        let Some(copied) = self.copied.as_ref() else {
            return Ok(());
        };
        let chunk_size = u64::from(geometry.chunk_size_bytes());
        let size = geometry.disk_size_bytes();
        let ranges: Vec<(u64, u64)> = (start / chunk_size..=(end - 1) / chunk_size)
            .filter(|chunk| copied.has(*chunk))
            .filter_map(|chunk| {
                let first = (chunk * chunk_size).max(start) / BLOCK;
                let last = ((chunk + 1) * chunk_size)
                    .min(end)
                    .min(size)
                    .div_ceil(BLOCK);
                (first < last).then_some((first, last - first))
            })
            .collect();
        let Some(overlay) = self.overlay.as_mut() else {
            return Ok(());
        };
        for (first, count) in ranges {
            overlay.wrote_blocks(first, count)?;
        }
        Ok(())
    }

    /// Copies chunk `chunk` (id `id`, bytes `bytes`; `None`: zero) into the
    /// target where it still reads as the base. `false` when it cannot now:
    /// its id changed (a fold), or a write to it is in flight.
    fn copy_chunk(
        &mut self,
        store: &Store,
        geometry: blockrep_core::Geometry,
        chunk: u64,
        id: ChunkId,
        bytes: Option<&[u8]>,
    ) -> Result<bool, Error> {
        match &self.copied {
            None => return Ok(false),
            Some(copied) if copied.has(chunk) => return Ok(true),
            Some(_) => {}
        }
        if self.chunk_id(store, chunk)? != id {
            return Ok(false);
        }
        let chunk_size = u64::from(geometry.chunk_size_bytes());
        let start = chunk * chunk_size;
        let end = start + u64::from(geometry.chunk_len(chunk).unwrap_or(0));
        let Some(overlay) = self.overlay.as_ref() else {
            return Ok(false);
        };
        if overlay.is_busy(start / BLOCK, (end - start).div_ceil(BLOCK)) {
            return Ok(false);
        }
        if bytes.is_some_and(|bytes| bytes.len() as u64 != end - start) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("chunk {id} does not have the length of chunk {chunk}'s place"),
            ));
        }
        let io = overlay.reader();
        for run in self.runs(start, end) {
            if run.state != BlockState::Base {
                continue;
            }
            match bytes {
                None => io.zero(run.start, run.end - run.start)?,
                Some(bytes) => io.write_blocks(
                    run.start / BLOCK,
                    &bytes[(run.start - start) as usize..(run.end - start) as usize],
                )?,
            }
        }
        if let Some(copied) = self.copied.as_mut() {
            copied.mark(chunk);
            copied.unrecorded.push(chunk);
        }
        Ok(true)
    }
}

impl Store {
    /// Opens volume `volume` of launch `name` and starts materializing it to
    /// `target` ([`LaunchVolume::materialize_to`]). Returns the volume, for
    /// the caller to drive its copy with [`LaunchVolume::materialize_step`].
    pub fn materialize_launch(
        self: &Arc<Self>,
        name: &str,
        volume: Option<&str>,
        target: &Path,
        now_unix_ms: u64,
    ) -> Result<(Arc<LaunchVolume>, MaterializeProgress), Error> {
        let opened = self.open_launch_volume(name, volume)?;
        let progress = opened
            .materialize_to(target, now_unix_ms)
            .map_err(|e| Error::new(e.kind(), format!("launch {name}: {e}")))?;
        Ok((opened, progress))
    }

    /// Every materialization on this server: live from an open volume, else
    /// read from its journal.
    pub fn launch_materializations(&self) -> Result<Vec<Materialization>, Error> {
        let open = self.open_launch_volumes();
        let mut out = Vec::new();
        for (launch, volume) in self.launches_with_overlays()? {
            let dir = Overlay::dir_of(self.data_dir(), &launch, volume.as_deref());
            let live = open.iter().find(|opened| {
                opened.info().name == launch
                    && opened.volume.as_ref().map(|v| v.as_str()) == volume.as_deref()
            });
            let progress = match live {
                Some(opened) => opened.materialize_progress(),
                None => read_progress(&dir)?,
            };
            if let Some(progress) = progress {
                out.push(Materialization {
                    launch,
                    volume,
                    progress,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[path = "materialize_tests.rs"]
pub(super) mod tests;

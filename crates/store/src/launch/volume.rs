//! An open launch volume: reads and writes by byte range. Writes go to the
//! volume's overlay (`overlay.rs`) at 4 KiB granularity; reads come from the
//! overlay where written, else from the volume's root through the store's
//! decoded chunk cache (`chunk_cache.rs`). A fold (`fold.rs`) moves the
//! overlay into the store and the launch's head (see `launch.rs` for the
//! guarantees).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use blockrep_core::{ChunkId, Geometry, Root, VolumeName};

use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::store::Store;

use super::LaunchInfo;
use super::materialize::{self, Copied, Fetched, Journal};
use super::overlay::{BlockState, OVERLAY_BLOCK_BYTES as BLOCK, Overlay, OverlayIo};

/// Index pages without unflushed changes that an open launch volume keeps in
/// memory (least recently used beyond that are dropped and read again from the
/// flushed root when needed). A page holds 1024 chunk ids, 32 KiB, so this is
/// 8 MiB per open volume and covers 16 GiB of disk at 64 KiB chunks: a client
/// that reads a whole volume cannot make the server hold its whole index.
/// Pages changed by a fold are kept until it publishes them.
pub const LAUNCH_PAGES_CACHED_MAX: usize = 256;
/// Chunks decoded ahead of a sequential reader.
const READAHEAD_CHUNKS: u64 = 32;
/// A read that starts within this many of its own lengths of where the last
/// one ended counts as sequential: a client's requests in flight (qd16)
/// arrive out of order. In lengths, so that two random 4 KiB reads a few
/// MiB apart do not start a readahead of [`READAHEAD_CHUNKS`] chunks.
const SEQUENTIAL_SLACK_READS: u64 = 16;
/// The most slack, whatever the reads' length.
const SEQUENTIAL_SLACK_BYTES_MAX: u64 = 16 << 20;

/// A launch opened for I/O. Every method takes `&self`; one mutex serializes
/// the volume's reads and writes, held for one request at a time (a fold
/// takes it for one chunk at a time). Offsets and lengths are in bytes and
/// need no alignment.
///
/// Writes are visible to reads at once and become durable with
/// [`LaunchVolume::sync`] (an NBD flush); a volume dropped without one may
/// lose its unsynced writes, exactly as a disk may at a crash.
pub struct LaunchVolume {
    pub(super) store: Arc<Store>,
    pub(super) geometry: Geometry,
    /// The volume's name in the launch's machine root; `None` when the launch
    /// is of a single disk (its head names the disk root itself).
    pub(super) volume: Option<VolumeName>,
    /// Its key among the catalog's open launches.
    key: String,
    /// Where its overlay lives (created at the first write).
    pub(super) overlay_dir: PathBuf,
    /// Whether a sync also folds: in a bucket (the overlay is local to this
    /// server, and another may serve the source next) and for an encrypted
    /// source (the overlay holds plaintext, so it is kept only until the
    /// next flush).
    pub(super) fold_on_sync: bool,
    pub(super) state: Mutex<VolumeState>,
    /// Held for a whole fold, so that folds do not interleave.
    pub(super) fold_lock: Mutex<()>,
    /// When the volume last served a read or a write (`None`: never).
    last_io: Mutex<Option<std::time::Instant>>,
    /// The journal of its materialization's copied chunks, if it has one
    /// (`materialize.rs`); taken before the state's lock, never after.
    pub(super) journal: Mutex<Option<Journal>>,
    /// Held shared by every write for its whole length, and exclusively
    /// by a freeze (a snapshot of the launch), which so sees no write in
    /// flight and lets none start. Taken before the state's lock.
    pub(super) io_gate: RwLock<()>,
    /// Held by a flush ([`LaunchVolume::sync`]) for its whole length.
    flushing: Mutex<()>,
    /// A test's pause in a flush, between taking the data and syncing it:
    /// the flush says it paused, then waits to be resumed.
    #[cfg(test)]
    pub(super) sync_pause: Mutex<Option<SyncPause>>,
}

#[cfg(test)]
pub(super) type SyncPause = (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

pub(super) struct VolumeState {
    /// The launch as of the last fold.
    pub(super) info: LaunchInfo,
    /// The root of the last fold: where unloaded pages are read from.
    pub(super) root: Root,
    /// Index pages in memory (by page index), with any changes of a fold
    /// not yet published: the dirty ones, and at most `clean_pages_max`
    /// clean ones.
    pub(super) pages: HashMap<usize, Vec<ChunkId>>,
    /// When each page in `pages` was last used (a tick of `use_clock`), to
    /// drop the least recently used clean page first.
    pub(super) page_used: HashMap<usize, u64>,
    /// Counts page uses.
    pub(super) use_clock: u64,
    /// Clean pages kept; [`LAUNCH_PAGES_CACHED_MAX`] unless a test lowers it.
    pub(super) clean_pages_max: usize,
    /// Pages whose ids a fold changed and has not published yet.
    pub(super) dirty_pages: BTreeSet<usize>,
    /// What clients wrote since the last fold; `None` until the first write.
    pub(super) overlay: Option<Overlay>,
    /// Writes so far, to number them.
    pub(super) writes: u64,
    /// The number of the last write to each chunk written since it was last
    /// folded, so that a fold tells a chunk written while it was folded.
    pub(super) chunk_writes: HashMap<u64, u64>,
    /// Where the last read ended, to see a sequential reader.
    last_read_end: u64,
    /// Where the readahead asked for so far ends, so that reads arriving
    /// out of order do not ask for the same chunks again.
    ahead_end: u64,
    /// The data key of an encrypted source: folded chunks get stored ids
    /// and every blob of the launch is sealed, as the source's are.
    pub(super) sealer: Option<Arc<blockrep_keys::Sealer>>,
    /// The source's id space: folded chunks are named in it.
    pub(super) space: blockrep_core::IdSpace,
    /// Chunk blobs this volume read from the store (cache misses), for
    /// tests and debugging.
    pub(super) chunk_reads: u64,
    /// The chunks its materialization copied, if it has one: those read
    /// from the target.
    pub(super) copied: Option<Copied>,
}

impl std::fmt::Debug for LaunchVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock_state();
        f.debug_struct("LaunchVolume")
            .field("name", &state.info.name)
            .field("geometry", &self.geometry)
            .field("generation", &state.info.generation)
            .field("dirty_pages", &state.dirty_pages.len())
            .finish()
    }
}

/// What a write puts in a range.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Bytes(&'a [u8]),
    Zeroes,
}

impl LaunchVolume {
    pub(super) fn lock_state(&self) -> MutexGuard<'_, VolumeState> {
        lock(&self.state)
    }

    /// The volume's name in its machine's launch (`None`: a single disk's).
    pub fn volume_name(&self) -> Option<&str> {
        self.volume.as_ref().map(VolumeName::as_str)
    }

    /// The launch as of its last fold.
    pub fn info(&self) -> LaunchInfo {
        self.lock_state().info.clone()
    }

    /// This volume's root as of its last fold (of a machine's launch, the
    /// volume's own root, not the machine root `info` names).
    pub fn flushed_root(&self) -> Root {
        self.lock_state().root.clone()
    }

    /// What the volume holds in memory, for the garbage collector: the root of
    /// its last fold (where pages not loaded are read from) and the current
    /// chunk ids of every loaded page, a running fold's included.
    pub(crate) fn ids_in_memory(&self) -> (ChunkId, Vec<ChunkId>) {
        let state = self.lock_state();
        let ids = state.pages.values().flatten().copied().collect();
        (state.root.id(), ids)
    }

    /// Index pages held in memory now: those a fold changed, and at most
    /// [`LAUNCH_PAGES_CACHED_MAX`] others.
    pub fn pages_in_memory(&self) -> usize {
        self.lock_state().pages.len()
    }

    /// How long since the volume last served a read or a write
    /// (`Duration::MAX` for one that never has).
    pub fn idle_for(&self) -> std::time::Duration {
        lock(&self.last_io).map_or(std::time::Duration::MAX, |at| at.elapsed())
    }

    fn note_io(&self) {
        *lock(&self.last_io) = Some(std::time::Instant::now());
    }

    /// Bytes written since the last fold (4 KiB blocks of the overlay).
    pub fn overlay_bytes(&self) -> u64 {
        self.lock_state()
            .overlay
            .as_ref()
            .map_or(0, |overlay| overlay.mapped_blocks() * BLOCK)
    }

    /// Lowers (or raises) the number of clean index pages kept, so that tests
    /// of the bound need no gigabyte disk. At least one.
    #[doc(hidden)]
    pub fn set_clean_pages_max(&self, pages: usize) {
        let mut state = self.lock_state();
        state.clean_pages_max = pages.max(1);
        let limit = state.clean_pages_max;
        state.drop_clean_pages_over(limit);
    }

    /// Size of the volume in bytes (that of the source disk).
    pub fn size_bytes(&self) -> u64 {
        self.geometry.disk_size_bytes()
    }

    /// Geometry of the volume.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range of {len_bytes} bytes at offset {offset_bytes} ends past the end \
                     of the {}-byte volume",
                    self.size_bytes()
                ),
            )),
        }
    }

    /// Reads `buf.len()` bytes at `offset_bytes`. A range past the end is an
    /// `InvalidInput` error. The volume's lock is held only to plan the read;
    /// the bytes are copied without it, so reads and writes of a volume run
    /// side by side.
    pub fn read(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset_bytes, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.note_io();
        let end = offset_bytes + buf.len() as u64;
        let (parts, io, ahead, copying) = {
            let mut state = self.lock_state();
            let parts = state.plan(&self.store, self.geometry, offset_bytes, end)?;
            // Chunks fetched from the store are copied into a
            // materialization's target (copy-on-read).
            let copying = state.copied.is_some();
            let io = match state.overlay.as_mut() {
                Some(overlay) if parts.iter().any(|part| part.kind == PartKind::Data) => {
                    let first = offset_bytes / BLOCK;
                    Some(overlay.io(first, (end - 1) / BLOCK - first + 1))
                }
                _ => None,
            };
            let slack = (buf.len() as u64 * SEQUENTIAL_SLACK_READS).min(SEQUENTIAL_SLACK_BYTES_MAX);
            let sequential = offset_bytes.abs_diff(state.last_read_end) <= slack;
            state.last_read_end = end;
            let ahead = if sequential {
                // Past the requests a client has in flight (the slack): those
                // are being read now, each decoding its own chunks, and a
                // readahead of them would decode them a second time.
                let from = (end + slack).min(self.size_bytes());
                state.chunks_ahead(&self.store, self.geometry, from)?
            } else {
                state.ahead_end = 0;
                Vec::new()
            };
            (parts, io, ahead, copying)
        };
        // Asked first, so the readahead thread decodes while this read copies.
        self.store.read_ahead(ahead);
        let mut fetched = Vec::new();
        let filled = fill(
            &self.store,
            &parts,
            io.as_ref().map(|(io, _)| io),
            offset_bytes,
            buf,
            copying.then_some(&mut fetched),
        );
        let mut state = self.lock_state();
        if let (Some((_, token)), Some(overlay)) = (io, state.overlay.as_mut()) {
            overlay.io_done(token);
        }
        state.chunk_reads += filled?;
        self.copy_on_read(&mut state, &fetched);
        Ok(())
    }

    /// Writes `data` at `offset_bytes`. A range past the end is an
    /// `InvalidInput` error and writes nothing. If a write of several blocks
    /// fails part way, some of them may have been written, as on a disk.
    pub fn write(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset_bytes, data.len() as u64)?;
        self.apply(offset_bytes, data.len() as u64, Fill::Bytes(data))
    }

    /// Writes `len_bytes` zero bytes at `offset_bytes`. Whole blocks cost only
    /// their place in the map.
    pub fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        self.check_range(offset_bytes, len_bytes)?;
        self.apply(offset_bytes, len_bytes, Fill::Zeroes)
    }

    /// Discards a range: here it reads back as zeroes afterwards, as after
    /// [`LaunchVolume::write_zeroes`].
    pub fn trim(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        self.write_zeroes(offset_bytes, len_bytes)
    }

    fn apply(&self, offset_bytes: u64, len_bytes: u64, fill: Fill<'_>) -> io::Result<()> {
        self.store.check_writable()?;
        if len_bytes == 0 {
            return Ok(());
        }
        self.note_io();
        let _gate = self.io_gate.read().unwrap_or_else(|p| p.into_inner());
        let size = self.size_bytes();
        let end = offset_bytes + len_bytes;
        // The whole blocks of a write of bytes are written without the lock.
        let whole_start = offset_bytes.div_ceil(BLOCK) * BLOCK;
        let whole_end = if end == size { end } else { end - end % BLOCK };
        let unlocked = match fill {
            Fill::Bytes(data) if whole_start < whole_end => Some((
                whole_start,
                whole_end,
                &data[(whole_start - offset_bytes) as usize..(whole_end - offset_bytes) as usize],
            )),
            _ => None,
        };
        let mut state = self.lock_state();
        if state.overlay.is_none() {
            state.overlay = Some(Overlay::create(&self.overlay_dir, size)?);
        }
        // Numbered before and after: a fold that read the chunks meanwhile
        // keeps their overlay blocks.
        state.note_write(self.geometry, offset_bytes, end);
        state.mark_copied_written(self.geometry, offset_bytes, end)?;
        let mut position = offset_bytes;
        while position < end {
            if let Some((start, stop, _)) = unlocked
                && position == start
            {
                position = stop;
                continue;
            }
            let block = position / BLOCK;
            let block_start = block * BLOCK;
            let block_end = (block_start + BLOCK).min(size);
            if position == block_start && end >= block_end {
                // Zeroes over whole blocks: the map alone.
                let run_end = if end == size { end } else { end - end % BLOCK };
                let overlay = state.overlay.as_mut().expect("created above");
                overlay.zero_blocks(block, (run_end - block_start).div_ceil(BLOCK))?;
                position = run_end;
            } else {
                // Part of a block: its current bytes, patched.
                let mut bytes = vec![0u8; (block_end - block_start) as usize];
                state.read_range(&self.store, self.geometry, block_start, &mut bytes)?;
                let piece_end = end.min(block_end);
                let patch = &mut bytes
                    [(position - block_start) as usize..(piece_end - block_start) as usize];
                match fill {
                    Fill::Bytes(data) => patch.copy_from_slice(
                        &data[(position - offset_bytes) as usize
                            ..(piece_end - offset_bytes) as usize],
                    ),
                    Fill::Zeroes => patch.fill(0),
                }
                state
                    .overlay
                    .as_mut()
                    .expect("created above")
                    .write_blocks(block, &bytes)?;
                position = piece_end;
            }
        }
        let Some((start, stop, data)) = unlocked else {
            return Ok(());
        };
        let first = start / BLOCK;
        let count = (stop - start).div_ceil(BLOCK);
        let (io, token) = state
            .overlay
            .as_mut()
            .expect("created above")
            .io(first, count);
        drop(state);
        let written = io.write_blocks(first, data);
        let mut state = self.lock_state();
        let overlay = state.overlay.as_mut().expect("created above");
        // Marked written before the blocks stop being busy, so that no sync
        // between the two punches them.
        let marked = written.and_then(|()| overlay.wrote_blocks(first, count));
        overlay.io_done(token);
        marked?;
        state.note_write(self.geometry, offset_bytes, end);
        Ok(())
    }

    /// Makes every write so far durable, as a disk's flush does: in the
    /// overlay, or, where a sync folds ([`LaunchVolume::fold`] says when),
    /// in the store and the launch's head.
    ///
    /// Reads and writes go on while it waits for the disk: the data written
    /// so far is synced without the volume's lock, and only what was written
    /// meanwhile and the map's records are synced under it. Flushes of the
    /// volume run one at a time.
    pub fn sync(&self, now_unix_ms: u64) -> io::Result<()> {
        if self.fold_on_sync {
            self.fold(now_unix_ms)?;
        }
        let _flushing = lock(&self.flushing);
        let data = match self.lock_state().overlay.as_mut() {
            Some(overlay) => overlay.take_dirty_data()?,
            None => None,
        };
        if let Some((data, _)) = &data {
            #[cfg(test)]
            if let Some((paused, resume)) = lock(&self.sync_pause).as_ref() {
                let _ = paused.send(());
                let _ = resume.recv();
            }
            // Every write acknowledged before this flush wrote its bytes
            // before the data was taken; its record is covered by the
            // marker the sync below writes.
            if let Err(e) = data.sync_data() {
                return Err(match self.lock_state().overlay.as_mut() {
                    Some(overlay) => overlay.data_sync_failed(e),
                    None => e,
                }
                .into());
            }
        }
        let mut state = self.lock_state();
        if let Some(overlay) = state.overlay.as_mut() {
            if let Some((data, writes)) = &data {
                overlay.data_synced(data, *writes);
            }
            overlay.sync()?;
        }
        Ok(())
    }

    /// Makes every write so far durable in the store and moves the launch's
    /// head to it: folds the overlay ([`LaunchVolume::fold`]), with
    /// `now_unix_ms` as the flush time (the store never reads the clock).
    pub fn flush(&self, now_unix_ms: u64) -> io::Result<()> {
        self.fold(now_unix_ms)?;
        // Records the unmaps and gives their space back: an encrypted
        // source's plaintext stays in the overlay no longer than this.
        let mut state = self.lock_state();
        if let Some(overlay) = state.overlay.as_mut() {
            overlay.sync()?;
        }
        Ok(())
    }
}

impl LaunchVolume {
    /// Volume `volume` (`None`: the single disk) of launch `info`, whose
    /// folded state is `root`, open in the catalog under `key`. Loads the
    /// volume's overlay; in a bucket, drops it instead (every write it held
    /// that a flush acknowledged was folded into the bucket).
    pub(super) fn new(
        store: Arc<Store>,
        info: LaunchInfo,
        root: Root,
        volume: Option<VolumeName>,
        key: String,
    ) -> Result<Self, Error> {
        let sealer = store.sealer_of(&info.source);
        let space = store.id_space_of(&info.source);
        let overlay_dir = Overlay::dir_of(
            store.data_dir(),
            &info.name,
            volume.as_ref().map(VolumeName::as_str),
        );
        let in_bucket = store.remote.is_some();
        let size = root.geometry().disk_size_bytes();
        let overlay = if in_bucket {
            if !store.is_read_only() {
                super::overlay::remove(&overlay_dir)?;
            }
            None
        } else {
            Overlay::open(&overlay_dir, size)?
        };
        let last_io = lock(&store.catalog.launch_last_io).get(&key).copied();
        let chunk_size = u64::from(root.geometry().chunk_size_bytes());
        let (copied, journal) = match overlay.as_ref().filter(|o| o.is_materialized()) {
            Some(_) => materialize::load(&overlay_dir, size, chunk_size)?.unzip(),
            None => (None, None),
        };
        Ok(Self {
            fold_on_sync: in_bucket || sealer.is_some(),
            store,
            geometry: root.geometry(),
            volume,
            key,
            overlay_dir,
            state: Mutex::new(VolumeState {
                info,
                root,
                pages: HashMap::new(),
                page_used: HashMap::new(),
                use_clock: 0,
                clean_pages_max: LAUNCH_PAGES_CACHED_MAX,
                dirty_pages: BTreeSet::new(),
                overlay,
                writes: 0,
                chunk_writes: HashMap::new(),
                last_read_end: u64::MAX,
                ahead_end: 0,
                sealer,
                space,
                chunk_reads: 0,
                copied,
            }),
            fold_lock: Mutex::new(()),
            last_io: Mutex::new(last_io),
            journal: Mutex::new(journal),
            io_gate: RwLock::new(()),
            flushing: Mutex::new(()),
            #[cfg(test)]
            sync_pause: Mutex::new(None),
        })
    }
}

impl Drop for LaunchVolume {
    fn drop(&mut self) {
        if let Some(at) = *lock(&self.last_io) {
            lock(&self.store.catalog.launch_last_io).insert(self.key.clone(), at);
        }
        let mut open = lock(&self.store.catalog.open_launches);
        // The launch may have been opened again since this volume's last handle
        // went; only a dead entry is ours to remove.
        if open
            .get(&self.key)
            .is_some_and(|volume| volume.strong_count() == 0)
        {
            open.remove(&self.key);
        }
    }
}

/// Where a part of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Data,
    Zero,
    Base {
        id: ChunkId,
        len: u32,
        chunk_index: u64,
        start_in_chunk: usize,
    },
}

/// A part of a read: byte offsets in the volume, and its source.
struct Part {
    start: u64,
    end: u64,
    kind: PartKind,
}

/// Copies `parts` into `out` (which starts at byte `offset`), without the
/// volume's lock: chunks through the store's cache (each one's id is its
/// content's hash, so it cannot have changed), overlay blocks through `io`
/// (which keeps them from being punched). Returns the chunks read from the
/// store; each chunk used goes to `fetched` if given.
fn fill(
    store: &Store,
    parts: &[Part],
    io: Option<&OverlayIo>,
    offset: u64,
    out: &mut [u8],
    mut fetched: Option<&mut Vec<Fetched>>,
) -> Result<u64, Error> {
    let mut reads = 0;
    for part in parts {
        let dst = &mut out[(part.start - offset) as usize..(part.end - offset) as usize];
        match part.kind {
            PartKind::Zero => dst.fill(0),
            PartKind::Data => io
                .ok_or_else(|| {
                    Error::new(ErrorKind::Invalid, "a read of overlay blocks without it")
                })?
                .read_at(dst, part.start)?,
            PartKind::Base {
                id,
                len,
                chunk_index,
                start_in_chunk,
            } => {
                let (bytes, read) = store
                    .cached_chunk(&id, len)
                    .map_err(|e| Error::new(e.kind(), format!("chunk {chunk_index}: {e}")))?;
                reads += u64::from(read);
                dst.copy_from_slice(&bytes[start_in_chunk..start_in_chunk + dst.len()]);
                if let Some(fetched) = fetched.as_mut()
                    && fetched
                        .last()
                        .is_none_or(|(last, _, _)| *last != chunk_index)
                {
                    fetched.push((chunk_index, id, bytes));
                }
            }
        }
    }
    Ok(reads)
}

/// A run of blocks of one state inside a read.
pub(super) struct Run {
    pub(super) state: BlockState,
    /// Byte offsets in the volume.
    pub(super) start: u64,
    pub(super) end: u64,
}

impl VolumeState {
    /// Fills `out` from `offset` (checked against the size), under the
    /// volume's lock: the overlay where written, else the root's chunks.
    pub(super) fn read_range(
        &mut self,
        store: &Store,
        geometry: Geometry,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), Error> {
        let end = offset + out.len() as u64;
        let parts = self.plan(store, geometry, offset, end)?;
        // Held under the lock, so no punch can happen meanwhile.
        let io = self.overlay.as_ref().map(Overlay::reader);
        self.chunk_reads += fill(store, &parts, io.as_ref(), offset, out, None)?;
        Ok(())
    }

    /// Numbers a write of `start..end` in every chunk it touches.
    fn note_write(&mut self, geometry: Geometry, start: u64, end: u64) {
        self.writes += 1;
        let write = self.writes;
        let chunk_size = u64::from(geometry.chunk_size_bytes());
        for chunk in start / chunk_size..=(end - 1) / chunk_size {
            self.chunk_writes.insert(chunk, write);
        }
    }

    /// Where each part of `start..end` is read from now.
    fn plan(
        &mut self,
        store: &Store,
        geometry: Geometry,
        start: u64,
        end: u64,
    ) -> Result<Vec<Part>, Error> {
        let chunk_size = u64::from(geometry.chunk_size_bytes());
        let mut parts: Vec<Part> = Vec::new();
        let mut position = start;
        while position < end {
            let chunk_index = position / chunk_size;
            let piece_end = ((chunk_index + 1) * chunk_size).min(end);
            let copied = self
                .copied
                .as_ref()
                .is_some_and(|copied| copied.has(chunk_index));
            for run in self.runs(position, piece_end) {
                let kind = match run.state {
                    BlockState::Data => PartKind::Data,
                    BlockState::Zero => PartKind::Zero,
                    // In a materialization's target, which holds the base.
                    BlockState::Base if copied => PartKind::Data,
                    BlockState::Base => {
                        let id = self.chunk_id(store, chunk_index)?;
                        if id.is_zero() {
                            PartKind::Zero
                        } else {
                            let len = geometry.chunk_len(chunk_index).ok_or_else(|| {
                                Error::new(ErrorKind::Invalid, "read past the last chunk")
                            })?;
                            PartKind::Base {
                                id,
                                len,
                                chunk_index,
                                start_in_chunk: (run.start - chunk_index * chunk_size) as usize,
                            }
                        }
                    }
                };
                match parts.last_mut() {
                    // Overlay blocks (or zeroes) across a chunk's end are one
                    // part: one read of the file for a sequential reader's
                    // whole request, not one per chunk.
                    Some(last)
                        if last.end == run.start
                            && kind == last.kind
                            && matches!(kind, PartKind::Data | PartKind::Zero) =>
                    {
                        last.end = run.end;
                    }
                    _ => parts.push(Part {
                        start: run.start,
                        end: run.end,
                        kind,
                    }),
                }
            }
            position = piece_end;
        }
        Ok(parts)
    }

    /// `start..end` (inside one chunk) cut into runs of one block state.
    pub(super) fn runs(&self, start: u64, end: u64) -> Vec<Run> {
        let Some(overlay) = self.overlay.as_ref().filter(|overlay| {
            overlay.any_mapped(start / BLOCK, (end - 1) / BLOCK - start / BLOCK + 1)
        }) else {
            return vec![Run {
                state: BlockState::Base,
                start,
                end,
            }];
        };
        let mut runs: Vec<Run> = Vec::new();
        let mut position = start;
        while position < end {
            let block = position / BLOCK;
            let block_end = ((block + 1) * BLOCK).min(end);
            let state = overlay.state(block);
            match runs.last_mut() {
                Some(last) if last.state == state => last.end = block_end,
                _ => runs.push(Run {
                    state,
                    start: position,
                    end: block_end,
                }),
            }
            position = block_end;
        }
        runs
    }

    /// The chunks after byte `from` that a sequential reader will want from
    /// the store and that no readahead asked for yet: not copied to a
    /// materialization's target, not written over in the overlay, not zero.
    fn chunks_ahead(
        &mut self,
        store: &Store,
        geometry: Geometry,
        from: u64,
    ) -> Result<Vec<(ChunkId, u32)>, Error> {
        let chunk_size = u64::from(geometry.chunk_size_bytes());
        let window = from.div_ceil(chunk_size);
        let last = (window + READAHEAD_CHUNKS).min(geometry.chunk_count());
        let asked = self.ahead_end / chunk_size;
        let first = if asked > last + READAHEAD_CHUNKS {
            // The reader went back: what was asked for is far ahead.
            self.ahead_end = last * chunk_size;
            window
        } else {
            // Asked for already up to `asked`.
            self.ahead_end = asked.max(last) * chunk_size;
            asked.clamp(window, last)
        };
        let mut out = Vec::new();
        for chunk_index in first..last {
            let Some(len) = geometry.chunk_len(chunk_index) else {
                break;
            };
            if self.copied.as_ref().is_some_and(|c| c.has(chunk_index)) {
                continue;
            }
            let first_block = chunk_index * chunk_size / BLOCK;
            let blocks = u64::from(len).div_ceil(BLOCK);
            if self
                .overlay
                .as_ref()
                .is_some_and(|overlay| overlay.all_mapped(first_block, blocks))
            {
                continue;
            }
            let id = self.chunk_id(store, chunk_index)?;
            if !id.is_zero() {
                out.push((id, len));
            }
        }
        Ok(out)
    }
}

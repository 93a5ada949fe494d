//! An open launch volume: reads and writes by byte range over a launch's
//! chunk ids, with index pages and decoded chunks cached in memory, and the
//! flush that stores what changed and moves the launch's head (see
//! `launch.rs` for the guarantees).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use blockrep_core::{CHUNKS_PER_PAGE, ChunkId, Geometry, MachineRoot, Page, Root, VolumeName};

use crate::blobs::{BlobKind, StoredCodec};
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::store::Store;

use super::LaunchInfo;

/// Decoded chunks a volume keeps, so reading a chunk in small pieces decodes it
/// once, and a partial write that follows a read needs no second decode.
const CACHE_CHUNKS: usize = 4;
/// Index pages without unflushed changes that an open launch volume keeps in
/// memory (least recently used beyond that are dropped and read again from the
/// flushed root when needed). A page holds 1024 chunk ids, 32 KiB, so this is
/// 8 MiB per open volume and covers 16 GiB of disk at 64 KiB chunks: a client
/// that reads a whole volume cannot make the server hold its whole index.
/// Pages with unflushed writes are kept until the flush, since they exist
/// nowhere else; they grow with what a client writes between flushes (32 bytes
/// per written chunk, a 32 KiB page at most per 1024 chunks).
pub const LAUNCH_PAGES_CACHED_MAX: usize = 256;

/// A launch opened for I/O. Every method takes `&self`; one mutex serializes the
/// volume's operations. Offsets and lengths are in bytes and need no alignment.
///
/// Writes are visible to reads at once and become durable with
/// [`LaunchVolume::flush`]; a volume dropped without a flush loses its unflushed
/// writes, exactly as a crash would.
pub struct LaunchVolume {
    store: Arc<Store>,
    geometry: Geometry,
    /// The volume's name in the launch's machine root; `None` when the launch
    /// is of a single disk (its head names the disk root itself).
    volume: Option<VolumeName>,
    /// Its key among the catalog's open launches.
    key: String,
    state: Mutex<VolumeState>,
}

pub(super) struct VolumeState {
    /// The launch as of the last flush.
    info: LaunchInfo,
    /// The root of the last flush: where unloaded pages are read from.
    root: Root,
    /// Index pages in memory (by page index), with any unflushed changes: the
    /// dirty ones, and at most `clean_pages_max` clean ones.
    pages: HashMap<usize, Vec<ChunkId>>,
    /// When each page in `pages` was last used (a tick of `use_clock`), to
    /// drop the least recently used clean page first.
    page_used: HashMap<usize, u64>,
    /// Counts page uses.
    use_clock: u64,
    /// Clean pages kept; [`LAUNCH_PAGES_CACHED_MAX`] unless a test lowers it.
    clean_pages_max: usize,
    /// Pages whose ids changed since the last flush.
    dirty_pages: BTreeSet<usize>,
    /// The last decoded chunks, most recent first; keyed by id, so never stale.
    cache: VecDeque<(ChunkId, Arc<[u8]>)>,
    /// zstd level 1, as the agent uses; `None` if it could not be set up.
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// The data key of an encrypted source: written chunks get stored ids
    /// and every blob of the launch is sealed, as the source's are.
    sealer: Option<Arc<blockrep_keys::Sealer>>,
    /// The source's id space: written chunks are named in it.
    space: blockrep_core::IdSpace,
    /// Chunk blobs read from the store (cache misses), for tests and debugging.
    pub(super) chunk_reads: u64,
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

/// The part of one chunk that a byte range covers.
#[derive(Debug, Clone, Copy)]
struct Piece {
    chunk_index: u64,
    start_in_chunk: usize,
    len: usize,
    /// Offset of the piece from the start of the range.
    start_in_range: u64,
}

/// Splits `offset..offset + len` (already checked against the disk size) at chunk
/// boundaries.
fn pieces(geometry: Geometry, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let chunk_size = u64::from(geometry.chunk_size_bytes());
    let end = offset + len;
    let mut position = offset;
    std::iter::from_fn(move || {
        if position >= end {
            return None;
        }
        let start_in_chunk = position % chunk_size;
        let piece_len = (chunk_size - start_in_chunk).min(end - position);
        let piece = Piece {
            chunk_index: position / chunk_size,
            // Both below the chunk size, a u32.
            start_in_chunk: start_in_chunk as usize,
            len: piece_len as usize,
            start_in_range: position - offset,
        };
        position += piece_len;
        Some(piece)
    })
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

    /// The launch as of its last flush.
    pub fn info(&self) -> LaunchInfo {
        self.lock_state().info.clone()
    }

    /// This volume's root as of its last flush (of a machine's launch, the
    /// volume's own root, not the machine root `info` names).
    pub fn flushed_root(&self) -> Root {
        self.lock_state().root.clone()
    }

    /// What the volume holds in memory, for the garbage collector: the root of
    /// its last flush (where pages not loaded are read from) and the current
    /// chunk ids of every loaded page, unflushed writes included.
    pub(crate) fn ids_in_memory(&self) -> (ChunkId, Vec<ChunkId>) {
        let state = self.lock_state();
        let ids = state.pages.values().flatten().copied().collect();
        (state.root.id(), ids)
    }

    /// Index pages held in memory now: those with unflushed writes, and at
    /// most [`LAUNCH_PAGES_CACHED_MAX`] others.
    pub fn pages_in_memory(&self) -> usize {
        self.lock_state().pages.len()
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
    /// `InvalidInput` error.
    pub fn read(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset_bytes, buf.len() as u64)?;
        let mut state = self.lock_state();
        for piece in pieces(self.geometry, offset_bytes, buf.len() as u64) {
            let start = piece.start_in_range as usize;
            let out = &mut buf[start..start + piece.len];
            let id = state.chunk_id(&self.store, piece.chunk_index)?;
            if id.is_zero() {
                out.fill(0);
            } else {
                let bytes = state.chunk_bytes(&self.store, self.geometry, piece.chunk_index, id)?;
                out.copy_from_slice(&bytes[piece.start_in_chunk..piece.start_in_chunk + piece.len]);
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset_bytes`, copy-on-write per chunk. A range past the
    /// end is an `InvalidInput` error and writes nothing. If the store fails part
    /// way through a write of several chunks, some of them may have been written,
    /// as on a disk.
    pub fn write(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset_bytes, data.len() as u64)?;
        self.apply(offset_bytes, data.len() as u64, Fill::Bytes(data))
    }

    /// Writes `len_bytes` zero bytes at `offset_bytes`. Whole chunks become the
    /// reserved zero id and cost no storage.
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
        let mut state = self.lock_state();
        for piece in pieces(self.geometry, offset_bytes, len_bytes) {
            let piece_fill = match fill {
                Fill::Bytes(data) => {
                    let start = piece.start_in_range as usize;
                    Fill::Bytes(&data[start..start + piece.len])
                }
                Fill::Zeroes => Fill::Zeroes,
            };
            state.write_piece(&self.store, self.geometry, piece, piece_fill)?;
        }
        Ok(())
    }

    /// Makes every write so far durable: stores the changed index pages and the new
    /// root, syncs the store, then publishes the launch's head, with
    /// `now_unix_ms` as its flush time (the store never reads the clock).
    /// Nothing to do when nothing changed.
    pub fn flush(&self, now_unix_ms: u64) -> io::Result<()> {
        let mut state = self.lock_state();
        state.flush(
            &self.store,
            self.geometry,
            self.volume.as_ref(),
            now_unix_ms,
        )?;
        Ok(())
    }
}

impl LaunchVolume {
    /// Volume `volume` (`None`: the single disk) of launch `info`, whose
    /// flushed state is `root`, open in the catalog under `key`.
    pub(super) fn new(
        store: Arc<Store>,
        info: LaunchInfo,
        root: Root,
        volume: Option<VolumeName>,
        key: String,
    ) -> Self {
        let sealer = store.sealer_of(&info.source);
        let space = store.id_space_of(&info.source);
        Self {
            store,
            geometry: root.geometry(),
            volume,
            key,
            state: Mutex::new(VolumeState {
                info,
                root,
                pages: HashMap::new(),
                page_used: HashMap::new(),
                use_clock: 0,
                clean_pages_max: LAUNCH_PAGES_CACHED_MAX,
                dirty_pages: BTreeSet::new(),
                cache: VecDeque::with_capacity(CACHE_CHUNKS),
                compressor: zstd::bulk::Compressor::new(1).ok(),
                sealer,
                space,
                chunk_reads: 0,
            }),
        }
    }
}

impl Drop for LaunchVolume {
    fn drop(&mut self) {
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

impl VolumeState {
    /// The current ids of page `page_index`, loading them when they are not in
    /// memory (first use, or dropped since as a clean page).
    fn page_mut(&mut self, store: &Store, page_index: usize) -> Result<&mut Vec<ChunkId>, Error> {
        if !self.pages.contains_key(&page_index) {
            let ids = store.read_page(&self.root, page_index)?.ids().to_vec();
            // Room for the page about to come in, which is clean.
            self.drop_clean_pages_over(self.clean_pages_max.saturating_sub(1));
            self.pages.insert(page_index, ids);
        }
        self.use_clock += 1;
        self.page_used.insert(page_index, self.use_clock);
        Ok(self
            .pages
            .get_mut(&page_index)
            .expect("the page was loaded above"))
    }

    /// Drops least recently used clean pages until at most `limit` are left.
    /// A clean page equals the flushed root's, which is durable and which the
    /// garbage collector marks from, so dropping one loses nothing.
    fn drop_clean_pages_over(&mut self, limit: usize) {
        while self.pages.len().saturating_sub(self.dirty_pages.len()) > limit {
            let oldest = self
                .page_used
                .iter()
                .filter(|(page_index, _)| !self.dirty_pages.contains(page_index))
                .min_by_key(|(_, used)| **used)
                .map(|(page_index, _)| *page_index);
            let Some(page_index) = oldest else {
                return;
            };
            self.pages.remove(&page_index);
            self.page_used.remove(&page_index);
        }
    }

    fn chunk_id(&mut self, store: &Store, chunk_index: u64) -> Result<ChunkId, Error> {
        let (page_index, position) = page_position(chunk_index);
        Ok(self.page_mut(store, page_index)?[position])
    }

    fn set_chunk_id(&mut self, store: &Store, chunk_index: u64, id: ChunkId) -> Result<(), Error> {
        let (page_index, position) = page_position(chunk_index);
        let page = self.page_mut(store, page_index)?;
        if page[position] != id {
            page[position] = id;
            self.dirty_pages.insert(page_index);
        }
        Ok(())
    }

    /// The decoded bytes of non-zero chunk `id` at `chunk_index`, from the cache or
    /// the store (which checks the hash); the length must match the geometry.
    fn chunk_bytes(
        &mut self,
        store: &Store,
        geometry: Geometry,
        chunk_index: u64,
        id: ChunkId,
    ) -> Result<Arc<[u8]>, Error> {
        if let Some(position) = self.cache.iter().position(|(cached, _)| *cached == id) {
            let entry = self.cache.remove(position).expect("position is in range");
            let bytes = Arc::clone(&entry.1);
            self.cache.push_front(entry);
            return Ok(bytes);
        }
        let bytes: Arc<[u8]> = store.read_blob(&id)?.into();
        self.chunk_reads += 1;
        if geometry.chunk_len(chunk_index) != Some(bytes.len() as u32) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "chunk {chunk_index} ({id}) has {} bytes, the geometry says otherwise",
                    bytes.len()
                ),
            ));
        }
        self.remember(id, Arc::clone(&bytes));
        Ok(bytes)
    }

    fn remember(&mut self, id: ChunkId, bytes: Arc<[u8]>) {
        self.cache.retain(|(cached, _)| *cached != id);
        if self.cache.len() == CACHE_CHUNKS {
            self.cache.pop_back();
        }
        self.cache.push_front((id, bytes));
    }

    /// Copy-on-write of one piece: the chunk's new content gets its own id and
    /// blob; the old blob (perhaps the base's) is left alone.
    fn write_piece(
        &mut self,
        store: &Store,
        geometry: Geometry,
        piece: Piece,
        fill: Fill<'_>,
    ) -> Result<(), Error> {
        let chunk_len = geometry
            .chunk_len(piece.chunk_index)
            .ok_or_else(|| Error::new(ErrorKind::Invalid, "write past the last chunk"))?
            as usize;
        let whole = piece.start_in_chunk == 0 && piece.len == chunk_len;
        let current = self.chunk_id(store, piece.chunk_index)?;
        let new_id = match fill {
            Fill::Zeroes if whole || current.is_zero() => ChunkId::ZERO,
            _ => {
                let mut bytes = if whole {
                    Vec::new()
                } else if current.is_zero() {
                    vec![0u8; chunk_len]
                } else {
                    self.chunk_bytes(store, geometry, piece.chunk_index, current)?
                        .to_vec()
                };
                match fill {
                    Fill::Bytes(data) if whole => bytes = data.to_vec(),
                    Fill::Bytes(data) => bytes
                        [piece.start_in_chunk..piece.start_in_chunk + piece.len]
                        .copy_from_slice(data),
                    Fill::Zeroes => {
                        bytes[piece.start_in_chunk..piece.start_in_chunk + piece.len].fill(0);
                    }
                }
                let id = self.space.hash_chunk(&bytes);
                if !id.is_zero() {
                    self.store_chunk(store, id, &bytes)?;
                    self.remember(id, bytes.into());
                }
                id
            }
        };
        self.set_chunk_id(store, piece.chunk_index, new_id)
    }

    /// Stores a chunk blob unless the store has it, zstd-compressed when that
    /// saves more than an eighth (as the agent does).
    fn store_chunk(&mut self, store: &Store, id: ChunkId, bytes: &[u8]) -> Result<(), Error> {
        if store.contains(&id) {
            return Ok(());
        }
        let raw_len = u32::try_from(bytes.len())
            .map_err(|_| Error::new(ErrorKind::Invalid, "chunk too large"))?;
        let compressed = self
            .compressor
            .as_mut()
            .and_then(|compressor| compressor.compress(bytes).ok())
            .filter(|compressed| compressed.len() < bytes.len() - bytes.len() / 8);
        let (codec, stored) = match &compressed {
            Some(compressed) => (StoredCodec::Zstd, compressed.as_slice()),
            None => (StoredCodec::Raw, bytes),
        };
        match &self.sealer {
            Some(sealer) => store.insert_sealed(sealer, id, codec, raw_len, stored)?,
            None => store.insert(BlobKind::Chunk, id, codec, raw_len, stored)?,
        };
        Ok(())
    }

    fn flush(
        &mut self,
        store: &Store,
        geometry: Geometry,
        volume: Option<&VolumeName>,
        now_unix_ms: u64,
    ) -> Result<(), Error> {
        if self.dirty_pages.is_empty() {
            return Ok(());
        }
        let mut page_ids = self.root.page_ids().to_vec();
        let mut dirty = Vec::with_capacity(self.dirty_pages.len());
        for &page_index in &self.dirty_pages {
            let ids = self.pages.get(&page_index).ok_or_else(|| {
                Error::new(ErrorKind::Invalid, "a dirty index page is not loaded")
            })?;
            let page = Page::new(ids.clone());
            // Encoded and hashed once: the id goes into the root, the bytes
            // into the store.
            let encoded = page.encode_with_id();
            page_ids[page_index] = encoded.as_ref().map_or(ChunkId::ZERO, |(_, id)| *id);
            dirty.push((page, encoded));
        }
        let root = Root::from_page_ids(geometry, page_ids)
            .map_err(|e| Error::new(ErrorKind::Invalid, format!("launch root: {e}")))?;
        let root_id = root.id();
        // The GC fence, held until the head is published; the ids the new root
        // adds are recorded for a running collection and checked to be stored
        // (see `gc.rs`). Pages not dirty are those of the flushed root.
        let _fence = store.blobs.fence().read_fence();
        store.blobs.fence().note(&root_id);
        for (page, encoded) in &dirty {
            if let Some((_, id)) = encoded {
                store.blobs.fence().note(id);
            }
            store.blobs.fence().note_all(page.ids());
        }
        for (page, encoded) in &dirty {
            if let Some((bytes, id)) = encoded {
                store
                    .blobs
                    .put_index_blob(BlobKind::Page, *id, bytes, self.sealer.as_deref())?;
            }
            store.blobs.require_present("launch flush", page.ids())?;
        }
        // Same geometry, so the roots differ exactly when their page ids do:
        // no need to hash the old root at every flush.
        if root.page_ids() != self.root.page_ids() {
            // Roots stay in clear, as the store's commits keep them.
            store
                .blobs
                .put_index_blob(BlobKind::Root, root_id, &root.encode(), None)?;
            match volume {
                None => {
                    // Blobs first, durably; only then the head that names them.
                    store.sync()?;
                    let mut info = self.info.clone();
                    info.root = root_id;
                    info.generation += 1;
                    info.flushed_unix_ms = now_unix_ms;
                    publish_launch_head(store, &info)?;
                    self.info = info;
                }
                Some(volume) => {
                    self.info =
                        flush_machine_head(store, &self.info.name, volume, root_id, now_unix_ms)?;
                }
            }
        }
        self.root = root;
        self.dirty_pages.clear();
        // The pages just flushed are clean now, and count against the bound.
        self.drop_clean_pages_over(self.clean_pages_max);
        Ok(())
    }
}

/// Publishes a launch's head (generation, root, flush time).
fn publish_launch_head(store: &Store, info: &LaunchInfo) -> Result<(), Error> {
    store.publish_launch_head(&store.launches_dir().join(&info.name), info)
}

/// Moves the head of machine launch `name` to a machine root in which
/// `volume`'s root is `root_id` (its pages and root already stored), leaving
/// the other volumes as the head names them now: volumes of one launch flush
/// independently, as a machine's disks do, so the head is read again under
/// the lock rather than taken from this volume's last flush. Returns the
/// launch as published.
fn flush_machine_head(
    store: &Store,
    name: &str,
    volume: &VolumeName,
    root_id: ChunkId,
    now_unix_ms: u64,
) -> Result<LaunchInfo, Error> {
    let _guard = lock(&store.catalog.launch_heads);
    let mut info = store
        .launch(name)?
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("launch {name} is gone")))?;
    let mut volumes = store.volume_roots(&info.root)?;
    let slot = volumes
        .iter_mut()
        .find(|(n, _)| n == volume)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("launch {name} lost volume {volume}"),
            )
        })?;
    slot.1 = root_id;
    let machine = MachineRoot::new(volumes)
        .map_err(|e| Error::new(ErrorKind::Corrupt, format!("launch {name}: {e}")))?;
    let machine_id = machine.id();
    store.blobs.fence().note(&machine_id);
    store
        .blobs
        .put_index_blob(BlobKind::Root, machine_id, &machine.encode(), None)?;
    // Blobs first, durably; only then the head that names them.
    store.sync()?;
    info.root = machine_id;
    info.generation += 1;
    info.flushed_unix_ms = now_unix_ms;
    publish_launch_head(store, &info)?;
    Ok(info)
}

/// Page index and position in the page of a chunk.
fn page_position(chunk_index: u64) -> (usize, usize) {
    // Chunk indices are below the geometry's chunk count, which fits in memory.
    let chunk_index = chunk_index as usize;
    (chunk_index / CHUNKS_PER_PAGE, chunk_index % CHUNKS_PER_PAGE)
}

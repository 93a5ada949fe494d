//! Launch volumes: writable copy-on-write views of a snapshot.
//!
//! A launch starts as its base snapshot's root. Writes never touch that root, the
//! snapshot or the source's head: a written chunk is patched in memory, hashed,
//! and stored as a new blob, and only the launch's own list of chunk ids changes.
//! [`LaunchVolume::flush`] stores the changed index pages and a new root, makes
//! every blob durable, and only then moves the launch's head to that root. After
//! a crash or restart the launch shows exactly its last flushed state. Launch
//! names are global (not per source).
//!
//! # Files
//!
//! `DATA/launches/NAME/` holds two files. The directory is built as
//! `DATA/launches/.NAME.tmp/` and renamed into place, so a launch exists whole or
//! not at all; deletion renames it to `.NAME.deleting` before removing it.
//!
//! `meta` is written once at creation; `head` is published atomically at
//! creation and by every flush that changed something. Their layouts are in
//! `format.rs` (`LAUNCH_META_MAGIC`, `LAUNCH_HEAD_MAGIC`).

use std::any::Any;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use blockrep_core::{
    CHUNKS_PER_PAGE, ChunkId, Consistency, Geometry, Page, Root, SourceId, hash_chunk,
};

use crate::blobs::{BlobKind, StoredCodec};
use crate::catalog::{list_names, validate_name};
use crate::error::{Error, ErrorKind};
use crate::format::{
    LAUNCH_HEAD_LEN as HEAD_LEN, LAUNCH_HEAD_MAGIC as HEAD_MAGIC, LAUNCH_META_LEN as META_LEN,
    LAUNCH_META_MAGIC as META_MAGIC, NAME_FIELD_LEN, check_record, get_name, id_at,
    label_from_byte, put_name, seal_with_crc, u64_at,
};
use crate::fsutil::{create_dir_durable, publish_atomic, read_small_file, sync_dir};
use crate::mutex::lock;
use crate::store::{Store, now_unix_ms};
use crate::vfs::Vfs;

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

/// What a launch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LaunchKind {
    /// A test launch: a drill, thrown away afterwards.
    Test = 1,
    /// The cutover launch: the volume the workload moves to.
    Cutover = 2,
}

impl LaunchKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => LaunchKind::Test,
            2 => LaunchKind::Cutover,
            _ => return None,
        })
    }
}

/// A launch: its immutable origin and its last flushed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchInfo {
    /// Name, unique in the store.
    pub name: String,
    /// Source of the base snapshot.
    pub source: SourceId,
    /// Name of the base snapshot (which may since have been deleted).
    pub snapshot: String,
    /// What the launch is for.
    pub kind: LaunchKind,
    /// Root the launch started from: the snapshot's root.
    pub base_root: ChunkId,
    /// Epoch of the base snapshot.
    pub base_epoch: u64,
    /// When the launch was created, Unix ms.
    pub created_unix_ms: u64,
    /// Root of the launch's last flushed state (`base_root` until written).
    pub root: ChunkId,
    /// Flushes that moved the root since creation.
    pub generation: u64,
    /// When `root` was flushed (the creation time for generation 0), Unix ms.
    pub flushed_unix_ms: u64,
    /// The consistency of the base root, inherited from the snapshot: what
    /// the launch started as (its own writes are the user's).
    pub consistency: Consistency,
}

impl LaunchInfo {
    fn encode_meta(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_LEN);
        out.extend_from_slice(&META_MAGIC);
        out.push(self.kind as u8);
        out.push(self.name.len() as u8);
        out.push(self.source.as_str().len() as u8);
        out.push(self.snapshot.len() as u8);
        out.push(self.consistency.to_byte());
        out.extend_from_slice(&[0; 3]);
        put_name(&mut out, &self.name);
        put_name(&mut out, self.source.as_str());
        put_name(&mut out, &self.snapshot);
        out.extend_from_slice(self.base_root.as_bytes());
        out.extend_from_slice(&self.base_epoch.to_le_bytes());
        out.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        seal_with_crc(&mut out);
        debug_assert_eq!(out.len(), META_LEN);
        out
    }

    fn encode_head(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_LEN);
        out.extend_from_slice(&HEAD_MAGIC);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(self.root.as_bytes());
        out.extend_from_slice(&self.flushed_unix_ms.to_le_bytes());
        seal_with_crc(&mut out);
        debug_assert_eq!(out.len(), HEAD_LEN);
        out
    }

    fn decode(meta: &[u8], head: &[u8]) -> Result<Self, Error> {
        check_record("launch meta file", meta, &META_MAGIC, META_LEN)?;
        check_record("launch head file", head, &HEAD_MAGIC, HEAD_LEN)?;
        let corrupt =
            |what: &str| Error::new(ErrorKind::Corrupt, format!("launch meta file: {what}"));
        if meta[13..16].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved bytes are not zero"));
        }
        let kind = LaunchKind::from_u8(meta[8]).ok_or_else(|| corrupt("unknown kind"))?;
        let name_field = |at: usize, len: u8| get_name(&meta[at..at + NAME_FIELD_LEN], len);
        let name = name_field(16, meta[9]).ok_or_else(|| corrupt("invalid launch name"))?;
        let source = name_field(80, meta[10])
            .and_then(|s| SourceId::new(&s).ok())
            .ok_or_else(|| corrupt("invalid source id"))?;
        let snapshot = name_field(144, meta[11]).ok_or_else(|| corrupt("invalid snapshot name"))?;
        Ok(Self {
            name,
            source,
            snapshot,
            kind,
            base_root: id_at(meta, 208),
            base_epoch: u64_at(meta, 240),
            created_unix_ms: u64_at(meta, 248),
            generation: u64_at(head, 8),
            root: id_at(head, 16),
            flushed_unix_ms: u64_at(head, 48),
            consistency: label_from_byte("launch meta file", meta[12])?,
        })
    }
}

impl Store {
    fn launches_dir(&self) -> PathBuf {
        self.data_dir().join("launches")
    }

    /// Creates a launch named `launch_name` from snapshot `snapshot_name` of
    /// `source`. O(1) in the disk size: the launch starts as the snapshot's root.
    /// Fails with `NotFound` when the snapshot does not exist, `AlreadyExists` when
    /// the launch name is taken, `Invalid` for a bad name.
    pub fn create_launch(
        &self,
        source: &SourceId,
        snapshot_name: &str,
        launch_name: &str,
        kind: LaunchKind,
    ) -> Result<LaunchInfo, Error> {
        self.check_writable()?;
        validate_name("launch", launch_name)?;
        let _guard = lock(&self.catalog.lock);
        let snapshot = self.snapshot(source, snapshot_name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("source {source} has no snapshot named {snapshot_name}"),
            )
        })?;
        if self.launch(launch_name)?.is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a launch named {launch_name} already exists"),
            ));
        }
        // The base must be readable now, not at the first read of the volume.
        self.read_root(&snapshot.root)?;
        let created_unix_ms = now_unix_ms();
        let info = LaunchInfo {
            name: launch_name.to_owned(),
            source: source.clone(),
            snapshot: snapshot.name,
            kind,
            base_root: snapshot.root,
            base_epoch: snapshot.epoch,
            created_unix_ms,
            root: snapshot.root,
            generation: 0,
            flushed_unix_ms: created_unix_ms,
            consistency: snapshot.consistency,
        };
        let launches = self.launches_dir();
        let vfs = self.vfs();
        create_dir_durable(vfs, &launches)?;
        let building = launches.join(format!(".{launch_name}.tmp"));
        remove_leftover(vfs, &building)?;
        create_dir_durable(vfs, &building)?;
        publish_atomic(vfs, &building.join("meta"), &info.encode_meta())?;
        publish_atomic(vfs, &building.join("head"), &info.encode_head())?;
        let path = launches.join(launch_name);
        vfs.rename(&building, &path)
            .map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))?;
        sync_dir(vfs, &launches)?;
        Ok(info)
    }

    /// The launch `name`, if it exists.
    pub fn launch(&self, name: &str) -> Result<Option<LaunchInfo>, Error> {
        validate_name("launch", name)?;
        let dir = self.launches_dir().join(name);
        let Some(meta) = read_small_file(self.vfs(), &dir.join("meta"), META_LEN)? else {
            return Ok(None);
        };
        let head = read_small_file(self.vfs(), &dir.join("head"), HEAD_LEN)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("launch {name} has a meta file but no head"),
            )
        })?;
        let info = LaunchInfo::decode(&meta, &head)
            .map_err(|e| Error::new(e.kind(), format!("launch {name}: {e}")))?;
        if info.name != name {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{} records another launch", dir.display()),
            ));
        }
        Ok(Some(info))
    }

    /// Launches of one source, or all of them, ordered by name.
    pub fn list_launches(&self, source: Option<&SourceId>) -> Result<Vec<LaunchInfo>, Error> {
        let mut out = Vec::new();
        for name in list_names(self.vfs(), &self.launches_dir())? {
            // Deleted between listing and reading: not an error.
            if let Some(info) = self.launch(&name)?
                && source.is_none_or(|s| *s == info.source)
            {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Deletes a launch and everything it wrote (its blobs become garbage). Fails
    /// with `Busy` while a volume of it is open, `NotFound` when it does not exist.
    pub fn delete_launch(&self, name: &str) -> Result<(), Error> {
        self.check_writable()?;
        validate_name("launch", name)?;
        let _guard = lock(&self.catalog.lock);
        let open = lock(&self.catalog.open_launches)
            .get(name)
            .is_some_and(|volume| volume.strong_count() > 0);
        if open {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("launch {name} is open; close it before deleting it"),
            ));
        }
        if self.launch(name)?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no launch named {name}"),
            ));
        }
        let launches = self.launches_dir();
        let path = launches.join(name);
        let doomed = launches.join(format!(".{name}.deleting"));
        let vfs = self.vfs();
        remove_leftover(vfs, &doomed)?;
        vfs.rename(&path, &doomed)
            .map_err(|e| Error::io(format!("cannot rename {}", path.display()), e))?;
        sync_dir(vfs, &launches)?;
        remove_leftover(vfs, &doomed)
    }

    /// Opens a launch for reading and writing (reading only, on a store opened
    /// read-only). A launch already open in this
    /// process is shared: every caller gets the same volume, so writes are never
    /// split between two volumes that would overwrite each other's flushes.
    pub fn open_launch(self: &Arc<Self>, name: &str) -> Result<Arc<LaunchVolume>, Error> {
        validate_name("launch", name)?;
        let _guard = lock(&self.catalog.lock);
        let mut open = lock(&self.catalog.open_launches);
        if let Some(volume) = open.get(name).and_then(upgrade) {
            return Ok(volume);
        }
        let info = self
            .launch(name)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no launch named {name}")))?;
        let root = self.read_root(&info.root)?;
        let volume = Arc::new(LaunchVolume {
            store: Arc::clone(self),
            geometry: root.geometry(),
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
                chunk_reads: 0,
            }),
        });
        let erased: Arc<dyn Any + Send + Sync> = volume.clone();
        open.insert(name.to_owned(), Arc::downgrade(&erased));
        Ok(volume)
    }
}

/// Removes a directory left by an interrupted create or delete, if any.
fn remove_leftover(vfs: &dyn Vfs, dir: &std::path::Path) -> Result<(), Error> {
    match vfs.remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", dir.display()), e)),
    }
}

/// A launch opened for I/O. Every method takes `&self`; one mutex serializes the
/// volume's operations. Offsets and lengths are in bytes and need no alignment.
///
/// Writes are visible to reads at once and become durable with
/// [`LaunchVolume::flush`]; a volume dropped without a flush loses its unflushed
/// writes, exactly as a crash would.
pub struct LaunchVolume {
    store: Arc<Store>,
    geometry: Geometry,
    state: Mutex<VolumeState>,
}

struct VolumeState {
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
    /// Chunk blobs read from the store (cache misses), for tests and debugging.
    chunk_reads: u64,
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
    fn lock_state(&self) -> MutexGuard<'_, VolumeState> {
        lock(&self.state)
    }

    /// The launch as of its last flush.
    pub fn info(&self) -> LaunchInfo {
        self.lock_state().info.clone()
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
    /// root, syncs the store, then publishes the launch's head. Nothing to do when
    /// nothing changed.
    pub fn flush(&self) -> io::Result<()> {
        let mut state = self.lock_state();
        state.flush(&self.store, self.geometry)?;
        Ok(())
    }
}

/// The volume behind an entry of the catalog's open launches, if it is
/// still open (the catalog holds volumes without their type).
fn upgrade(entry: &Weak<dyn Any + Send + Sync>) -> Option<Arc<LaunchVolume>> {
    entry.upgrade()?.downcast::<LaunchVolume>().ok()
}

impl Store {
    /// Launch volumes open in this process.
    pub(crate) fn open_launch_volumes(&self) -> Vec<Arc<LaunchVolume>> {
        lock(&self.catalog.open_launches)
            .values()
            .filter_map(upgrade)
            .collect()
    }
}

impl Drop for LaunchVolume {
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let name = &state.info.name;
        let mut open = lock(&self.store.catalog.open_launches);
        // The launch may have been opened again since this volume's last handle
        // went; only a dead entry is ours to remove.
        if open
            .get(name)
            .is_some_and(|volume| volume.strong_count() == 0)
        {
            open.remove(name);
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
                let id = hash_chunk(&bytes);
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
        match compressed {
            Some(compressed) => {
                store.insert(BlobKind::Chunk, id, StoredCodec::Zstd, raw_len, &compressed)?
            }
            None => store.insert(BlobKind::Chunk, id, StoredCodec::Raw, raw_len, bytes)?,
        };
        Ok(())
    }

    fn flush(&mut self, store: &Store, geometry: Geometry) -> Result<(), Error> {
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
                store.blobs.put_index_blob(BlobKind::Page, *id, bytes)?;
            }
            store.blobs.require_present("launch flush", page.ids())?;
        }
        if root_id != self.info.root {
            store
                .blobs
                .put_index_blob(BlobKind::Root, root_id, &root.encode())?;
            // Blobs first, durably; only then the head that names them.
            store.sync()?;
            let mut info = self.info.clone();
            info.root = root_id;
            info.generation += 1;
            info.flushed_unix_ms = now_unix_ms();
            let path = store.launches_dir().join(&info.name).join("head");
            publish_atomic(store.vfs(), &path, &info.encode_head())?;
            self.info = info;
        }
        self.root = root;
        self.dirty_pages.clear();
        // The pages just flushed are clean now, and count against the bound.
        self.drop_clean_pages_over(self.clean_pages_max);
        Ok(())
    }
}

/// Page index and position in the page of a chunk.
fn page_position(chunk_index: u64) -> (usize, usize) {
    // Chunk indices are below the geometry's chunk count, which fits in memory.
    let chunk_index = chunk_index as usize;
    (chunk_index / CHUNKS_PER_PAGE, chunk_index % CHUNKS_PER_PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{commit_disk, pack_bytes, sample_disk, source};
    use proptest::prelude::*;
    use std::fs;
    use std::path::Path;

    const CHUNK: u64 = 4096;
    /// Ten whole chunks and a short last one.
    const DISK_LEN: u64 = 10 * CHUNK + 777;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Arc<Store>,
        disk: Vec<u8>,
    }

    /// A store with one committed source, a snapshot "base" of it and a test
    /// launch "drill" from that snapshot.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let geometry = Geometry::new(DISK_LEN, CHUNK as u32).unwrap();
        let disk = sample_disk(DISK_LEN as usize, 3);
        commit_disk(&store, &source(), &disk, geometry, 1);
        store
            .create_snapshot(&source(), Some("base"), None, 1)
            .unwrap();
        store
            .create_launch(&source(), "base", "drill", LaunchKind::Test)
            .unwrap();
        Fixture { dir, store, disk }
    }

    fn read_all(volume: &LaunchVolume) -> Vec<u8> {
        let mut out = vec![0xaa; volume.size_bytes() as usize];
        volume.read(0, &mut out).unwrap();
        out
    }

    fn reopen(dir: &Path) -> Arc<Store> {
        Arc::new(Store::open(dir).unwrap())
    }

    #[test]
    fn records_round_trip_and_detect_damage() {
        let info = LaunchInfo {
            name: "cut".into(),
            source: source(),
            snapshot: "cutover-3-99".into(),
            kind: LaunchKind::Cutover,
            base_root: ChunkId([1; 32]),
            base_epoch: 3,
            created_unix_ms: 99,
            root: ChunkId([2; 32]),
            generation: 5,
            flushed_unix_ms: 100,
            consistency: Consistency::CrashConsistent,
        };
        let (meta, head) = (info.encode_meta(), info.encode_head());
        assert_eq!((meta.len(), head.len()), (META_LEN, HEAD_LEN));
        assert_eq!(LaunchInfo::decode(&meta, &head).unwrap(), info);
        for i in 0..meta.len() {
            let mut damaged = meta.clone();
            damaged[i] ^= 0x01;
            assert!(
                LaunchInfo::decode(&damaged, &head).is_err(),
                "meta flip at {i}"
            );
        }
        for i in 0..head.len() {
            let mut damaged = head.clone();
            damaged[i] ^= 0x01;
            assert!(
                LaunchInfo::decode(&meta, &damaged).is_err(),
                "head flip at {i}"
            );
        }
    }

    #[test]
    fn create_list_delete() {
        let f = fixture();
        let snapshot = f.store.snapshot(&source(), "base").unwrap().unwrap();
        let drill = f.store.launch("drill").unwrap().unwrap();
        assert_eq!(drill.base_root, snapshot.root);
        assert_eq!(drill.root, snapshot.root);
        assert_eq!((drill.generation, drill.base_epoch), (0, 1));
        assert_eq!(drill.snapshot, "base");
        let cut = f
            .store
            .create_launch(&source(), "base", "cut", LaunchKind::Cutover)
            .unwrap();
        assert_eq!(cut.kind, LaunchKind::Cutover);
        assert_eq!(
            f.store.list_launches(None).unwrap(),
            vec![cut.clone(), drill.clone()]
        );
        assert_eq!(f.store.list_launches(Some(&source())).unwrap().len(), 2);
        let other = SourceId::new("other").unwrap();
        assert!(f.store.list_launches(Some(&other)).unwrap().is_empty());

        let kind_of = |r: Result<LaunchInfo, Error>| r.unwrap_err().kind();
        assert_eq!(
            kind_of(
                f.store
                    .create_launch(&source(), "base", "drill", LaunchKind::Test)
            ),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            kind_of(
                f.store
                    .create_launch(&source(), "gone", "x", LaunchKind::Test)
            ),
            ErrorKind::NotFound
        );
        for bad in ["", "../x", ".x", "A", "a/b"] {
            assert_eq!(
                kind_of(
                    f.store
                        .create_launch(&source(), "base", bad, LaunchKind::Test)
                ),
                ErrorKind::Invalid,
                "{bad:?}"
            );
        }

        // A launch outlives its snapshot: it records the root itself.
        f.store.delete_snapshot(&source(), "base").unwrap();
        let volume = f.store.open_launch("cut").unwrap();
        assert_eq!(read_all(&volume), f.disk);
        assert_eq!(
            f.store.delete_launch("cut").unwrap_err().kind(),
            ErrorKind::Busy
        );
        drop(volume);
        f.store.delete_launch("cut").unwrap();
        assert_eq!(
            f.store.delete_launch("cut").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(f.store.list_launches(None).unwrap(), vec![drill]);
        let entries: Vec<_> = fs::read_dir(f.dir.path().join("launches"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec!["drill"], "no leftovers of create or delete");
    }

    #[test]
    fn a_launch_open_twice_is_one_volume() {
        let f = fixture();
        let a = f.store.open_launch("drill").unwrap();
        let b = f.store.open_launch("drill").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = f.store.open_launch("drill").unwrap();
        assert_eq!(read_all(&c), f.disk);
        assert_eq!(
            f.store.open_launch("nope").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        fn shareable<T: Send + Sync>(_: &T) {}
        shareable(&c);
    }

    #[test]
    fn unaligned_writes_match_a_model() {
        let f = fixture();
        let volume = f.store.open_launch("drill").unwrap();
        assert_eq!(volume.size_bytes(), DISK_LEN);
        let mut model = f.disk.clone();
        let writes: &[(u64, usize)] = &[
            (0, 1),                                   // first byte
            (4095, 2),                                // across the first boundary
            (3 * CHUNK - 7, 2 * CHUNK as usize + 19), // three chunks, both ends partial
            (5 * CHUNK, CHUNK as usize),              // exactly one chunk
            (DISK_LEN - 1000, 1000),                  // into and through the short last chunk
            (DISK_LEN - 1, 1),                        // the very last byte
            (10 * CHUNK + 5, 3),                      // inside the short last chunk
            (6 * CHUNK + 100, 0),                     // empty
        ];
        for (i, &(offset, len)) in writes.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13 + 1) as u8 | 1).collect();
            volume.write(offset, &data).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            assert_eq!(read_all(&volume), model, "after write {i}");
        }
        volume.write_zeroes(2 * CHUNK + 1, CHUNK + 3).unwrap();
        model[2 * CHUNK as usize + 1..3 * CHUNK as usize + 4].fill(0);
        volume.trim(7 * CHUNK, 2 * CHUNK).unwrap();
        model[7 * CHUNK as usize..9 * CHUNK as usize].fill(0);
        assert_eq!(read_all(&volume), model);
        // Reads at odd offsets and lengths too.
        for &(offset, len) in &[(1u64, 5000usize), (4095, 1), (DISK_LEN - 778, 778), (9, 0)] {
            let mut buf = vec![0u8; len];
            volume.read(offset, &mut buf).unwrap();
            assert_eq!(buf, &model[offset as usize..offset as usize + len]);
        }
        volume.flush().unwrap();
        assert_eq!(read_all(&volume), model);
        drop(volume);
        let store = reopen(f.dir.path());
        assert_eq!(read_all(&store.open_launch("drill").unwrap()), model);
    }

    #[test]
    fn out_of_range_is_invalid_input() {
        let f = fixture();
        let volume = f.store.open_launch("drill").unwrap();
        let invalid = |r: io::Result<()>| r.unwrap_err().kind() == io::ErrorKind::InvalidInput;
        let mut buf = [0u8; 2];
        assert!(invalid(volume.read(DISK_LEN - 1, &mut buf)));
        assert!(invalid(volume.read(DISK_LEN + 1, &mut [])));
        assert!(invalid(volume.read(u64::MAX, &mut buf)));
        assert!(invalid(volume.write(DISK_LEN - 1, &[1, 2])));
        assert!(invalid(volume.write(u64::MAX - 1, &[1, 2, 3])));
        assert!(invalid(volume.write_zeroes(0, DISK_LEN + 1)));
        assert!(invalid(volume.trim(u64::MAX, u64::MAX)));
        volume.read(DISK_LEN, &mut []).unwrap();
        volume.write(DISK_LEN - 2, &[1, 2]).unwrap();
        // The failed writes changed nothing.
        let mut model = f.disk.clone();
        model[DISK_LEN as usize - 2..].copy_from_slice(&[1, 2]);
        assert_eq!(read_all(&volume), model);
    }

    #[test]
    fn flushed_writes_survive_a_restart_and_unflushed_ones_do_not() {
        let f = fixture();
        let mut model = f.disk.clone();
        {
            let volume = f.store.open_launch("drill").unwrap();
            volume.write(100, b"flushed").unwrap();
            model[100..107].copy_from_slice(b"flushed");
            volume.flush().unwrap();
            assert_eq!(volume.info().generation, 1);
            volume.write(5000, b"lost").unwrap();
            volume.write_zeroes(0, CHUNK).unwrap();
            // Dropped without a flush: as if the server had crashed.
        }
        let store = reopen(f.dir.path());
        let volume = store.open_launch("drill").unwrap();
        assert_eq!(read_all(&volume), model);
        let info = volume.info();
        assert_eq!(info.generation, 1);
        assert_eq!(store.launch("drill").unwrap().unwrap(), info);
        // A flush with nothing written moves nothing.
        volume.flush().unwrap();
        assert_eq!(volume.info(), info);
        // Writing back what is there changes no root either.
        volume.write(100, b"flushed").unwrap();
        volume.flush().unwrap();
        assert_eq!(volume.info(), info);
    }

    #[test]
    fn launch_writes_never_change_the_base() {
        let f = fixture();
        let head_before = f.store.head(&source()).unwrap().unwrap();
        let snapshot_before = f.store.snapshot(&source(), "base").unwrap().unwrap();
        let snapshot_file = f
            .dir
            .path()
            .join("sources")
            .join(source().as_str())
            .join("snapshots")
            .join("base");
        let head_file = f
            .dir
            .path()
            .join("sources")
            .join(source().as_str())
            .join("head");
        let files_before = (
            fs::read(&snapshot_file).unwrap(),
            fs::read(&head_file).unwrap(),
        );

        let volume = f.store.open_launch("drill").unwrap();
        volume.write(0, &vec![0x5a; DISK_LEN as usize]).unwrap();
        volume.write_zeroes(CHUNK, 3 * CHUNK).unwrap();
        volume.flush().unwrap();
        let own_root = volume.info().root;
        assert_ne!(own_root, snapshot_before.root);

        assert_eq!(f.store.head(&source()).unwrap().unwrap(), head_before);
        assert_eq!(
            f.store.snapshot(&source(), "base").unwrap().unwrap(),
            snapshot_before
        );
        assert_eq!(
            (
                fs::read(&snapshot_file).unwrap(),
                fs::read(&head_file).unwrap()
            ),
            files_before
        );
        let out = f.dir.path().join("export.raw");
        f.store.export(&source(), &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), f.disk);
        // A second launch of the same snapshot still starts from the base.
        f.store
            .create_launch(&source(), "base", "second", LaunchKind::Test)
            .unwrap();
        assert_eq!(read_all(&f.store.open_launch("second").unwrap()), f.disk);

        let roots = f.store.referenced_roots().unwrap();
        let mut expected = vec![head_before.root, own_root];
        expected.sort();
        assert_eq!(
            roots, expected,
            "head = snapshot = bases, plus the launch's own"
        );
    }

    #[test]
    fn sequential_small_reads_decode_a_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let geometry = Geometry::new(4 << 16, 1 << 16).unwrap();
        let disk: Vec<u8> = (0..4usize << 16).map(|i| (i % 251) as u8 + 1).collect();
        commit_disk(&store, &source(), &disk, geometry, 1);
        store
            .create_snapshot(&source(), Some("s"), None, 1)
            .unwrap();
        store
            .create_launch(&source(), "s", "l", LaunchKind::Test)
            .unwrap();
        let volume = store.open_launch("l").unwrap();
        let mut piece = [0u8; 4096];
        for offset in (0..2 << 16).step_by(4096) {
            volume.read(offset as u64, &mut piece).unwrap();
            assert_eq!(piece, disk[offset..offset + 4096]);
        }
        assert_eq!(volume.lock_state().chunk_reads, 2);
        // A partial write after a read reuses the decoded chunk too.
        volume.write(70_000, b"patch").unwrap();
        assert_eq!(volume.lock_state().chunk_reads, 2);
    }

    #[test]
    fn written_chunks_are_compressed_when_it_pays_and_zeroes_cost_nothing() {
        let f = fixture();
        let volume = f.store.open_launch("drill").unwrap();
        let blobs = f.store.blob_count();
        volume.write_zeroes(0, 4 * CHUNK).unwrap();
        volume.write(4 * CHUNK, &vec![0u8; CHUNK as usize]).unwrap();
        assert_eq!(f.store.blob_count(), blobs, "zero chunks are never stored");
        let packs = pack_bytes(f.dir.path());
        volume
            .write(5 * CHUNK, &vec![0x11; CHUNK as usize])
            .unwrap();
        f.store.sync().unwrap();
        let grown = pack_bytes(f.dir.path()) - packs;
        assert!(
            grown < CHUNK / 8,
            "a repetitive chunk is stored compressed: {grown}"
        );
        assert_eq!(f.store.blob_count(), blobs + 1);
    }

    #[test]
    fn a_read_only_store_reads_but_refuses_writes() {
        let f = fixture();
        let reader = Arc::new(Store::open_read_only(f.dir.path()).unwrap());
        let volume = reader.open_launch("drill").unwrap();
        assert_eq!(read_all(&volume), f.disk);
        assert!(volume.write(0, b"x").is_err());
        assert!(reader.delete_launch("drill").is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, data: Vec<u8> },
        Zero { offset: u64, len: u64 },
        Read { offset: u64, len: u64 },
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Offsets cluster near chunk boundaries and the end, where bugs hide.
        let offset = prop_oneof![
            0..DISK_LEN,
            (0..=10u64, -3i64..=3).prop_map(|(chunk, delta)| {
                (chunk * CHUNK).saturating_add_signed(delta).min(DISK_LEN)
            }),
            (DISK_LEN - 800)..=DISK_LEN,
        ];
        let len = prop_oneof![0..10u64, 0..2 * CHUNK + 10, Just(CHUNK)];
        prop_oneof![
            4 => (offset.clone(), len.clone(), any::<u8>()).prop_map(|(offset, len, seed)| {
                let len = len.min(DISK_LEN - offset);
                // Mostly patterned bytes; seed 0 writes zeroes through `write`.
                let data = (0..len).map(|i| if seed == 0 { 0 } else { (i as u8) ^ seed }).collect();
                Op::Write { offset, data }
            }),
            2 => (offset.clone(), len.clone()).prop_map(|(offset, len)| Op::Zero {
                offset,
                len: len.min(DISK_LEN - offset),
            }),
            2 => (offset, len).prop_map(|(offset, len)| Op::Read {
                offset,
                len: len.min(DISK_LEN - offset),
            }),
            1 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn random_operations_match_a_model(ops in proptest::collection::vec(op(), 1..40)) {
            let f = fixture();
            let volume = f.store.open_launch("drill").unwrap();
            let mut model = f.disk.clone();
            let mut flushed = f.disk.clone();
            for op in &ops {
                match op {
                    Op::Write { offset, data } => {
                        volume.write(*offset, data).unwrap();
                        let start = *offset as usize;
                        model[start..start + data.len()].copy_from_slice(data);
                    }
                    Op::Zero { offset, len } => {
                        volume.write_zeroes(*offset, *len).unwrap();
                        model[*offset as usize..(*offset + *len) as usize].fill(0);
                    }
                    Op::Read { offset, len } => {
                        let mut buf = vec![0xee; *len as usize];
                        volume.read(*offset, &mut buf).unwrap();
                        prop_assert_eq!(&buf[..], &model[*offset as usize..(*offset + *len) as usize]);
                    }
                    Op::Flush => {
                        volume.flush().unwrap();
                        flushed.clone_from(&model);
                    }
                }
            }
            prop_assert_eq!(read_all(&volume), model);
            drop(volume);
            let store = reopen(f.dir.path());
            prop_assert_eq!(read_all(&store.open_launch("drill").unwrap()), flushed);
            let out = f.dir.path().join("export.raw");
            store.export(&source(), &out).unwrap();
            prop_assert_eq!(fs::read(&out).unwrap(), f.disk);
        }
    }
}

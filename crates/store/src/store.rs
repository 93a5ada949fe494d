//! The store proper: the blob index, the active pack, heads and export.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use blockrep_core::{CHUNKS_PER_PAGE, ChunkId, Consistency, Geometry, Page, Root, SourceId};

use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind};
use crate::fsutil::{create_dir_durable, publish_atomic, read_small_file, sync_dir};
use crate::gc::GcState;
use crate::guard::{FsyncGuard, sync_tree};
use crate::head::{HEAD_LEN, Head};
use crate::pack::{
    BlobKind, PACK_SIZE_MAX_BYTES, PackScan, RECORD_HEADER_LEN, RecordHeader, StoredCodec,
    pack_file_name, parse_pack_file_name, scan_pack,
};
use crate::pack_index;
use crate::vfs::{OpenMode, PendingSync, RealFs, Vfs, VfsFile};

/// What the index knows of one stored blob without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Chunk, page or root.
    pub kind: BlobKind,
    /// Length of the blob's decoded bytes.
    pub raw_len: u32,
}

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) pack: u32,
    pub(crate) offset: u64,
    pub(crate) header: RecordHeader,
    /// Whether the record's crc32 held when it was scanned or written.
    pub(crate) crc_ok: bool,
}

impl Location {
    /// Bytes the record takes in its pack: header and stored bytes.
    pub(crate) fn record_len_bytes(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.header.stored_len)
    }

    fn is_at(&self, other: &Location) -> bool {
        self.pack == other.pack && self.offset == other.offset
    }
}

/// What [`Store::sweep_entries`] found.
#[derive(Debug)]
pub(crate) enum Sweep {
    /// Entries still in place that are to be kept: nothing was removed.
    Keep(Vec<(ChunkId, Location)>),
    /// Nothing to keep; this many entries were removed from the index.
    Removed(u64),
}

/// What [`Store::relocate`] did.
#[derive(Debug)]
pub(crate) enum Relocation {
    /// The record was copied to the active pack and the index points at the copy.
    Moved,
    /// The index no longer points at the old record: nothing to do.
    Gone,
    /// The old record cannot be read or fails its checksum; it stays where it is.
    Unreadable(Error),
}

#[derive(Debug)]
struct ActivePack {
    number: u32,
    file: Arc<dyn VfsFile>,
    len_bytes: u64,
}

#[derive(Debug, Default)]
struct Inner {
    index: HashMap<ChunkId, Location>,
    active: Option<ActivePack>,
    last_pack: u32,
    /// Bytes appended since the last background flush was started.
    unflushed_bytes: u64,
    /// fsyncs running in the background (sealed packs, early flushes of the
    /// active pack). `sync` waits for all of them.
    background_syncs: Vec<PendingSync>,
}

/// Appended bytes after which a background fdatasync of the active pack starts,
/// so the fsync at commit finds little left to write.
const FLUSH_EVERY_BYTES: u64 = 64 * 1024 * 1024;

/// What a commit wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    /// The new head.
    pub head: Head,
    /// Index pages newly stored.
    pub pages_stored: u64,
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    /// The head that was exported.
    pub head: Head,
    /// Size of the image.
    pub disk_size_bytes: u64,
    /// Chunks written (non-zero chunks).
    pub chunks_written: u64,
}

/// A replica store in one data directory. Cheap to share behind an `Arc`; every
/// method takes `&self`.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Every file of the data directory is reached through this (see `vfs.rs`).
    vfs: Arc<dyn Vfs>,
    read_only: bool,
    /// Holds the data directory's exclusive lock while a writable store is open.
    lock_file: Option<File>,
    inner: Mutex<Inner>,
    readers: Mutex<HashMap<u32, Arc<dyn VfsFile>>>,
    /// Set once an fsync has failed. Linux may forget a write-back error after
    /// reporting it once, so a later fsync "succeeding" proves nothing: every
    /// later fsync fails (see `guard.rs`), so nothing is acknowledged until the
    /// store is reopened, which makes everything it finds durable first.
    sync_failed: Arc<std::sync::atomic::AtomicBool>,
    /// Serializes commits per source (head read-check-write).
    commit_locks: Mutex<HashMap<SourceId, Arc<Mutex<()>>>>,
    /// Snapshot and launch bookkeeping (see `catalog.rs`).
    pub(crate) catalog: Catalog,
    /// The garbage collector's fence and "touched during GC" set (see `gc.rs`).
    pub(crate) gc: GcState,
    /// Size at which the active pack is sealed; [`PACK_SIZE_MAX_BYTES`] unless a
    /// test makes packs small.
    pack_size_max_bytes: AtomicU64,
    /// Serializes the joining of background fsyncs: a `sync` that finds the list
    /// empty because a concurrent `sync` took it must still wait until those
    /// fsyncs are done before it may report the data durable.
    sync_join: Mutex<()>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a store lock is a bug in this crate; the data it guards
    // (an index of durable records) stays consistent, so carry on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens (creating if needed) the store in `dir` for writing. A torn tail of the
    /// last pack, left by a crash, is cut off.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let dir = &std::path::absolute(dir)
            .map_err(|e| Error::io(format!("cannot resolve {}", dir.display()), e))?;
        create_dir_durable(&RealFs, dir)?;
        crate::vfs::restrict_data_dir(dir).map_err(|e| {
            Error::io(
                format!("cannot restrict {} to its owner (mode 0700)", dir.display()),
                e,
            )
        })?;
        Self::open_with_vfs(dir, Arc::new(RealFs))
    }

    /// [`Store::open`] on another file system: `dir` is an absolute path in
    /// `vfs`. The crash tests open stores on a simulated disk this way.
    pub fn open_with_vfs(dir: &Path, vfs: Arc<dyn Vfs>) -> Result<Self, Error> {
        let guard = FsyncGuard::new(vfs);
        let sync_failed = guard.flag();
        let vfs: Arc<dyn Vfs> = Arc::new(guard);
        create_dir_durable(vfs.as_ref(), &dir.join("packs"))?;
        create_dir_durable(vfs.as_ref(), &dir.join("sources"))?;
        // What this open is about to trust (pack records it indexes, heads,
        // names) may be in the page cache only, if the last process saw an
        // fsync fail: make it durable before anything new builds on it.
        sync_tree(vfs.as_ref(), dir).map_err(|e| {
            Error::io(
                format!("cannot make the contents of {} durable", dir.display()),
                e,
            )
        })?;
        Self::open_inner(dir, vfs, false, sync_failed)
    }

    /// [`Store::open`], holding an exclusive lock on the data directory for as
    /// long as the store is open: the server and offline commands that write
    /// use this, so that two processes never append to the same packs.
    pub fn open_exclusive(dir: &Path) -> Result<Self, Error> {
        let dir = &std::path::absolute(dir)
            .map_err(|e| Error::io(format!("cannot resolve {}", dir.display()), e))?;
        create_dir_durable(&RealFs, dir)?;
        // One writer per data directory: a second server (or a GC run from the
        // command line) appending to the same packs would corrupt them.
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::vfs::FILE_MODE)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "{} is in use by another blockrep process (a running server?); \
                         read-only commands (export, verify, gc --dry-run) still work",
                        dir.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("cannot lock {}", lock_path.display()), e));
            }
        }
        let mut store = Self::open(dir)?;
        store.lock_file = Some(lock_file);
        Ok(store)
    }

    /// Opens an existing store without changing anything, e.g. to export while the
    /// server runs. Only committed state is read.
    pub fn open_read_only(dir: &Path) -> Result<Self, Error> {
        if !dir.join("packs").is_dir() {
            return Err(Error::new(
                ErrorKind::Missing,
                format!("{} is not a blockrep data directory", dir.display()),
            ));
        }
        Self::open_inner(dir, Arc::new(RealFs), true, Arc::default())
    }

    fn open_inner(
        dir: &Path,
        vfs: Arc<dyn Vfs>,
        read_only: bool,
        sync_failed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, Error> {
        let store = Self {
            dir: dir.to_owned(),
            vfs,
            read_only,
            inner: Mutex::new(Inner::default()),
            readers: Mutex::new(HashMap::new()),
            sync_failed,
            commit_locks: Mutex::new(HashMap::new()),
            catalog: Catalog::default(),
            gc: GcState::default(),
            pack_size_max_bytes: AtomicU64::new(PACK_SIZE_MAX_BYTES),
            sync_join: Mutex::new(()),
            lock_file: None,
        };
        store.load_index()?;
        Ok(store)
    }

    /// The data directory (absolute for a writable store).
    pub(crate) fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The file system the data directory lives on.
    pub(crate) fn vfs(&self) -> &dyn Vfs {
        self.vfs.as_ref()
    }

    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.dir.join("packs")
    }

    /// Whether the store was opened read-only.
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Makes packs seal at `bytes` instead of [`PACK_SIZE_MAX_BYTES`], so that
    /// tests of compaction get many packs from little data. Takes effect at the
    /// next append.
    #[doc(hidden)]
    pub fn set_pack_size_max_bytes(&self, bytes: u64) {
        self.pack_size_max_bytes
            .store(bytes.max(1), Ordering::Relaxed);
    }

    fn pack_size_max_bytes(&self) -> u64 {
        self.pack_size_max_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn pack_numbers(&self) -> Result<Vec<u32>, Error> {
        let dir = self.packs_dir();
        let names = self
            .vfs
            .list_dir(&dir)
            .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        let mut numbers = Vec::new();
        for name in names {
            if let Some(number) = name.to_str().and_then(parse_pack_file_name) {
                numbers.push(number);
            }
        }
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// Builds the blob index from the packs, cutting torn tails when writable.
    pub(crate) fn load_index(&self) -> Result<(), Error> {
        let numbers = self.pack_numbers()?;
        let mut inner = lock(&self.inner);
        inner.index.clear();
        let packs_dir = self.packs_dir();
        for (position, &number) in numbers.iter().enumerate() {
            let path = packs_dir.join(pack_file_name(number));
            let is_last = position + 1 == numbers.len();
            // A sealed pack's saved scan, when there is a sound one (see
            // `pack_index.rs`); the newest pack is always scanned.
            let saved = if is_last {
                None
            } else {
                pack_index::load(self.vfs(), &packs_dir, number, &path)
            };
            let scan = match saved {
                Some(scan) => scan,
                None => match scan_pack(self.vfs(), &path) {
                    Ok(scan) => {
                        if !self.read_only {
                            // What this open indexes must be durable: an fsync
                            // that failed before it may have left writes to the
                            // pack pending. Only then is its scan saved.
                            self.vfs
                                .open(&path, OpenMode::Read)
                                .and_then(|file| file.sync_all())
                                .map_err(|e| {
                                    Error::io(format!("cannot fsync {}", path.display()), e)
                                })?;
                            if !is_last {
                                self.save_pack_index(number, &scan);
                            }
                        }
                        scan
                    }
                    // Deleted by a collection since the listing (a read-only store
                    // looking at a running server): its blobs are elsewhere now.
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e),
                },
            };
            for record in &scan.records {
                let location = Location {
                    pack: number,
                    offset: record.offset,
                    header: record.header,
                    crc_ok: record.crc_ok,
                };
                // The same id twice means a compaction copied it and stopped
                // before deleting the old pack. The newer copy is kept, so that
                // the next collection finds the old pack dead and deletes it
                // without copying again; but never a damaged copy over a sound
                // one: a copy not yet fsynced when the power went may be torn
                // while the old record still holds.
                match inner.index.entry(record.header.id) {
                    Entry::Occupied(mut known) => {
                        if location.crc_ok || !known.get().crc_ok {
                            known.insert(location);
                        }
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(location);
                    }
                }
            }
            if scan.valid_len < scan.file_len && is_last && !self.read_only {
                // Only the last pack is ever appended to, so only it can have a torn
                // tail; nothing past `valid_len` was ever part of a commit.
                tracing_cut(&path, scan.valid_len, scan.file_len);
                let file = self
                    .vfs
                    .open(&path, OpenMode::ReadWrite)
                    .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
                file.set_len(scan.valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| Error::io(format!("cannot truncate {}", path.display()), e))?;
            }
            inner.last_pack = number;
        }
        drop(inner);
        if !self.read_only {
            self.remove_orphan_pack_indexes(&numbers)?;
        }
        Ok(())
    }

    /// Removes saved pack indexes whose pack is gone (a collection deletes the
    /// index first, but a crash may land the two removals in either order).
    fn remove_orphan_pack_indexes(&self, numbers: &[u32]) -> Result<(), Error> {
        let packs_dir = self.packs_dir();
        let names = self
            .vfs
            .list_dir(&packs_dir)
            .map_err(|e| Error::io(format!("cannot list {}", packs_dir.display()), e))?;
        let mut removed = false;
        for name in names {
            let Some(number) = name.to_str().and_then(pack_index::parse_index_file_name) else {
                continue;
            };
            if numbers.binary_search(&number).is_err() {
                pack_index::remove(self.vfs(), &packs_dir, number).map_err(|e| {
                    Error::io(format!("cannot remove the index of pack {number}"), e)
                })?;
                removed = true;
            }
        }
        if removed {
            sync_dir(self.vfs(), &packs_dir)?;
        }
        Ok(())
    }

    /// Saves the scan of sealed pack `number`. Failing to (a full disk) costs
    /// only a scan at the next open.
    fn save_pack_index(&self, number: u32, scan: &PackScan) {
        if let Err(e) = pack_index::save(self.vfs(), &self.packs_dir(), number, scan) {
            // Rare, and worth a line (see `tracing_cut`).
            eprintln!(
                "blockrep-store: cannot save the index of pack {number} ({e}); \
                 it will be scanned again at the next open"
            );
        }
    }

    /// Whether the store holds a sound blob with this id. While a garbage
    /// collection runs, a hit keeps the blob alive through it (the caller may
    /// go on to reference it). A record found damaged when the store opened
    /// (a torn write, or rot) is not a hit: the caller sends the bytes again
    /// and [`Store::insert`] stores a sound copy.
    pub fn contains(&self, id: &ChunkId) -> bool {
        let inner = lock(&self.inner);
        let found = inner.index.get(id).is_some_and(|at| at.crc_ok);
        if found {
            // Under the index lock, so a collector deciding to drop `id` (also
            // under it) sees the hit.
            self.gc.note(id);
        }
        found
    }

    /// The kind and decoded length of a sound stored blob, or `None` when the
    /// store holds no sound blob with this id. Read from the index alone (no
    /// I/O), so a caller can check that an id a peer names is a chunk of the
    /// length its position needs before it trusts or serves it. Like
    /// [`Store::contains`], a hit keeps the blob alive through a running GC.
    pub fn blob_info(&self, id: &ChunkId) -> Option<BlobInfo> {
        let inner = lock(&self.inner);
        let at = inner.index.get(id).filter(|at| at.crc_ok)?;
        let info = BlobInfo {
            kind: at.header.kind,
            raw_len: at.header.raw_len,
        };
        self.gc.note(id);
        Some(info)
    }

    /// Fails with `Missing` unless every non-zero id is stored.
    pub(crate) fn require_present<'a>(
        &self,
        what: &str,
        ids: impl IntoIterator<Item = &'a ChunkId>,
    ) -> Result<(), Error> {
        let inner = lock(&self.inner);
        for id in ids {
            if !id.is_zero() && !inner.index.contains_key(id) {
                return Err(Error::new(
                    ErrorKind::Missing,
                    format!("{what} names {id}, which is not stored"),
                ));
            }
        }
        Ok(())
    }

    /// Number of blobs in the index.
    pub fn blob_count(&self) -> usize {
        lock(&self.inner).index.len()
    }

    /// [`Store::insert`] of a page or root: stored as encoded, its id the blake3
    /// of `bytes`.
    pub(crate) fn insert_index_blob(
        &self,
        kind: BlobKind,
        id: ChunkId,
        bytes: &[u8],
    ) -> Result<bool, Error> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| Error::new(ErrorKind::Invalid, "index blob too large"))?;
        self.insert(kind, id, StoredCodec::Raw, len, bytes)
    }

    /// Appends a blob unless one with the same id is already stored. Returns whether
    /// it was new. The caller has verified that `id` is the blake3 of the decoded
    /// bytes. Not durable until [`Store::sync`]. A record of that id found
    /// damaged on open does not count: a sound copy is appended and replaces it.
    pub fn insert(
        &self,
        kind: BlobKind,
        id: ChunkId,
        codec: StoredCodec,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<bool, Error> {
        self.check_writable()?;
        let mut inner = lock(&self.inner);
        // Found or stored, the caller is about to reference it: a running
        // collection must keep it.
        self.gc.note(&id);
        if inner.index.get(&id).is_some_and(|at| at.crc_ok) {
            return Ok(false);
        }
        let header = RecordHeader {
            kind,
            codec,
            stored_len: u32::try_from(stored.len())
                .map_err(|_| Error::new(ErrorKind::Invalid, "blob too large"))?,
            raw_len,
            id,
            crc: 0,
        };
        let header_bytes = header.encode_with_crc(stored);
        let header = RecordHeader::decode(&header_bytes)
            .ok_or_else(|| Error::new(ErrorKind::Invalid, "blob exceeds the record limits"))?;
        let location = self.append_locked(&mut inner, &header_bytes, header, stored)?;
        inner.index.insert(id, location);
        Ok(true)
    }

    /// Appends one record to the active pack. The caller holds the index lock
    /// and updates the index.
    fn append_locked(
        &self,
        inner: &mut Inner,
        header_bytes: &[u8; RECORD_HEADER_LEN],
        header: RecordHeader,
        stored: &[u8],
    ) -> Result<Location, Error> {
        let active = self.active_pack(inner)?;
        let offset = active.len_bytes;
        let path_for_error = || self.packs_dir().join(pack_file_name(active.number));
        active
            .file
            .write_all_at(header_bytes, offset)
            .and_then(|()| {
                active
                    .file
                    .write_all_at(stored, offset + RECORD_HEADER_LEN as u64)
            })
            .map_err(|e| {
                Error::io(
                    format!("cannot append to {}", path_for_error().display()),
                    e,
                )
            })?;
        active.len_bytes = offset + RECORD_HEADER_LEN as u64 + stored.len() as u64;
        let pack = active.number;
        let file = Arc::clone(&active.file);
        inner.unflushed_bytes += (RECORD_HEADER_LEN + stored.len()) as u64;
        if inner.unflushed_bytes >= FLUSH_EVERY_BYTES {
            inner.unflushed_bytes = 0;
            inner.background_syncs.push(self.vfs.start_sync_data(file));
        }
        Ok(Location {
            pack,
            offset,
            header,
            crc_ok: true,
        })
    }

    /// Copies the record of `id` that is at `from` to the active pack, as it is
    /// (same header, same crc), then points the index at the copy. The copy is
    /// durable after the next [`Store::sync`]; until the old pack is deleted,
    /// both copies are valid.
    pub(crate) fn relocate(&self, id: &ChunkId, from: Location) -> Result<Relocation, Error> {
        let (header_bytes, stored) = match self.read_record(from) {
            Ok(record) => record,
            Err(e) => return Ok(Relocation::Unreadable(e)),
        };
        let mut inner = lock(&self.inner);
        if !inner.index.get(id).is_some_and(|at| at.is_at(&from)) {
            return Ok(Relocation::Gone);
        }
        let location = self.append_locked(&mut inner, &header_bytes, from.header, &stored)?;
        inner.index.insert(*id, location);
        Ok(Relocation::Moved)
    }

    /// Every index entry, for the collector's accounting.
    pub(crate) fn index_entries(&self) -> Vec<(ChunkId, Location)> {
        lock(&self.inner)
            .index
            .iter()
            .map(|(id, location)| (*id, *location))
            .collect()
    }

    /// Number of the newest pack: the active one, or the one that will be reused
    /// as active. Packs below it are sealed and never appended to again.
    pub(crate) fn newest_pack_number(&self) -> u32 {
        let inner = lock(&self.inner);
        inner.active.as_ref().map_or(inner.last_pack, |a| a.number)
    }

    /// Under the index lock: the entries of `candidates` that still point where
    /// they did, split by `keep`. When none is to be kept, the others are removed
    /// from the index in the same step, and their count returned.
    pub(crate) fn sweep_entries(
        &self,
        candidates: &[(ChunkId, Location)],
        keep: impl Fn(&ChunkId) -> bool,
    ) -> Sweep {
        let mut inner = lock(&self.inner);
        let present: Vec<(ChunkId, Location)> = candidates
            .iter()
            .filter(|(id, at)| inner.index.get(id).is_some_and(|now| now.is_at(at)))
            .copied()
            .collect();
        let kept: Vec<(ChunkId, Location)> =
            present.iter().filter(|(id, _)| keep(id)).copied().collect();
        if !kept.is_empty() {
            return Sweep::Keep(kept);
        }
        for (id, _) in &present {
            inner.index.remove(id);
        }
        Sweep::Removed(present.len() as u64)
    }

    /// Drops cached file handles of deleted packs (readers that hold one keep
    /// reading the unlinked file).
    pub(crate) fn forget_readers(&self, packs: &HashSet<u32>) {
        lock(&self.readers).retain(|pack, _| !packs.contains(pack));
    }

    /// The pack to append to, sealing the current one when full.
    fn active_pack<'a>(&self, inner: &'a mut Inner) -> Result<&'a mut ActivePack, Error> {
        let pack_size_max_bytes = self.pack_size_max_bytes();
        let full = inner
            .active
            .as_ref()
            .is_some_and(|a| a.len_bytes >= pack_size_max_bytes);
        if full {
            let sealed = inner.active.take().expect("checked above");
            // A sealed pack is never written again; its fsync runs in the
            // background, and `sync` waits for it before any commit.
            inner
                .background_syncs
                .push(self.vfs.start_sync_data(sealed.file));
        }
        if inner.active.is_none() {
            inner.active = Some(self.open_active(inner.last_pack)?);
            inner.last_pack = inner.active.as_ref().expect("just set").number;
        }
        Ok(inner.active.as_mut().expect("just set"))
    }

    fn open_active(&self, last_pack: u32) -> Result<ActivePack, Error> {
        if last_pack > 0 {
            let path = self.packs_dir().join(pack_file_name(last_pack));
            let file = self
                .vfs
                .open(&path, OpenMode::ReadWrite)
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
            let len_bytes = file
                .len()
                .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
            if len_bytes < self.pack_size_max_bytes() {
                return Ok(ActivePack {
                    number: last_pack,
                    file,
                    len_bytes,
                });
            }
        }
        let number = last_pack + 1;
        let path = self.packs_dir().join(pack_file_name(number));
        let file = self
            .vfs
            .open(&path, OpenMode::CreateNew)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        sync_dir(self.vfs(), &self.packs_dir())?;
        Ok(ActivePack {
            number,
            file,
            len_bytes: 0,
        })
    }

    /// Whether an fsync has failed since the store was opened: commits are then
    /// refused until it is reopened (see [`Store::sync`]).
    pub fn sync_failed(&self) -> bool {
        self.sync_failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes every blob inserted so far durable.
    pub fn sync(&self) -> Result<(), Error> {
        let file = lock(&self.inner)
            .active
            .as_ref()
            .map(|a| Arc::clone(&a.file));
        // fsyncs run outside the index lock: other sessions keep appending
        // meanwhile, and everything appended before this call is covered. The
        // join lock makes a concurrent `sync` that took the pending fsyncs first
        // finish joining them before this one goes on.
        let mut result = Ok(());
        {
            let _join = lock(&self.sync_join);
            let pending = std::mem::take(&mut lock(&self.inner).background_syncs);
            for pending_sync in pending {
                if let Err(e) = pending_sync.wait() {
                    result = Err(e);
                }
            }
        }
        if let Some(file) = file
            && let Err(e) = file.sync_data()
        {
            result = Err(e);
        }
        // The guard has recorded a failure already (see `guard.rs`).
        if let Err(e) = result {
            return Err(Error::io("cannot fsync pack data", e));
        }
        // With nothing to fsync, an earlier failure must still refuse.
        if self.sync_failed.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier fsync failed; reopen the store (restart the server) to recover",
            ));
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<(), Error> {
        if self.read_only {
            Err(Error::new(ErrorKind::Invalid, "store opened read-only"))
        } else {
            Ok(())
        }
    }

    fn reader(&self, pack: u32) -> Result<Arc<dyn VfsFile>, Error> {
        let mut readers = lock(&self.readers);
        if let Some(file) = readers.get(&pack) {
            return Ok(Arc::clone(file));
        }
        let path = self.packs_dir().join(pack_file_name(pack));
        let file = self
            .vfs
            .open(&path, OpenMode::Read)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        readers.insert(pack, Arc::clone(&file));
        Ok(file)
    }

    pub(crate) fn location(&self, id: &ChunkId) -> Result<Location, Error> {
        if let Some(location) = lock(&self.inner).index.get(id).copied() {
            return Ok(location);
        }
        if self.read_only {
            // A read-only store may lag behind a running server: look again.
            self.load_index()?;
            if let Some(location) = lock(&self.inner).index.get(id).copied() {
                return Ok(location);
            }
        }
        Err(Error::new(
            ErrorKind::Missing,
            format!("blob {id} is not in the store"),
        ))
    }

    /// Where the index says blob `id` is, without reloading a read-only index.
    pub(crate) fn indexed_location(&self, id: &ChunkId) -> Option<Location> {
        lock(&self.inner).index.get(id).copied()
    }

    /// After a read at `failed` went wrong: where blob `id` is now, if a
    /// collection moved it (in this process, or in the server a read-only store
    /// looks at, whose index is reloaded for that). `None` when it has not moved.
    pub(crate) fn moved_since(
        &self,
        id: &ChunkId,
        failed: &Location,
    ) -> Result<Option<Location>, Error> {
        let mut now = self.location(id)?;
        if now.is_at(failed) && self.read_only {
            self.load_index()?;
            now = self.location(id)?;
        }
        Ok((!now.is_at(failed)).then_some(now))
    }

    /// Reads the header and stored bytes of the record at `location`, checking
    /// that the header is the one indexed and that the crc32 matches.
    pub(crate) fn read_record(
        &self,
        location: Location,
    ) -> Result<([u8; RECORD_HEADER_LEN], Vec<u8>), Error> {
        let file = self.reader(location.pack)?;
        let mut record = vec![0u8; location.record_len_bytes() as usize];
        file.read_exact_at(&mut record, location.offset)
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot read the record at offset {} of pack {}",
                        location.offset,
                        pack_file_name(location.pack)
                    ),
                    e,
                )
            })?;
        let stored = record.split_off(RECORD_HEADER_LEN);
        let mut header_bytes = [0u8; RECORD_HEADER_LEN];
        header_bytes.copy_from_slice(&record);
        let header = location.header;
        if RecordHeader::decode(&header_bytes) != Some(header)
            || !header.crc_matches(&header_bytes, &stored)
        {
            self.note_damaged(location);
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "blob {} at offset {} of pack {} fails its checksum",
                    header.id,
                    location.offset,
                    pack_file_name(location.pack)
                ),
            ));
        }
        Ok((header_bytes, stored))
    }

    /// The stored bytes of blob `id` and where they were read. A collection may
    /// move the blob and delete its old pack between the index lookup and the
    /// read; then the read is retried at the new place.
    pub(crate) fn read_stored(&self, id: &ChunkId) -> Result<(Location, Vec<u8>), Error> {
        let mut location = self.location(id)?;
        for _ in 0..3 {
            let mut stored = vec![0u8; location.header.stored_len as usize];
            let read = self.reader(location.pack).and_then(|file| {
                file.read_exact_at(&mut stored, location.offset + RECORD_HEADER_LEN as u64)
                    .map_err(|e| Error::io(format!("cannot read blob {id}"), e))
            });
            match read {
                Ok(()) => return Ok((location, stored)),
                Err(e) => match self.moved_since(id, &location)? {
                    Some(now) => location = now,
                    None => return Err(e),
                },
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!("blob {id} kept moving while being read"),
        ))
    }

    /// Reads a blob, decodes it and checks that its blake3 equals `id`.
    pub fn read_blob(&self, id: &ChunkId) -> Result<Vec<u8>, Error> {
        let (location, stored) = self.read_stored(id)?;
        let decoded = decode_stored(id, location.header, stored);
        if decoded
            .as_ref()
            .is_err_and(|e| e.kind() == ErrorKind::Corrupt)
        {
            self.note_damaged(location);
        }
        decoded
    }

    /// A record found damaged since the open (rot, found by a read or by
    /// `verify`) stops counting as stored, so the next agent that has the
    /// chunk sends it again and a sound copy is stored; and its pack's saved
    /// scan is dropped, so the next open scans the pack and sees the damage
    /// too. Best effort and without an fsync (a saved scan that comes back
    /// after a crash only delays that): the record is damaged whatever
    /// happens here, and a read must not fail the store's fsyncs.
    pub(crate) fn note_damaged(&self, location: Location) {
        let newly = match lock(&self.inner).index.get_mut(&location.header.id) {
            Some(at) if at.is_at(&location) && at.crc_ok => {
                at.crc_ok = false;
                true
            }
            _ => false,
        };
        if newly && !self.read_only {
            let _ = pack_index::remove(self.vfs(), &self.packs_dir(), location.pack);
        }
    }

    pub(crate) fn source_dir(&self, source: &SourceId) -> PathBuf {
        // Safe to join: SourceId admits no '/', no '..' and no NUL.
        self.dir.join("sources").join(source.as_str())
    }

    /// The source's committed head, if it has one.
    pub fn head(&self, source: &SourceId) -> Result<Option<Head>, Error> {
        let path = self.source_dir(source).join("head");
        match read_small_file(self.vfs(), &path, HEAD_LEN)? {
            Some(bytes) => Head::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Sources that have a committed head.
    pub fn sources(&self) -> Result<Vec<SourceId>, Error> {
        let dir = self.dir.join("sources");
        let names = self
            .vfs
            .list_dir(&dir)
            .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        let mut out = Vec::new();
        for name in names {
            if let Some(source) = name.to_str().and_then(|n| SourceId::new(n).ok())
                && self.head(&source)?.is_some()
            {
                out.push(source);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads and decodes a root.
    pub fn read_root(&self, id: &ChunkId) -> Result<Root, Error> {
        let bytes = self.read_blob(id)?;
        Root::decode(&bytes).map_err(|e| Error::new(ErrorKind::Corrupt, format!("root {id}: {e}")))
    }

    /// Reads page `page_index` of `root` (an all-zero page is not stored).
    pub fn read_page(&self, root: &Root, page_index: usize) -> Result<Page, Error> {
        let len = root.page_len(page_index);
        let id = root.page_ids()[page_index];
        if id.is_zero() {
            return Ok(Page::new(vec![ChunkId::ZERO; len]));
        }
        let bytes = self.read_blob(&id)?;
        Page::decode(&bytes, len)
            .map_err(|e| Error::new(ErrorKind::Corrupt, format!("page {id}: {e}")))
    }

    /// All chunk ids of `root`, in disk order.
    pub fn chunk_ids(&self, root: &Root) -> Result<Vec<ChunkId>, Error> {
        let mut ids = Vec::with_capacity(root.geometry().chunk_count() as usize);
        for page_index in 0..root.page_ids().len() {
            ids.extend_from_slice(self.read_page(root, page_index)?.ids());
        }
        Ok(ids)
    }

    /// Commits a new epoch of `source`: stores the given pages (every non-zero page
    /// the root names that the store may lack) and the root, makes everything
    /// durable, then moves the head. Fails with `EpochMismatch` unless `epoch`
    /// follows the current head.
    pub fn commit(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &Root,
        pages: &[Page],
        scan_started_unix_ms: u64,
    ) -> Result<CommitStats, Error> {
        self.commit_with(source, epoch, root, pages, scan_started_unix_ms, true)
    }

    /// [`Store::commit`] of an epoch that may be an intermediate step of a large
    /// sync (`complete` false): the head moves, but its synced scan time does not.
    /// The root is labelled `live`; [`Store::commit_labelled`] says more.
    pub fn commit_with(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &Root,
        pages: &[Page],
        scan_started_unix_ms: u64,
        complete: bool,
    ) -> Result<CommitStats, Error> {
        self.commit_labelled(
            source,
            epoch,
            root,
            pages,
            scan_started_unix_ms,
            complete,
            Consistency::Live,
        )
    }

    /// The lock that orders the head writes of one source.
    pub(crate) fn commit_lock(&self, source: &SourceId) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.commit_locks).entry(source.clone()).or_default())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn commit_inner(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &Root,
        pages: &[Page],
        scan_started_unix_ms: u64,
        complete: bool,
        consistency: Consistency,
    ) -> Result<CommitStats, Error> {
        self.check_writable()?;
        let source_lock = self.commit_lock(source);
        let _guard = lock(&source_lock);
        let previous_head = self.head(source)?;
        let previous = previous_head.map_or(0, |h| h.epoch);
        if epoch != previous + 1 {
            return Err(Error::new(
                ErrorKind::EpochMismatch,
                format!(
                    "source {source}: commit of epoch {epoch} does not follow head epoch {previous}"
                ),
            ));
        }
        let root_id = root.id();
        // The GC fence, held until the head is published: a collection can
        // neither list references nor drop blobs between the check below and
        // the publication (see `gc.rs`).
        let _fence = self.gc.read_fence();
        self.gc.note(&root_id);
        self.gc.note_all(root.page_ids());
        for page in pages {
            self.gc.note_all(page.ids());
        }
        let mut pages_stored = 0;
        for page in pages {
            if let Some((bytes, id)) = page.encode_with_id()
                && self.insert_index_blob(BlobKind::Page, id, &bytes)?
            {
                pages_stored += 1;
            }
        }
        self.require_present("commit", root.page_ids())?;
        for page in pages {
            self.require_present("commit", page.ids())?;
        }
        self.check_pages_not_given(root, pages, previous_head.as_ref())?;
        self.insert_index_blob(BlobKind::Root, root_id, &root.encode())?;
        // Blobs first, durably; only then the head that names them.
        self.sync()?;
        let head = Head {
            epoch,
            root: root_id,
            scan_started_unix_ms,
            committed_unix_ms: now_unix_ms(),
            synced_scan_started_unix_ms: if complete {
                scan_started_unix_ms
            } else {
                previous_head.map_or(0, |h| h.synced_scan_started_unix_ms)
            },
            consistency,
        };
        let dir = self.source_dir(source);
        create_dir_durable(self.vfs(), &dir)?;
        publish_atomic(self.vfs(), &dir.join("head"), &head.encode())?;
        Ok(CommitStats { head, pages_stored })
    }

    /// Pages the new root names that were neither given nor are pages of the
    /// previous head were taken from some older root, whose chunks a collection
    /// may have dropped: read them, keep their chunks alive and check that
    /// every one is stored. (A server gives every page that differs from the
    /// head, so this finds nothing to do.)
    fn check_pages_not_given(
        &self,
        root: &Root,
        pages: &[Page],
        previous_head: Option<&Head>,
    ) -> Result<(), Error> {
        let given: HashSet<ChunkId> = pages.iter().map(Page::id).collect();
        let unknown = |id: &ChunkId| !id.is_zero() && !given.contains(id);
        if !root.page_ids().iter().any(unknown) {
            return Ok(());
        }
        let previous: HashSet<ChunkId> = match previous_head {
            Some(head) => self
                .read_root(&head.root)?
                .page_ids()
                .iter()
                .copied()
                .collect(),
            None => HashSet::new(),
        };
        for (page_index, id) in root.page_ids().iter().enumerate() {
            if unknown(id) && !previous.contains(id) {
                let page = self.read_page(root, page_index)?;
                self.gc.note_all(page.ids());
                self.require_present("commit", page.ids())?;
            }
        }
        Ok(())
    }

    /// Writes the committed replica of `source` to `out` as a sparse raw image:
    /// zero chunks are left as holes. The image is fsynced before returning;
    /// it is all or nothing and mode 0600, as [`Store::export_root`] says.
    pub fn export(&self, source: &SourceId, out: &Path) -> Result<ExportStats, Error> {
        let head = self.head(source)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Missing,
                format!("source {source} has no committed replica"),
            )
        })?;
        let (disk_size_bytes, chunks_written) = self.export_root(&head.root, out)?;
        Ok(ExportStats {
            head,
            disk_size_bytes,
            chunks_written,
        })
    }

    /// Writes the disk that `root_id` describes (a head, a snapshot, a launch) to
    /// `out` as a sparse raw image, fsynced, mode 0600. All or nothing: it is
    /// written beside `out` under a temporary name and renamed into place, so a
    /// failed export leaves no file (an existing `out` is left as it was); an
    /// existing `out` that is not a regular file is refused (see `export.rs`).
    /// Returns its size and the non-zero chunks written.
    pub fn export_root(&self, root_id: &ChunkId, out: &Path) -> Result<(u64, u64), Error> {
        // The image is the caller's file, outside the data directory: it is
        // written with std::fs, not through the store's Vfs.
        use std::os::unix::fs::FileExt;
        let root = self.read_root(root_id)?;
        let size_bytes = root.geometry().disk_size_bytes();
        let chunks_written = crate::export::write_image(out, size_bytes, |file| {
            self.export_chunks(&root, &mut |offset, data| {
                FileExt::write_all_at(file, data, offset)
                    .map_err(|e| Error::io(format!("cannot write {}", out.display()), e))
            })
        })?;
        Ok((size_bytes, chunks_written))
    }

    /// Reads every non-zero chunk of `root` (checked against its id and the
    /// geometry) and hands it to `write` with its byte offset on the disk.
    /// Returns how many chunks were written.
    pub(crate) fn export_chunks(
        &self,
        root: &Root,
        write: &mut ChunkSink<'_>,
    ) -> Result<u64, Error> {
        let geometry = root.geometry();
        let mut chunks_written = 0;
        for page_index in 0..root.page_ids().len() {
            let page = self.read_page(root, page_index)?;
            for (offset_in_page, id) in page.ids().iter().enumerate() {
                if id.is_zero() {
                    continue;
                }
                let chunk_index = (page_index * CHUNKS_PER_PAGE + offset_in_page) as u64;
                let data = self.read_blob(id)?;
                check_chunk_len(geometry, chunk_index, data.len())?;
                write(geometry.chunk_offset(chunk_index), &data)?;
                chunks_written += 1;
            }
        }
        Ok(chunks_written)
    }
}

/// Where [`Store::export_chunks`] puts each chunk: byte offset on the disk, bytes.
pub(crate) type ChunkSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), Error> + 'a;

/// Decodes a blob's stored bytes (at most its raw length).
pub(crate) fn decode_raw(header: RecordHeader, stored: Vec<u8>) -> Result<Vec<u8>, String> {
    match header.codec {
        StoredCodec::Raw => Ok(stored),
        StoredCodec::Zstd => zstd::bulk::decompress(&stored, header.raw_len as usize)
            .map_err(|e| format!("zstd: {e}")),
    }
}

/// Whether `raw` are the bytes of blob `id`.
pub(crate) fn hashes_to(raw: &[u8], id: &ChunkId) -> bool {
    ChunkId::from(blake3::hash(raw)) == *id
}

/// Decodes a blob's stored bytes and checks that they hash to `id`.
fn decode_stored(id: &ChunkId, header: RecordHeader, stored: Vec<u8>) -> Result<Vec<u8>, Error> {
    let raw = decode_raw(header, stored)
        .map_err(|e| Error::new(ErrorKind::Corrupt, format!("blob {id}: {e}")))?;
    if raw.len() != header.raw_len as usize || !hashes_to(&raw, id) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("blob {id} does not hash to its id"),
        ));
    }
    Ok(raw)
}

fn check_chunk_len(geometry: Geometry, index: u64, len: usize) -> Result<(), Error> {
    if geometry.chunk_len(index) == Some(len as u32) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Corrupt,
            format!("chunk {index} has {len} bytes, the geometry says otherwise"),
        ))
    }
}

fn tracing_cut(path: &Path, valid_len: u64, file_len: u64) {
    // The store has no logging dependency; recovery is rare and worth one line.
    eprintln!(
        "blockrep-store: dropping torn tail of {}: {} bytes after offset {}",
        path.display(),
        file_len - valid_len,
        valid_len
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep_core::scan_buffer;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use crate::testutil::{sample_disk, source};

    /// Stores every non-zero chunk of `disk` and commits it as `epoch` of the
    /// test source.
    fn commit_disk(store: &Store, disk: &[u8], geometry: Geometry, epoch: u64) -> Head {
        crate::testutil::commit_disk(store, &source(), disk, geometry, epoch)
    }

    #[test]
    fn commit_reopen_export_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let geometry = Geometry::new(40 * 4096 + 100, 4096).unwrap();
        let disk = sample_disk(geometry.disk_size_bytes() as usize, 3);
        let head = {
            let store = Store::open(dir.path()).unwrap();
            commit_disk(&store, &disk, geometry, 1)
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.head(&source()).unwrap(), Some(head));
        let out = dir.path().join("out.raw");
        let stats = store.export(&source(), &out).unwrap();
        assert_eq!(stats.disk_size_bytes, disk.len() as u64);
        assert_eq!(fs::read(&out).unwrap(), disk);
        assert_eq!(store.sources().unwrap(), vec![source()]);
    }

    #[test]
    fn commit_requires_the_next_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let geometry = Geometry::new(8192, 4096).unwrap();
        let disk = sample_disk(8192, 5);
        commit_disk(&store, &disk, geometry, 1);
        let (root, pages) = Root::build(geometry, &scan_buffer(&disk, geometry));
        for wrong in [1, 3] {
            let err = store
                .commit(&source(), wrong, &root, &pages, 0)
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::EpochMismatch);
        }
        assert_eq!(store.head(&source()).unwrap().unwrap().epoch, 1);
    }

    #[test]
    fn insert_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = b"chunk bytes";
        let id = ChunkId::from(blake3::hash(data));
        assert!(
            store
                .insert(BlobKind::Chunk, id, StoredCodec::Raw, 11, data)
                .unwrap()
        );
        assert!(
            !store
                .insert(BlobKind::Chunk, id, StoredCodec::Raw, 11, data)
                .unwrap()
        );
        assert_eq!(store.read_blob(&id).unwrap(), data);
        let info = store.blob_info(&id).unwrap();
        assert_eq!((info.kind, info.raw_len), (BlobKind::Chunk, 11));
        assert_eq!(
            store.blob_info(&ChunkId::from(blake3::hash(b"other"))),
            None
        );
    }

    /// 4 KiB blobs of distinct bytes in packs sealed at 16 KiB, then closed.
    fn store_with_sealed_packs(dir: &Path) -> Vec<ChunkId> {
        let store = Store::open(dir).unwrap();
        store.set_pack_size_max_bytes(16 * 1024);
        let ids: Vec<ChunkId> = (0..24u32)
            .map(|i| {
                let data: Vec<u8> = (0..4096u32).map(|j| (i * 31 + j * 7) as u8).collect();
                let id = ChunkId::from(blake3::hash(&data));
                store
                    .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &data)
                    .unwrap();
                id
            })
            .collect();
        store.sync().unwrap();
        ids
    }

    fn index_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".idx"))
            .collect();
        names.sort();
        names
    }

    /// The saved scan of a sealed pack is what a reopen uses: damage to a
    /// record's data (not its header) made after the scan was saved is not
    /// seen at the open, only at a read, which then drops the saved scan so
    /// that the next open scans the pack and sees it too.
    #[test]
    fn sealed_packs_open_from_their_saved_scans() {
        let dir = tempfile::tempdir().unwrap();
        let ids = store_with_sealed_packs(dir.path());
        let (packs, victim) = {
            let store = Store::open(dir.path()).unwrap();
            let packs = store.pack_numbers().unwrap();
            (packs, store.location(&ids[0]).unwrap())
        };
        assert!(packs.len() >= 4, "{packs:?}");
        assert_eq!(victim.pack, packs[0]);
        let sealed: Vec<String> = packs[..packs.len() - 1]
            .iter()
            .map(|n| format!("{n:08}.idx"))
            .collect();
        assert_eq!(
            index_files(dir.path()),
            sealed,
            "one saved scan per sealed pack"
        );

        let pack = dir.path().join("packs").join(pack_file_name(victim.pack));
        let file = fs::OpenOptions::new().write(true).open(&pack).unwrap();
        FileExt::write_all_at(&file, b"X", victim.offset + RECORD_HEADER_LEN as u64 + 100).unwrap();
        drop(file);

        let store = Store::open(dir.path()).unwrap();
        assert!(
            store.contains(&ids[0]),
            "the damage was seen at the open: the pack was scanned, not loaded"
        );
        assert_eq!(store.blob_count(), ids.len());
        for id in &ids[1..] {
            assert!(store.read_blob(id).is_ok());
        }
        assert_eq!(
            store.read_blob(&ids[0]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert!(
            !store.contains(&ids[0]),
            "a damaged record still counts as stored"
        );
        assert!(!index_files(dir.path()).contains(&sealed[0]));
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert!(!store.contains(&ids[0]), "the rescan missed the damage");
        assert_eq!(index_files(dir.path()), sealed);
        // A sound copy is stored again when the agent resends it.
        let data: Vec<u8> = (0..4096u32).map(|j| (j * 7) as u8).collect();
        assert!(
            store
                .insert(BlobKind::Chunk, ids[0], StoredCodec::Raw, 4096, &data)
                .unwrap()
        );
        assert_eq!(store.read_blob(&ids[0]).unwrap(), data);
    }

    /// A saved scan that does not describe its pack (another pack's, a damaged
    /// one) is not believed, and one left by a deleted pack is removed.
    #[test]
    fn saved_scans_that_do_not_match_their_pack_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let ids = store_with_sealed_packs(dir.path());
        drop(Store::open(dir.path()).unwrap());
        let packs = dir.path().join("packs");
        let saved = index_files(dir.path());
        let second = fs::read(packs.join(&saved[1])).unwrap();
        // Pack 1 gets pack 2's saved scan; pack 2's is damaged; pack 99 has none.
        fs::write(packs.join(&saved[0]), &second).unwrap();
        let mut damaged = second.clone();
        damaged[40] ^= 1;
        fs::write(packs.join(&saved[1]), &damaged).unwrap();
        fs::write(packs.join("00000099.idx"), &second).unwrap();

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.blob_count(), ids.len());
        for id in &ids {
            assert!(store.contains(id));
            assert!(store.read_blob(id).is_ok());
        }
        assert_eq!(index_files(dir.path()), saved, "the orphan is removed");
        assert_eq!(
            fs::read(packs.join(&saved[1])).unwrap(),
            second,
            "rewritten"
        );
        assert_ne!(
            fs::read(packs.join(&saved[0])).unwrap(),
            second,
            "rewritten"
        );
    }

    #[test]
    fn torn_tail_is_dropped_and_head_survives() {
        let dir = tempfile::tempdir().unwrap();
        let geometry = Geometry::new(16 * 4096, 4096).unwrap();
        let disk = sample_disk(geometry.disk_size_bytes() as usize, 7);
        let head = {
            let store = Store::open(dir.path()).unwrap();
            let head = commit_disk(&store, &disk, geometry, 1);
            // An uncommitted blob, then a torn half-record, as a crash would leave.
            let extra = vec![0x5a; 4096];
            let id = ChunkId::from(blake3::hash(&extra));
            store
                .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &extra)
                .unwrap();
            head
        };
        let pack = dir.path().join("packs").join(pack_file_name(1));
        let len_before = fs::metadata(&pack).unwrap().len();
        let mut file = OpenOptions::new().append(true).open(&pack).unwrap();
        file.write_all(&b"BRB1\x01\x01\x00\x00"[..]).unwrap();
        file.write_all(&[0xee; 100]).unwrap();
        drop(file);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(fs::metadata(&pack).unwrap().len(), len_before);
        assert_eq!(store.head(&source()).unwrap(), Some(head));
        let out = dir.path().join("out.raw");
        store.export(&source(), &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), disk);
        // Appending after recovery works and survives another reopen.
        let disk2 = sample_disk(disk.len(), 9);
        let head2 = commit_disk(&store, &disk2, geometry, 2);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.head(&source()).unwrap(), Some(head2));
        store.export(&source(), &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), disk2);
    }

    #[test]
    fn damage_in_the_middle_of_the_last_pack_is_not_mistaken_for_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
        let ids: Vec<ChunkId> = blobs
            .iter()
            .map(|b| ChunkId::from(blake3::hash(b)))
            .collect();
        {
            let store = Store::open(dir.path()).unwrap();
            for (id, blob) in ids.iter().zip(&blobs) {
                store
                    .insert(BlobKind::Chunk, *id, StoredCodec::Raw, 4096, blob)
                    .unwrap();
            }
            store.sync().unwrap();
        }
        let pack = dir.path().join("packs").join(pack_file_name(1));
        let len_before = fs::metadata(&pack).unwrap().len();
        // Damage the second record's data, then its neighbour's header magic.
        let record = (RECORD_HEADER_LEN + 4096) as u64;
        let file = OpenOptions::new().write(true).open(&pack).unwrap();
        FileExt::write_all_at(&file, &[0xff], record + RECORD_HEADER_LEN as u64 + 7).unwrap();
        FileExt::write_all_at(&file, b"XXXX", 2 * record).unwrap();
        drop(file);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            fs::metadata(&pack).unwrap().len(),
            len_before,
            "committed data was cut off"
        );
        assert_eq!(store.read_blob(&ids[0]).unwrap(), blobs[0]);
        assert_eq!(
            store.read_blob(&ids[1]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert!(
            store.read_blob(&ids[2]).is_err(),
            "a record with a broken header is not readable"
        );
        assert_eq!(
            store.read_blob(&ids[3]).unwrap(),
            blobs[3],
            "records after the damage were lost"
        );
    }

    #[test]
    fn damaged_blob_is_reported_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = vec![0x42u8; 4096];
        let id = ChunkId::from(blake3::hash(&data));
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &data)
            .unwrap();
        store.sync().unwrap();
        let pack = dir.path().join("packs").join(pack_file_name(1));
        let file = OpenOptions::new().write(true).open(&pack).unwrap();
        FileExt::write_all_at(&file, &[0x43], 100).unwrap();
        assert_eq!(store.read_blob(&id).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn a_record_damaged_before_a_crash_is_stored_again_not_deduplicated() {
        // A chunk appended but not fsynced when the power went may come back
        // with a sound header and torn data, followed by later records (so it
        // is not cut as a torn tail). The agent resends it after the crash; the
        // store must not answer "already stored" with the damaged record.
        let dir = tempfile::tempdir().unwrap();
        let data = vec![0x42u8; 4096];
        let id = ChunkId::from(blake3::hash(&data));
        let later = vec![0x17u8; 4096];
        let later_id = ChunkId::from(blake3::hash(&later));
        {
            let store = Store::open(dir.path()).unwrap();
            for (id, bytes) in [(id, &data), (later_id, &later)] {
                store
                    .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, bytes)
                    .unwrap();
            }
            store.sync().unwrap();
        }
        let pack = dir.path().join("packs").join(pack_file_name(1));
        let file = OpenOptions::new().write(true).open(&pack).unwrap();
        FileExt::write_all_at(&file, &[0u8; 100], RECORD_HEADER_LEN as u64 + 1000).unwrap();
        drop(file);
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.contains(&id), "a damaged record answered an offer");
        assert!(store.contains(&later_id));
        assert!(
            store
                .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &data)
                .unwrap(),
            "the resent chunk was taken as already stored"
        );
        assert_eq!(store.read_blob(&id).unwrap(), data);
        store.sync().unwrap();
        drop(store);
        // After another open the sound copy still wins over the damaged one.
        let store = Store::open(dir.path()).unwrap();
        assert!(store.contains(&id));
        assert_eq!(store.read_blob(&id).unwrap(), data);
    }

    #[test]
    fn read_only_store_sees_later_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reader = Store::open_read_only(dir.path()).unwrap();
        let geometry = Geometry::new(8 * 4096, 4096).unwrap();
        let disk = sample_disk(geometry.disk_size_bytes() as usize, 11);
        commit_disk(&store, &disk, geometry, 1);
        let out = dir.path().join("out.raw");
        reader.export(&source(), &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), disk);
        assert!(
            reader
                .insert(BlobKind::Chunk, ChunkId([1; 32]), StoredCodec::Raw, 1, b"x")
                .is_err()
        );
    }
}

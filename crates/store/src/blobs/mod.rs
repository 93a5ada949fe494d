//! The blob layer: content-addressed chunks, index pages and roots in
//! append-only packs, below [`Store`](crate::Store). [`Blobs`] owns the blob
//! index (id -> pack, offset), the active pack, background fsyncs, the GC
//! fence and the touched set, and reaches packs only through a
//! [`PackBackend`] (the local packs directory today).
//!
//! Its API is narrow: [`Blobs::put`], [`Blobs::get`], [`Blobs::contains`],
//! [`Blobs::sync`], the fence ([`Blobs::fence`]), a checked read for
//! `verify` ([`Blobs::check`]) and the compaction a collection drives
//! ([`Blobs::collect`], in `compact.rs`). Records found damaged stop counting
//! as stored ([`Blobs::note_damaged`]).

pub(crate) mod backend;
mod compact;
mod fence;
mod index;
mod load;
pub(crate) mod pack;
pub(crate) mod pack_index;
mod remembered;
pub(crate) mod seal;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockrep_core::ChunkId;
use blockrep_keys::{Keyring, Sealer};

use crate::error::{Error, ErrorKind};
use crate::format::RECORD_HEADER_LEN;
use crate::mutex::lock;
use crate::vfs::{PendingSync, VfsFile};

pub use backend::UploadStats;
pub(crate) use backend::{LocalPacks, PackBackend};
pub use compact::{GC_LIVE_SHARE_MIN_DEFAULT, GcOptions, GcReport};
pub(crate) use compact::{GcStage, Peers};
pub(crate) use fence::{GcState, Tracking};
use index::BlobIndex;
pub use index::INDEX_MEMORY_DEFAULT_BYTES;
pub(crate) use index::IndexOptions;
pub use pack::{BlobKind, PACK_SIZE_MAX_BYTES, StoredCodec};
pub(crate) use pack::{RecordHeader, pack_file_name, parse_pack_file_name};
pub(crate) use pack_index::parse_index_file_name;

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

/// What [`Blobs::check`] found wrong with a blob, and where (pack, offset)
/// when the index has a place for it.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The index has no record of it.
    Missing,
    /// The record is of another kind.
    WrongKind(u32, u64, BlobKind),
    /// The record's crc32 fails.
    ChecksumMismatch(u32, u64),
    /// The stored bytes do not decode.
    Undecodable(u32, u64, String),
    /// The decoded bytes do not hash to the id (or have another length).
    HashMismatch(u32, u64),
    /// A sealed record fails authentication (a flipped byte, a record moved
    /// from another place or source).
    AuthFailed(u32, u64, String),
    /// A sealed record's data key is not held (shredded, or no key
    /// directory given).
    NoKey(u32, u64, String),
    /// The record cannot be read.
    Unreadable(u32, u64, String),
}

#[derive(Debug)]
struct ActivePack {
    number: u32,
    file: Arc<dyn VfsFile>,
    len_bytes: u64,
}

#[derive(Debug, Default)]
struct Inner {
    index: BlobIndex,
    active: Option<ActivePack>,
    last_pack: u32,
    /// The next blob goes to a new pack, not to the last one reopened.
    start_new_pack: bool,
    /// Bytes appended since the last background flush was started.
    unflushed_bytes: u64,
    /// fsyncs running in the background (sealed packs, early flushes of the
    /// active pack). `sync` waits for all of them.
    background_syncs: Vec<PendingSync>,
}

/// Appended bytes after which a background fdatasync of the active pack starts,
/// so the fsync at commit finds little left to write.
const FLUSH_EVERY_BYTES: u64 = 64 * 1024 * 1024;

/// The blobs of one store.
#[derive(Debug)]
pub(crate) struct Blobs {
    packs: Box<dyn PackBackend>,
    read_only: bool,
    inner: Mutex<Inner>,
    /// Set once an fsync has failed. Linux may forget a write-back error after
    /// reporting it once, so a later fsync "succeeding" proves nothing: every
    /// later fsync fails (see `guard.rs`), so nothing is acknowledged until the
    /// store is reopened, which makes everything it finds durable first.
    sync_failed: Arc<AtomicBool>,
    /// The garbage collector's fence and "touched during GC" set (see `gc.rs`).
    fence: GcState,
    /// Size at which the active pack is sealed; [`PACK_SIZE_MAX_BYTES`] unless a
    /// test makes packs small.
    pack_size_max_bytes: AtomicU64,
    /// Serializes the joining of background fsyncs: a `sync` that finds the list
    /// empty because a concurrent `sync` took it must still wait until those
    /// fsyncs are done before it may report the data durable.
    sync_join: Mutex<()>,
    /// The data keys that open sealed records.
    keyring: Arc<Keyring>,
    /// Times the index was rebuilt from the packs after a run failed a read:
    /// a collection that sees it change deletes nothing.
    index_rebuilds: AtomicU64,
    /// Packs a collection is deleting (or deleted): a rebuild of the index
    /// leaves them out, as the collection already took their entries out.
    deleting: Mutex<std::collections::BTreeSet<u32>>,
    /// Chunks whose hash launch reads checked (`remembered.rs`).
    verified: remembered::VerifiedIds,
    /// One [`Blobs::refresh`] at a time: one that finds nothing new while
    /// another is still indexing what it found must not report the index
    /// current.
    refreshing: Mutex<()>,
    /// Set while this store cannot tell whether another server's collection
    /// deleted packs its index still names (`bucket/take_part.rs`): commits
    /// and flushes are refused until a refresh after the round's end.
    pub(crate) unsettled: AtomicBool,
}

impl Blobs {
    /// Opens the blobs in `packs` and builds their index, cutting a torn tail
    /// of the newest pack unless `read_only`. `sync_failed` is the flag of the
    /// store's fsync guard.
    pub(crate) fn open(
        packs: Box<dyn PackBackend>,
        read_only: bool,
        sync_failed: Arc<AtomicBool>,
        index_options: IndexOptions,
    ) -> Result<Self, Error> {
        let blobs = Self {
            packs,
            read_only,
            inner: Mutex::new(Inner {
                index: BlobIndex::unopened(index_options),
                ..Inner::default()
            }),
            sync_failed,
            fence: GcState::default(),
            pack_size_max_bytes: AtomicU64::new(PACK_SIZE_MAX_BYTES),
            sync_join: Mutex::new(()),
            keyring: Arc::new(Keyring::new()),
            index_rebuilds: AtomicU64::new(0),
            deleting: Mutex::default(),
            verified: remembered::VerifiedIds::default(),
            refreshing: Mutex::new(()),
            unsettled: AtomicBool::new(false),
        };
        blobs.load_index()?;
        Ok(blobs)
    }

    /// The GC fence for reading, for a step that publishes a record naming
    /// blobs (see `gc.rs`). Fails with `Busy` while another server's
    /// collection may have deleted packs this index still names (see
    /// [`Blobs::unsettled`]).
    pub(crate) fn publishing_fence(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, Error> {
        let fence = self.fence.read_fence();
        if self.unsettled.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Busy,
                "this server has not yet read the bucket's packs again (after another \
                 server's collection, or after its own announcement lapsed): nothing is \
                 published until it has (try again)",
            ));
        }
        Ok(fence)
    }

    /// The data keys that open sealed records; the store's owner adds the
    /// keys of its encrypted sources.
    pub(crate) fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// The GC fence and touched set.
    pub(crate) fn fence(&self) -> &GcState {
        &self.fence
    }

    /// Whether the blobs were opened read-only.
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Sets the memory the blob index keeps before it moves entries to
    /// runs on disk (see [`crate::Store::set_index_memory_max_bytes`]).
    pub(crate) fn set_index_memory_max_bytes(&self, bytes: usize) {
        let entries = (bytes / index::MEM_BYTES_PER_ENTRY).max(1);
        lock(&self.inner).index.set_mem_max_entries(entries);
    }

    /// Bytes of memory the index's runs keep, and entries in its table.
    pub(crate) fn index_memory(&self) -> (usize, usize) {
        let inner = lock(&self.inner);
        (inner.index.runs_memory_bytes(), inner.index.mem_len())
    }

    /// Makes packs seal at `bytes` (see [`crate::Store::set_pack_size_max_bytes`]).
    pub(crate) fn set_pack_size_max_bytes(&self, bytes: u64) {
        self.pack_size_max_bytes
            .store(bytes.max(1), Ordering::Relaxed);
    }

    fn pack_size_max_bytes(&self) -> u64 {
        self.pack_size_max_bytes.load(Ordering::Relaxed)
    }

    /// The numbers of the packs present, ascending.
    pub(crate) fn pack_numbers(&self) -> Result<Vec<u32>, Error> {
        self.packs.list()
    }

    /// See [`PackBackend::remove_unpublished`].
    pub(crate) fn remove_unpublished(&self) -> Result<u64, Error> {
        self.packs.remove_unpublished()
    }

    /// Whether a sound blob with this id is stored (see
    /// [`crate::Store::contains`]); a hit is recorded as touched.
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        let (_inner, at) = self.indexed(id);
        let found = at.is_some_and(|at| at.crc_ok);
        if found {
            // Under the index lock, so a collector deciding to drop `id` (also
            // under it) sees the hit.
            self.fence.note(id);
        }
        found
    }

    /// Kind and decoded length of a sound stored blob (see
    /// [`crate::Store::blob_info`]); a hit is recorded as touched.
    pub(crate) fn info(&self, id: &ChunkId) -> Option<BlobInfo> {
        let (_inner, at) = self.indexed(id);
        let at = at.filter(|at| at.crc_ok)?;
        let info = BlobInfo {
            kind: at.header.kind,
            raw_len: at.header.raw_len,
        };
        self.fence.note(id);
        Some(info)
    }

    /// Fails with `Missing` unless every non-zero id is stored.
    pub(crate) fn require_present<'a>(
        &self,
        what: &str,
        ids: impl IntoIterator<Item = &'a ChunkId>,
    ) -> Result<(), Error> {
        for id in ids {
            if !id.is_zero() && self.indexed(id).1.is_none() {
                return Err(Error::new(
                    ErrorKind::Missing,
                    format!("{what} names {id}, which is not stored"),
                ));
            }
        }
        Ok(())
    }

    /// Number of blobs in the index.
    pub(crate) fn count(&self) -> usize {
        lock(&self.inner).index.len()
    }

    /// [`Blobs::put`] of a page or root: stored as encoded, its id the blake3
    /// of `bytes`.
    pub(crate) fn put_index_blob(
        &self,
        kind: BlobKind,
        id: ChunkId,
        bytes: &[u8],
        sealer: Option<&Sealer>,
    ) -> Result<bool, Error> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| Error::new(ErrorKind::Invalid, "index blob too large"))?;
        match sealer {
            Some(sealer) => self.put_sealed(sealer, kind, id, StoredCodec::Raw, len, bytes),
            None => self.put(kind, id, StoredCodec::Raw, len, bytes, None),
        }
    }

    /// Appends a blob unless a sound one with the same id is stored; whether
    /// it was new (see [`crate::Store::insert`]).
    pub(crate) fn put(
        &self,
        kind: BlobKind,
        id: ChunkId,
        codec: StoredCodec,
        raw_len: u32,
        stored: &[u8],
        stored_crc: Option<u32>,
    ) -> Result<bool, Error> {
        self.put_record(kind, id, codec, false, raw_len, stored, stored_crc)
    }

    /// Appends a record of `stored` unless `id` is held. `stored_crc` is the
    /// crc32 of `stored` when the caller has it (see
    /// [`RecordHeader::encode_with_crc`]).
    #[allow(clippy::too_many_arguments)]
    fn put_record(
        &self,
        kind: BlobKind,
        id: ChunkId,
        codec: StoredCodec,
        sealed: bool,
        raw_len: u32,
        stored: &[u8],
        stored_crc: Option<u32>,
    ) -> Result<bool, Error> {
        self.check_writable()?;
        let (mut inner, at) = self.indexed(&id);
        // Found or stored, the caller is about to reference it: a running
        // collection must keep it.
        self.fence.note(&id);
        if at.is_some_and(|at| at.crc_ok) {
            return Ok(false);
        }
        let header = RecordHeader {
            kind,
            codec,
            sealed,
            stored_len: u32::try_from(stored.len())
                .map_err(|_| Error::new(ErrorKind::Invalid, "blob too large"))?,
            raw_len,
            id,
            crc: 0,
        };
        let header_bytes = header.encode_with_crc(stored, stored_crc);
        let header = RecordHeader::decode(&header_bytes)
            .ok_or_else(|| Error::new(ErrorKind::Invalid, "blob exceeds the record limits"))?;
        let location = self.append_locked(&mut inner, &header_bytes, header, stored)?;
        inner.index.insert_known(id, location, at.is_some());
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
        let number = active.number;
        active
            .file
            .write_all_at_parts(header_bytes, stored, offset)
            .map_err(|e| {
                Error::io(
                    format!("cannot append to {}", self.packs.describe(number)),
                    e,
                )
            })?;
        active.len_bytes = offset + RECORD_HEADER_LEN as u64 + stored.len() as u64;
        let file = Arc::clone(&active.file);
        inner.unflushed_bytes += (RECORD_HEADER_LEN + stored.len()) as u64;
        if inner.unflushed_bytes >= FLUSH_EVERY_BYTES {
            inner.unflushed_bytes = 0;
            inner.background_syncs.push(self.packs.start_flush(file));
        }
        Ok(Location {
            pack: number,
            offset,
            header,
            crc_ok: true,
        })
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
                .push(self.packs.seal(sealed.number, sealed.file));
        }
        if inner.active.is_none() {
            let reopen = !std::mem::take(&mut inner.start_new_pack);
            inner.active = Some(self.open_active(inner.last_pack, reopen)?);
            inner.last_pack = inner.active.as_ref().expect("just set").number;
        }
        Ok(inner.active.as_mut().expect("just set"))
    }

    fn open_active(&self, last_pack: u32, reopen: bool) -> Result<ActivePack, Error> {
        if reopen && last_pack > 0 && !self.packs.is_sealed(last_pack) {
            let (file, len_bytes) = self.packs.open_active(last_pack)?;
            if len_bytes < self.pack_size_max_bytes() {
                return Ok(ActivePack {
                    number: last_pack,
                    file,
                    len_bytes,
                });
            }
        }
        let (number, file) = self.packs.create_active(last_pack)?;
        Ok(ActivePack {
            number,
            file,
            len_bytes: 0,
        })
    }

    /// Where the packs are (`local`, or a bucket's name).
    pub(crate) fn backend(&self) -> String {
        self.packs.location()
    }

    /// Checks that the packs can be reached now.
    pub(crate) fn check_reachable(&self) -> Result<(), Error> {
        self.packs.check_reachable()
    }

    /// Uploads pending and done, when the packs are in a bucket.
    pub(crate) fn upload_stats(&self) -> Option<UploadStats> {
        self.packs.upload_stats()
    }

    /// Whether an fsync has failed since the store was opened.
    pub(crate) fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::SeqCst)
    }

    /// Refuses once an fsync has failed (`Store::check_synced`).
    pub(crate) fn check_synced(&self) -> Result<(), Error> {
        if self.sync_failed() {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier fsync failed; reopen the store (restart the server) to recover",
            ));
        }
        Ok(())
    }

    /// Seals the active pack (or the last one, not reopened yet), so that
    /// a collection may compact it: blobs put from now on go to a new pack.
    pub(crate) fn seal_active_pack(&self) {
        let mut inner = lock(&self.inner);
        if let Some(active) = inner.active.take_if(|a| a.len_bytes > 0) {
            let sealed = self.packs.seal(active.number, active.file);
            inner.background_syncs.push(sealed);
        }
        // An empty active pack stays the one appended to.
        inner.start_new_pack = inner.active.is_none() && inner.last_pack > 0;
    }

    /// Makes every blob put so far durable.
    pub(crate) fn sync(&self) -> Result<(), Error> {
        let file = {
            let mut inner = lock(&self.inner);
            if self.packs.seals_at_sync() {
                // Blobs of such a backend are durable once their pack is
                // sealed: seal the active one if it holds anything.
                if let Some(active) = inner.active.take_if(|a| a.len_bytes > 0) {
                    let sealed = self.packs.seal(active.number, active.file);
                    inner.background_syncs.push(sealed);
                }
            }
            // What this sync makes durable, if the index is to move entries
            // to a run after it (see `index/`).
            let durable = inner.index.flush_due();
            (inner.active.as_ref().map(|a| Arc::clone(&a.file)), durable)
        };
        let (file, durable) = file;
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
            return Err(Error::io("cannot make pack data durable", e));
        }
        self.packs.settle()?;
        // With nothing to fsync, an earlier failure must still refuse.
        self.check_synced()?;
        if let Some(durable) = durable {
            self.flush_index(&mut lock(&self.inner), Some(durable));
        }
        Ok(())
    }

    /// Fails with `Invalid` on a read-only store.
    pub(crate) fn check_writable(&self) -> Result<(), Error> {
        if self.read_only {
            Err(Error::new(ErrorKind::Invalid, "store opened read-only"))
        } else {
            Ok(())
        }
    }

    /// The index lock and where blob `id` is. When a run of the index fails
    /// a read, the index is rebuilt from the packs, in memory for the rest of
    /// the process (its manifest is gone, so the next open rebuilds its runs),
    /// and the lookup made again.
    fn indexed(&self, id: &ChunkId) -> (std::sync::MutexGuard<'_, Inner>, Option<Location>) {
        let inner = lock(&self.inner);
        let found = inner.index.get(id);
        if found.is_some() || !inner.index.is_damaged() {
            return (inner, found);
        }
        let mut inner = inner;
        inner.index.keep_in_memory();
        drop(inner);
        self.index_rebuilds.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.load_index() {
            eprintln!("blockrep-store: cannot rebuild the blob index: {e}");
        }
        let inner = lock(&self.inner);
        let found = inner.index.get(id);
        (inner, found)
    }

    /// Where the index says blob `id` is; a read-only store reloads its index
    /// once when it does not know the id.
    pub(crate) fn location(&self, id: &ChunkId) -> Result<Location, Error> {
        if let Some(location) = self.indexed(id).1 {
            return Ok(location);
        }
        if self.read_only {
            // A read-only store may lag behind a running server: look again.
            self.load_index()?;
            if let Some(location) = lock(&self.inner).index.get(id) {
                return Ok(location);
            }
        }
        Err(Error::new(
            ErrorKind::Missing,
            format!("blob {id} is not in the store"),
        ))
    }

    /// Pack and offset of blob `id`'s record, without reloading a read-only
    /// index.
    pub(crate) fn place(&self, id: &ChunkId) -> Option<(u32, u64)> {
        lock(&self.inner)
            .index
            .get(id)
            .map(|at| (at.pack, at.offset))
    }

    /// After a read at `failed` went wrong: where blob `id` is now, if a
    /// collection moved it (in this process, or in the server a read-only store
    /// looks at, whose index is reloaded for that). `None` when it has not moved.
    fn moved_since(&self, id: &ChunkId, failed: &Location) -> Result<Option<Location>, Error> {
        let mut now = self.location(id)?;
        if now.is_at(failed) && self.read_only {
            self.load_index()?;
            now = self.location(id)?;
        }
        // In a shared bucket, another server's collection may have moved it
        // and deleted the pack since this index last read the listing. A
        // refresh that fails leaves the read's own error to be reported.
        if now.is_at(failed) && !self.read_only && self.packs.is_shared() && self.refresh().is_ok()
        {
            now = self.location(id)?;
        }
        Ok((!now.is_at(failed)).then_some(now))
    }

    /// Reads the header and stored bytes of the record at `location`, checking
    /// that the header is the one indexed and that the crc32 matches.
    /// The header and the stored bytes are read apart, so that the stored
    /// bytes are not copied out of a buffer holding both.
    fn read_record(&self, location: Location) -> Result<([u8; RECORD_HEADER_LEN], Vec<u8>), Error> {
        let mut header_bytes = [0u8; RECORD_HEADER_LEN];
        self.packs
            .read_at(location.pack, location.offset, &mut header_bytes)?;
        let stored = self.packs.read_vec_at(
            location.pack,
            location.offset + RECORD_HEADER_LEN as u64,
            location.header.stored_len as usize,
        )?;
        let header = location.header;
        if RecordHeader::decode(&header_bytes) != Some(header)
            || !header.crc_matches(&header_bytes, &stored)
        {
            return Err(self.fails_checksum(location));
        }
        Ok((header_bytes, stored))
    }

    /// Notes the record at `location` damaged; the error that says so.
    fn fails_checksum(&self, location: Location) -> Error {
        self.note_damaged(location);
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "blob {} at offset {} of pack {} fails its checksum",
                location.header.id,
                location.offset,
                pack_file_name(location.pack)
            ),
        )
    }

    /// The stored bytes of blob `id` and where they were read. A collection may
    /// move the blob and delete its old pack between the index lookup and the
    /// read; then the read is retried at the new place.
    pub(crate) fn get_stored(&self, id: &ChunkId) -> Result<(Location, Vec<u8>), Error> {
        self.read_moving(id, |location| {
            self.packs.read_vec_at(
                location.pack,
                location.offset + RECORD_HEADER_LEN as u64,
                location.header.stored_len as usize,
            )
        })
    }

    /// `read` of blob `id` at its place, retried at the new place (up to
    /// three times) when a collection moved it meanwhile.
    fn read_moving(
        &self,
        id: &ChunkId,
        read: impl Fn(Location) -> Result<Vec<u8>, Error>,
    ) -> Result<(Location, Vec<u8>), Error> {
        let mut location = self.location(id)?;
        for _ in 0..3 {
            match read(location) {
                Ok(stored) => return Ok((location, stored)),
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
    pub(crate) fn get(&self, id: &ChunkId) -> Result<Vec<u8>, Error> {
        let (location, stored) = self.get_stored(id)?;
        let decoded = self.decode(location, stored)?;
        if !decoded.matches(&location.header, id) {
            self.note_damaged(location);
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("blob {id} does not hash to its id"),
            ));
        }
        Ok(decoded.raw)
    }

    /// Reads blob `id`'s whole record as `verify` does, checking its kind,
    /// crc32, decoding and hash; returns the decoded bytes and the stored
    /// bytes read.
    pub(crate) fn check(&self, id: &ChunkId, kind: BlobKind) -> Result<(Vec<u8>, u64), Fault> {
        let Some(mut location) = self.indexed(id).1 else {
            return Err(Fault::Missing);
        };
        if location.header.kind != kind {
            return Err(Fault::WrongKind(
                location.pack,
                location.offset,
                location.header.kind,
            ));
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (pack, offset) = (location.pack, location.offset);
            match self.read_record(location) {
                Ok((_, stored)) => {
                    let read = stored.len() as u64;
                    let decoded =
                        seal::decode(&self.keyring, &location.header, stored).map_err(|fault| {
                            match fault {
                                seal::DecodeFault::Damaged(e) if location.header.sealed => {
                                    Fault::AuthFailed(pack, offset, e)
                                }
                                seal::DecodeFault::Damaged(e) => {
                                    Fault::Undecodable(pack, offset, e)
                                }
                                seal::DecodeFault::NoKey(e) => Fault::NoKey(pack, offset, e),
                            }
                        })?;
                    if !decoded.matches(&location.header, id) {
                        return Err(Fault::HashMismatch(pack, offset));
                    }
                    return Ok((decoded.raw, read));
                }
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    return Err(Fault::ChecksumMismatch(pack, offset));
                }
                Err(e) => {
                    // A collection may have moved the blob and deleted its pack
                    // since the lookup: look again before calling it unreadable.
                    match self.moved_since(id, &location) {
                        Ok(Some(now)) if attempts < 3 => location = now,
                        _ => return Err(Fault::Unreadable(pack, offset, e.to_string())),
                    }
                }
            }
        }
    }

    /// A record found damaged since the open (rot, found by a read or by
    /// `verify`) stops counting as stored, so the next agent that has the
    /// chunk sends it again and a sound copy is stored; and its pack's saved
    /// scan is dropped, so the next open scans the pack and sees the damage
    /// too. Best effort and without an fsync (a saved scan that comes back
    /// after a crash only delays that): the record is damaged whatever
    /// happens here, and a read must not fail the store's fsyncs.
    pub(crate) fn note_damaged(&self, location: Location) {
        let newly = {
            let mut inner = lock(&self.inner);
            match inner.index.get(&location.header.id) {
                Some(at) if at.is_at(&location) && at.crc_ok => {
                    let damaged = Location {
                        crc_ok: false,
                        ..at
                    };
                    inner.index.insert(location.header.id, damaged);
                    // Until a run records the damage, an open reads the
                    // pack again instead of trusting the runs about it.
                    inner.index.uncover(location.pack, location.offset);
                    true
                }
                _ => false,
            }
        };
        if newly && !self.read_only {
            let _ = self.packs.forget_scan(location.pack);
        }
    }
}

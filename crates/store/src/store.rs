//! The store proper: opening and locking a data directory, heads and commit,
//! and export. Blobs (chunks, pages, roots in packs) are the blob layer's
//! (`blobs/`); snapshots, launches, GC and verify are `impl Store` blocks of
//! their own modules.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blockrep_core::{
    CHUNKS_PER_PAGE, ChunkId, Consistency, Geometry, MachineRoot, Page, Root, SINGLE_VOLUME_NAME,
    SourceId, VolumeName,
};

use crate::blobs::{BlobInfo, BlobKind, Blobs, IndexOptions, LocalPacks, PackBackend, StoredCodec};
use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind};
use crate::fsutil::{
    create_dir_durable, lock_data_dir, make_data_dir, read_small_file, refuse_working_copy,
    restrict_data_dir,
};
use crate::guard::{FsyncGuard, sync_tree};
use crate::head::{HEAD_LEN, Head};
use crate::mutex::lock;
use crate::remote::Remote;
use crate::vfs::{RealFs, Vfs};

/// The blob index's runs, in the data directory (see `blobs/index/`).
const INDEX_DIR: &str = "index";

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

/// A stored root record: the disk root of one volume, or a machine root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredRoot {
    /// A disk root: the whole of a single-disk source's recovery point.
    Disk(Root),
    /// A machine root, naming each volume's disk root.
    Machine(MachineRoot),
}

/// What a commit publishes: the disk roots it stores, each with the pages
/// the store may lack, and, for a machine, each volume's name (in the order
/// of `volumes`), from which the machine root the head names is built.
pub(crate) struct CommitTree<'a> {
    pub(crate) volumes: Vec<(&'a Root, &'a [Page])>,
    /// `None`: the head names the one volume's disk root directly.
    pub(crate) names: Option<Vec<VolumeName>>,
}

/// A replica store in one data directory. Cheap to share behind an `Arc`; every
/// method takes `&self`.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Every file of the data directory is reached through this (see `vfs.rs`).
    vfs: Arc<dyn Vfs>,
    /// Holds the data directory's exclusive lock while a writable store is open.
    pub(crate) lock_file: Option<File>,
    /// Chunks, pages and roots (see `blobs/`).
    pub(crate) blobs: Blobs,
    /// Serializes commits per source (head read-check-write).
    commit_locks: Mutex<HashMap<SourceId, Arc<Mutex<()>>>>,
    /// Snapshot and launch bookkeeping (see `catalog.rs`).
    pub(crate) catalog: Catalog,
    /// The bucket, for a store kept in one (see `bucket/`).
    pub(crate) remote: Option<Arc<Remote>>,
    /// Decoded chunks read by launch volumes (see `chunk_cache.rs`).
    pub(crate) chunk_cache: crate::chunk_cache::ChunkCache,
}

impl Store {
    /// Where the store keeps its packs and records: `local` (the data
    /// directory) or the bucket's `s3://BUCKET/PREFIX`.
    pub fn backend(&self) -> String {
        self.blobs.backend()
    }

    /// Checks that the store's backend can be reached now (a round trip to
    /// a bucket; nothing for a local store, whose directory the caller
    /// probes).
    pub fn check_backend(&self) -> Result<(), Error> {
        self.blobs.check_reachable()
    }

    /// The GC fence for reading, for a step that publishes a record naming
    /// blobs (see `gc.rs`), once this store may publish: not while another
    /// server's round is unsettled here (`Blobs::publishing_fence`), nor
    /// while its announcement in a bucket has lapsed at `now_unix_ms`.
    pub(crate) fn publishing_fence(
        &self,
        now_unix_ms: u64,
    ) -> Result<std::sync::RwLockReadGuard<'_, ()>, Error> {
        let fence = self.blobs.publishing_fence()?;
        if let Some(remote) = &self.remote {
            remote.check_presence(now_unix_ms)?;
        }
        Ok(fence)
    }

    /// In a bucket, fails unless this server holds `source`'s lease past
    /// `now_unix_ms`; a local store has no leases.
    pub(crate) fn check_lease(&self, source: &SourceId, now_unix_ms: u64) -> Result<(), Error> {
        match &self.remote {
            Some(remote) => remote.check_lease(source, now_unix_ms),
            None => Ok(()),
        }
    }

    /// Uploads pending and done, for a store in a bucket (`None` for a
    /// local store).
    pub fn upload_stats(&self) -> Option<crate::UploadStats> {
        self.blobs.upload_stats()
    }

    /// The data directory (absolute for a writable store).
    pub(crate) fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The file system the data directory lives on.
    pub(crate) fn vfs(&self) -> &dyn Vfs {
        self.vfs.as_ref()
    }

    /// Whether the store was opened read-only.
    pub(crate) fn is_read_only(&self) -> bool {
        self.blobs.is_read_only()
    }

    /// Fails with `Invalid` on a store opened read-only.
    pub(crate) fn check_writable(&self) -> Result<(), Error> {
        self.blobs.check_writable()
    }

    /// Makes packs seal at `bytes` instead of [`crate::PACK_SIZE_MAX_BYTES`], so
    /// that tests of compaction get many packs from little data. Takes effect at
    /// the next append.
    #[doc(hidden)]
    pub fn set_pack_size_max_bytes(&self, bytes: u64) {
        self.blobs.set_pack_size_max_bytes(bytes);
    }

    /// Sets the memory the blob index keeps for its newest entries before a
    /// sync moves them to sorted runs on disk (`DATA/index`); default
    /// [`crate::INDEX_MEMORY_DEFAULT_BYTES`]. A store on a simulated disk or
    /// in a bucket keeps its whole index in memory.
    pub fn set_index_memory_max_bytes(&self, bytes: usize) {
        self.blobs.set_index_memory_max_bytes(bytes);
    }

    /// Bytes of memory the blob index's runs keep (filters and block
    /// summaries), and entries in its in-memory table.
    pub fn index_memory(&self) -> (usize, usize) {
        self.blobs.index_memory()
    }

    /// Whether the store holds a sound blob with this id. While a garbage
    /// collection runs, a hit keeps the blob alive through it (the caller may
    /// go on to reference it). A record found damaged when the store opened
    /// (a torn write, or rot) is not a hit: the caller sends the bytes again
    /// and [`Store::insert`] stores a sound copy.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.blobs.contains(id)
    }

    /// The kind and decoded length of a sound stored blob, or `None` when the
    /// store holds no sound blob with this id. Read from the index alone (no
    /// I/O), so a caller can check that an id a peer names is a chunk of the
    /// length its position needs before it trusts or serves it. Like
    /// [`Store::contains`], a hit keeps the blob alive through a running GC.
    pub fn blob_info(&self, id: &ChunkId) -> Option<BlobInfo> {
        self.blobs.info(id)
    }

    /// Number of blobs in the index.
    pub fn blob_count(&self) -> usize {
        self.blobs.count()
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
        self.blobs.put(kind, id, codec, raw_len, stored, None)
    }

    /// [`Store::insert`] of bytes whose crc32 the caller computed already
    /// (`stored_crc`, IEEE, of exactly `stored`): the record's crc is made
    /// from it without a second pass over the bytes.
    pub fn insert_with_crc(
        &self,
        kind: BlobKind,
        id: ChunkId,
        codec: StoredCodec,
        raw_len: u32,
        stored: &[u8],
        stored_crc: u32,
    ) -> Result<bool, Error> {
        self.blobs
            .put(kind, id, codec, raw_len, stored, Some(stored_crc))
    }

    /// Stores every non-zero chunk of the disk image `disk` (raw, as
    /// [`Store::insert`] does) and returns its root and index pages, ready
    /// for a commit: a disk seeded from an image the caller holds.
    pub fn insert_image(
        &self,
        disk: &[u8],
        geometry: Geometry,
    ) -> Result<(Root, Vec<Page>), Error> {
        if disk.len() as u64 != geometry.disk_size_bytes() {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "an image of {} bytes for a geometry of {}",
                    disk.len(),
                    geometry.disk_size_bytes()
                ),
            ));
        }
        let ids = blockrep_core::scan_buffer(disk, geometry);
        for (index, id) in ids.iter().enumerate() {
            if let Some(range) = geometry.chunk_range(index as u64)
                && !id.is_zero()
            {
                let len = range.len() as u32;
                self.insert(BlobKind::Chunk, *id, StoredCodec::Raw, len, &disk[range])?;
            }
        }
        Ok(Root::build(geometry, &ids))
    }

    /// Whether an fsync has failed since the store was opened: commits are then
    /// refused until it is reopened (see [`Store::sync`]).
    pub fn sync_failed(&self) -> bool {
        self.blobs.sync_failed()
    }

    /// Refuses (`Io`) once an fsync has failed: what the store holds may not
    /// be on disk, so nothing may be vouched for, even unchanged.
    pub fn check_synced(&self) -> Result<(), Error> {
        self.blobs.check_synced()
    }

    /// Makes every blob inserted so far durable.
    pub fn sync(&self) -> Result<(), Error> {
        self.blobs.sync()
    }

    /// Reads a blob, decodes it and checks that its blake3 equals `id`.
    pub fn read_blob(&self, id: &ChunkId) -> Result<Vec<u8>, Error> {
        self.blobs.get(id)
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

    /// Whether the data directory holds any record of `source` (a head, a
    /// snapshot read from a bucket, ...), committed or not.
    pub fn has_records_of(&self, source: &SourceId) -> bool {
        self.vfs.is_dir(&self.source_dir(source))
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

    /// Reads and decodes a disk root (a machine root is refused: see
    /// [`Store::read_machine`]).
    pub fn read_root(&self, id: &ChunkId) -> Result<Root, Error> {
        let bytes = self.read_blob(id)?;
        if MachineRoot::is_encoding(&bytes) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("root {id} is a machine root: name one of its volumes"),
            ));
        }
        Root::decode(&bytes).map_err(|e| Error::new(ErrorKind::Corrupt, format!("root {id}: {e}")))
    }

    /// Reads a root record, whichever kind it is.
    pub fn read_stored_root(&self, id: &ChunkId) -> Result<StoredRoot, Error> {
        let bytes = self.read_blob(id)?;
        if MachineRoot::is_encoding(&bytes) {
            MachineRoot::decode(&bytes)
                .map(StoredRoot::Machine)
                .map_err(|e| Error::new(ErrorKind::Corrupt, format!("root {id}: {e}")))
        } else {
            Root::decode(&bytes)
                .map(StoredRoot::Disk)
                .map_err(|e| Error::new(ErrorKind::Corrupt, format!("root {id}: {e}")))
        }
    }

    /// The recovery point `id` names, as a machine: a machine root as it is,
    /// a disk root as a machine of one volume called
    /// [`SINGLE_VOLUME_NAME`] whose root is `id` itself.
    pub fn read_machine(&self, id: &ChunkId) -> Result<MachineRoot, Error> {
        match self.read_stored_root(id)? {
            StoredRoot::Machine(machine) => Ok(machine),
            StoredRoot::Disk(_) => Ok(single_volume(*id)),
        }
    }

    /// Each volume's name and disk root in the recovery point `id` names
    /// (see [`Store::read_machine`]), sorted by name.
    pub fn volume_roots(&self, id: &ChunkId) -> Result<Vec<(VolumeName, ChunkId)>, Error> {
        Ok(self.read_machine(id)?.volumes().to_vec())
    }

    /// The disk root of volume `volume` of the recovery point `id`; with no
    /// name, of its only volume. Fails with `NotFound` for a volume the
    /// machine lacks and `Invalid` when no name is given and it has several,
    /// naming the volumes it has.
    pub fn volume_root(&self, id: &ChunkId, volume: Option<&str>) -> Result<ChunkId, Error> {
        choose_volume(&self.read_machine(id)?, volume).map(|(_, root)| *root)
    }

    /// [`Store::export`] of one volume of the source's head: with no name, of
    /// its only volume.
    pub fn export_volume(
        &self,
        source: &SourceId,
        volume: Option<&str>,
        out: &Path,
    ) -> Result<ExportStats, Error> {
        let head = self.head(source)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Missing,
                format!("source {source} has no committed replica"),
            )
        })?;
        let root = self
            .volume_root(&head.root, volume)
            .map_err(|e| Error::new(e.kind(), format!("source {source}: {e}")))?;
        let (disk_size_bytes, chunks_written) = self.export_root(&root, out)?;
        Ok(ExportStats {
            head,
            disk_size_bytes,
            chunks_written,
        })
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
    /// follows the current head. `now_unix_ms` is recorded as the commit
    /// time: the store never reads the clock (a simulation drives it).
    pub fn commit(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &Root,
        pages: &[Page],
        scan_started_unix_ms: u64,
        now_unix_ms: u64,
    ) -> Result<CommitStats, Error> {
        self.commit_with(
            source,
            epoch,
            root,
            pages,
            scan_started_unix_ms,
            true,
            now_unix_ms,
        )
    }

    /// [`Store::commit`] of an epoch that may be an intermediate step of a large
    /// sync (`complete` false): the head moves, but its synced scan time does not.
    /// The root is labelled `live`; [`Store::commit_labelled`] says more.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_with(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &Root,
        pages: &[Page],
        scan_started_unix_ms: u64,
        complete: bool,
        now_unix_ms: u64,
    ) -> Result<CommitStats, Error> {
        self.commit_labelled(
            source,
            epoch,
            root,
            pages,
            scan_started_unix_ms,
            complete,
            Consistency::Live,
            now_unix_ms,
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
        tree: CommitTree<'_>,
        scan_started_unix_ms: u64,
        complete: bool,
        consistency: Consistency,
        now_unix_ms: u64,
    ) -> Result<CommitStats, Error> {
        self.check_writable()?;
        self.check_lease(source, now_unix_ms)?;
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
        // Each root encoded and hashed once: the id names it in the fence,
        // the machine root and its record, the bytes are the record.
        let encoded: Vec<(ChunkId, Vec<u8>)> = tree
            .volumes
            .iter()
            .map(|(root, _)| {
                let bytes = root.encode();
                (ChunkId::from(blake3::hash(&bytes)), bytes)
            })
            .collect();
        let machine = match tree.names {
            Some(names) => Some(
                MachineRoot::new(
                    names
                        .into_iter()
                        .zip(encoded.iter().map(|(id, _)| *id))
                        .collect(),
                )
                .map_err(|e| Error::new(ErrorKind::Invalid, format!("source {source}: {e}")))?,
            ),
            None => None,
        };
        let machine_bytes = machine.as_ref().map(MachineRoot::encode);
        let head_root = match &machine_bytes {
            Some(bytes) => ChunkId::from(blake3::hash(bytes)),
            None => encoded[0].0,
        };
        // The GC fence, held until the head is published: a collection can
        // neither list references nor drop blobs between the check below and
        // the publication (see `gc.rs`).
        let _fence = self.publishing_fence(now_unix_ms)?;
        self.blobs.fence().note(&head_root);
        for ((root, pages), (id, _)) in tree.volumes.iter().zip(&encoded) {
            self.blobs.fence().note(id);
            self.blobs.fence().note_all(root.page_ids());
            for page in *pages {
                self.blobs.fence().note_all(page.ids());
            }
        }
        // An encrypted source's pages are sealed like its chunks. Its roots
        // are not: they hold only the geometry and page ids (hashes of pages
        // of stored ids), and the root of a blank disk is every source's,
        // which no one source's key may hold hostage.
        let sealer = self.sealer_of(source);
        let sealer = sealer.as_deref();
        let mut pages_stored = 0;
        for (_, pages) in &tree.volumes {
            for page in *pages {
                if let Some((bytes, id)) = page.encode_with_id()
                    && self
                        .blobs
                        .put_index_blob(BlobKind::Page, id, &bytes, sealer)?
                {
                    pages_stored += 1;
                }
            }
        }
        let mut previous_pages: Option<HashSet<ChunkId>> = None;
        for (root, pages) in &tree.volumes {
            self.blobs.require_present("commit", root.page_ids())?;
            for page in *pages {
                self.blobs.require_present("commit", page.ids())?;
            }
            self.check_pages_not_given(root, pages, previous_head.as_ref(), &mut previous_pages)?;
        }
        for (id, bytes) in &encoded {
            self.blobs
                .put_index_blob(BlobKind::Root, *id, bytes, None)?;
        }
        if let Some(bytes) = &machine_bytes {
            // A machine root is stored as a root record too: its magic, not
            // the record's kind, tells it from a disk root (see `format.rs`).
            self.blobs
                .put_index_blob(BlobKind::Root, head_root, bytes, None)?;
        }
        // Blobs first, durably; only then the head that names them.
        self.sync()?;
        // An incomplete epoch (an intermediate step of a large sync) mixes
        // the previous head with part of a scan: it claims nothing.
        let consistency = if complete {
            consistency
        } else {
            Consistency::Live
        };
        let head = Head {
            epoch,
            root: head_root,
            scan_started_unix_ms,
            committed_unix_ms: now_unix_ms,
            synced_scan_started_unix_ms: if complete {
                scan_started_unix_ms
            } else {
                previous_head.map_or(0, |h| h.synced_scan_started_unix_ms)
            },
            consistency,
        };
        let dir = self.source_dir(source);
        create_dir_durable(self.vfs(), &dir)?;
        // Again: the uploads of a sync can take long enough for a lease to lapse.
        self.check_lease(source, now_unix_ms)?;
        self.publish_head(source, &head)
            .map_err(Error::lease_refusal)?;
        Ok(CommitStats { head, pages_stored })
    }

    /// Pages the new root names that were neither given nor are pages of the
    /// previous head (of any of its volumes) were taken from some older root,
    /// whose chunks a collection may have dropped: read them, keep their chunks
    /// alive and check that every one is stored. (A server gives every page
    /// that differs from the head, so this finds nothing to do.) The previous
    /// head's pages are read once per commit, into `previous_pages`, and only
    /// when needed.
    fn check_pages_not_given(
        &self,
        root: &Root,
        pages: &[Page],
        previous_head: Option<&Head>,
        previous_pages: &mut Option<HashSet<ChunkId>>,
    ) -> Result<(), Error> {
        let given: HashSet<ChunkId> = pages.iter().map(Page::id).collect();
        let unknown = |id: &ChunkId| !id.is_zero() && !given.contains(id);
        if !root.page_ids().iter().any(unknown) {
            return Ok(());
        }
        if previous_pages.is_none() {
            let mut set = HashSet::new();
            if let Some(head) = previous_head {
                for (_, disk_root) in self.volume_roots(&head.root)? {
                    set.extend(self.read_root(&disk_root)?.page_ids().iter().copied());
                }
            }
            *previous_pages = Some(set);
        }
        let previous = previous_pages.as_ref().expect("filled above");
        for (page_index, id) in root.page_ids().iter().enumerate() {
            if unknown(id) && !previous.contains(id) {
                let page = self.read_page(root, page_index)?;
                self.blobs.fence().note_all(page.ids());
                self.blobs.require_present("commit", page.ids())?;
            }
        }
        Ok(())
    }

    /// Writes the committed replica of `source` to `out` as a sparse raw image:
    /// zero chunks are left as holes. The image is fsynced before returning;
    /// it is all or nothing and mode 0600, as [`Store::export_root`] says. A
    /// machine of several volumes is exported a volume at a time
    /// ([`Store::export_volume`]).
    pub fn export(&self, source: &SourceId, out: &Path) -> Result<ExportStats, Error> {
        self.export_volume(source, None, out)
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
    fn export_chunks(&self, root: &Root, write: &mut ChunkSink<'_>) -> Result<u64, Error> {
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

/// Volume `volume` of `machine` (with no name, its only one): `NotFound`
/// for a volume it lacks and `Invalid` when no name is given and it has
/// several, naming the volumes it has.
pub(crate) fn choose_volume<'a>(
    machine: &'a MachineRoot,
    volume: Option<&str>,
) -> Result<&'a (VolumeName, ChunkId), Error> {
    let names = || {
        machine
            .volumes()
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (volume, machine.volumes()) {
        (Some(name), volumes) => {
            volumes
                .iter()
                .find(|(n, _)| n.as_str() == name)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("no volume {name:?}: the volumes are {}", names()),
                    )
                })
        }
        (None, [only]) => Ok(only),
        (None, volumes) => Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "{} volumes ({}): name the one to use",
                volumes.len(),
                names()
            ),
        )),
    }
}

/// The machine a disk root stands for: one volume of the default name.
pub(crate) fn single_volume(root: ChunkId) -> MachineRoot {
    let name = VolumeName::new(SINGLE_VOLUME_NAME).expect("a valid name");
    MachineRoot::new(vec![(name, root)]).expect("one volume is a valid machine")
}

/// Where [`Store::export_chunks`] puts each chunk: byte offset on the disk, bytes.
type ChunkSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), Error> + 'a;

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

mod open;

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod tests;

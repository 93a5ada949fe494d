//! Where packs live: the [`PackBackend`] seam under the blob layer, and
//! [`LocalPacks`], the packs directory of a data directory reached through the
//! store's [`Vfs`] (so the power-loss simulator runs the blob layer too).
//!
//! The trait is shaped for a backend that keeps sealed packs as immutable
//! objects (an object store): the one pack being appended to is a local file
//! ([`PackBackend::create_active`], [`PackBackend::open_active`]), and sealing
//! it ([`PackBackend::seal`]) is the moment it becomes an object, written
//! whole; after that a pack is only read by range ([`PackBackend::read_at`]),
//! listed, scanned and removed whole. The saved scans of sealed packs
//! (`pack_index.rs`) are a cache the backend keeps beside them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::fsutil::sync_dir;
use crate::mutex::lock;
use crate::vfs::{OpenMode, PendingSync, Vfs, VfsFile};

use super::pack::{PackScan, pack_file_name, parse_pack_file_name, scan_pack};
use super::pack_index;

/// What a store in a bucket has not uploaded yet, and how uploads went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Bytes of sealed packs waiting for (or retrying) their upload.
    pub bytes_pending: u64,
    /// Objects waiting for their upload (packs, each with its index).
    pub objects_pending: u64,
    /// Uploads and record writes that failed since the store opened.
    pub errors_total: u64,
    /// Bytes of packs uploaded since the store opened.
    pub uploaded_bytes_total: u64,
}

/// What [`PackBackend::refresh`] found.
#[derive(Debug, Default)]
pub(crate) struct Refreshed {
    /// Packs published since the last look.
    pub(crate) added: Vec<u32>,
    /// Packs gone from the bucket since: their records are no longer
    /// stored.
    pub(crate) gone: Vec<u32>,
    /// What the backend forgot of the gone packs (number, length, whether
    /// cached), put back by [`PackBackend::undo_refresh`].
    pub(crate) forgotten: Vec<(u32, u64, bool)>,
}

/// A store of numbered packs. Every method may be called from several threads.
pub(crate) trait PackBackend: fmt::Debug + Send + Sync {
    /// A name for pack `number` in messages (its path for local packs).
    fn describe(&self, number: u32) -> String;

    /// The numbers of the packs present, ascending.
    fn list(&self) -> Result<Vec<u32>, Error>;

    /// Length in bytes of pack `number`.
    fn len(&self, number: u32) -> Result<u64, Error>;

    /// Reads `buf.len()` bytes of pack `number` at `offset`.
    fn read_at(&self, number: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// Reads `len` bytes at `offset` of pack `number` into a new buffer.
    fn read_vec_at(&self, number: u32, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; len];
        self.read_at(number, offset, &mut buf)?;
        Ok(buf)
    }

    /// Every record of pack `number` and where its valid content ends (see
    /// `scan_pack`). `NotFound` when the pack is gone.
    fn scan(&self, number: u32) -> Result<PackScan, Error>;

    /// [`PackBackend::scan`] of the records at or past `from`, a record
    /// boundary (what the blob index's runs do not cover); the records
    /// below may be listed too.
    fn scan_from(&self, number: u32, _from: u64) -> Result<PackScan, Error> {
        self.scan(number)
    }

    /// Makes what pack `number` holds durable (what an open is about to index).
    fn make_durable(&self, number: u32) -> Result<(), Error>;

    /// Cuts the torn tail of the newest pack at `len` bytes, durably.
    fn truncate(&self, number: u32, len: u64) -> Result<(), Error>;

    /// Opens the newest pack to go on appending to it; with its length.
    fn open_active(&self, number: u32) -> Result<(Arc<dyn VfsFile>, u64), Error>;

    /// Creates a pack numbered above `after`, empty, to append to; its name
    /// is durable. Returns its number.
    fn create_active(&self, after: u32) -> Result<(u32, Arc<dyn VfsFile>), Error>;

    /// Starts flushing appended bytes of the active pack to stable storage.
    fn start_flush(&self, file: Arc<dyn VfsFile>) -> PendingSync;

    /// Seals a full active pack: it is never appended to again, and is durable
    /// once the returned sync is joined.
    fn seal(&self, number: u32, file: Arc<dyn VfsFile>) -> PendingSync;

    /// Whether pack `number` is sealed, so never appended to again, though
    /// it is the newest (a bucket's packs are sealed once written; a local
    /// directory's newest pack is the one appended to).
    fn is_sealed(&self, _number: u32) -> bool {
        false
    }

    /// Whether a sync must seal the active pack: a pack's blobs are durable
    /// only once it is sealed (uploaded whole), not when fsynced.
    fn seals_at_sync(&self) -> bool {
        false
    }

    /// Finishes what earlier seals left undone (an upload that failed);
    /// called by every sync after it joined the seals it started.
    fn settle(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Removes packs that were claimed but never published (their writer
    /// stopped first). Only while nobody else may be writing one: a
    /// collection on a bucket runs when its server is alone. Returns how many.
    fn remove_unpublished(&self) -> Result<u64, Error> {
        Ok(0)
    }

    /// Learns of packs published by others since the backend was opened,
    /// and of packs deleted by another server's collection: returns the
    /// numbers of each, ascending.
    fn refresh(&self) -> Result<Refreshed, Error> {
        Ok(Refreshed::default())
    }

    /// Whether other stores change these packs (a bucket shared by several
    /// servers): a read that fails where the index points is worth a
    /// refresh.
    fn is_shared(&self) -> bool {
        false
    }

    /// Forgets what `refresh` found, when the index could not take it in:
    /// the next refresh finds it again.
    fn undo_refresh(&self, _found: &Refreshed) {}

    /// Drops the local copies of the packs `refresh` found gone, once the
    /// index no longer names them.
    fn settle_refresh(&self, _found: &Refreshed) {}

    /// Where the packs are, for status: `local`, or the bucket's name.
    fn location(&self) -> String {
        "local".into()
    }

    /// Checks that the packs can be reached now (a round trip to a bucket).
    fn check_reachable(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Uploads pending and done, for a backend that uploads.
    fn upload_stats(&self) -> Option<UploadStats> {
        None
    }

    /// The saved scan of sealed pack `number`, if there is a sound one.
    fn load_scan(&self, number: u32) -> Option<PackScan>;

    /// Saves the scan of sealed pack `number` (a cache: failing costs a scan).
    fn save_scan(&self, number: u32, scan: &PackScan) -> Result<(), Error>;

    /// Drops the saved scan of pack `number`, if any, without making that
    /// durable (a saved scan coming back after a crash only delays a rescan).
    fn forget_scan(&self, number: u32) -> std::io::Result<()>;

    /// Removes saved scans whose pack is not in `packs` (sorted); returns
    /// whether any was removed.
    fn remove_orphan_scans(&self, packs: &[u32]) -> Result<bool, Error>;

    /// Removes pack `number` (its saved scan first). Readers that hold it
    /// keep reading what they had; the removal is durable after
    /// [`PackBackend::sync_listing`].
    fn remove(&self, number: u32) -> Result<(), Error>;

    /// Makes creations and removals of packs durable.
    fn sync_listing(&self) -> Result<(), Error>;
}

/// Packs as files `NNNNNNNN.pack` (and saved scans `NNNNNNNN.idx`) in one
/// directory of a [`Vfs`].
pub(crate) struct LocalPacks {
    dir: PathBuf,
    vfs: Arc<dyn Vfs>,
    /// Open read handles, one per pack, so a read costs no `open`.
    readers: Mutex<HashMap<u32, Arc<dyn VfsFile>>>,
}

impl fmt::Debug for LocalPacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalPacks")
            .field("dir", &self.dir)
            .finish()
    }
}

impl LocalPacks {
    /// The packs in `dir` (which exists) of `vfs`.
    pub(crate) fn new(dir: PathBuf, vfs: Arc<dyn Vfs>) -> Self {
        Self {
            dir,
            vfs,
            readers: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, number: u32) -> PathBuf {
        self.dir.join(pack_file_name(number))
    }

    fn reader(&self, number: u32) -> Result<Arc<dyn VfsFile>, Error> {
        let mut readers = lock(&self.readers);
        if let Some(file) = readers.get(&number) {
            return Ok(Arc::clone(file));
        }
        let path = self.path(number);
        let file = self
            .vfs
            .open(&path, OpenMode::Read)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        readers.insert(number, Arc::clone(&file));
        Ok(file)
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

impl PackBackend for LocalPacks {
    fn describe(&self, number: u32) -> String {
        self.path(number).display().to_string()
    }

    fn list(&self) -> Result<Vec<u32>, Error> {
        let names = self
            .vfs
            .list_dir(self.dir())
            .map_err(|e| Error::io(format!("cannot list {}", self.dir.display()), e))?;
        let mut numbers: Vec<u32> = names
            .iter()
            .filter_map(|name| name.to_str().and_then(parse_pack_file_name))
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    fn len(&self, number: u32) -> Result<u64, Error> {
        let path = self.path(number);
        self.vfs
            .file_len(&path)
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))
    }

    fn read_vec_at(&self, number: u32, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        self.reader(number)?.read_vec_at(len, offset).map_err(|e| {
            Error::io(
                format!(
                    "cannot read at offset {offset} of pack {}",
                    pack_file_name(number)
                ),
                e,
            )
        })
    }

    fn read_at(&self, number: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.reader(number)?
            .read_exact_at(buf, offset)
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot read at offset {offset} of pack {}",
                        pack_file_name(number)
                    ),
                    e,
                )
            })
    }

    fn scan(&self, number: u32) -> Result<PackScan, Error> {
        scan_pack(self.vfs.as_ref(), &self.path(number))
    }

    fn scan_from(&self, number: u32, from: u64) -> Result<PackScan, Error> {
        super::pack::scan_pack_from(self.vfs.as_ref(), &self.path(number), from)
    }

    fn make_durable(&self, number: u32) -> Result<(), Error> {
        let path = self.path(number);
        self.vfs
            .open(&path, OpenMode::Read)
            .and_then(|file| file.sync_all())
            .map_err(|e| Error::io(format!("cannot fsync {}", path.display()), e))
    }

    fn truncate(&self, number: u32, len: u64) -> Result<(), Error> {
        let path = self.path(number);
        let file = self
            .vfs
            .open(&path, OpenMode::ReadWrite)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(format!("cannot truncate {}", path.display()), e))
    }

    fn open_active(&self, number: u32) -> Result<(Arc<dyn VfsFile>, u64), Error> {
        let path = self.path(number);
        let file = self
            .vfs
            .open(&path, OpenMode::ReadWrite)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let len_bytes = file
            .len()
            .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
        Ok((file, len_bytes))
    }

    fn create_active(&self, after: u32) -> Result<(u32, Arc<dyn VfsFile>), Error> {
        let number = after + 1;
        let path = self.path(number);
        let file = self
            .vfs
            .open(&path, OpenMode::CreateNew)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        sync_dir(self.vfs.as_ref(), self.dir())?;
        Ok((number, file))
    }

    fn start_flush(&self, file: Arc<dyn VfsFile>) -> PendingSync {
        self.vfs.start_sync_data(file)
    }

    fn seal(&self, _number: u32, file: Arc<dyn VfsFile>) -> PendingSync {
        // A local pack is sealed where it is: its fsync runs in the background.
        self.vfs.start_sync_data(file)
    }

    fn load_scan(&self, number: u32) -> Option<PackScan> {
        pack_index::load(self.vfs.as_ref(), self.dir(), number, &self.path(number))
    }

    fn save_scan(&self, number: u32, scan: &PackScan) -> Result<(), Error> {
        pack_index::save(self.vfs.as_ref(), self.dir(), number, scan)
    }

    fn forget_scan(&self, number: u32) -> std::io::Result<()> {
        pack_index::remove(self.vfs.as_ref(), self.dir(), number)
    }

    fn remove_orphan_scans(&self, packs: &[u32]) -> Result<bool, Error> {
        let names = self
            .vfs
            .list_dir(self.dir())
            .map_err(|e| Error::io(format!("cannot list {}", self.dir.display()), e))?;
        let mut removed = false;
        for name in names {
            let Some(number) = name.to_str().and_then(pack_index::parse_index_file_name) else {
                continue;
            };
            if packs.binary_search(&number).is_err() {
                self.forget_scan(number).map_err(|e| {
                    Error::io(format!("cannot remove the index of pack {number}"), e)
                })?;
                removed = true;
            }
        }
        Ok(removed)
    }

    fn remove(&self, number: u32) -> Result<(), Error> {
        let path = self.path(number);
        // The pack's saved index goes first: an index is never left behind by
        // its pack (it would not be believed anyway).
        let outcome = self
            .forget_scan(number)
            .and_then(|()| self.vfs.remove_file(&path))
            .map_err(|e| Error::io(format!("cannot delete {}", path.display()), e));
        // Readers that hold the handle keep reading the unlinked file.
        lock(&self.readers).remove(&number);
        outcome
    }

    fn sync_listing(&self) -> Result<(), Error> {
        sync_dir(self.vfs.as_ref(), self.dir())
    }
}

#[cfg(test)]
impl super::Blobs {
    /// The packs underneath, for tests that drive the backend directly.
    pub(crate) fn pack_backend(&self) -> &dyn PackBackend {
        self.packs.as_ref()
    }
}

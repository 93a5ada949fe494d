//! The store in an S3-compatible bucket.
//!
//! The data directory stays the working copy: packs are appended locally and
//! records (heads, snapshots, launches, lifecycle) are written there as
//! always. The bucket is the truth that several servers share:
//!
//! - **Packs** (`packs.rs`): a pack is sealed whenever a commit, a launch flush
//!   or a collection needs its blobs durable, and uploaded whole as the
//!   immutable object `packs/NNNNNNNN.pack` (multipart when large), then its
//!   index `packs/NNNNNNNN.idx`. A pack exists for readers once its index
//!   does. Pack numbers are claimed in the bucket first (a create-only write
//!   of an empty object), so two servers never use one number. Sealed packs
//!   stay in the data directory as a cache bounded by
//!   [`BucketOptions::cache_bytes`]; the rest is read by ranged GETs.
//! - **Records** (`records.rs`): every file under `sources/` and `launches/`
//!   becomes durable by an atomic rename, and that rename is where it is
//!   published: the object is written first, conditionally on the version
//!   this server last saw (create-only if it saw none), and only then is the
//!   local file renamed. A server whose view is stale (another server wrote
//!   the record since) is refused and publishes nothing. A deletion removes
//!   the objects first.
//! - **Order**: a record names blobs only after a sync, and a sync in a bucket
//!   returns only once every sealed pack is uploaded with its index; so the
//!   bucket never holds a record that names a blob it lacks.
//! - **Opening** replaces the data directory's records with the bucket's and
//!   drops local packs the bucket does not have (blobs no record can name).

mod packs;
mod records;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockrep_objects::{BlockingBucket, Version};

use crate::error::{Error, ErrorKind};
use crate::fsutil::create_dir_durable;
use crate::guard::FsyncGuard;
use crate::mutex::lock;
use crate::store::{Store, lock_data_dir};
use crate::vfs::{RealFs, Vfs};

pub(crate) use packs::BucketPacks;
pub(crate) use records::BucketRecords;

/// Default of [`BucketOptions::cache_bytes`].
pub const BUCKET_CACHE_BYTES_DEFAULT: u64 = 4 << 30;

/// How a store in a bucket keeps its local copy.
#[derive(Debug, Clone, Copy)]
pub struct BucketOptions {
    /// Most bytes of sealed packs kept in the data directory; older packs
    /// beyond it are read from the bucket. The pack being written and packs
    /// not yet uploaded are always local and do not count.
    pub cache_bytes: u64,
}

impl Default for BucketOptions {
    fn default() -> Self {
        Self {
            cache_bytes: BUCKET_CACHE_BYTES_DEFAULT,
        }
    }
}

/// The bucket and what this store knows of its objects.
#[derive(Debug)]
pub(crate) struct Remote {
    pub(crate) bucket: BlockingBucket,
    /// The version last read or written of each record object, the
    /// condition of its next write.
    versions: std::sync::Mutex<std::collections::HashMap<String, Version>>,
    errors_total: AtomicU64,
    uploaded_bytes_total: AtomicU64,
    /// Makes every record object's bytes differ from the last (see
    /// [`Remote::envelope`]).
    writes: AtomicU64,
    nonce_base: u64,
}

/// First bytes of every record object: its format.
const ENVELOPE_MAGIC: [u8; 4] = *b"BRO1";
/// Magic and a write nonce before the record's own bytes.
const ENVELOPE_LEN: usize = 12;

impl Remote {
    pub(crate) fn new(bucket: BlockingBucket) -> Self {
        let seed = format!(
            "{}:{:?}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
        );
        let hash = blake3::hash(seed.as_bytes());
        let mut base = [0u8; 8];
        base.copy_from_slice(&hash.as_bytes()[..8]);
        Self {
            bucket,
            versions: Default::default(),
            errors_total: AtomicU64::new(0),
            uploaded_bytes_total: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            nonce_base: u64::from_le_bytes(base),
        }
    }

    /// A record's object: the magic, a nonce unique to this write, then the
    /// record. The nonce makes a rewrite of the same record a new object
    /// version (stores derive ETags from the bytes), so that a conditional
    /// write by a server that read the old version fails.
    fn envelope(&self, record: &[u8]) -> Vec<u8> {
        let nonce = self
            .nonce_base
            .wrapping_add(self.writes.fetch_add(1, Ordering::Relaxed));
        let mut out = Vec::with_capacity(ENVELOPE_LEN + record.len());
        out.extend_from_slice(&ENVELOPE_MAGIC);
        out.extend_from_slice(&nonce.to_le_bytes());
        out.extend_from_slice(record);
        out
    }

    /// The record inside an object written by [`Remote::envelope`].
    fn open_envelope<'a>(key: &str, object: &'a [u8]) -> Result<&'a [u8], Error> {
        match object.get(..4) {
            Some(magic) if magic == ENVELOPE_MAGIC && object.len() >= ENVELOPE_LEN => {
                Ok(&object[ENVELOPE_LEN..])
            }
            _ => Err(Error::new(
                ErrorKind::Corrupt,
                format!("{key} in the bucket is not a blockrep record"),
            )),
        }
    }

    pub(crate) fn version(&self, key: &str) -> Option<Version> {
        lock(&self.versions).get(key).cloned()
    }

    pub(crate) fn set_version(&self, key: &str, version: Option<Version>) {
        let mut versions = lock(&self.versions);
        match version {
            Some(version) => versions.insert(key.to_owned(), version),
            None => versions.remove(key),
        };
    }

    /// Counts a failed upload or record write.
    pub(crate) fn note_error(&self) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_uploaded(&self, bytes: u64) {
        self.uploaded_bytes_total
            .fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn errors_total(&self) -> u64 {
        self.errors_total.load(Ordering::Relaxed)
    }

    pub(crate) fn uploaded_bytes_total(&self) -> u64 {
        self.uploaded_bytes_total.load(Ordering::Relaxed)
    }
}

/// An error of the bucket as a store error saying what was being done.
pub(crate) fn bucket_error(what: impl std::fmt::Display, e: blockrep_objects::Error) -> Error {
    let kind = match e {
        blockrep_objects::Error::Malformed { .. } => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what}: {e}"))
}

/// The same as an `io::Error`, for the file-system seam.
pub(crate) fn bucket_io_error(
    what: impl std::fmt::Display,
    e: blockrep_objects::Error,
) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

impl Store {
    /// Opens the store kept in `bucket` (see `bucket/`), with `dir` as its
    /// local working copy and cache, locked like [`Store::open_exclusive`].
    /// The records of `dir` are replaced by the bucket's.
    pub fn open_in_bucket(
        dir: &Path,
        bucket: blockrep_objects::BlockingBucket,
        options: BucketOptions,
    ) -> Result<Self, Error> {
        let dir = &std::path::absolute(dir)
            .map_err(|e| Error::io(format!("cannot resolve {}", dir.display()), e))?;
        create_dir_durable(&RealFs, dir)?;
        let lock_file = lock_data_dir(dir)?;
        crate::vfs::restrict_data_dir(dir).map_err(|e| {
            Error::io(
                format!("cannot restrict {} to its owner (mode 0700)", dir.display()),
                e,
            )
        })?;
        let remote = Arc::new(Remote::new(bucket));
        let records = BucketRecords::new(Arc::new(RealFs), dir.clone(), Arc::clone(&remote));
        records.restore()?;
        let guard = FsyncGuard::new(Arc::new(records));
        let sync_failed = guard.flag();
        let vfs: Arc<dyn Vfs> = Arc::new(guard);
        create_dir_durable(vfs.as_ref(), &dir.join("packs"))?;
        let packs = BucketPacks::open(
            dir.join("packs"),
            Arc::clone(&vfs),
            remote,
            options.cache_bytes,
        )?;
        let mut store = Store::with_packs(dir, vfs, Box::new(packs), false, sync_failed)?;
        store.lock_file = Some(lock_file);
        Ok(store)
    }
}

/// Shared by the two halves of a store in a bucket.
pub(crate) type SharedRemote = Arc<Remote>;

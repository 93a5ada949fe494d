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
//! - **Listings** (`refresh.rs`) read again the snapshots and launches of the
//!   sources another server serves, as far as they changed.

#[cfg(test)]
mod gated;
mod lease;
mod packs;
mod records;
mod refresh;
mod round;
mod take_part;

use crate::blobs::IndexOptions;
use crate::error::{Error, ErrorKind};
use crate::fsutil::create_dir_durable;
use crate::fsutil::{lock_data_dir, make_data_dir, restrict_data_dir};
use crate::guard::FsyncGuard;
pub(crate) use crate::remote::{Remote, bucket_error, bucket_io_error};
use crate::store::Store;
use crate::vfs::{RealFs, Vfs};
use std::path::Path;
use std::sync::Arc;

pub(crate) use packs::BucketPacks;
pub(crate) use records::BucketRecords;
pub(crate) use round::RoundPeers;
pub use round::{Round, RoundPhase};
pub use take_part::{RoundEnd, RoundPart};

/// Size at which a pack of a store in a bucket is sealed and uploaded.
pub const BUCKET_PACK_SIZE_MAX_BYTES: u64 = 64 << 20;

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

/// Name of the file that makes a data directory the working copy of a bucket.
pub(crate) const WORKING_COPY_FILE: &str = "bucket";

/// Makes `dir` the working copy of the bucket `name`, or checks that it is:
/// opening replaces a working copy's records with the bucket's, so a data
/// directory that holds a local store (or another bucket's copy) is refused
/// rather than emptied.
fn claim_working_copy(dir: &Path, name: &str) -> Result<(), Error> {
    let marker = dir.join(WORKING_COPY_FILE);
    match std::fs::read_to_string(&marker) {
        Ok(text) if text.trim() == name => return Ok(()),
        Ok(text) => {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "{} is the working copy of {}, not of {name}: give each bucket a data \
                     directory of its own",
                    dir.display(),
                    text.trim()
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot read {}", marker.display()), e)),
    }
    let holds_a_store = ["packs", "sources", "launches"]
        .iter()
        .any(|sub| std::fs::read_dir(dir.join(sub)).is_ok_and(|mut d| d.next().is_some()));
    if holds_a_store {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "{} holds a local store: a bucket's working copy must be a new directory \
                 (the local store is left as it is)",
                dir.display()
            ),
        ));
    }
    crate::fsutil::publish_atomic(&RealFs, &marker, format!("{name}\n").as_bytes())
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
        let dir = &make_data_dir(dir)?;
        let lock_file = lock_data_dir(dir)?;
        claim_working_copy(dir, bucket.bucket().name())?;
        restrict_data_dir(dir)?;
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
            Arc::clone(&remote),
            options.cache_bytes,
        )?;
        let mut store = Store::with_packs(
            dir,
            vfs,
            Box::new(packs),
            false,
            sync_failed,
            IndexOptions::default(),
        )?;
        store.lock_file = Some(lock_file);
        store.remote = Some(remote);
        // Smaller packs than a local store's: a pack is uploaded when it is
        // sealed, so its upload overlaps the rest of a sync, and what a
        // commit waits for (the last pack) stays short.
        store.set_pack_size_max_bytes(BUCKET_PACK_SIZE_MAX_BYTES);
        Ok(store)
    }
}

/// Shared by the two halves of a store in a bucket.
pub(crate) type SharedRemote = Arc<Remote>;

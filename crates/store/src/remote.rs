//! The bucket a store is kept in, and what the store knows of its objects:
//! the version of each record it last read or wrote (the condition of its
//! next write), the leases it holds, and counters of its uploads. Shared by
//! the store proper (which checks a source's lease before a commit) and the
//! bucket layers (`bucket/`).

use std::sync::atomic::{AtomicU64, Ordering};

use blockrep_core::SourceId;
use blockrep_objects::{BlockingBucket, Lease, LeaseRecord, Version};

use crate::error::{Error, ErrorKind};
use crate::mutex::lock;

/// The bucket and what this store knows of its objects.
#[derive(Debug)]
pub(crate) struct Remote {
    pub(crate) bucket: BlockingBucket,
    /// The version last read or written of each record object, the
    /// condition of its next write.
    versions: std::sync::Mutex<std::collections::HashMap<String, Version>>,
    /// The leases this store holds, by name: a source's id, or
    /// [`PRESENCE_PREFIX`] + holder, or [`GC_LEASE`].
    leases: std::sync::Mutex<std::collections::HashMap<String, Lease>>,
    errors_total: AtomicU64,
    uploaded_bytes_total: AtomicU64,
    /// Makes every record object's bytes differ from the last (see
    /// [`Remote::envelope`]).
    writes: AtomicU64,
    nonce_base: u64,
    /// The collection this store runs beside other servers, from its claim
    /// of the collection lease to the end of its round (`bucket/round.rs`).
    pub(crate) round: std::sync::Mutex<Option<Collecting>>,
    /// Why this store may not publish now (`bucket/take_part.rs`), and as
    /// whom it announced itself.
    pub(crate) unsettled: std::sync::Mutex<Unsettled>,
    /// One claim of a source's lease at a time: two at once (a session and
    /// an admin request) would both take it, and keep one of the versions.
    pub(crate) claiming: std::sync::Mutex<()>,
    /// Set when the server released its leases at a clean stop: a lease
    /// that a claim still running takes after that is released at once,
    /// so that no lease outlives the stop until its expiry.
    released: std::sync::atomic::AtomicBool,
}

/// What keeps a store in a bucket from publishing, mirrored in the blob
/// layer's flag that publishing checks.
#[derive(Debug, Default)]
pub(crate) struct Unsettled {
    /// The generation of another server's round whose end this store could
    /// not confirm, or that ran without it.
    pub(crate) round: Option<u64>,
    /// Its announcement lapsed: it must announce itself again and read the
    /// packs (`Store::rejoin`).
    pub(crate) rejoin: bool,
    /// The name it announced itself as, once it did.
    pub(crate) announced_as: Option<String>,
}

impl Unsettled {
    /// Whether publishing must wait.
    pub(crate) fn blocks(&self) -> bool {
        self.round.is_some() || self.rejoin
    }
}

/// A collection under this store's collection lease, and the servers that
/// take part in it.
#[derive(Debug, Clone)]
pub(crate) struct Collecting {
    /// Generation of the collection lease: the round's number.
    pub(crate) generation: u64,
    /// This server.
    pub(crate) holder: String,
    /// The other servers present, then those that joined.
    pub(crate) peers: Vec<String>,
    /// Lease time of the servers' presence, which bounds every wait.
    pub(crate) ttl_ms: u64,
    /// The clock the lease was taken with, and when.
    pub(crate) claimed_unix_ms: u64,
    pub(crate) claimed_at: std::time::Instant,
}

/// Lease names of the servers sharing a bucket (`leases/servers/HOLDER`):
/// no source id holds a `/`, so none collides with a source's lease.
pub(crate) const PRESENCE_PREFIX: &str = "servers/";
/// The lease of the one collection that may run on a bucket at a time.
pub(crate) const GC_LEASE: &str = "gc/collector";

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
            leases: Default::default(),
            errors_total: AtomicU64::new(0),
            uploaded_bytes_total: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            nonce_base: u64::from_le_bytes(base),
            round: Default::default(),
            unsettled: Default::default(),
            claiming: Default::default(),
            released: Default::default(),
        }
    }

    /// A record's object: the magic, a nonce unique to this write, then the
    /// record. The nonce makes a rewrite of the same record a new object
    /// version (stores derive ETags from the bytes), so that a conditional
    /// write by a server that read the old version fails.
    pub(crate) fn envelope(&self, record: &[u8]) -> Vec<u8> {
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
    pub(crate) fn open_envelope<'a>(key: &str, object: &'a [u8]) -> Result<&'a [u8], Error> {
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

    /// Forgets the versions of every record under `dir/` (about to be read
    /// again).
    pub(crate) fn forget_versions_under(&self, dir: &str) {
        let prefix = format!("{dir}/");
        lock(&self.versions).retain(|key, _| !key.starts_with(&prefix));
    }

    /// The lease named `name` this store holds, if any (perhaps expired).
    pub(crate) fn lease_named(&self, name: &str) -> Option<LeaseRecord> {
        lock(&self.leases).get(name).map(|l| l.record().clone())
    }

    /// The lease this store holds on `source`, if any (perhaps expired).
    pub(crate) fn lease(&self, source: &SourceId) -> Option<LeaseRecord> {
        self.lease_named(source.as_str())
    }

    /// Every lease this store holds, by name.
    pub(crate) fn leases(&self) -> Vec<(String, LeaseRecord)> {
        let mut all: Vec<_> = lock(&self.leases)
            .iter()
            .map(|(name, lease)| (name.clone(), lease.record().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// A copy of the lease named `name`, to renew.
    pub(crate) fn held(&self, name: &str) -> Option<Lease> {
        lock(&self.leases).get(name).cloned()
    }

    /// Holds `lease` as `name`'s, unless the leases were released (see
    /// [`Remote::release_all`]): then it is released in the bucket instead
    /// (best effort: it expires by itself).
    pub(crate) fn keep_lease(&self, name: &str, lease: Lease) {
        lock(&self.leases).insert(name.to_owned(), lease.clone());
        // Checked after it is in the map: a release that began before it
        // was put there sets the flag first, so one of the two releases it.
        if self.released.load(Ordering::SeqCst) && self.replace_lease(name, &lease, None) {
            let _ = self.bucket.release_lease(lease);
        }
    }

    /// Marks the leases released for good (a clean stop), and takes them
    /// out of the map: the caller releases them in the bucket.
    pub(crate) fn release_all(&self) -> Vec<(String, Lease)> {
        self.released.store(true, Ordering::SeqCst);
        lock(&self.leases).drain().collect()
    }

    pub(crate) fn drop_lease(&self, name: &str) -> Option<Lease> {
        lock(&self.leases).remove(name)
    }

    /// Replaces the lease `name` by `new` (drops it for `None`) only if it
    /// is still `expected`, the copy a renewal started from: a release or
    /// a new claim made while the renewal's request ran wins over the
    /// renewal's outcome. Returns whether it replaced it.
    pub(crate) fn replace_lease(&self, name: &str, expected: &Lease, new: Option<Lease>) -> bool {
        let mut leases = lock(&self.leases);
        if leases.get(name) != Some(expected) {
            return false;
        }
        match new {
            Some(lease) => leases.insert(name.to_owned(), lease),
            None => leases.remove(name),
        };
        true
    }

    /// Fails unless this store holds `source`'s lease until after
    /// `now_unix_ms`: a server whose lease lapsed (it was paused, or cut off
    /// from the bucket) writes nothing more of the source, even where the
    /// bucket's conditions would still let it.
    pub(crate) fn check_lease(&self, source: &SourceId, now_unix_ms: u64) -> Result<(), Error> {
        match self.lease(source) {
            Some(record) if record.expires_unix_ms > now_unix_ms => Ok(()),
            Some(record) => Err(Error::new(
                ErrorKind::Leased,
                format!(
                    "this server's lease of {source} expired at {} (unix ms); \
                     another server may serve it now",
                    record.expires_unix_ms
                ),
            )),
            None => Err(Error::new(
                ErrorKind::Leased,
                format!("this server holds no lease of {source}"),
            )),
        }
    }

    /// Fails when this store announced itself in the bucket and that
    /// announcement is not held now (`now_unix_ms`): a collection may run
    /// without it, so it publishes nothing until it announced itself again
    /// and read the packs. A store that never announced itself (a tool) is
    /// not held to it.
    pub(crate) fn check_presence(&self, now_unix_ms: u64) -> Result<(), Error> {
        let Some(holder) = lock(&self.unsettled).announced_as.clone() else {
            return Ok(());
        };
        let name = format!("{PRESENCE_PREFIX}{holder}");
        match self.lease_named(&name) {
            Some(lease) if lease.expires_unix_ms > now_unix_ms => Ok(()),
            _ => Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "this server's announcement {name} is not held (it was paused or cut off \
                     from the bucket): nothing is published until it has announced itself \
                     again"
                ),
            )),
        }
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

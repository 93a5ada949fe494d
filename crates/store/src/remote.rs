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
    /// The generation of another server's round whose end this store could
    /// not confirm: it publishes nothing until it has
    /// (`bucket/take_part.rs`).
    pub(crate) unsettled_round: std::sync::Mutex<Option<u64>>,
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
            unsettled_round: Default::default(),
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

    pub(crate) fn keep_lease(&self, name: &str, lease: Lease) {
        lock(&self.leases).insert(name.to_owned(), lease);
    }

    pub(crate) fn drop_lease(&self, name: &str) -> Option<Lease> {
        lock(&self.leases).remove(name)
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

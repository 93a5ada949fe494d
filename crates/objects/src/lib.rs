//! blockrep's objects in an S3-compatible bucket (AWS S3, Ceph RGW, MinIO,
//! SeaweedFS): the primitives the replication servers that share one bucket
//! build on.
//!
//! - [`Bucket`]: objects under a prefix, written whole and only
//!   conditionally where it matters: [`Bucket::put_new`] (`If-None-Match: *`:
//!   exactly one of several racing writers wins) and [`Bucket::put_if`]
//!   (`If-Match` on the version read: a writer that lost track of the object
//!   is refused, never silently overwrites it), plus whole and ranged reads,
//!   sealed uploads of files ([`Bucket::upload_file`], multipart past
//!   [`PART_BYTES`]), listing and deletion.
//! - [`Lease`]: one holder at a time for a name (a source), with an expiry
//!   and a generation that grows with every change of holder, kept in one
//!   object and changed only by conditional writes.
//!
//! - [`BlockingBucket`]: the same calls for synchronous code (the replica
//!   store), each run on a runtime of its own.
//!
//! A conditional write is judged by its mode: a create that loses is
//! [`Error::Exists`]; an update whose condition failed (the object changed
//! or went: AWS answers 404, SeaweedFS 412) is [`Error::Conflict`].

mod blocking;
mod bucket;
mod lease;

pub use blocking::BlockingBucket;
pub use bucket::{
    Bucket, Listed, PART_BYTES, PARTS_IN_FLIGHT, REQUEST_RETRIES_MAX, REQUEST_RETRY_WINDOW,
    REQUEST_TIMEOUT, S3Location, S3Service, Version,
};
pub use lease::{Lease, LeaseRecord};

/// What a bucket operation failed with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `put_new` of a key that exists.
    #[error("{0} exists already")]
    Exists(String),
    /// A conditional write whose condition did not hold: the object changed
    /// (or went) since it was read.
    #[error("{0} changed since it was read")]
    Conflict(String),
    /// A lease someone else holds and has not let expire.
    #[error("{name} is leased to {holder} until {expires_unix_ms} (unix ms)")]
    Held {
        name: String,
        holder: String,
        expires_unix_ms: u64,
    },
    /// An object that is not what blockrep writes there.
    #[error("{key}: {why}")]
    Malformed { key: String, why: String },
    /// A local file could not be read.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A bad location or configuration.
    #[error("{0}")]
    Config(String),
    /// The store failed or could not be reached.
    #[error("{0}")]
    Store(#[from] object_store::Error),
}

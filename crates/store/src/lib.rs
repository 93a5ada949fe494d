//! The replica store: content-addressed chunks, index pages and roots in
//! append-only packs, plus one head per source.
//!
//! # Layout of a data directory
//!
//! ```text
//! DATA/packs/00000001.pack   append-only blob files, sealed at PACK_SIZE_MAX_BYTES
//! DATA/sources/ID/head       the source's last committed epoch (fixed-size, checksummed)
//! DATA/sources/ID/snapshots/NAME   a snapshot: a named reference to a committed root
//! ```
//!
//! Snapshots ([`Snapshot`], format in `snapshot.rs`) copy nothing; automatic ones
//! are taken and expired by a [`RetentionPolicy`].
//!
//! # Pack record (little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `BRB1` |
//! | 4 | 1 | kind: 1 chunk, 2 index page, 3 root |
//! | 5 | 1 | codec: 1 raw, 2 zstd |
//! | 6 | 2 | reserved, zero |
//! | 8 | 4 | stored length |
//! | 12 | 4 | raw (decoded) length |
//! | 16 | 32 | id: blake3 of the decoded bytes |
//! | 48 | 4 | crc32 of bytes 0..48 and the stored bytes |
//! | 52 | stored length | stored bytes |
//!
//! # Invariants
//!
//! - Nothing torn is ever read as valid: every record carries a crc32, and on open a
//!   torn tail of the active (last) pack is cut off. Sealed packs are never truncated.
//! - A head moves only after every blob it names is durable: blobs are appended,
//!   the pack is fsynced, then the head is written to a temporary file, fsynced,
//!   renamed over the old head, and the directory fsynced.
//! - `insert` is idempotent and reports whether the blob was new.
#![deny(unsafe_code)]

mod catalog;
mod error;
mod fsutil;
mod head;
mod pack;
mod retention;
mod snapshot;
mod store;
#[cfg(test)]
mod testutil;

pub use error::{Error, ErrorKind};
pub use head::Head;
pub use pack::{BlobKind, PACK_SIZE_MAX_BYTES, StoredCodec};
pub use retention::{RETENTION_TIERS_MAX, RetentionPolicy, RetentionTier};
pub use snapshot::{Snapshot, SnapshotKind};
pub use store::{CommitStats, ExportStats, Store};

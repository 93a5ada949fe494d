//! The replica store: content-addressed chunks, index pages and roots in
//! append-only packs, plus one head per source, its snapshots, and launch volumes.
//!
//! # Layout of a data directory
//!
//! ```text
//! DATA/packs/00000001.pack   append-only blob files, sealed at PACK_SIZE_MAX_BYTES
//! DATA/sources/ID/head       the source's last committed epoch (fixed-size, checksummed)
//! DATA/sources/ID/snapshots/NAME   a snapshot: a named reference to a committed root
//! DATA/launches/NAME/meta    a launch volume's origin (its base snapshot and root)
//! DATA/launches/NAME/head    a launch volume's last flushed root and write generation
//! ```
//!
//! Snapshots ([`Snapshot`]) copy nothing; automatic ones are taken and
//! expired by a [`RetentionPolicy`]. Launch volumes ([`LaunchVolume`]) are
//! copy-on-write views of a snapshot's root that never
//! change that root or the source's head. [`Store::gc`] reclaims what nothing
//! references and compacts packs while replication goes on (protocol in
//! `gc.rs`); [`Store::verify`] re-reads everything referenced and reports damage
//! with what it affects.
//!
//! Below [`Store`] (heads, commit, export, in `store.rs`) sits the blob layer
//! (`blobs/`: the blob index, the active pack, fsyncs, the GC fence, pack
//! compaction), which reaches packs through a `PackBackend` (the local
//! `packs/` directory today). Every byte layout is in `format.rs`.
//!
//! Every file of the data directory is reached through the [`vfs::Vfs`] trait
//! ([`vfs::RealFs`] by default, [`Store::open_with_vfs`] for another), so that
//! crash tests can run the store on a simulated disk that loses power
//! (`sim`, with the `sim` feature).
//!
//! ```
//! use std::sync::Arc;
//! use blockrep_core::{Geometry, Root, SourceId, scan_buffer};
//! use blockrep_store::{BlobKind, GcOptions, LaunchKind, Store, StoredCodec};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = Arc::new(Store::open(dir.path()).unwrap());
//! let source = SourceId::new("web-1").unwrap();
//! // Commit a one-chunk disk (a server does this as chunks arrive from the agent).
//! let geometry = Geometry::new(4096, 4096).unwrap();
//! let disk = vec![7u8; 4096];
//! let ids = scan_buffer(&disk, geometry);
//! store.insert(BlobKind::Chunk, ids[0], StoredCodec::Raw, 4096, &disk).unwrap();
//! // The store never reads the clock: callers pass the time in
//! // (blockrep_core::clock::now_unix_ms() in the server).
//! let now_unix_ms = 1_700_000_000_000;
//! let (root, pages) = Root::build(geometry, &ids);
//! store.commit(&source, 1, &root, &pages, 0, now_unix_ms).unwrap();
//!
//! // Snapshot it, launch a test volume from the snapshot, write and flush.
//! store.create_snapshot(&source, Some("before"), None, now_unix_ms).unwrap();
//! store
//!     .create_launch(&source, "before", "drill", LaunchKind::Test, now_unix_ms)
//!     .unwrap();
//! let volume = store.open_launch("drill").unwrap();
//! volume.write(10, b"hello").unwrap();
//! volume.flush(now_unix_ms).unwrap();
//! let mut buf = [0u8; 7];
//! volume.read(9, &mut buf).unwrap();
//! assert_eq!(&buf, b"\x07hello\x07");
//! // The snapshot and the source's head still name the original disk.
//! assert_eq!(store.snapshot(&source, "before").unwrap().unwrap().root, root.id());
//! assert_eq!(store.head(&source).unwrap().unwrap().root, root.id());
//!
//! // Everything referenced reads back intact; nothing is garbage yet.
//! assert!(store.verify(None, None).unwrap().is_clean());
//! let report = store.gc(&GcOptions::default()).unwrap();
//! assert_eq!((report.blobs_dead, report.packs_compacted), (0, 0));
//! ```
//!
//! # Formats
//!
//! Every file of the data directory is a fixed-size or length-prefixed record
//! with a magic that carries its version and a crc32; their byte layouts are
//! all in `format.rs` (pack records: magic `BRB1`, a 52-byte header, then the
//! stored bytes).
//!
//! # Invariants
//!
//! - Nothing torn is ever read as valid: every record carries a crc32, and on open a
//!   torn tail of the active (last) pack is cut off. Sealed packs are never truncated.
//!   A record whose crc fails never counts as the blob being stored: a sound copy
//!   wins on open, and [`Store::contains`] and [`Store::insert`] ignore it.
//! - A head moves only after every blob it names is durable: blobs are appended,
//!   the pack is fsynced, then the head is written to a temporary file, fsynced,
//!   renamed over the old head, and the directory fsynced.
//! - `insert` is idempotent and reports whether the blob was new.
//! - The store never reads the clock: every time it records (commit, snapshot,
//!   launch creation and flush, expiry) is passed in by the caller.
//! - Snapshot and launch names are validated like source ids before any path is
//!   built from them.
//! - The data directory is 0700 and every file the store creates 0600, whatever
//!   the umask; `export` writes its image 0600, all or nothing (see `vfs.rs`
//!   and `export.rs`).
//! - A snapshot is published under the GC fence, so a collection never sweeps
//!   what it names.
//! - A snapshot or launch record is published atomically; a launch directory is
//!   built under a temporary name and renamed into place.
//! - Launch writes never change a snapshot, a source's head or any existing blob;
//!   a launch's head moves only after the pages and root it names are durable.
//! - A commit or flush publishes a root only if every page it names and every
//!   chunk of the pages it adds is stored, checked under the GC fence.
//! - Garbage collection removes a blob only if nothing references it, no open
//!   launch holds it and nobody touched it while it ran; a pack file is deleted
//!   only after its live records were copied and made durable elsewhere.
#![deny(unsafe_code)]

mod authentic;
mod blob_read;
mod blobs;
mod bucket;
mod catalog;
mod chunk_cache;
mod chunk_reads;
mod consistency;
mod convert;
mod delete;
mod error;
mod export;
mod format;
mod fsutil;
mod gc;
mod guard;
mod head;
mod launch;
mod lifecycle;
mod machine;
mod migration;
mod mutex;
mod remote;
mod retention;
mod rpo_target;
mod sealed;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod snapshot;
mod source_record;
mod store;
mod tenant;
#[cfg(test)]
mod testutil;
mod textrec;
mod verify;
pub mod vfs;

pub use blobs::{
    BlobInfo, BlobKind, GC_LIVE_SHARE_MIN_DEFAULT, GcOptions, GcReport, INDEX_MEMORY_DEFAULT_BYTES,
    PACK_SIZE_MAX_BYTES, StoredCodec, UploadStats,
};
pub use blockrep_objects::LeaseRecord;
pub use bucket::{
    BUCKET_CACHE_BYTES_DEFAULT, BucketOptions, Round, RoundEnd, RoundPart, RoundPhase,
};
pub use chunk_cache::{CHUNK_CACHE_BYTES_DEFAULT, ChunkCacheStats};
pub use convert::SourceEncrypted;
pub use delete::SourceDeleted;
pub use error::{Error, ErrorKind};
pub use head::Head;
pub use launch::{
    CHECK_OUTPUT_TAIL_MAX_BYTES, CHECK_TEXT_MAX_BYTES, LAUNCH_CHECKS_MAX, LAUNCH_PAGES_CACHED_MAX,
    LaunchCheck, LaunchInfo, LaunchKind, LaunchVolume, LaunchWorkflow, Materialization,
    MaterializeProgress, MaterializeStep, OVERLAY_BLOCK_BYTES, Rebased, check_output_tail,
};
pub use lifecycle::{Downtime, Lifecycle, LifecycleStage};
pub use machine::VolumeCommit;
pub use migration::{
    FAILED_CHECKS_MAX, FailedCheck, MIGRATION_BY_MAX_BYTES, MIGRATION_EVENTS_KEPT,
    MIGRATION_NOTE_MAX_BYTES, MigrationChange, MigrationEvent, MigrationState,
};
pub use retention::{RETENTION_TIERS_MAX, RetentionPolicy, RetentionTier};
pub use snapshot::{Snapshot, SnapshotKind};
pub use store::{CommitStats, ExportStats, Store, StoredRoot};
pub use verify::{
    AFFECTED_CHUNKS_LISTED_MAX, Affected, BlobPlace, ChunkPlace, Damage, DamagedBlob, Referrer,
    VerifyReport,
};

//! Core data model of blockrep: disk geometry, chunk ids, blake3 scanning of
//! disks on every core, index pages, roots (the Merkle root of a disk) and diffs.
//!
//! Nothing here does network I/O or knows about tokio or TLS; the agent, the server
//! and the store all build on these types.
//!
//! ```
//! use blockrep_core::{Geometry, scan_buffer, Root};
//!
//! let geometry = Geometry::new(200_000, 65_536).unwrap();
//! let mut disk = vec![0u8; 200_000];
//! disk[70_000] = 1; // only chunk 1 is non-zero
//! let ids = scan_buffer(&disk, geometry);
//! assert!(ids[0].is_zero() && !ids[1].is_zero() && ids[2].is_zero());
//! let root = Root::from_chunk_ids(geometry, &ids);
//! assert_eq!(root.geometry(), geometry);
//! ```
#![forbid(unsafe_code)]

pub mod clock;
mod consistency;
mod diff;
mod disk;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod geometry;
mod id;
mod id_space;
mod index;
mod machine;
mod patch;
pub mod rng;
mod scan;
mod source;
mod wire_enum;

pub use consistency::Consistency;
pub use diff::{changed_chunks, changed_pages};
pub use disk::DiskImage;
pub use error::{Error, ErrorKind};
pub use geometry::{
    CHUNK_SIZE_DEFAULT_BYTES, CHUNK_SIZE_MAX_BYTES, CHUNK_SIZE_MIN_BYTES, CHUNKS_PER_PAGE,
    DISK_SIZE_MAX_BYTES, Geometry, PAGE_COUNT_MAX,
};
pub use id::ChunkId;
pub use id_space::{ID_KEY_LEN, IdSpace};
pub use index::{Page, Root, RootId};
pub use machine::{MachineRoot, SINGLE_VOLUME_NAME, VOLUME_NAME_MAX_LEN, VOLUMES_MAX, VolumeName};
pub use patch::{
    BLOCK_VALUE_LEN, BlockValue, PATCH_BLOCK_BYTES, apply_patch, changed_blocks,
    hash_with_block_values, parse_block_values, patch_block_count,
};
pub use scan::{hash_chunk, is_all_zero, scan_buffer, scan_buffer_with_threads};
pub use source::{SOURCE_ID_MAX_LEN, SourceId};

//! Helpers for the tests of snapshots and launches (the same pattern as the tests
//! in `store.rs`: store every non-zero chunk, then commit).

use std::fs;
use std::path::Path;

use blockrep_core::{Geometry, Root, SourceId, scan_buffer};

use crate::{BlobKind, Head, Store, StoredCodec};

pub(crate) fn source() -> SourceId {
    SourceId::new("src-1").unwrap()
}

/// Stores every non-zero chunk of `disk` and commits it as `epoch` of `source`.
pub(crate) fn commit_disk(
    store: &Store,
    source: &SourceId,
    disk: &[u8],
    geometry: Geometry,
    epoch: u64,
) -> Head {
    let ids = scan_buffer(disk, geometry);
    for (index, id) in ids.iter().enumerate() {
        if !id.is_zero() {
            let range = geometry.chunk_range(index as u64).unwrap();
            store
                .insert(
                    BlobKind::Chunk,
                    *id,
                    StoredCodec::Raw,
                    range.len() as u32,
                    &disk[range],
                )
                .unwrap();
        }
    }
    let (root, pages) = Root::build(geometry, &ids);
    store.commit(source, epoch, &root, &pages, 1).unwrap().head
}

/// A disk with a zero chunk in every three 4 KiB blocks and patterned bytes elsewhere.
pub(crate) fn sample_disk(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if (i / 4096) % 3 == 0 {
                0
            } else {
                (i as u8).wrapping_mul(seed) ^ (i >> 12) as u8
            }
        })
        .collect()
}

/// Total size of the pack files.
pub(crate) fn pack_bytes(data_dir: &Path) -> u64 {
    fs::read_dir(data_dir.join("packs"))
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum()
}

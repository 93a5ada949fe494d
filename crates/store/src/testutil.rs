//! Helpers for the tests of snapshots and launches (the same pattern as the tests
//! in `store/tests.rs`: store every non-zero chunk, then commit).

use std::fs;
use std::path::Path;

use blockrep_core::{ChunkId, Geometry, Page, Root, SourceId};

use crate::{Head, Store};

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
    let (root, pages) = store_disk(store, disk, geometry);
    store
        .commit(
            source,
            epoch,
            &root,
            &pages,
            1,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap()
        .head
}

/// Stores every non-zero chunk of `disk` (raw) and builds its root and pages.
pub(crate) fn store_disk(store: &Store, disk: &[u8], geometry: Geometry) -> (Root, Vec<Page>) {
    store.insert_image(disk, geometry).unwrap()
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
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".pack"))
        .map(|entry| entry.metadata().unwrap().len())
        .sum()
}

/// The seeded generator of the tests.
pub(crate) use blockrep_core::rng::SplitMix64 as Rng;

/// Rewrites about `share_percent` of the chunks of `disk` with fresh random
/// bytes (and some with zeroes).
pub(crate) fn churn(rng: &mut Rng, disk: &mut [u8], geometry: Geometry, share_percent: u64) {
    for index in 0..geometry.chunk_count() {
        if rng.below(100) >= share_percent {
            continue;
        }
        let range = geometry.chunk_range(index).unwrap();
        if rng.below(8) == 0 {
            disk[range].fill(0);
        } else {
            rng.fill(&mut disk[range]);
        }
    }
}

/// The disk a root describes, rebuilt from the store.
pub(crate) fn root_disk(store: &Store, root_id: &ChunkId) -> Vec<u8> {
    let root = store.read_root(root_id).unwrap();
    let geometry = root.geometry();
    let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
    for (index, id) in store.chunk_ids(&root).unwrap().iter().enumerate() {
        if !id.is_zero() {
            let range = geometry.chunk_range(index as u64).unwrap();
            disk[range].copy_from_slice(&store.read_blob(id).unwrap());
        }
    }
    disk
}

/// The pack files by name, with their bytes.
pub(crate) fn pack_files(data_dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fs::read_dir(data_dir.join("packs"))
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".pack"))
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                fs::read(entry.path()).unwrap(),
            )
        })
        .collect()
}

/// Every byte of the data directory's files, one buffer per file.
pub(crate) fn every_file(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// A store in a fresh temporary directory (kept while the guard lives).
pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = Store::open(dir.path()).expect("open store");
    (dir, store)
}

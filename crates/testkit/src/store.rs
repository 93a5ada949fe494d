//! Writing disks into a store directly, as a server's sessions would, for
//! tests that need a store in a given state before any server runs.

use blockrep_core::{Consistency, Geometry, Page, Root, SourceId, VolumeName};
use blockrep_store::{Store, VolumeCommit};

/// Stores every non-zero chunk of `disk` (raw) and builds its root and pages.
pub fn store_disk(store: &Store, disk: &[u8], geometry: Geometry) -> (Root, Vec<Page>) {
    store.insert_image(disk, geometry).unwrap()
}

/// Commits `disks` (name and bytes, in chunks of `chunk_bytes`) as epoch
/// `epoch` of `source`, one machine, labelled crash-consistent.
pub fn commit_machine(
    store: &Store,
    source: &SourceId,
    epoch: u64,
    chunk_bytes: u32,
    disks: &[(&str, Vec<u8>)],
) {
    let built: Vec<_> = disks
        .iter()
        .map(|(name, disk)| {
            let geometry = Geometry::new(disk.len() as u64, chunk_bytes).unwrap();
            let (root, pages) = store_disk(store, disk, geometry);
            (VolumeName::new(name).unwrap(), root, pages)
        })
        .collect();
    let volumes: Vec<VolumeCommit<'_>> = built
        .iter()
        .map(|(name, root, pages)| VolumeCommit { name, root, pages })
        .collect();
    store
        .commit_machine(
            source,
            epoch,
            &volumes,
            1,
            true,
            Consistency::CrashConsistent,
            2,
        )
        .unwrap();
}

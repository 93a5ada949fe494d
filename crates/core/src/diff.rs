//! Differences between two states of a disk.
//!
//! Both inputs may come from a peer (the agent diffs its scan against roots and
//! pages the server sends), so a mismatch is an error for the caller to report,
//! never a panic.

use crate::error::{Error, ErrorKind};
use crate::id::ChunkId;
use crate::index::Root;

/// Indices of the pages whose ids differ between two roots of the same geometry.
///
/// Fails with [`ErrorKind::GeometryMismatch`] if the geometries differ: a diff
/// between disks of different sizes or chunk sizes means nothing, and callers
/// decide what a resize means first.
pub fn changed_pages(old: &Root, new: &Root) -> Result<Vec<usize>, Error> {
    if old.geometry() != new.geometry() {
        return Err(Error::new(
            ErrorKind::GeometryMismatch,
            format!(
                "cannot diff a root of {} bytes in {}-byte chunks against one of {} bytes in \
                 {}-byte chunks",
                old.geometry().disk_size_bytes(),
                old.geometry().chunk_size_bytes(),
                new.geometry().disk_size_bytes(),
                new.geometry().chunk_size_bytes()
            ),
        ));
    }
    Ok(old
        .page_ids()
        .iter()
        .zip(new.page_ids())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| index)
        .collect())
}

/// Indices of the chunks whose ids differ, for two id lists of the same length;
/// `first_index` is added to every result (the position of `old[0]` on the disk).
///
/// Fails with [`ErrorKind::GeometryMismatch`] if the lengths differ.
pub fn changed_chunks(
    old: &[ChunkId],
    new: &[ChunkId],
    first_index: u64,
) -> Result<Vec<u64>, Error> {
    if old.len() != new.len() {
        return Err(Error::new(
            ErrorKind::GeometryMismatch,
            format!("cannot diff {} chunk ids against {}", old.len(), new.len()),
        ));
    }
    Ok(old
        .iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| first_index + index as u64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Geometry;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn page_and_chunk_diffs_agree(
            changes in proptest::collection::btree_set(0usize..3000, 0..40)
        ) {
            let geometry = Geometry::new(3000 * 4096, 4096).unwrap();
            let old: Vec<ChunkId> = (0..3000u32)
                .map(|i| ChunkId::from(blake3::hash(&i.to_le_bytes())))
                .collect();
            let mut new = old.clone();
            for &i in &changes {
                new[i] = ChunkId([7; 32]);
            }
            let old_root = Root::from_chunk_ids(geometry, &old);
            let new_root = Root::from_chunk_ids(geometry, &new);
            let mut found = Vec::new();
            for page in changed_pages(&old_root, &new_root).unwrap() {
                let start = page * 1024;
                let end = (start + 1024).min(3000);
                found.extend(
                    changed_chunks(&old[start..end], &new[start..end], start as u64).unwrap(),
                );
            }
            let expected: Vec<u64> = changes.iter().map(|&i| i as u64).collect();
            prop_assert_eq!(found, expected);
            prop_assert_eq!(old_root == new_root, changes.is_empty());
        }
    }

    #[test]
    fn roots_of_other_geometries_are_refused_not_diffed() {
        let ids = vec![ChunkId([3; 32]); 3000];
        let geometry = Geometry::new(3000 * 4096, 4096).unwrap();
        let root = Root::from_chunk_ids(geometry, &ids);
        let smaller = Geometry::new(2000 * 4096, 4096).unwrap();
        let other = Root::from_chunk_ids(smaller, &ids[..2000]);
        let error = changed_pages(&root, &other).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::GeometryMismatch);
        assert!(error.to_string().contains("cannot diff"), "{error}");
        let error = changed_chunks(&ids, &ids[..2000], 0).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::GeometryMismatch);
    }
}

//! Differences between two states of a disk.

use crate::id::ChunkId;
use crate::index::Root;

/// Indices of the pages whose ids differ between two roots of the same geometry.
///
/// Panics if the geometries differ: callers decide what a resize means first.
pub fn changed_pages(old: &Root, new: &Root) -> Vec<usize> {
    assert_eq!(
        old.geometry(),
        new.geometry(),
        "diff needs equal geometries"
    );
    old.page_ids()
        .iter()
        .zip(new.page_ids())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| index)
        .collect()
}

/// Indices of the chunks whose ids differ, for two id lists of the same length;
/// `first_index` is added to every result (the position of `old[0]` on the disk).
pub fn changed_chunks(old: &[ChunkId], new: &[ChunkId], first_index: u64) -> Vec<u64> {
    assert_eq!(old.len(), new.len(), "diff needs equal lengths");
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| first_index + index as u64)
        .collect()
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
            for page in changed_pages(&old_root, &new_root) {
                let start = page * 1024;
                let end = (start + 1024).min(3000);
                found.extend(changed_chunks(&old[start..end], &new[start..end], start as u64));
            }
            let expected: Vec<u64> = changes.iter().map(|&i| i as u64).collect();
            prop_assert_eq!(found, expected);
            prop_assert_eq!(old_root == new_root, changes.is_empty());
        }
    }
}

//! Sub-chunk patches: a changed chunk described as the 4 KiB blocks that
//! differ from a base chunk the receiver already holds.
//!
//! Both ends find the blocks that differ without keeping any per-block state:
//! blake3 is a tree over 1 KiB chunks, so the chaining value of every 4 KiB
//! subtree is computed on the way to a chunk's id ([`hash_with_block_values`]).
//! The sender compares its blocks' values with the base's (which the receiver
//! computes from its stored copy), sends only the ranges that differ, and the
//! receiver rebuilds the chunk ([`apply_patch`]) and checks its id before it
//! keeps it.
//!
//! ```
//! use blockrep_core::{apply_patch, changed_blocks, hash_chunk, hash_with_block_values};
//!
//! let base = vec![1u8; 65_536];
//! let mut new = base.clone();
//! new[10_000] = 2; // in block 2
//! let (_, base_values) = hash_with_block_values(&base);
//! let (new_id, new_values) = hash_with_block_values(&new);
//! let ranges = changed_blocks(&base_values, &new_values, 65_536).unwrap();
//! assert_eq!(ranges, vec![(8192, 4096)]);
//! let data = &new[8192..12_288];
//! let rebuilt = apply_patch(&base, 65_536, &ranges, data).unwrap();
//! assert_eq!(hash_chunk(&rebuilt), new_id);
//! ```

use blake3::Hasher;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::error::{Error, ErrorKind};
use crate::id::ChunkId;
use crate::scan::hash_chunk;

/// Bytes of one patch block: the unit in which changes are found and sent.
/// A blake3 subtree of four 1 KiB chunks, so every block of a chunk (but a
/// short last one) is a whole subtree of the chunk's hash tree. Do not change:
/// both ends of a session compute block values with it.
pub const PATCH_BLOCK_BYTES: u32 = 4096;

/// Bytes kept of a block's blake3 chaining value. 128 bits: a block whose
/// value collides with the base's by chance is not sent, but the chunk's full
/// 256-bit id is checked after the patch is applied, so a collision costs a
/// refused patch, never a wrong chunk.
pub const BLOCK_VALUE_LEN: usize = 16;

/// A block's value: its blake3 subtree chaining value, truncated to
/// [`BLOCK_VALUE_LEN`] bytes.
pub type BlockValue = [u8; BLOCK_VALUE_LEN];

/// Number of patch blocks in a chunk of `raw_len` bytes (the last may be short).
pub fn patch_block_count(raw_len: u32) -> u32 {
    raw_len.div_ceil(PATCH_BLOCK_BYTES)
}

fn truncate(cv: &ChainingValue) -> BlockValue {
    let mut value = [0u8; BLOCK_VALUE_LEN];
    value.copy_from_slice(&cv[..BLOCK_VALUE_LEN]);
    value
}

/// The id of a chunk ([`hash_chunk`]: [`ChunkId::ZERO`] when it is all zero)
/// and the value of each of its [`PATCH_BLOCK_BYTES`] blocks, in one pass of
/// blake3: no byte is hashed twice.
///
/// Each block is hashed as a subtree at its offset; the blocks' chaining
/// values are merged up blake3's tree to the root. For a chunk of at most one
/// block, the one value is the chaining value of the whole chunk as a subtree
/// at offset 0 (a value only ever compared with another computed the same way).
/// An empty chunk has no blocks.
pub fn hash_with_block_values(data: &[u8]) -> (ChunkId, Vec<BlockValue>) {
    let block_len = PATCH_BLOCK_BYTES as usize;
    if data.is_empty() {
        return (hash_chunk(data), Vec::new());
    }
    let mut values = Vec::with_capacity(data.len().div_ceil(block_len));
    if data.len() <= block_len {
        let mut hasher = Hasher::new();
        hasher.update(data);
        values.push(truncate(&hasher.finalize_non_root()));
        let id = if crate::scan::is_all_zero(data) {
            ChunkId::ZERO
        } else {
            ChunkId::from(hasher.finalize())
        };
        return (id, values);
    }
    let split = left_subtree_len(data.len() as u64) as usize;
    let left = subtree_cv(data, 0, split, &mut values);
    let right = subtree_cv(data, split, data.len() - split, &mut values);
    let root = merge_subtrees_root(&left, &right, Mode::Hash);
    // The zero rule of `hash_chunk`; checked after hashing, because the block
    // values of a zero chunk are needed too (a chunk zeroed by a patch).
    let id = if crate::scan::is_all_zero(data) {
        ChunkId::ZERO
    } else {
        ChunkId::from(root)
    };
    (id, values)
}

/// The chaining value of the subtree of `data` at `offset` of `len` bytes,
/// pushing the values of its blocks, left to right, onto `values`.
///
/// Every subtree longer than a block splits at `left_subtree_len`, a power of
/// two of at least 4 KiB for any length over 4 KiB; so every split falls on a
/// block boundary and the leaves are exactly the blocks.
fn subtree_cv(
    data: &[u8],
    offset: usize,
    len: usize,
    values: &mut Vec<BlockValue>,
) -> ChainingValue {
    if len <= PATCH_BLOCK_BYTES as usize {
        let cv = Hasher::new()
            .set_input_offset(offset as u64)
            .update(&data[offset..offset + len])
            .finalize_non_root();
        values.push(truncate(&cv));
        return cv;
    }
    let split = left_subtree_len(len as u64) as usize;
    let left = subtree_cv(data, offset, split, values);
    let right = subtree_cv(data, offset + split, len - split, values);
    merge_subtrees_non_root(&left, &right, Mode::Hash)
}

/// The byte ranges `(offset, len)` of a chunk of `raw_len` bytes whose blocks
/// differ between `base` and `new` (their block values), adjacent blocks
/// merged into one range. `None` when the value lists do not both hold one
/// value per block of `raw_len`: the chunks cannot be compared block by block.
pub fn changed_blocks(
    base: &[BlockValue],
    new: &[BlockValue],
    raw_len: u32,
) -> Option<Vec<(u32, u32)>> {
    let blocks = patch_block_count(raw_len) as usize;
    if base.len() != blocks || new.len() != blocks {
        return None;
    }
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for (block, (old, now)) in base.iter().zip(new).enumerate() {
        if old == now {
            continue;
        }
        let offset = block as u32 * PATCH_BLOCK_BYTES;
        let len = PATCH_BLOCK_BYTES.min(raw_len - offset);
        match ranges.last_mut() {
            Some((start, run)) if *start + *run == offset => *run += len,
            _ => ranges.push((offset, len)),
        }
    }
    Some(ranges)
}

/// Splits concatenated block values (as `BlockValues` and `WantPatched` carry
/// them); `None` for an empty entry (no base) or one that is not whole values,
/// where the chunk then travels whole, which is always correct.
pub fn parse_block_values(values: &[u8]) -> Option<Vec<BlockValue>> {
    if values.is_empty() || !values.len().is_multiple_of(BLOCK_VALUE_LEN) {
        return None;
    }
    values
        .chunks_exact(BLOCK_VALUE_LEN)
        .map(|value| value.try_into().ok())
        .collect()
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidPatch, message)
}

/// Rebuilds a chunk from its `base` and a patch: `ranges` (`(offset, len)`)
/// replaced by `data`, the concatenation of their new bytes.
///
/// Refused, with [`ErrorKind::InvalidPatch`] and a message that says why: a
/// base of another length than `raw_len` (a patch never resizes a chunk), no
/// ranges, an empty range, ranges out of order or overlapping, a range beyond
/// `raw_len`, more ranges than the chunk has blocks, or `data` of another
/// length than the ranges add up to. The caller checks the result's id.
pub fn apply_patch(
    base: &[u8],
    raw_len: u32,
    ranges: &[(u32, u32)],
    data: &[u8],
) -> Result<Vec<u8>, Error> {
    if base.len() as u64 != u64::from(raw_len) {
        return Err(invalid(format!(
            "patch of a {raw_len}-byte chunk against a base of {} bytes",
            base.len()
        )));
    }
    if ranges.is_empty() {
        return Err(invalid("patch has no ranges".into()));
    }
    let blocks = patch_block_count(raw_len).max(1);
    if ranges.len() as u64 > u64::from(blocks) {
        return Err(invalid(format!(
            "patch has {} ranges, more than the chunk's {blocks} blocks",
            ranges.len()
        )));
    }
    let mut covered: u64 = 0;
    let mut previous_end: u64 = 0;
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let (start, end) = (u64::from(offset), u64::from(offset) + u64::from(len));
        if len == 0 {
            return Err(invalid(format!("patch range {i} at {offset} is empty")));
        }
        if i > 0 && start < previous_end {
            return Err(invalid(format!(
                "patch range {i} at {offset} overlaps or precedes the range before it \
                 (which ends at {previous_end})"
            )));
        }
        if end > u64::from(raw_len) {
            return Err(invalid(format!(
                "patch range {i} ({offset}+{len}) ends beyond the chunk's {raw_len} bytes"
            )));
        }
        previous_end = end;
        covered += u64::from(len);
    }
    if data.len() as u64 != covered {
        return Err(invalid(format!(
            "patch carries {} data bytes, its ranges cover {covered}",
            data.len()
        )));
    }
    let mut out = base.to_vec();
    let mut at = 0usize;
    for &(offset, len) in ranges {
        let (offset, len) = (offset as usize, len as usize);
        out[offset..offset + len].copy_from_slice(&data[at..at + len]);
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes, so a failure reproduces.
    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        crate::rng::bytes(len, seed)
    }

    #[test]
    fn id_equals_hash_chunk_for_every_shape_of_tree() {
        let lengths = [
            1,
            1023,
            1024,
            1025,
            4095,
            4096,
            4097,
            8192,
            12_288,
            20 * 1024,
            20 * 1024 + 1,
            65_535,
            65_536,
            65_537,
            3 * 65_536 + 4096 * 3 + 7,
            1 << 20,
            4 << 20,
        ];
        for (seed, len) in lengths.into_iter().enumerate() {
            let data = random_bytes(len, seed as u64);
            let (id, values) = hash_with_block_values(&data);
            assert_eq!(id, hash_chunk(&data), "length {len}");
            assert_eq!(values.len(), len.div_ceil(4096), "length {len}");
        }
    }

    #[test]
    fn zero_chunks_keep_the_reserved_id_and_have_values() {
        for len in [0usize, 100, 4096, 65_536] {
            let (id, values) = hash_with_block_values(&vec![0u8; len]);
            assert!(id.is_zero(), "length {len}");
            assert_eq!(values.len(), len.div_ceil(4096));
        }
        let (_, zero) = hash_with_block_values(&[0u8; 8192]);
        assert_ne!(
            zero[0], zero[1],
            "blocks at other offsets have other values"
        );
    }

    #[test]
    fn a_changed_byte_changes_exactly_its_block_value() {
        let len = 65_536 + 5000;
        let data = random_bytes(len, 7);
        let (_, before) = hash_with_block_values(&data);
        for position in [0usize, 4095, 4096, 30_000, 65_535, 65_536, len - 1] {
            let mut changed = data.clone();
            changed[position] ^= 0x40;
            let (id, after) = hash_with_block_values(&changed);
            assert_eq!(id, hash_chunk(&changed));
            for block in 0..before.len() {
                assert_eq!(
                    before[block] != after[block],
                    block == position / 4096,
                    "byte {position}, block {block}"
                );
            }
        }
    }

    #[test]
    fn changed_blocks_merges_neighbours_and_cuts_the_short_last_block() {
        let len = 5 * 4096 + 100;
        let base = random_bytes(len, 1);
        let mut new = base.clone();
        for position in [10, 4096 + 5, 3 * 4096, 5 * 4096 + 99] {
            new[position] ^= 1;
        }
        let (_, base_values) = hash_with_block_values(&base);
        let (new_id, new_values) = hash_with_block_values(&new);
        let ranges = changed_blocks(&base_values, &new_values, len as u32).unwrap();
        assert_eq!(ranges, vec![(0, 8192), (3 * 4096, 4096), (5 * 4096, 100)]);
        let data: Vec<u8> = ranges
            .iter()
            .flat_map(|&(o, l)| new[o as usize..(o + l) as usize].to_vec())
            .collect();
        let rebuilt = apply_patch(&base, len as u32, &ranges, &data).unwrap();
        assert_eq!(rebuilt, new);
        assert_eq!(hash_chunk(&rebuilt), new_id);
        assert_eq!(
            changed_blocks(&base_values, &base_values, len as u32),
            Some(vec![])
        );
        assert_eq!(
            changed_blocks(&base_values[1..], &new_values, len as u32),
            None
        );
        assert_eq!(changed_blocks(&base_values, &new_values, 4096), None);
    }

    #[test]
    fn invalid_patches_are_refused_with_their_reason() {
        let base = vec![5u8; 8192];
        // (raw_len, ranges, data length, reason)
        type Case = (u32, &'static [(u32, u32)], usize, &'static str);
        let cases: [Case; 8] = [
            (8193, &[(0, 1)], 1, "against a base of 8192 bytes"),
            (8192, &[], 0, "no ranges"),
            (8192, &[(10, 0)], 0, "is empty"),
            (8192, &[(100, 10), (105, 10)], 20, "overlaps"),
            (8192, &[(100, 10), (50, 10)], 20, "overlaps or precedes"),
            (8192, &[(8190, 4)], 4, "ends beyond"),
            (
                8192,
                &[(0, 1), (2, 1), (4, 1)],
                3,
                "more than the chunk's 2 blocks",
            ),
            (
                8192,
                &[(0, 10)],
                9,
                "carries 9 data bytes, its ranges cover 10",
            ),
        ];
        for (raw_len, ranges, data_len, reason) in cases {
            let error = apply_patch(&base, raw_len, ranges, &vec![1; data_len]).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidPatch);
            assert!(error.to_string().contains(reason), "{error} lacks {reason}");
        }
        // Adjacent ranges are fine, and a range may end at the chunk's end.
        let out = apply_patch(&base, 8192, &[(0, 4), (8190, 2)], &[9; 6]).unwrap();
        assert_eq!(&out[..4], &[9; 4]);
        apply_patch(&base, 8192, &[(0, 2), (2, 2)], &[9; 4]).unwrap();
        assert_eq!(&out[8190..], &[9; 2]);
        assert_eq!(out[4], 5);
    }
}

//! Flat bitmaps of 4 KiB blocks: one bit per block, 64 blocks a word, bit
//! `b % 64` of word `b / 64`. The bits past the last block are always clear.

use std::sync::atomic::{AtomicU64, Ordering};

/// Words needed for `blocks` bits.
pub(super) fn words_for(blocks: u64) -> usize {
    // A disk's block count fits memory as a bitmap or the open fails earlier.
    blocks.div_ceil(64) as usize
}

/// A bitmap with every one of `blocks` bits set.
pub(super) fn full(blocks: u64) -> Vec<u64> {
    let mut bits = vec![u64::MAX; words_for(blocks)];
    let tail = blocks % 64;
    if tail != 0
        && let Some(last) = bits.last_mut()
    {
        *last = (1u64 << tail) - 1;
    }
    bits
}

/// Whether bit `block` is set.
pub(super) fn get(bits: &[u64], block: u64) -> bool {
    bits.get((block / 64) as usize)
        .is_some_and(|word| word & (1u64 << (block % 64)) != 0)
}

/// Sets bit `block`.
pub(super) fn set(bits: &mut [u64], block: u64) {
    if let Some(word) = bits.get_mut((block / 64) as usize) {
        *word |= 1u64 << (block % 64);
    }
}

/// Clears bit `block`.
pub(super) fn clear(bits: &mut [u64], block: u64) {
    if let Some(word) = bits.get_mut((block / 64) as usize) {
        *word &= !(1u64 << (block % 64));
    }
}

/// The next set bit at or after `from` and before `end`.
pub(super) fn next_set(bits: &[u64], from: u64, end: u64) -> Option<u64> {
    let mut block = from;
    while block < end {
        let index = (block / 64) as usize;
        let word = bits.get(index).copied()? & (u64::MAX << (block % 64));
        if word != 0 {
            let found = (index as u64) * 64 + u64::from(word.trailing_zeros());
            return (found < end).then_some(found);
        }
        block = (index as u64 + 1) * 64;
    }
    None
}

/// Set bits in total.
#[cfg(test)]
pub(super) fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|word| u64::from(word.count_ones())).sum()
}

/// Sets bits `first..end` of a bitmap shared by concurrent writers. A word
/// that already has the bits is only read, so rewriting hot blocks does not
/// bounce its cache line between cores.
pub(super) fn set_range_atomic(bits: &[AtomicU64], first: u64, end: u64) {
    let mut block = first;
    while block < end {
        let shift = block % 64;
        let span = (64 - shift).min(end - block);
        let mask = if span == 64 {
            u64::MAX
        } else {
            ((1u64 << span) - 1) << shift
        };
        if let Some(word) = bits.get((block / 64) as usize)
            && word.load(Ordering::Relaxed) & mask != mask
        {
            word.fetch_or(mask, Ordering::Relaxed);
        }
        block += span;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_sets_exactly_the_blocks() {
        let bits = full(130);
        assert_eq!(count(&bits), 130);
        assert!(get(&bits, 129));
        assert!(!get(&bits, 130));
    }

    #[test]
    fn ranges_and_searches_cross_words() {
        let atomic: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        set_range_atomic(&atomic, 60, 131);
        let bits: Vec<u64> = atomic.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        assert_eq!(count(&bits), 71);
        assert!(!get(&bits, 59) && get(&bits, 60) && get(&bits, 130) && !get(&bits, 131));
        assert_eq!(next_set(&bits, 0, 256), Some(60));
        assert_eq!(next_set(&bits, 131, 256), None);
        assert_eq!(next_set(&bits, 0, 50), None);
        let mut bits = bits;
        clear(&mut bits, 60);
        set(&mut bits, 200);
        assert_eq!(next_set(&bits, 0, 256), Some(61));
        assert_eq!(next_set(&bits, 131, 256), Some(200));
    }
}

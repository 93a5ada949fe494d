//! The overlay's map in memory: two bits per block, as two bitsets.

/// Two bits per block, as two bitsets.
#[derive(Debug, Clone)]
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    pub(crate) fn new(blocks: u64) -> Self {
        Bits(vec![0; blocks.div_ceil(64) as usize])
    }
    pub(crate) fn get(&self, block: u64) -> bool {
        self.0[(block / 64) as usize] & (1 << (block % 64)) != 0
    }
    /// The masks of the words that blocks `first..first + count` fall in.
    pub(crate) fn masks(first: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
        let end = first + count;
        let mut block = first;
        std::iter::from_fn(move || {
            if block >= end {
                return None;
            }
            let bit = block % 64;
            let n = (64 - bit).min(end - block);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let word = (block / 64) as usize;
            block += n;
            Some((word, mask))
        })
    }
    pub(crate) fn set_range(&mut self, first: u64, count: u64, value: bool) {
        for (word, mask) in Self::masks(first, count) {
            if value {
                self.0[word] |= mask;
            } else {
                self.0[word] &= !mask;
            }
        }
    }
    pub(crate) fn any_in(&self, first: u64, count: u64) -> bool {
        Self::masks(first, count).any(|(word, mask)| self.0[word] & mask != 0)
    }
    /// Whether every one of `count` blocks from `first` is set in `self`
    /// or in `other` (a bitset of the same length).
    pub(crate) fn all_in_either(&self, other: &Bits, first: u64, count: u64) -> bool {
        Self::masks(first, count).all(|(word, mask)| (self.0[word] | other.0[word]) & mask == mask)
    }
    pub(crate) fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

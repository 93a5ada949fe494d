//! The block values cache: the block values
//! ([`blockrep_core::hash_with_block_values`]) of the chunks the server checked
//! last, so that the next epoch's `GetBlockValues` need not read and hash
//! them again. Bounded in bytes, least recently used out first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use blockrep_core::ChunkId;
use bytes::Bytes;

/// Bytes of block values the server keeps cached, all sources together: the
/// values of 65,536 chunks of 64 KiB (256 bytes each), or of 256 chunks of
/// 4 MiB. Entries are evicted least recently used first.
pub(crate) const BLOCK_VALUES_CACHE_BYTES_MAX: usize = 16 << 20;

/// The block values of recently checked chunks, all sources together.
#[derive(Debug, Default)]
pub(crate) struct BlockValues {
    cache: Mutex<ValuesCache>,
}

/// A least-recently-used map of chunk id -> block values, bounded in bytes.
#[derive(Debug, Default)]
struct ValuesCache {
    entries: HashMap<ChunkId, (Bytes, u64)>,
    /// Last use -> id: the first entry is the next to evict.
    by_use: BTreeMap<u64, ChunkId>,
    clock: u64,
    bytes: usize,
}

impl ValuesCache {
    fn get(&mut self, id: &ChunkId) -> Option<Bytes> {
        self.clock += 1;
        let (values, used) = self.entries.get_mut(id)?;
        self.by_use.remove(used);
        *used = self.clock;
        self.by_use.insert(self.clock, *id);
        Some(values.clone())
    }

    fn insert(&mut self, id: ChunkId, values: Bytes) {
        if values.len() > BLOCK_VALUES_CACHE_BYTES_MAX {
            return;
        }
        self.clock += 1;
        if let Some((old, used)) = self.entries.remove(&id) {
            self.by_use.remove(&used);
            self.bytes -= old.len();
        }
        self.bytes += values.len();
        self.entries.insert(id, (values, self.clock));
        self.by_use.insert(self.clock, id);
        while self.bytes > BLOCK_VALUES_CACHE_BYTES_MAX {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = self.entries.remove(&oldest) {
                self.bytes -= evicted.len();
            }
        }
    }
}

impl BlockValues {
    /// The values of `id`, if cached (it becomes the most recently used).
    pub(crate) fn cached(&self, id: &ChunkId) -> Option<Bytes> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(id)
    }

    /// Caches the values of `id`, evicting the least recently used beyond
    /// the cache's bytes.
    pub(crate) fn remember(&self, id: ChunkId, values: Bytes) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_evicts_the_least_recently_used_within_its_bytes() {
        let mut cache = ValuesCache::default();
        let entry = Bytes::from(vec![0u8; BLOCK_VALUES_CACHE_BYTES_MAX / 4]);
        let id = |n: u8| ChunkId([n; 32]);
        for n in 0..4 {
            cache.insert(id(n), entry.clone());
        }
        assert!(cache.get(&id(0)).is_some()); // 1 is now the oldest
        cache.insert(id(4), entry.clone());
        assert!(cache.get(&id(1)).is_none());
        for n in [0, 2, 3, 4] {
            assert!(cache.get(&id(n)).is_some(), "entry {n}");
        }
        assert_eq!(cache.bytes, BLOCK_VALUES_CACHE_BYTES_MAX);
        cache.insert(id(2), Bytes::from_static(&[1; 16]));
        assert_eq!(cache.entries.len(), 4);
        assert_eq!(cache.bytes, 3 * entry.len() + 16);
        assert_eq!(cache.by_use.len(), cache.entries.len());
    }
}

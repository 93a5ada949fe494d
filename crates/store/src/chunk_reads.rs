//! Launch volumes' reads of the replica's chunks through the store's decoded
//! chunk cache (`chunk_cache.rs`): hits, decodes (hash checked) and the
//! readahead work handed to the cache's thread.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockrep_core::ChunkId;

use crate::chunk_cache::{ChunkBytes, ChunkCacheStats};
use crate::error::{Error, ErrorKind};
use crate::store::Store;

impl Store {
    /// Sets the decoded chunk cache's memory budget (0: no cache). Entries
    /// held are dropped.
    pub fn set_chunk_cache_bytes(&self, budget_bytes: u64) {
        self.chunk_cache.set_budget(budget_bytes);
    }

    /// The decoded chunk cache's budget, use and counters.
    pub fn chunk_cache_stats(&self) -> ChunkCacheStats {
        let cache = &self.chunk_cache;
        ChunkCacheStats {
            budget_bytes: cache.budget_bytes.load(Ordering::Relaxed),
            used_bytes: cache.used_bytes(),
            hits: cache.hits.load(Ordering::Relaxed),
            misses: cache.misses.load(Ordering::Relaxed),
            readahead_chunks: cache.readahead_chunks.load(Ordering::Relaxed),
        }
    }

    /// The decoded bytes of non-zero chunk `id`, which must be `len` bytes
    /// long: from the cache, or read from the store (hash checked) and
    /// kept. The flag says whether the store was read.
    pub(crate) fn cached_chunk(&self, id: &ChunkId, len: u32) -> Result<(ChunkBytes, bool), Error> {
        if let Some(bytes) = self.chunk_cache.get(id) {
            self.chunk_cache.hits.fetch_add(1, Ordering::Relaxed);
            // Checked on a hit too: a root that names this chunk at a place
            // of another length is damage, not a short read.
            return Ok((of_len(id, len, bytes)?, false));
        }
        self.chunk_cache.misses.fetch_add(1, Ordering::Relaxed);
        Ok((self.decode_chunk(id, len)?, true))
    }

    /// Reads, checks and caches chunk `id`.
    fn decode_chunk(&self, id: &ChunkId, len: u32) -> Result<ChunkBytes, Error> {
        let bytes = of_len(id, len, Arc::new(self.blobs.get_remembered(id)?))?;
        self.chunk_cache.insert(*id, Arc::clone(&bytes));
        Ok(bytes)
    }

    /// A chunk's bytes for a materialization's copy: from the cache when it
    /// holds them (not counted as a client's hit), else read and checked,
    /// and not cached (a copy reads each chunk once).
    pub(crate) fn chunk_for_copy(&self, id: &ChunkId, len: u32) -> Result<ChunkBytes, Error> {
        let bytes = match self.chunk_cache.get(id) {
            Some(bytes) => bytes,
            None => Arc::new(self.blobs.get_remembered(id)?),
        };
        of_len(id, len, bytes)
    }

    /// Keeps chunk `id` (just stored with these bytes) in the cache.
    pub(crate) fn cache_chunk(&self, id: ChunkId, bytes: ChunkBytes) {
        self.chunk_cache.insert(id, bytes);
    }

    /// Asks the readahead thread to decode `chunks` into the cache.
    pub(crate) fn read_ahead(self: &Arc<Self>, chunks: Vec<(ChunkId, u32)>) {
        if chunks.is_empty() || self.chunk_cache.budget_bytes.load(Ordering::Relaxed) == 0 {
            return;
        }
        let store = Arc::downgrade(self);
        self.chunk_cache.send(Box::new(move || {
            let Some(store) = store.upgrade() else {
                return;
            };
            for (id, len) in chunks {
                if store.chunk_cache.get(&id).is_some() {
                    continue;
                }
                // A chunk that cannot be read is reported to the reader that
                // asks for it; readahead only warms the cache.
                if store.decode_chunk(&id, len).is_ok() {
                    store
                        .chunk_cache
                        .readahead_chunks
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
}

/// `bytes` if chunk `id` has the `len` bytes its place holds, else `Corrupt`.
fn of_len(id: &ChunkId, len: u32, bytes: ChunkBytes) -> Result<ChunkBytes, Error> {
    if bytes.len() != len as usize {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "chunk {id} has {} bytes where its place holds {len}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::temp_store;

    #[test]
    fn a_cached_chunk_of_another_length_than_its_place_is_corrupt() {
        let (_dir, store) = temp_store();
        store.set_chunk_cache_bytes(1 << 20);
        let bytes = vec![7u8; 4096];
        let id = blockrep_core::hash_chunk(&bytes);
        store.cache_chunk(id, Arc::new(bytes));
        let (hit, read) = store.cached_chunk(&id, 4096).unwrap();
        assert_eq!((hit.len(), read), (4096, false));
        let error = store.cached_chunk(&id, 65_536).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    }
}

//! Sub-chunk patches (protocol 4): the server's side.
//!
//! - `GetBlockValues`: the agent asks for the block values
//!   ([`blockrep_core::hash_with_block_values`]) of the chunks its changed chunks replace.
//!   Answered only for the source's own committed chunks, the chunks it may
//!   reference without a proof (see `references`): anything else (another
//!   source's chunk, a page, an unknown id) gets an empty entry, the same
//!   answer as a chunk the store no longer holds, so the answer never tells
//!   whether another source's data exists. Values are computed from the stored
//!   chunk, whose id is checked on the way (a mismatch is store damage: logged,
//!   answered empty), and kept in a cache bounded by
//!   [`BLOCK_VALUES_CACHE_BYTES_MAX`]. Every chunk the verifier checks, patched or
//!   whole, enters the cache with the values its hash gave: they are the bases
//!   of the next epoch's patches.
//! - `Patch`: the base must be one of the source's own committed chunks
//!   (else: `patch base <id> is not a chunk of this source`). The patch is then
//!   queued for the verifier like a `Chunk`: it reads the base, applies the
//!   ranges (`blockrep_core::apply_patch`, which checks them), and stores the
//!   result only if it hashes to the patch's id; it is counted as a chunk.
//!   Every refusal ends the session with `BadChunk` and nothing of the epoch
//!   is committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use blockrep_core::ChunkId;
use blockrep_proto::{Codec, ErrorCode, Message};
use blockrep_store::{BlobKind, Store};
use bytes::Bytes;
use tracing::warn;

use super::{End, EpochCounters, Outcome, Reject, Replica, Session, internal};
use crate::verify::{Job, OnValues, PatchOf, Verifier};

/// Bytes of block values the server keeps cached, all sources together: the
/// values of 65,536 chunks of 64 KiB (256 bytes each), or of 256 chunks of
/// 4 MiB. Entries are evicted least recently used first.
pub(crate) const BLOCK_VALUES_CACHE_BYTES_MAX: usize = 16 << 20;

/// Server-wide state of patches: the block values cache and the counters
/// `/metrics` shows.
#[derive(Debug, Default)]
pub(crate) struct PatchShared {
    cache: Mutex<ValuesCache>,
    /// Patches applied and queued for storage.
    pub patches_received_total: AtomicU64,
    /// Bytes of patch data, as sent (raw or compressed).
    pub patch_bytes_received_total: AtomicU64,
    /// Chunk bytes that patches did not have to carry: each patched chunk's
    /// length less the patch data sent for it.
    pub patch_bytes_saved_total: AtomicU64,
    /// `GetBlockValues` entries answered with values (not empty).
    pub block_values_served_total: AtomicU64,
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

/// Where a session's verifier puts the block values of the chunks it checks:
/// the cache, so the next epoch's `GetBlockValues` need not read and hash them.
pub(crate) fn values_sink(shared: &Arc<crate::shared::Shared>) -> OnValues {
    let shared = Arc::clone(shared);
    Arc::new(move |id, values| shared.patches.remember(id, values))
}

impl PatchShared {
    fn cached(&self, id: &ChunkId) -> Option<Bytes> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(id)
    }

    fn remember(&self, id: ChunkId, values: Bytes) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, values);
    }
}

/// The block values of one stored chunk, concatenated; empty when the store
/// cannot give them (no such chunk, or damaged). Blocking.
fn stored_values(store: &Store, id: &ChunkId) -> Bytes {
    if store
        .blob_info(id)
        .is_none_or(|info| info.kind != BlobKind::Chunk)
    {
        return Bytes::new();
    }
    // One pass of blake3 checks the chunk and gives its values.
    match store.read_blob_with_values(id) {
        Ok((_, values)) => Bytes::from(values.concat()),
        Err(e) => {
            warn!(chunk = %id, error = %e,
                  "cannot read a chunk for its block values (store damage?): none served");
            Bytes::new()
        }
    }
}

/// A patch as received.
pub(super) struct PatchFrame {
    pub index: u64,
    pub base: ChunkId,
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub ranges: Vec<(u32, u32)>,
    pub data: Bytes,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Session<S> {
    /// Answers a `GetBlockValues`: values for the source's own committed
    /// chunks, empty entries for everything else.
    pub(super) async fn send_block_values(
        &mut self,
        replica: &Replica,
        ids: Vec<ChunkId>,
    ) -> Result<(), Outcome> {
        let patches = &self.shared.patches;
        let mut values: Vec<Option<Bytes>> = ids
            .iter()
            .map(|id| {
                if id.is_zero() || !replica.references.is_committed_own(id) {
                    Some(Bytes::new())
                } else {
                    patches.cached(id)
                }
            })
            .collect();
        let missing: Vec<(usize, ChunkId)> = values
            .iter()
            .zip(&ids)
            .enumerate()
            .filter(|(_, (value, _))| value.is_none())
            .map(|(i, (_, id))| (i, *id))
            .collect();
        if !missing.is_empty() {
            let shared = Arc::clone(&self.shared);
            let computing = tokio::task::spawn_blocking(move || {
                missing
                    .into_iter()
                    .map(|(i, id)| {
                        let found = stored_values(&shared.store, &id);
                        if !found.is_empty() {
                            shared.patches.remember(id, found.clone());
                        }
                        (i, found)
                    })
                    .collect::<Vec<_>>()
            });
            let computed = self.connection.working(computing).await.map_err(internal)?;
            for (i, found) in computed {
                values[i] = Some(found);
            }
        }
        let values: Vec<Bytes> = values.into_iter().map(Option::unwrap_or_default).collect();
        let served = values.iter().filter(|v| !v.is_empty()).count() as u64;
        self.shared
            .patches
            .block_values_served_total
            .fetch_add(served, Ordering::Relaxed);
        self.connection
            .send(&Message::BlockValues { values })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))
    }

    /// Checks and applies one `Patch`, and queues the chunk it makes for the
    /// verifier; returns the id the replica now has at its index.
    pub(super) async fn patch(
        &mut self,
        replica: &mut Replica,
        counters: &mut EpochCounters,
        verifier: &mut Option<Verifier>,
        patch: PatchFrame,
    ) -> Result<ChunkId, Outcome> {
        let index = patch.index;
        let refused = |what: String| -> Outcome {
            Reject::new(
                ErrorCode::BadChunk,
                format!("{what}; nothing of this epoch is committed"),
            )
            .into()
        };
        let expected_len = replica.geometry.chunk_len(index).ok_or_else(|| {
            refused(format!(
                "patch for chunk {index}: the chunk is beyond the end of the disk"
            ))
        })?;
        if patch.raw_len != expected_len {
            return Err(refused(format!(
                "patch for chunk {index} has length {}, expected {expected_len}",
                patch.raw_len
            )));
        }
        replica.references.mark_sent(index)?;
        if patch.id.is_zero() {
            return Err(refused(format!(
                "patch for chunk {index} makes the zero id (a zero chunk is sent as such)"
            )));
        }
        // The same rule as a reference without proof: only the source's own
        // data, so a patch never reads, or tells of, another source's chunk.
        if patch.base.is_zero() || !replica.references.is_committed_own(&patch.base) {
            return Err(refused(format!(
                "patch base {} is not a chunk of this source",
                patch.base
            )));
        }
        let data_len = patch.data.len() as u64;
        let raw_len = patch.raw_len;
        let id = patch.id;
        // The verifier rebuilds and checks the chunk, queued behind the chunks
        // before it: a refused patch ends the session as a bad chunk does.
        let verifier = verifier.get_or_insert_with(|| {
            Verifier::spawn(Arc::clone(&self.shared.store), values_sink(&self.shared))
        });
        verifier
            .submit(Job {
                index,
                id,
                codec: patch.codec,
                raw_len,
                data: patch.data,
                patch: Some(PatchOf {
                    base: patch.base,
                    ranges: patch.ranges,
                }),
            })
            .await?;
        let stats = &self.shared.patches;
        stats.patches_received_total.fetch_add(1, Ordering::Relaxed);
        stats
            .patch_bytes_received_total
            .fetch_add(data_len, Ordering::Relaxed);
        stats.patch_bytes_saved_total.fetch_add(
            u64::from(raw_len).saturating_sub(data_len),
            Ordering::Relaxed,
        );
        counters.chunks_received += 1;
        if !replica.references.is_own(&id) {
            counters.chunks_new += 1;
        }
        replica.references.received(id);
        Ok(id)
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

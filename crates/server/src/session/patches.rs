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
//!   [`crate::block_values::BLOCK_VALUES_CACHE_BYTES_MAX`]. Every chunk the
//!   verifier rebuilds from a patch enters the cache with the values its hash
//!   gave (one pass gives both): a chunk patched once is the likeliest base of
//!   the next patch. A whole chunk is checked with the plain hash, 2.4 times
//!   faster than one that also gives the values; its values are computed here
//!   when first asked for, which only the chunks an agent changes later are.
//! - `Patch`: the base must be one of the source's own committed chunks
//!   (else: `patch base <id> is not a chunk of this source`). The patch is then
//!   queued for the verifier like a `Chunk`: it reads the base, applies the
//!   ranges (`blockrep_core::apply_patch`, which checks them), and stores the
//!   result only if it hashes to the patch's id; it is counted as a chunk.
//!   Every refusal ends the session with `BadChunk` and nothing of the epoch
//!   is committed.

use std::sync::Arc;

use blockrep_core::ChunkId;
use blockrep_proto::{Codec, ErrorCode, Message};
use blockrep_store::{BlobKind, Store};
use bytes::Bytes;
use tracing::warn;

use super::{End, EpochCounters, Outcome, Reject, Replica, Session, internal};
use crate::verify::{Job, OnValues, PatchOf, Verifier};

/// Where a session's verifier puts the block values of the chunks it rebuilds
/// from patches: the cache, so the next epoch's `GetBlockValues` need not read
/// and hash them.
pub(crate) fn values_sink(shared: &Arc<crate::shared::Shared>) -> OnValues {
    let shared = Arc::clone(shared);
    Arc::new(move |id, values| shared.block_values.remember(id, values))
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

/// The block values of `missing` (index in the request, id), read and hashed
/// from the store and cached, spread over the machine's cores: a delta's first
/// request finds none cached but those of the chunks patched before, since a
/// whole chunk is verified without them. Blocking.
fn computed_values(
    shared: &crate::shared::Shared,
    missing: &[(usize, ChunkId)],
) -> Vec<(usize, Bytes)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, VALUES_THREADS_MAX);
    let per_thread = missing.len().div_ceil(threads).max(1);
    let one_part = |part: &[(usize, ChunkId)]| -> Vec<(usize, Bytes)> {
        part.iter()
            .map(|&(i, id)| {
                let found = stored_values(&shared.store, &id);
                if !found.is_empty() {
                    shared.block_values.remember(id, found.clone());
                }
                (i, found)
            })
            .collect()
    };
    if missing.len() <= per_thread {
        return one_part(missing);
    }
    std::thread::scope(|scope| {
        let parts: Vec<_> = missing
            .chunks(per_thread)
            .map(|part| scope.spawn(move || one_part(part)))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| part.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Threads that compute the block values of one `GetBlockValues` at most.
const VALUES_THREADS_MAX: usize = 4;

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
        let cache = &self.shared.block_values;
        let mut values: Vec<Option<Bytes>> = ids
            .iter()
            .map(|id| {
                if id.is_zero() || !replica.references.is_committed_own(id) {
                    Some(Bytes::new())
                } else {
                    cache.cached(id)
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
            let computing = tokio::task::spawn_blocking(move || computed_values(&shared, &missing));
            let computed = self.connection.working(computing).await.map_err(internal)?;
            for (i, found) in computed {
                values[i] = Some(found);
            }
        }
        let values: Vec<Bytes> = values.into_iter().map(Option::unwrap_or_default).collect();
        let served = values.iter().filter(|v| !v.is_empty()).count() as u64;
        self.shared.ledger.block_values_served(served);
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
        let compressed = patch.codec == Codec::Zstd;
        // The verifier rebuilds and checks the chunk, queued behind the chunks
        // before it: a refused patch ends the session as a bad chunk does.
        let verifier = verifier.get_or_insert_with(|| {
            Verifier::spawn(
                Arc::clone(&self.shared.store),
                self.sealing.clone(),
                values_sink(&self.shared),
            )
        });
        verifier
            .submit(Job {
                index,
                id,
                codec: patch.codec,
                raw_len,
                data: patch.data,
                data_crc: None,
                patch: Some(PatchOf {
                    base: patch.base,
                    ranges: patch.ranges,
                }),
            })
            .await?;
        self.shared
            .ledger
            .patch_received(data_len, u64::from(raw_len));
        counters.chunks_received += 1;
        counters.chunks_compressed += u64::from(compressed);
        if !replica.references.is_own(&id) {
            counters.chunks_new += 1;
        }
        replica.references.received(id);
        Ok(id)
    }
}

//! Sub-chunk patches, the agent's side of replication.
//!
//! A changed chunk whose index the replica already names (its base, a chunk of
//! this source's own) can travel as the 4 KiB blocks that differ from that
//! base. The agent keeps no per-block state: before the epoch's data it asks
//! the server for the block values of the bases (`GetBlockValues`, batched and
//! pipelined), and each encoder gets the new chunk's block values for free
//! from the one blake3 pass that also yields its id. Where the blocks that
//! differ make up less than [`PATCH_SHARE_MAX_PERCENT`] of the chunk, a `Patch`
//! frame carries them; otherwise the whole chunk travels as before.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use blockrep_core::{BlockValue, ChunkId, changed_blocks, parse_block_values};
use blockrep_proto::{BLOCK_VALUES_IDS_MAX, Message};

use crate::Error;
use crate::connection::Connection;

/// A patch is sent only when the bytes of its ranges are below this share of
/// the chunk: a patch nearly as large as its chunk saves little and costs the
/// server a read of the base.
pub(crate) const PATCH_SHARE_MAX_PERCENT: u64 = 75;
/// `GetBlockValues` requests in flight at once: enough to hide the round trip,
/// few enough that the answers (up to a few MiB each) never pile up unread.
const REQUESTS_IN_FLIGHT: usize = 4;

/// The base of every changed chunk the server could give block values for,
/// by chunk index.
#[derive(Default)]
pub(crate) struct Bases {
    by_index: HashMap<u64, Base>,
    /// Frame bytes of the `GetBlockValues` sent.
    pub bytes_sent: u64,
    /// Bytes of block values received (the answers' payload).
    pub values_bytes_received: u64,
}

/// The chunk the replica holds at an index, and its block values.
#[derive(Clone)]
pub(crate) struct Base {
    pub id: ChunkId,
    pub values: Arc<Vec<BlockValue>>,
}

impl Bases {
    /// The base of chunk `index`, if a patch against it is possible.
    pub(crate) fn get(&self, index: u64) -> Option<&Base> {
        self.by_index.get(&index)
    }

    /// Chunks that have a base.
    pub(crate) fn len(&self) -> usize {
        self.by_index.len()
    }
}

/// Asks the server for the block values of the chunks `head` names at the
/// `changed` indices (zero chunks have no base). An empty answer for an id
/// means the server will not patch against it: those chunks travel whole.
pub(crate) async fn fetch_bases(
    connection: &mut Connection,
    head: &[ChunkId],
    changed: &[u64],
) -> Result<Bases, Error> {
    let mut seen = HashSet::new();
    let ids: Vec<ChunkId> = changed
        .iter()
        .filter_map(|&index| head.get(index as usize).copied())
        .filter(|id| !id.is_zero() && seen.insert(*id))
        .collect();
    if ids.is_empty() {
        return Ok(Bases::default());
    }
    let batches: Vec<&[ChunkId]> = ids.chunks(BLOCK_VALUES_IDS_MAX).collect();
    let mut values: HashMap<ChunkId, Arc<Vec<BlockValue>>> = HashMap::new();
    let (mut bytes_sent, mut values_bytes_received) = (0, 0);
    let mut sent = 0;
    for received in 0..batches.len() {
        while sent < batches.len() && sent < received + REQUESTS_IN_FLIGHT {
            bytes_sent += connection
                .send(&Message::GetBlockValues {
                    ids: batches[sent].to_vec(),
                })
                .await?;
            sent += 1;
        }
        connection.flush().await?;
        let batch = batches[received];
        let Message::BlockValues { values: answer } = connection.recv().await? else {
            return Err(Error::Protocol("expected BlockValues".into()));
        };
        if answer.len() != batch.len() {
            return Err(Error::Protocol(format!(
                "BlockValues has {} entries for {} ids asked",
                answer.len(),
                batch.len()
            )));
        }
        values_bytes_received += answer.iter().map(|e| e.len() as u64).sum::<u64>();
        for (id, entry) in batch.iter().zip(answer) {
            if let Some(parsed) = parse_block_values(&entry) {
                values.insert(*id, Arc::new(parsed));
            }
        }
    }
    let by_index = changed
        .iter()
        .filter_map(|&index| {
            let id = *head.get(index as usize)?;
            let values = Arc::clone(values.get(&id)?);
            Some((index, Base { id, values }))
        })
        .collect();
    Ok(Bases {
        by_index,
        bytes_sent,
        values_bytes_received,
    })
}

/// What a patch carries: the ranges that differ and their new bytes.
pub(crate) struct Plan {
    pub ranges: Vec<(u32, u32)>,
    pub payload: Vec<u8>,
}

/// The ranges of `data` that differ from `base`, and their bytes, when they
/// are small enough to be worth a patch.
pub(crate) fn plan(base: &Base, values: &[BlockValue], data: &[u8]) -> Option<Plan> {
    let raw_len = u32::try_from(data.len()).ok()?;
    let ranges = changed_blocks(&base.values, values, raw_len)?;
    let changed: u64 = ranges.iter().map(|&(_, len)| u64::from(len)).sum();
    // Nothing differs: the chunk changed back to its base since the scan. A
    // patch must carry something; the whole chunk (or the duplicate check)
    // handles it.
    if changed == 0 || changed * 100 >= data.len() as u64 * PATCH_SHARE_MAX_PERCENT {
        return None;
    }
    let mut payload = Vec::with_capacity(changed as usize);
    for &(offset, len) in &ranges {
        payload.extend_from_slice(&data[offset as usize..(offset + len) as usize]);
    }
    Some(Plan { ranges, payload })
}

/// Whether a session error was the server refusing a patch (or the block
/// values asked for one): the next session then sends whole chunks, so a
/// refusal cannot repeat forever.
pub(crate) fn refused_patch(error: &Error) -> bool {
    matches!(error, Error::Refused { message, .. } | Error::Protocol(message)
        if message.to_ascii_lowercase().contains("patch") || message.contains("BlockValues"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep_core::BLOCK_VALUE_LEN;
    use bytes::Bytes;

    #[test]
    fn values_that_are_not_whole_are_no_base() {
        assert!(parse_block_values(&Bytes::new()).is_none());
        assert!(parse_block_values(&Bytes::from(vec![0u8; BLOCK_VALUE_LEN + 1])).is_none());
        let two = parse_block_values(&Bytes::from(vec![7u8; 2 * BLOCK_VALUE_LEN])).unwrap();
        assert_eq!(two, vec![[7u8; BLOCK_VALUE_LEN]; 2]);
    }

    #[test]
    fn a_refusal_that_names_a_patch_turns_patches_off() {
        let refused = Error::Refused {
            code: blockrep_proto::ErrorCode::BadChunk,
            message: "patch for chunk 3 produced 00, expected 11".into(),
        };
        assert!(refused_patch(&refused));
        assert!(!refused_patch(&Error::Lost("reset".into())));
    }
}

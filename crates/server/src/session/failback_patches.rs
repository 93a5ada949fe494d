//! Failback with sub-chunk patches: the answer to `WantPatched`.
//!
//! The agent names each chunk it wants with the id and block values of what
//! its disk holds at that index. For each, the server reads the target chunk,
//! hashes it with its block values (which also re-checks the stored chunk
//! against its id), and sends a `Patch` against the disk's chunk when the
//! blocks that differ are less than [`PATCH_SHARE_MAX_PERCENT`] of the chunk,
//! else the whole `Chunk`, as a `Want` would. The agent's values are only
//! compared, never trusted: a patch built from wrong values fails the agent's
//! own check of the result's id, and reveals nothing but the target's bytes,
//! which this source may read anyway.

use std::sync::Arc;

use blockrep_core::{BlockValue, ChunkId, Geometry, changed_blocks, parse_block_values};
use blockrep_proto::{Codec, ErrorCode, Message};
use blockrep_store::{BlobKind, Store};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Outcome, Reject, Session, internal};

/// A patch is sent only when its ranges are below this share of the chunk.
const PATCH_SHARE_MAX_PERCENT: u64 = 75;

/// One wanted chunk: its index, the disk's chunk there and its block values.
type Entry = (u64, ChunkId, Bytes);

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Answers a `WantPatched` of a failback whose target has `target_ids`:
    /// reads, encodes and writes a few MiB of answers at a time, so a request
    /// of the most chunks of the largest size is never gathered in memory.
    /// Returns the answers and bytes sent.
    pub(super) async fn send_patched(
        &mut self,
        geometry: Geometry,
        target_ids: &[ChunkId],
        entries: Vec<Entry>,
    ) -> Result<(u64, u64), Outcome> {
        let (mut count, mut bytes) = (0, 0);
        for batch in entries.chunks(self.chunks_per_batch(geometry)) {
            let mut wanted = Vec::with_capacity(batch.len());
            for (index, base, values) in batch {
                let (id, raw_len) = target_chunk(geometry, target_ids, *index)?;
                wanted.push((*index, id, raw_len, *base, values.clone()));
            }
            let store = Arc::clone(&self.shared.store);
            let answers = tokio::task::spawn_blocking(move || -> Result<Vec<Message>, Reject> {
                wanted
                    .into_iter()
                    .map(|(index, id, raw_len, base, values)| {
                        answer(&store, index, id, raw_len, base, &values)
                    })
                    .collect()
            })
            .await
            .map_err(internal)??;
            let before = self.connection.bytes_written;
            for message in &answers {
                self.connection.queue(message);
            }
            self.connection
                .flush()
                .await
                .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
            let sent = self.connection.bytes_written - before;
            let chunks = answers.len() as u64;
            self.shared.ledger.sources.update(&self.source, |r| {
                r.failback_chunks_sent_total += chunks;
                r.failback_bytes_sent_total += sent;
            });
            count += chunks;
            bytes += sent;
        }
        Ok((count, bytes))
    }
}

/// The answer for chunk `index`: the target chunk `id` of `raw_len` bytes as a
/// patch against the disk's `base` with block values `values`, or whole.
fn answer(
    store: &Store,
    index: u64,
    id: ChunkId,
    raw_len: u32,
    base: ChunkId,
    values: &[u8],
) -> Result<Message, Reject> {
    // No patch against a zero base, of a zero target, or from values that do
    // not parse.
    let Some(base_values) = parse_block_values(values).filter(|_| !base.is_zero() && !id.is_zero())
    else {
        return whole_chunk(store, index, id, raw_len);
    };
    // A chunk that may go as a patch is read with its block values: one pass
    // of blake3 checks it and gives them.
    let (data, target_values) = read_target(store, index, id, raw_len, true)?;
    if let Some(target_values) = target_values
        && let Some(ranges) = changed_blocks(&base_values, &target_values, raw_len)
    {
        let changed: u64 = ranges.iter().map(|&(_, len)| u64::from(len)).sum();
        if changed > 0 && changed * 100 < u64::from(raw_len) * PATCH_SHARE_MAX_PERCENT {
            let mut payload = Vec::with_capacity(changed as usize);
            for &(offset, len) in &ranges {
                payload.extend_from_slice(&data[offset as usize..(offset + len) as usize]);
            }
            return Ok(Message::Patch {
                index,
                base,
                id,
                codec: Codec::Raw,
                raw_len,
                ranges,
                data: Bytes::from(payload),
            });
        }
    }
    Ok(raw_chunk(index, id, raw_len, data))
}

/// The id and length of the target's chunk `index`, which the agent named:
/// an index beyond the disk is the agent's error.
pub(super) fn target_chunk(
    geometry: Geometry,
    target_ids: &[ChunkId],
    index: u64,
) -> Result<(ChunkId, u32), Reject> {
    let id = *target_ids.get(index as usize).ok_or_else(|| {
        Reject::new(
            ErrorCode::BadFrame,
            format!("chunk {index} is beyond the end of the disk"),
        )
    })?;
    let raw_len = geometry
        .chunk_len(index)
        .expect("index checked against the ids");
    Ok((id, raw_len))
}

/// The answer to a `Want` of chunk `index` (and to a `WantPatched` that gets
/// no patch): the target chunk `id` of `raw_len` bytes whole; an all-zero
/// chunk goes as `Codec::Zero`, without data.
pub(super) fn whole_chunk(
    store: &Store,
    index: u64,
    id: ChunkId,
    raw_len: u32,
) -> Result<Message, Reject> {
    if id.is_zero() {
        return Ok(Message::Chunk {
            index,
            id,
            codec: Codec::Zero,
            raw_len,
            data: Bytes::new(),
        });
    }
    let (data, _) = read_target(store, index, id, raw_len, false)?;
    Ok(raw_chunk(index, id, raw_len, data))
}

/// A `Chunk` carrying `data` uncompressed.
fn raw_chunk(index: u64, id: ChunkId, raw_len: u32, data: Vec<u8>) -> Message {
    Message::Chunk {
        index,
        id,
        codec: Codec::Raw,
        raw_len,
        data: Bytes::from(data),
    }
}

/// Reads the target's chunk `index`, and with `with_values` its block values,
/// computed by the hash that checks it: only a chunk of the length its
/// position needs is ever sent, never a page, a root or another length.
fn read_target(
    store: &Store,
    index: u64,
    id: ChunkId,
    raw_len: u32,
    with_values: bool,
) -> Result<(Vec<u8>, Option<Vec<BlockValue>>), Reject> {
    match store.blob_info(&id) {
        Some(info) if info.kind == BlobKind::Chunk && info.raw_len == raw_len => {}
        other => {
            return Err(Reject::new(
                ErrorCode::Internal,
                format!(
                    "chunk {index} of the target names {id}, which is {}, not a chunk of \
                     {raw_len} bytes; not sent (run `blockrep verify`)",
                    other.map_or("not stored".to_owned(), |info| format!(
                        "a {:?} blob of {} bytes",
                        info.kind, info.raw_len
                    ))
                ),
            ));
        }
    }
    let damaged = |e: blockrep_store::Error| {
        Reject::new(
            ErrorCode::Internal,
            format!("chunk {index} of the target ({id}): {e}; not sent (run `blockrep verify`)"),
        )
    };
    let (data, values) = if with_values {
        let (data, values) = store.read_blob_with_values(&id).map_err(damaged)?;
        (data, Some(values))
    } else {
        (store.read_blob(&id).map_err(damaged)?, None)
    };
    if data.len() != raw_len as usize {
        return Err(Reject::new(
            ErrorCode::Internal,
            format!(
                "chunk {index} ({id}) decodes to {} bytes, not {raw_len}",
                data.len()
            ),
        ));
    }
    Ok((data, values))
}

//! Chunk verification off the network task: every chunk is decoded with a size cap
//! and hashed before it reaches the store.

use std::sync::Arc;

use blockrep_core::{BlockValue, ChunkId, apply_patch, hash_with_block_values};
use blockrep_proto::{Codec, ErrorCode};
use blockrep_store::{BlobKind, Store, StoredCodec};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::session::Reject;

/// Chunks queued between the network task and the verifier. Bounds the memory a
/// session holds to this many chunks (at most 4 MiB each).
const VERIFY_QUEUE_LEN: usize = 32;

/// A chunk with data, as received.
#[derive(Debug)]
pub(crate) struct Job {
    pub index: u64,
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub data: Bytes,
    /// For a patch: the chunk it applies to and the byte ranges `data` (once
    /// decoded) replaces. The verifier rebuilds the chunk, so patches flow
    /// through the same queue as chunks instead of one blocking task each.
    pub patch: Option<PatchOf>,
}

/// What makes a [`Job`] a patch.
#[derive(Debug)]
pub(crate) struct PatchOf {
    pub base: ChunkId,
    pub ranges: Vec<(u32, u32)>,
}

/// What the verifier did over one epoch.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct VerifyStats {
    pub chunks_verified: u64,
    pub chunks_stored: u64,
    pub bytes_stored: u64,
}

/// Told the block values of every chunk the verifier checks: they fall out of
/// its hash, and they are what the next epoch's patches are planned against.
pub(crate) type OnValues = Arc<dyn Fn(ChunkId, Bytes) + Send + Sync>;

#[derive(Debug)]
pub(crate) struct Verifier {
    tx: mpsc::Sender<Job>,
    handle: JoinHandle<Result<VerifyStats, Reject>>,
}

impl Verifier {
    pub(crate) fn spawn(store: Arc<Store>, on_values: OnValues) -> Self {
        let (tx, mut rx) = mpsc::channel::<Job>(VERIFY_QUEUE_LEN);
        let handle = tokio::task::spawn_blocking(move || {
            let mut stats = VerifyStats::default();
            let mut decompressor = zstd::bulk::Decompressor::new()
                .map_err(|e| Reject::new(ErrorCode::Internal, format!("zstd: {e}")))?;
            let mut scratch = Vec::new();
            while let Some(job) = rx.blocking_recv() {
                let (codec, data, values) = match &job.patch {
                    Some(patch) => {
                        let (rebuilt, values) =
                            rebuild(&store, &job, patch, &mut decompressor, &mut scratch)?;
                        (StoredCodec::Raw, Bytes::from(rebuilt), values)
                    }
                    None => {
                        let values = verify(&job, &mut decompressor, &mut scratch)?;
                        let codec = match job.codec {
                            Codec::Zstd => StoredCodec::Zstd,
                            _ => StoredCodec::Raw,
                        };
                        (codec, job.data.clone(), values)
                    }
                };
                on_values(job.id, Bytes::from(values.concat()));
                let stored = store
                    .insert(BlobKind::Chunk, job.id, codec, job.raw_len, &data)
                    .map_err(|e| Reject::new(ErrorCode::Internal, format!("store: {e}")))?;
                stats.chunks_verified += 1;
                if stored {
                    stats.chunks_stored += 1;
                    stats.bytes_stored += data.len() as u64;
                }
            }
            Ok(stats)
        });
        Self { tx, handle }
    }

    /// Queues a chunk. If the verifier has stopped on an error, that error.
    pub(crate) async fn submit(&mut self, job: Job) -> Result<(), Reject> {
        if self.tx.send(job).await.is_ok() {
            return Ok(());
        }
        // The receiver is gone only when the verifier returned early, with an error.
        let (tx, _) = mpsc::channel(1);
        let failed = std::mem::replace(&mut self.tx, tx);
        drop(failed);
        match (&mut self.handle).await {
            Ok(Err(reject)) => Err(reject),
            Ok(Ok(_)) => Err(Reject::new(ErrorCode::Internal, "verifier stopped")),
            Err(e) => Err(Reject::new(
                ErrorCode::Internal,
                format!("verifier failed: {e}"),
            )),
        }
    }

    /// Completes only if the verifier stops early, i.e. on a bad chunk or a store
    /// error, so the session can end at once instead of at the next frame.
    pub(crate) async fn failed(&mut self) -> Reject {
        match (&mut self.handle).await {
            Ok(Err(reject)) => reject,
            Ok(Ok(_)) => Reject::new(ErrorCode::Internal, "verifier stopped"),
            Err(e) => Reject::new(ErrorCode::Internal, format!("verifier failed: {e}")),
        }
    }

    /// Waits for every queued chunk to be verified and stored (not yet durable).
    pub(crate) async fn finish(self) -> Result<VerifyStats, Reject> {
        drop(self.tx);
        match self.handle.await {
            Ok(result) => result,
            Err(e) => Err(Reject::new(
                ErrorCode::Internal,
                format!("verifier failed: {e}"),
            )),
        }
    }
}

fn verify(
    job: &Job,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    scratch: &mut Vec<u8>,
) -> Result<Vec<BlockValue>, Reject> {
    let bad =
        |what: String| Reject::new(ErrorCode::BadChunk, format!("chunk {}: {what}", job.index));
    let raw: &[u8] = match job.codec {
        Codec::Raw => &job.data,
        Codec::Zstd => {
            scratch.clear();
            scratch.reserve(job.raw_len as usize);
            // The capacity caps the output: a zstd bomb fails here instead of
            // allocating what it claims.
            decompressor
                .decompress_to_buffer(&job.data[..], scratch)
                .map_err(|e| {
                    bad(format!(
                        "does not decompress within {} bytes: {e}",
                        job.raw_len
                    ))
                })?;
            scratch
        }
        Codec::Zero | Codec::Ref => return Err(bad("carries no data".into())),
    };
    if raw.len() != job.raw_len as usize {
        return Err(bad(format!(
            "has {} bytes, expected {}",
            raw.len(),
            job.raw_len
        )));
    }
    let (actual, values) = hash_with_block_values(raw);
    if actual.is_zero() {
        return Err(bad("is all zero but was not sent as a zero chunk".into()));
    }
    if actual != job.id {
        return Err(bad(format!(
            "does not hash to its id {} (data hashes to {actual})",
            job.id
        )));
    }
    Ok(values)
}

/// The chunk a patch makes, once its id is checked: its data decoded (capped at
/// the ranges' length, so a zstd bomb fails), applied to its base, hashed.
fn rebuild(
    store: &Store,
    job: &Job,
    patch: &PatchOf,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    scratch: &mut Vec<u8>,
) -> Result<(Vec<u8>, Vec<BlockValue>), Reject> {
    let index = job.index;
    let bad = |what: String| {
        Reject::new(
            ErrorCode::BadChunk,
            format!("patch for chunk {index}: {what}; nothing of this epoch is committed"),
        )
    };
    let covered: u64 = patch.ranges.iter().map(|&(_, len)| u64::from(len)).sum();
    let data: &[u8] = match job.codec {
        Codec::Raw => &job.data,
        Codec::Zstd => {
            // The capacity caps the output, as for a chunk.
            let cap = covered.min(u64::from(job.raw_len)) as usize;
            scratch.clear();
            scratch.reserve(cap);
            decompressor
                .decompress_to_buffer(&job.data[..], scratch)
                .map_err(|e| bad(format!("data does not decompress within {cap} bytes: {e}")))?;
            scratch
        }
        Codec::Zero | Codec::Ref => return Err(bad("a patch carries raw or zstd data".into())),
    };
    let base = store.read_blob(&patch.base).map_err(|e| {
        Reject::new(
            ErrorCode::Internal,
            format!("reading patch base {}: {e}", patch.base),
        )
    })?;
    let rebuilt =
        apply_patch(&base, job.raw_len, &patch.ranges, data).map_err(|e| bad(e.to_string()))?;
    let (computed, values) = hash_with_block_values(&rebuilt);
    if computed != job.id {
        return Err(Reject::new(
            ErrorCode::BadChunk,
            format!(
                "patch for chunk {index} produced {computed}, expected {}; nothing of this \
                 epoch is committed",
                job.id
            ),
        ));
    }
    Ok((rebuilt, values))
}

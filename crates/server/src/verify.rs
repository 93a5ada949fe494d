//! Chunk verification off the network task: every chunk is decoded with a size cap
//! and hashed before it reaches the store.

use std::sync::Arc;

use blockrep_core::{BlockValue, ChunkId, IdSpace, apply_patch, hash_with_block_values};
use blockrep_proto::{Codec, ErrorCode};
use blockrep_store::{BlobKind, Store, StoredCodec};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::reject::Reject;

/// Chunks queued between the network task and the verifier threads, all
/// together. Bounds the memory a session holds to this many chunks (at most 4
/// MiB each).
const VERIFY_QUEUE_LEN: usize = 32;
/// Verifier threads of one session at most (fewer on a machine with fewer
/// cores). A patch costs its thread a read of the base, an apply and a hash,
/// several times a whole chunk's work; one thread alone made the server the
/// slow end of a delta sent as patches.
const VERIFY_THREADS_MAX: usize = 4;

/// A chunk with data, as received.
#[derive(Debug)]
pub(crate) struct Job {
    pub index: u64,
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub data: Bytes,
    /// The crc32 of `data`, when the frame's checksum gave it: a chunk
    /// stored as it arrived needs no second pass for its record's crc.
    pub data_crc: Option<u32>,
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

/// A session's verifier: jobs are spread over a few blocking threads, each
/// with its own queue. The order in which chunks are stored does not matter:
/// nothing is committed before [`Verifier::finish`] has seen every one.
#[derive(Debug)]
pub(crate) struct Verifier {
    queues: Vec<mpsc::Sender<Job>>,
    handles: Vec<JoinHandle<Result<VerifyStats, Reject>>>,
    /// Where a thread that stops on an error says why, before it returns.
    errors: mpsc::Receiver<Reject>,
    /// The queue tried first for the next job.
    next: usize,
}

impl Verifier {
    /// Verifier threads storing into `store`; an encrypted source's chunks
    /// (`sealing` given: its current data key and its id space) are checked
    /// against their stored ids and sealed.
    pub(crate) fn spawn(
        store: Arc<Store>,
        sealing: Option<crate::encryption::Sealing>,
        on_values: OnValues,
    ) -> Self {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, VERIFY_THREADS_MAX);
        let (error_tx, errors) = mpsc::channel(threads);
        let mut queues = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (tx, rx) = mpsc::channel::<Job>((VERIFY_QUEUE_LEN / threads).max(1));
            let (store, on_values, error_tx) =
                (Arc::clone(&store), Arc::clone(&on_values), error_tx.clone());
            let sealing = sealing.clone();
            queues.push(tx);
            handles.push(tokio::task::spawn_blocking(move || {
                let result = run(&store, sealing.as_ref(), &on_values, rx);
                if let Err(reject) = &result {
                    let told = Reject::new(reject.code, reject.message.clone());
                    let _ = error_tx.blocking_send(told);
                }
                result
            }));
        }
        Self {
            queues,
            handles,
            errors,
            next: 0,
        }
    }

    /// Queues a chunk: on the first thread with room, else on the next in
    /// turn, waiting. If the verifier has stopped on an error, that error.
    pub(crate) async fn submit(&mut self, job: Job) -> Result<(), Reject> {
        let threads = self.queues.len();
        let mut job = job;
        for step in 0..threads {
            let at = (self.next + step) % threads;
            match self.queues[at].try_send(job) {
                Ok(()) => {
                    self.next = (at + 1) % threads;
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Full(back)) => job = back,
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.stopped().await),
            }
        }
        let at = self.next;
        self.next = (at + 1) % threads;
        if self.queues[at].send(job).await.is_ok() {
            return Ok(());
        }
        Err(self.stopped().await)
    }

    /// Why a thread's queue closed: it only returns early, with an error.
    async fn stopped(&mut self) -> Reject {
        if let Ok(reject) = self.errors.try_recv() {
            return reject;
        }
        // Its error is on the way, or it panicked: its handle says which.
        for handle in &mut self.handles {
            if handle.is_finished() {
                return match handle.await {
                    Ok(Err(reject)) => reject,
                    Ok(Ok(_)) => Reject::new(ErrorCode::Internal, "verifier stopped"),
                    Err(e) => Reject::new(ErrorCode::Internal, format!("verifier failed: {e}")),
                };
            }
        }
        self.failed().await
    }

    /// Completes only if a verifier thread stops early, i.e. on a bad chunk or
    /// a store error, so the session can end at once instead of at the next
    /// frame. Cancel-safe: the session waits on it next to each read.
    pub(crate) async fn failed(&mut self) -> Reject {
        match self.errors.recv().await {
            Some(reject) => reject,
            // Every thread ended without an error to tell: they panicked.
            None => Reject::new(ErrorCode::Internal, "verifier stopped"),
        }
    }

    /// Waits for every queued chunk to be verified and stored (not yet durable).
    pub(crate) async fn finish(self) -> Result<VerifyStats, Reject> {
        drop(self.queues);
        let mut total = VerifyStats::default();
        let mut first_error = None;
        for handle in self.handles {
            match handle.await {
                Ok(Ok(stats)) => {
                    total.chunks_verified += stats.chunks_verified;
                    total.chunks_stored += stats.chunks_stored;
                    total.bytes_stored += stats.bytes_stored;
                }
                Ok(Err(reject)) => {
                    first_error.get_or_insert(reject);
                }
                Err(e) => {
                    first_error.get_or_insert(Reject::new(
                        ErrorCode::Internal,
                        format!("verifier failed: {e}"),
                    ));
                }
            }
        }
        match first_error {
            Some(reject) => Err(reject),
            None => Ok(total),
        }
    }
}

/// One verifier thread: checks (or rebuilds) and stores each job of its queue
/// until the queue closes, or the first refusal.
fn run(
    store: &Store,
    sealing: Option<&crate::encryption::Sealing>,
    on_values: &OnValues,
    mut rx: mpsc::Receiver<Job>,
) -> Result<VerifyStats, Reject> {
    let mut stats = VerifyStats::default();
    let mut decompressor = zstd::bulk::Decompressor::new()
        .map_err(|e| Reject::new(ErrorCode::Internal, format!("zstd: {e}")))?;
    let mut scratch = Vec::new();
    let space = sealing.map_or(IdSpace::PLAIN, |(_, space)| *space);
    let sealer = sealing.map(|(sealer, _)| sealer.as_ref());
    while let Some(job) = rx.blocking_recv() {
        let (codec, data, values) = match &job.patch {
            Some(patch) => {
                let (rebuilt, values) =
                    rebuild(store, space, &job, patch, &mut decompressor, &mut scratch)?;
                (StoredCodec::Raw, Bytes::from(rebuilt), Some(values))
            }
            None => {
                verify(space, &job, &mut decompressor, &mut scratch)?;
                let codec = match job.codec {
                    Codec::Zstd => StoredCodec::Zstd,
                    _ => StoredCodec::Raw,
                };
                (codec, job.data.clone(), None)
            }
        };
        if let Some(values) = values {
            on_values(job.id, Bytes::from(values.concat()));
        }
        let stored = match (sealer, job.data_crc.filter(|_| job.patch.is_none())) {
            (Some(sealer), _) => store.insert_sealed(sealer, job.id, codec, job.raw_len, &data),
            (None, Some(crc)) => {
                store.insert_with_crc(BlobKind::Chunk, job.id, codec, job.raw_len, &data, crc)
            }
            (None, None) => store.insert(BlobKind::Chunk, job.id, codec, job.raw_len, &data),
        }
        .map_err(|e| Reject::new(ErrorCode::Internal, format!("store: {e}")))?;
        stats.chunks_verified += 1;
        if stored {
            stats.chunks_stored += 1;
            stats.bytes_stored += data.len() as u64;
        }
    }
    Ok(stats)
}

fn verify(
    space: IdSpace,
    job: &Job,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    scratch: &mut Vec<u8>,
) -> Result<(), Reject> {
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
    // The plain hash, at the full width of blake3's SIMD: the block values
    // (hashed a 4 KiB block at a time, 2.4 times the work) are computed from
    // the store when an agent first asks for them (`GetBlockValues`), which
    // it does only for the chunks it changes later; see `patches`.
    // An encrypted source's chunks travel under their stored ids.
    let actual = space.hash_chunk(raw);
    if actual.is_zero() {
        return Err(bad("is all zero but was not sent as a zero chunk".into()));
    }
    if actual != job.id {
        return Err(bad(format!(
            "does not hash to its id {} (data hashes to {actual})",
            job.id
        )));
    }
    Ok(())
}

/// The chunk a patch makes, once its id is checked: its data decoded (capped at
/// the ranges' length, so a zstd bomb fails), applied to its base, hashed.
fn rebuild(
    store: &Store,
    space: IdSpace,
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
    // The base is read without hashing it: the rebuilt chunk is hashed whole
    // below, so a damaged base cannot pass; only when that check fails is the
    // base hashed, to tell store damage from a bad patch.
    let base = store.read_blob_unverified(&patch.base).map_err(|e| {
        Reject::new(
            ErrorCode::Internal,
            format!("reading patch base {}: {e}", patch.base),
        )
    })?;
    let rebuilt =
        apply_patch(&base, job.raw_len, &patch.ranges, data).map_err(|e| bad(e.to_string()))?;
    let (computed, values) = hash_with_block_values(&rebuilt);
    let computed = space.map(computed);
    if computed != job.id {
        if let Err(e) = store.read_blob(&patch.base) {
            return Err(Reject::new(
                ErrorCode::Internal,
                format!("patch base {} of chunk {index}: {e}", patch.base),
            ));
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use blockrep_core::hash_chunk;

    fn chunk(index: u64, data: Vec<u8>) -> Job {
        Job {
            index,
            id: hash_chunk(&data),
            codec: Codec::Raw,
            raw_len: data.len() as u32,
            data: Bytes::from(data),
            data_crc: None,
            patch: None,
        }
    }

    /// A patch of a 16 KiB `base` that writes fives over its second 4 KiB
    /// block, claiming the chunk it makes is `id`.
    fn fives_at_4096(index: u64, id: ChunkId, base: ChunkId) -> Job {
        Job {
            index,
            id,
            codec: Codec::Raw,
            raw_len: 16_384,
            data: Bytes::from(vec![5u8; 4096]),
            data_crc: None,
            patch: Some(PatchOf {
                base,
                ranges: vec![(4096, 4096)],
            }),
        }
    }

    fn counting() -> (OnValues, Arc<AtomicU64>) {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&seen);
        let on_values: OnValues = Arc::new(move |_, _| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        (on_values, seen)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_thread_stores_what_it_checks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let (on_values, seen) = counting();
        let mut verifier = Verifier::spawn(Arc::clone(&store), None, on_values);
        let jobs: Vec<Job> = (0..200u64)
            .map(|n| chunk(n, vec![(n % 250) as u8 + 1; 8192 + n as usize]))
            .collect();
        let ids: Vec<ChunkId> = jobs.iter().map(|job| job.id).collect();
        for job in jobs {
            verifier.submit(job).await.unwrap();
        }
        let stats = verifier.finish().await.unwrap();
        assert_eq!((stats.chunks_verified, stats.chunks_stored), (200, 200));
        // Whole chunks are checked with the plain hash: no block values.
        assert_eq!(seen.load(Ordering::Relaxed), 0);
        for id in &ids {
            assert_eq!(hash_chunk(&store.read_blob(id).unwrap()), *id);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuilt_patch_gives_its_block_values_and_a_whole_chunk_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let base = blockrep_core::rng::bytes(16_384, 3);
        let base_id = hash_chunk(&base);
        store
            .insert(BlobKind::Chunk, base_id, StoredCodec::Raw, 16_384, &base)
            .unwrap();
        let kept: Arc<std::sync::Mutex<Vec<(ChunkId, Bytes)>>> = Arc::default();
        let on_values: OnValues = {
            let kept = Arc::clone(&kept);
            Arc::new(move |id, values| kept.lock().unwrap().push((id, values)))
        };
        let mut verifier = Verifier::spawn(Arc::clone(&store), None, on_values);
        verifier
            .submit(chunk(0, blockrep_core::rng::bytes(65_536, 4)))
            .await
            .unwrap();
        let mut patched = base.clone();
        patched[4096..8192].fill(5);
        let patched_id = hash_chunk(&patched);
        verifier
            .submit(fives_at_4096(1, patched_id, base_id))
            .await
            .unwrap();
        verifier.finish().await.unwrap();
        let (_, expected) = hash_with_block_values(&patched);
        assert_eq!(
            *kept.lock().unwrap(),
            vec![(patched_id, Bytes::from(expected.concat()))],
            "only the rebuilt chunk's values, as its hash gave them"
        );
        assert_eq!(store.read_blob(&patched_id).unwrap(), patched);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_on_any_thread_is_told_at_once_and_nothing_wrong_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let base = vec![3u8; 16_384];
        let base_id = hash_chunk(&base);
        store
            .insert(BlobKind::Chunk, base_id, StoredCodec::Raw, 16_384, &base)
            .unwrap();
        let (on_values, _) = counting();
        let mut verifier = Verifier::spawn(Arc::clone(&store), None, on_values);
        for n in 0..3u64 {
            verifier
                .submit(chunk(n, vec![n as u8 + 1; 4096]))
                .await
                .unwrap();
        }
        // A patch that claims an id its bytes do not make.
        let claimed = hash_chunk(&[4u8; 16_384]);
        verifier
            .submit(fives_at_4096(9, claimed, base_id))
            .await
            .unwrap();
        // No more jobs come: the other threads sit idle, and the refusal must
        // still reach the session without waiting for the next frame.
        let reject = tokio::time::timeout(Duration::from_secs(30), verifier.failed())
            .await
            .expect("the refusal is told while the other threads wait");
        assert_eq!(reject.code, ErrorCode::BadChunk);
        assert!(
            reject.message.contains("patch for chunk 9 produced"),
            "{}",
            reject.message
        );
        assert!(!store.contains(&claimed));
        assert!(verifier.finish().await.is_err());
    }
}

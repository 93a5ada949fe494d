//! The send pipeline: worker threads copy, re-hash and compress changed chunks into
//! ready-to-write frames; the network task writes them in whatever order they come.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockrep_core::{ChunkId, DiskImage, Geometry, hash_chunk};
use blockrep_proto::{Codec, Message, encode, encode_chunk_header};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::{AdaptiveCompression, Compression, Error};

/// Bytes of a `Chunk` frame before its data.
const CHUNK_HEADER_LEN: usize = 4 + 1 + 8 + 32 + 1 + 4 + 4;
/// Bytes of frames in flight between the workers and the socket: bounds memory.
const WINDOW_BYTES: usize = 16 * 1024 * 1024;
/// Chunks a worker takes at a time.
const CHUNKS_PER_CLAIM: usize = 16;
/// After a chunk that did not compress, skip compression for this many chunks.
const INCOMPRESSIBLE_SKIP: u32 = 32;

/// One frame ready to write, and the id of the data it carries (which may differ
/// from the scan's if the disk changed since).
pub(crate) struct Encoded {
    pub index: u64,
    pub id: ChunkId,
    pub frame: Bytes,
    pub raw_len: u64,
}

/// Starts the workers for `changed` chunks; frames arrive on the returned channel,
/// which closes when every chunk has been encoded.
pub(crate) fn spawn_encoders(
    disk: Arc<DiskImage>,
    geometry: Geometry,
    changed: Arc<Vec<u64>>,
    compression: Compression,
    adaptive: Arc<AdaptiveCompression>,
) -> mpsc::Receiver<Result<Encoded, Error>> {
    let window = (WINDOW_BYTES / geometry.chunk_size_bytes() as usize).max(4);
    let (tx, rx) = mpsc::channel::<Result<Encoded, Error>>(window);
    let next = Arc::new(AtomicUsize::new(0));
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    for _ in 0..workers {
        let adaptive = Arc::clone(&adaptive);
        let (disk, changed, next, tx) = (
            Arc::clone(&disk),
            Arc::clone(&changed),
            Arc::clone(&next),
            tx.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut encoder = ChunkEncoder::new(compression, adaptive);
            loop {
                let start = next.fetch_add(CHUNKS_PER_CLAIM, Ordering::Relaxed);
                if start >= changed.len() {
                    return;
                }
                let end = (start + CHUNKS_PER_CLAIM).min(changed.len());
                for &index in &changed[start..end] {
                    let encoded = encoder.encode(&disk, geometry, index);
                    let failed = encoded.is_err();
                    if tx.blocking_send(encoded).is_err() || failed {
                        return; // the session ended; stop quietly
                    }
                }
            }
        });
    }
    rx
}

struct ChunkEncoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    skip: u32,
    /// Set for `Compression::Auto`.
    adaptive: Option<Arc<AdaptiveCompression>>,
}

impl ChunkEncoder {
    fn new(compression: Compression, adaptive: Arc<AdaptiveCompression>) -> Self {
        let compressor = match compression {
            Compression::Auto | Compression::Zstd => zstd::bulk::Compressor::new(1).ok(),
            Compression::None => None,
        };
        Self {
            compressor,
            skip: 0,
            adaptive: (compression == Compression::Auto).then_some(adaptive),
        }
    }

    fn encode(
        &mut self,
        disk: &DiskImage,
        geometry: Geometry,
        index: u64,
    ) -> Result<Encoded, Error> {
        let range = geometry
            .chunk_range(index)
            .expect("changed chunks lie on the disk");
        let raw_len = range.len();
        // Copy once, out of the mapping, straight into the frame; then hash the copy,
        // so the id always matches the bytes that travel.
        let mut frame = BytesMut::with_capacity(CHUNK_HEADER_LEN + raw_len);
        frame.resize(CHUNK_HEADER_LEN, 0);
        frame.resize(CHUNK_HEADER_LEN + raw_len, 0);
        // Read with pread rather than through the scan's mapping: scattered reads
        // through a mapping leave whole page-cache folios mapped, so resident
        // memory would grow with the disk instead of with the window.
        disk.read_at(range.start as u64, &mut frame[CHUNK_HEADER_LEN..])
            .map_err(|e| {
                Error::DiskChanged(format!("cannot read chunk {index} of the disk: {e}"))
            })?;
        let id = hash_chunk(&frame[CHUNK_HEADER_LEN..]);
        if id.is_zero() {
            let mut zero = BytesMut::with_capacity(CHUNK_HEADER_LEN);
            encode(
                &Message::Chunk {
                    index,
                    id,
                    codec: Codec::Zero,
                    raw_len: raw_len as u32,
                    data: Bytes::new(),
                },
                &mut zero,
            );
            return Ok(Encoded {
                index,
                id,
                frame: zero.freeze(),
                raw_len: 0,
            });
        }
        if let Some(compressed) = self.try_compress(&frame[CHUNK_HEADER_LEN..]) {
            let mut out = BytesMut::with_capacity(CHUNK_HEADER_LEN + compressed.len());
            encode_chunk_header(
                &mut out,
                index,
                &id,
                Codec::Zstd,
                raw_len as u32,
                compressed.len(),
            );
            out.extend_from_slice(&compressed);
            return Ok(Encoded {
                index,
                id,
                frame: out.freeze(),
                raw_len: raw_len as u64,
            });
        }
        let mut header = BytesMut::with_capacity(CHUNK_HEADER_LEN);
        encode_chunk_header(&mut header, index, &id, Codec::Raw, raw_len as u32, raw_len);
        debug_assert_eq!(header.len(), CHUNK_HEADER_LEN);
        frame[..CHUNK_HEADER_LEN].copy_from_slice(&header);
        Ok(Encoded {
            index,
            id,
            frame: frame.freeze(),
            raw_len: raw_len as u64,
        })
    }

    fn try_compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let compressor = self.compressor.as_mut()?;
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        if let Some(adaptive) = &self.adaptive
            && !adaptive.should_try()
        {
            return None;
        }
        let started = std::time::Instant::now();
        let result = compressor.compress(data);
        if let (Some(adaptive), Ok(compressed)) = (&self.adaptive, &result) {
            adaptive.record_compression(data.len(), compressed.len(), started.elapsed());
            if !adaptive.enabled() {
                return None; // a sample, taken only to measure
            }
        }
        match result {
            Ok(compressed) if compressed.len() < data.len() - data.len() / 8 => Some(compressed),
            _ => {
                self.skip = INCOMPRESSIBLE_SKIP;
                None
            }
        }
    }
}

//! Chunk compression: zstd levels 1 and 3 over 64 KiB chunks of text-like,
//! structured and random data, and capped decompression as the server's verifier
//! does it, next to blake3 of the same chunks (the cost every sent chunk pays
//! anyway). The compression ratio of each kind is printed before its group.
//!
//! Target: zstd -1 on random chunks costs no more than about blake3 on one core,
//! since the agent tries it before giving up for a while.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const CHUNK_BYTES: usize = 64 << 10;
/// Chunks per iteration: different chunks, so the bench does not compress one
/// cached chunk over and over.
const CHUNKS: usize = 16;

/// Seeded, so every run compresses the same bytes.
use blockrep_core::rng::SplitMix64 as Rng;

const WORDS: [&str; 16] = [
    "block", "replica", "epoch", "kernel", "inode", "journal", "the", "of", "disk", "write",
    "sector", "commit", "server", "agent", "root", "page",
];

/// Words from a small vocabulary separated by spaces, like logs or source text.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[(rng.next_u64() % 16) as usize].as_bytes());
        out.push(b' ');
    }
    out.truncate(len);
    out
}

/// 64-byte records: a counter, a fixed pattern, and one varying byte in a
/// quarter of them, like database pages or inode tables.
fn structured(rng: &mut Rng, len: usize, first_record: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (n, record) in out.chunks_mut(64).enumerate() {
        let header = (first_record + n as u64).to_le_bytes();
        for (i, b) in record.iter_mut().enumerate() {
            *b = if i < 8 { header[i] } else { (i as u8) ^ 0x5a };
        }
        if rng.next_u64() % 4 == 0 {
            record[8] = rng.next_u64() as u8;
        }
    }
    out
}

fn random(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out
}

fn chunks(kind: &str) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(42);
    (0..CHUNKS)
        .map(|n| match kind {
            "text" => text(&mut rng, CHUNK_BYTES),
            "structured" => structured(&mut rng, CHUNK_BYTES, (n * CHUNK_BYTES / 64) as u64),
            _ => random(&mut rng, CHUNK_BYTES),
        })
        .collect()
}

fn compress_all(compressor: &mut zstd::bulk::Compressor<'_>, chunks: &[Vec<u8>]) -> Vec<Vec<u8>> {
    chunks
        .iter()
        .map(|chunk| compressor.compress(chunk).unwrap())
        .collect()
}

fn compress(c: &mut Criterion) {
    for kind in ["text", "structured", "random"] {
        let data = chunks(kind);
        let raw_bytes = (CHUNKS * CHUNK_BYTES) as u64;
        let mut group = c.benchmark_group(format!("compress_64KiB/{kind}"));
        group.throughput(Throughput::Bytes(raw_bytes));
        for level in [1, 3] {
            let mut compressor = zstd::bulk::Compressor::new(level).unwrap();
            let compressed = compress_all(&mut compressor, &data);
            let stored_bytes: usize = compressed.iter().map(Vec::len).sum();
            println!(
                "compress_64KiB/{kind}: zstd -{level} ratio {:.2} ({} -> {} bytes)",
                raw_bytes as f64 / stored_bytes as f64,
                raw_bytes,
                stored_bytes
            );
            // Output buffer sized once, as a sender reusing its frame buffer would.
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK_BYTES));
            group.bench_function(BenchmarkId::new("zstd", level), |b| {
                b.iter(|| {
                    for chunk in &data {
                        out.clear();
                        compressor
                            .compress_to_buffer(black_box(chunk.as_slice()), &mut out)
                            .unwrap();
                    }
                })
            });
            let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
            // Capacity is the cap: a chunk that claims more fails instead of growing it.
            let mut scratch = Vec::with_capacity(CHUNK_BYTES);
            group.bench_function(BenchmarkId::new("unzstd_capped", level), |b| {
                b.iter(|| {
                    for frame in &compressed {
                        scratch.clear();
                        decompressor
                            .decompress_to_buffer(black_box(frame.as_slice()), &mut scratch)
                            .unwrap();
                    }
                })
            });
            assert_eq!(scratch.len(), CHUNK_BYTES);
        }
        group.bench_function("blake3", |b| {
            b.iter(|| {
                for chunk in &data {
                    black_box(blake3::hash(black_box(chunk)));
                }
            })
        });
        group.finish();
    }
}

criterion_group!(benches, compress);
criterion_main!(benches);

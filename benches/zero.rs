//! Zero detection: what an all-zero chunk costs blockrep (`hash_chunk`) next to a
//! naive byte-by-byte check and to blake3 of the same bytes, and what a sparse
//! disk costs `scan_buffer` next to blake3 of the whole buffer on every core.
//!
//! Target: `zero_chunk_64KiB/hash_chunk` is several times faster than
//! `zero_chunk_64KiB/blake3`, and `sparse_disk_256MiB/scan_buffer` costs about
//! the non-zero share of `sparse_disk_256MiB/blake3_update_rayon`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use blockrep_core::{Geometry, hash_chunk, scan_buffer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CHUNK_BYTES: usize = 64 << 10;
const DISK_BYTES: usize = 256 << 20;
/// Share of the sparse disk's 1 MiB extents that hold data, in percent; the rest
/// are zero, as on a freshly installed system disk.
const DATA_SHARE_PERCENT: u64 = 10;
const EXTENT_BYTES: usize = 1 << 20;

/// Incompressible-looking bytes, so data chunks really hash.
fn fill_random(out: &mut [u8], seed: u64) {
    blockrep_core::rng::SplitMix64::new(seed).fill(out);
}

/// A zeroed buffer whose pages are really backed by memory. `vec![0; n]` maps
/// the shared zero page until written, so reading it would hit one cached 4 KiB
/// page over and over instead of streaming from RAM as a mapped disk does.
fn touched_zeros(len: usize) -> Vec<u8> {
    let mut out = vec![1u8; len];
    out.fill(0);
    out
}

/// The sparse disk: `DATA_SHARE_PERCENT` of its extents random, the rest zero,
/// picked by a fixed sequence so every run scans the same layout.
fn sparse_disk() -> Vec<u8> {
    let mut disk = touched_zeros(DISK_BYTES);
    for (n, extent) in disk.chunks_mut(EXTENT_BYTES).enumerate() {
        if (n as u64 * 37) % 100 < DATA_SHARE_PERCENT {
            fill_random(extent, n as u64 + 1);
        }
    }
    disk
}

/// The obvious check, for reference: one byte at a time with an early exit.
fn naive_is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

fn zero_chunk(c: &mut Criterion) {
    let zeros = touched_zeros(CHUNK_BYTES);
    let mut data = vec![0u8; CHUNK_BYTES];
    fill_random(&mut data, 7);
    let mut group = c.benchmark_group("zero_chunk_64KiB");
    group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
    group.bench_function("hash_chunk", |b| b.iter(|| hash_chunk(black_box(&zeros))));
    group.bench_function("naive_all_zero", |b| {
        b.iter(|| naive_is_zero(black_box(&zeros)))
    });
    group.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&zeros))));
    // A data chunk pays the zero check's early exit plus blake3: the check must
    // not make data chunks measurably slower than plain blake3 above.
    group.bench_function("hash_chunk_data", |b| {
        b.iter(|| hash_chunk(black_box(&data)))
    });
    group.finish();
}

fn sparse_scan(c: &mut Criterion) {
    let disk = sparse_disk();
    let geometry = Geometry::new(DISK_BYTES as u64, CHUNK_BYTES as u32).unwrap();
    let mut group = c.benchmark_group("sparse_disk_256MiB");
    group.throughput(Throughput::Bytes(DISK_BYTES as u64));
    group.sample_size(10);
    group.bench_function("scan_buffer", |b| {
        b.iter(|| scan_buffer(black_box(&disk), geometry))
    });
    group.bench_function("blake3_update_rayon", |b| {
        b.iter(|| {
            blake3::Hasher::new()
                .update_rayon(black_box(&disk))
                .finalize()
        })
    });
    // One thread reading every byte: the memory-bandwidth side of zero detection.
    group.bench_function("naive_all_zero_per_chunk_1_thread", |b| {
        b.iter(|| {
            disk.chunks(CHUNK_BYTES)
                .filter(|chunk| naive_is_zero(chunk))
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, zero_chunk, sparse_scan);
criterion_main!(benches);

//! Scan speed: blockrep's per-chunk hashing on every core against plain blake3
//! (`Hasher::update_rayon`, all cores) over the same 256 MiB buffer.
//!
//! Target: `scan/chunks_64KiB` reaches at least 80% of `scan/blake3_update_rayon`.
#![allow(missing_docs, clippy::unwrap_used)]

use blockrep_core::{Geometry, scan_buffer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BUFFER_BYTES: usize = 256 << 20;

fn buffer() -> Vec<u8> {
    // Non-zero, incompressible-looking bytes: every chunk must really be hashed.
    let mut out = vec![0u8; BUFFER_BYTES];
    let mut state = 0x1234_5678_9abc_def0u64;
    for word in out.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    out
}

fn scan(c: &mut Criterion) {
    let data = buffer();
    let mut group = c.benchmark_group("scan");
    group.throughput(Throughput::Bytes(BUFFER_BYTES as u64));
    group.sample_size(20);
    group.bench_function("blake3_update_rayon", |b| {
        b.iter(|| blake3::Hasher::new().update_rayon(&data).finalize())
    });
    for chunk_size in [16u32 << 10, 64 << 10, 1 << 20] {
        let geometry = Geometry::new(BUFFER_BYTES as u64, chunk_size).unwrap();
        group.bench_function(format!("chunks_{}KiB", chunk_size >> 10), |b| {
            b.iter(|| scan_buffer(&data, geometry))
        });
    }
    let zeros = vec![0u8; BUFFER_BYTES];
    let geometry = Geometry::new(BUFFER_BYTES as u64, 64 << 10).unwrap();
    group.bench_function("zero_disk_64KiB", |b| {
        b.iter(|| scan_buffer(&zeros, geometry))
    });
    group.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);

//! Block values: what `hash_with_block_values` (a chunk's id plus the value of
//! each 4 KiB block, merged up blake3's tree by hand) costs next to plain
//! `blake3::hash` of the same bytes, measured in the same run. Each 4 KiB block
//! is hashed on its own, so blake3's SIMD sees at most four 1 KiB chunks at a
//! time; the gap between the two rows is that loss.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use blockrep_core::hash_with_block_values;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Incompressible-looking bytes, so every block really hashes.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    blockrep_core::rng::bytes(len, seed)
}

fn block_values(c: &mut Criterion) {
    for (name, len) in [
        ("block_values_64KiB", 64usize << 10),
        ("block_values_4MiB", 4 << 20),
    ] {
        let data = random_bytes(len, 7);
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function("blake3_hash", |b| b.iter(|| blake3::hash(black_box(&data))));
        group.bench_function("hash_with_block_values", |b| {
            b.iter(|| hash_with_block_values(black_box(&data)))
        });
        group.finish();
    }
}

criterion_group!(benches, block_values);
criterion_main!(benches);

//! Scan speed of a disk image file (in the page cache) through `DiskImage::scan`,
//! next to plain blake3 over the same bytes already in memory: what reading the
//! file costs on top of hashing it.
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write;

use blockrep_core::{DiskImage, Geometry, scan_buffer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const DISK_BYTES: usize = 256 << 20;

fn disk_bytes() -> Vec<u8> {
    // Non-zero, incompressible-looking bytes: every chunk must really be hashed.
    let mut out = vec![0u8; DISK_BYTES];
    let mut state = 0x1234_5678_9abc_def0u64;
    for word in out.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    out
}

fn scan_file(c: &mut Criterion) {
    let data = disk_bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let mut group = c.benchmark_group("scan_file");
    group.throughput(Throughput::Bytes(DISK_BYTES as u64));
    group.sample_size(20);
    for chunk_size in [4u32 << 10, 64 << 10, 1 << 20] {
        let geometry = Geometry::new(DISK_BYTES as u64, chunk_size).unwrap();
        group.bench_function(format!("memory_{}KiB", chunk_size >> 10), |b| {
            b.iter(|| scan_buffer(&data, geometry))
        });
        group.bench_function(format!("file_{}KiB", chunk_size >> 10), |b| {
            b.iter(|| {
                let disk = DiskImage::open(&path).unwrap();
                disk.scan(geometry)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scan_file);
criterion_main!(benches);

//! Store writes: `Store::insert` of 64 MiB of 64 KiB chunks into a fresh store in
//! a temporary directory, then `Store::commit` (which waits for every fsync and
//! publishes the head), next to the filesystem floor: the same bytes written with
//! `File::write_all` in 64 KiB writes, then `sync_data`. The commit alone, both
//! sides without any fsync, and the crc32 each record carries split the difference.
//!
//! Target: `store_64MiB/insert_commit` within 20% of
//! `store_64MiB/write_all_sync_data`; the pack format and the head must not add a
//! visible cost to the fsync that durability needs anyway.
#![allow(missing_docs, clippy::unwrap_used)]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use blockrep_core::{ChunkId, Geometry, Root, SourceId};
use blockrep_store::{BlobKind, Store, StoredCodec};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tempfile::TempDir;

const CHUNK_BYTES: usize = 64 << 10;
/// Enough to cross the store's 64 MiB background-flush threshold once, as an
/// initial sync does many times.
const EPOCH_BYTES: usize = 64 << 20;
const CHUNKS: usize = EPOCH_BYTES / CHUNK_BYTES;
/// Length of a pack record's header (`BRB1 | kind | codec | 0 0 | stored len |
/// raw len | id | crc32`), copied here because the store keeps it private.
const PACK_RECORD_HEADER_BYTES: usize = 52;

/// Random-looking chunks, all different: the store keeps what it is given, so
/// only the size matters, but distinct bytes keep the page cache honest.
fn chunks() -> Vec<Vec<u8>> {
    let mut state = 0x0123_4567_89ab_cdefu64;
    (0..CHUNKS)
        .map(|_| {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            chunk
        })
        .collect()
}

fn temp_dir() -> TempDir {
    // Under the target directory rather than /tmp, which may be tmpfs and would
    // make every fsync free.
    let parent = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap().join("target"));
    std::fs::create_dir_all(&parent).unwrap();
    tempfile::Builder::new()
        .prefix("bench-store-")
        .tempdir_in(parent)
        .unwrap()
}

/// What one iteration wrote. Dropped after the timing stops, it first waits for
/// the data to reach the disk, so that write-back left by one iteration (such as
/// the store's background flush at 64 MiB) never runs inside the next one.
struct Written {
    data: WrittenData,
    /// Deleted once `data` is flushed and closed.
    _dir: TempDir,
}

enum WrittenData {
    Store(Box<Store>),
    File(File),
}

impl Written {
    fn store(dir: TempDir, store: Store) -> Self {
        let data = WrittenData::Store(Box::new(store));
        Self { data, _dir: dir }
    }

    fn file(dir: TempDir, file: File) -> Self {
        let data = WrittenData::File(file);
        Self { data, _dir: dir }
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        match &self.data {
            WrittenData::Store(store) => store.sync().unwrap(),
            WrittenData::File(file) => file.sync_data().unwrap(),
        }
    }
}

/// A new, empty store in its own directory.
fn new_store() -> (TempDir, Store) {
    let dir = temp_dir();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// A new, empty plain file in its own directory (the floors).
fn new_file() -> (TempDir, File) {
    let dir = temp_dir();
    let file = File::create(dir.path().join("floor")).unwrap();
    (dir, file)
}

fn insert_all(store: &Store, chunks: &[Vec<u8>], ids: &[ChunkId]) {
    for (chunk, id) in chunks.iter().zip(ids) {
        let new = store
            .insert(
                BlobKind::Chunk,
                *id,
                StoredCodec::Raw,
                CHUNK_BYTES as u32,
                chunk,
            )
            .unwrap();
        assert!(new, "every chunk of the bench must be new to the store");
    }
}

fn store(c: &mut Criterion) {
    let chunks = chunks();
    let ids: Vec<ChunkId> = chunks
        .iter()
        .map(|chunk| ChunkId::from(blake3::hash(chunk)))
        .collect();
    let geometry = Geometry::new(EPOCH_BYTES as u64, CHUNK_BYTES as u32).unwrap();
    let (root, pages) = Root::build(geometry, &ids);
    let source = SourceId::new("bench").unwrap();

    let mut group = c.benchmark_group("store_64MiB");
    group.throughput(Throughput::Bytes(EPOCH_BYTES as u64));
    // Each iteration writes 64 MiB: few, equal samples, a fresh directory each.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    // Durable variants first: the page-cache-only ones leave dirty pages whose
    // write-back would otherwise land in the fsync of the next measurement.
    group.bench_function("insert_commit", |b| {
        b.iter_batched(
            new_store,
            |(dir, store)| {
                insert_all(&store, &chunks, &ids);
                store
                    .commit(
                        &source,
                        1,
                        &root,
                        &pages,
                        0,
                        blockrep_core::clock::now_unix_ms(),
                    )
                    .unwrap();
                Written::store(dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    // The commit alone, with the 64 MiB already appended: the waits for the pack's
    // fsyncs, the page and root, and the head's publication.
    group.bench_function("commit_after_insert", |b| {
        b.iter_batched(
            || {
                let dir = temp_dir();
                let store = Store::open(dir.path()).unwrap();
                insert_all(&store, &chunks, &ids);
                (dir, store)
            },
            |(dir, store)| {
                store
                    .commit(
                        &source,
                        1,
                        &root,
                        &pages,
                        0,
                        blockrep_core::clock::now_unix_ms(),
                    )
                    .unwrap();
                Written::store(dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("write_all_sync_data", |b| {
        b.iter_batched(
            new_file,
            |(dir, mut file)| {
                for chunk in &chunks {
                    file.write_all(chunk).unwrap();
                }
                file.sync_data().unwrap();
                Written::file(dir, file)
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("insert_no_sync", |b| {
        b.iter_batched(
            new_store,
            |(dir, store)| {
                insert_all(&store, &chunks, &ids);
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    // The pack's write pattern through plain std: per chunk a 52-byte record
    // header, then the data right after it, so every data write starts off a page
    // boundary. Separates the cost of the layout from the store's own work.
    group.bench_function("pwrite_header_then_data_no_sync", |b| {
        b.iter_batched(
            new_file,
            |(dir, file)| {
                let header = [0x42u8; PACK_RECORD_HEADER_BYTES];
                let mut offset = 0u64;
                for chunk in &chunks {
                    file.write_all_at(&header, offset).unwrap();
                    file.write_all_at(chunk, offset + header.len() as u64)
                        .unwrap();
                    offset += (header.len() + chunk.len()) as u64;
                }
                Written::file(dir, file)
            },
            BatchSize::PerIteration,
        )
    });
    // Each record carries a crc32 of its bytes, computed on insert.
    group.bench_function("crc32_only", |b| {
        b.iter(|| {
            for chunk in &chunks {
                std::hint::black_box(crc32fast::hash(chunk));
            }
        })
    });
    group.bench_function("write_all_no_sync", |b| {
        b.iter_batched(
            new_file,
            |(dir, mut file)| {
                for chunk in &chunks {
                    file.write_all(chunk).unwrap();
                }
                Written::file(dir, file)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// Packs of the opening bench: small, so that 256 MiB makes 16 of them.
const OPEN_PACK_BYTES: u64 = 16 << 20;
/// Copies of the 64 MiB of chunks the opening bench stores.
const OPEN_COPIES: usize = 4;

/// Opening a store of 256 MiB in 16 packs (15 sealed): from the packs' saved
/// scans, against scanning every record (what each open did before the scans
/// were saved, and what the first open after a pack seals still does), next
/// to the floor of a scan, reading the pack files. Read-only opens, so that
/// the scanning variant does not save the scans it makes.
fn open(c: &mut Criterion) {
    let dir = temp_dir();
    {
        let store = Store::open(dir.path()).unwrap();
        store.set_pack_size_max_bytes(OPEN_PACK_BYTES);
        for copy in 0..OPEN_COPIES {
            for chunk in chunks() {
                let mut chunk = chunk;
                chunk[..8].copy_from_slice(&(copy as u64).to_le_bytes());
                let id = ChunkId::from(blake3::hash(&chunk));
                store
                    .insert(
                        BlobKind::Chunk,
                        id,
                        StoredCodec::Raw,
                        CHUNK_BYTES as u32,
                        &chunk,
                    )
                    .unwrap();
            }
        }
        store.sync().unwrap();
    }
    // A writable open saves the sealed packs' scans.
    drop(Store::open(dir.path()).unwrap());
    let packs = dir.path().join("packs");
    let files = |suffix: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&packs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect()
    };
    assert_eq!(files(".idx").len(), files(".pack").len() - 1);
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = files(".idx")
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();

    let mut group = c.benchmark_group("store_open_256MiB");
    group.throughput(Throughput::Bytes((OPEN_COPIES * EPOCH_BYTES) as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.bench_function("saved_scans", |b| {
        b.iter(|| Store::open_read_only(dir.path()).unwrap().blob_count())
    });
    group.bench_function("scanning", |b| {
        b.iter_batched(
            || {
                // Gone after the first iteration: a read-only open saves nothing.
                for (path, _) in &saved {
                    let _ = std::fs::remove_file(path);
                }
            },
            |()| Store::open_read_only(dir.path()).unwrap().blob_count(),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("read_pack_files", |b| {
        b.iter(|| {
            files(".pack")
                .iter()
                .map(|p| std::hint::black_box(std::fs::read(p).unwrap()).len())
                .sum::<usize>()
        })
    });
    group.finish();
    for (path, bytes) in &saved {
        std::fs::write(path, bytes).unwrap();
    }
}

criterion_group!(benches, store, open);
criterion_main!(benches);

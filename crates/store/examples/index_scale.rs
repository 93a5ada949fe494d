//! How the blob index scales: builds a store of many small blobs (the
//! index's cost is per blob, not per byte, so 16 million 8-byte blobs stand
//! for 1 TiB of 64 KiB chunks in about 1 GiB of packs), then opens it in a
//! fresh process and measures start-up, lookups, inserts and memory.
//!
//! ```text
//! index_scale build DIR BLOBS [--in-memory]
//! index_scale open DIR BLOBS [--in-memory] [--lookups N]
//! ```
//!
//! `--in-memory` opens the store without an index directory, so the whole
//! index is the in-memory table, as every store's was before runs. Each
//! phase prints one line of `key=value` pairs, memory from /proc/self/status.
//! `scripts/index-scale.sh` runs both kinds side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use blockrep_core::ChunkId;
use blockrep_store::{BlobKind, Store, StoredCodec};

const SYNC_EVERY: u64 = 65_536;

fn blob(n: u64) -> ([u8; 8], ChunkId) {
    let bytes = n.to_le_bytes();
    (bytes, ChunkId(*blake3::hash(&bytes).as_bytes()))
}

fn open(dir: &Path, in_memory: bool) -> Store {
    if in_memory {
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        Store::open_with_vfs(&dir, Arc::new(blockrep_store::vfs::RealFs)).unwrap()
    } else {
        Store::open(dir).unwrap()
    }
}

/// Inserts blobs `from..to`, syncing every `SYNC_EVERY`; inserts per second.
fn insert(store: &Store, from: u64, to: u64) -> f64 {
    let start = Instant::now();
    for n in from..to {
        let (bytes, id) = blob(n);
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, 8, &bytes)
            .unwrap();
        if (n + 1) % SYNC_EVERY == 0 {
            store.sync().unwrap();
        }
    }
    store.sync().unwrap();
    (to - from) as f64 / start.elapsed().as_secs_f64()
}

/// `VmRSS` and `VmHWM` in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: index_scale build|open DIR BLOBS [--in-memory] [--lookups N]";
    let (phase, dir, blobs) = match &args[..] {
        [_, phase, dir, blobs, ..] => (phase.as_str(), Path::new(dir), blobs),
        _ => panic!("{usage}"),
    };
    let blobs: u64 = blobs.parse().expect(usage);
    let in_memory = args.iter().any(|a| a == "--in-memory");
    let lookups: u64 = args
        .iter()
        .position(|a| a == "--lookups")
        .and_then(|at| args.get(at + 1))
        .map_or(1_000_000, |n| n.parse().expect(usage));
    let kind = if in_memory { "in-memory" } else { "runs" };
    match phase {
        "build" => {
            let store = open(dir, in_memory);
            let rate = insert(&store, 0, blobs);
            let (rss, hwm) = memory();
            println!(
                "phase=build index={kind} blobs={} inserts_per_s={rate:.0} rss_mib={rss:.1} peak_rss_mib={hwm:.1}",
                store.blob_count()
            );
        }
        "open" => {
            let start = Instant::now();
            let store = open(dir, in_memory);
            let open_s = start.elapsed().as_secs_f64();
            assert_eq!(store.blob_count() as u64, blobs, "blobs after the open");
            let (rss_open, _) = memory();
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let start = Instant::now();
            for _ in 0..lookups {
                assert!(store.contains(&blob(next() % blobs).1));
            }
            let hits = lookups as f64 / start.elapsed().as_secs_f64();
            let start = Instant::now();
            for _ in 0..lookups {
                assert!(!store.contains(&blob(blobs + next() % blobs).1));
            }
            let misses = lookups as f64 / start.elapsed().as_secs_f64();
            let inserts = insert(&store, blobs, blobs + lookups);
            let (rss, hwm) = memory();
            let (runs_bytes, table) = store.index_memory();
            println!(
                "phase=open index={kind} blobs={blobs} open_s={open_s:.3} rss_after_open_mib={rss_open:.1} \
                 hits_per_s={hits:.0} misses_per_s={misses:.0} inserts_per_s={inserts:.0} \
                 rss_mib={rss:.1} peak_rss_mib={hwm:.1} runs_memory_mib={:.1} table_entries={table}",
                runs_bytes as f64 / 1048576.0
            );
        }
        _ => panic!("{usage}"),
    }
}

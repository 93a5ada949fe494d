//! Tests of the blob index kept on disk (`blobs/index/`) as the store uses
//! it: a table bounded by its budget, runs that an open trusts, and a
//! rebuild from the packs when they are damaged.
use super::*;
use crate::testutil::Rng;
use std::fs;

const BLOBS: usize = 3000;
/// Entries the table may hold: 64.
const BUDGET_BYTES: usize = 64 * 128;

/// A store holding `BLOBS` chunks of 100 random bytes in small packs,
/// synced every 100 inserts with the index over a tiny budget.
fn filled(dir: &Path) -> Vec<(ChunkId, Vec<u8>)> {
    let store = Store::open(dir).unwrap();
    store.set_pack_size_max_bytes(64 * 1024);
    store.set_index_memory_max_bytes(BUDGET_BYTES);
    let mut rng = Rng::new(7);
    let mut blobs = Vec::new();
    for n in 0..BLOBS {
        let mut bytes = vec![0u8; 100];
        rng.fill(&mut bytes);
        let id = ChunkId(*blake3::hash(&bytes).as_bytes());
        assert!(
            store
                .insert(BlobKind::Chunk, id, StoredCodec::Raw, 100, &bytes)
                .unwrap()
        );
        blobs.push((id, bytes));
        if n % 100 == 99 {
            store.sync().unwrap();
            let (_, table) = store.index_memory();
            assert!(table <= 64, "the table holds {table} entries after a sync");
        }
    }
    store.sync().unwrap();
    check(&store, &blobs);
    blobs
}

fn check(store: &Store, blobs: &[(ChunkId, Vec<u8>)]) {
    assert_eq!(store.blob_count(), blobs.len());
    for (id, bytes) in blobs {
        assert!(store.contains(id));
        assert_eq!(&store.read_blob(id).unwrap(), bytes);
    }
    for n in 0..500u32 {
        let absent = ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes());
        assert!(!store.contains(&absent));
    }
}

fn runs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut runs: Vec<_> = fs::read_dir(dir.join(INDEX_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("run-"))
        .collect();
    runs.sort();
    runs
}

#[test]
fn the_index_moves_to_runs_and_an_open_reads_only_what_they_do_not_cover() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = filled(dir.path());
    let files = runs(dir.path());
    // Thirty flushes merged pairwise: a handful of runs, not thirty.
    assert!(
        !files.is_empty() && files.len() <= 6,
        "{} runs",
        files.len()
    );
    for file in files
        .iter()
        .chain([&dir.path().join(INDEX_DIR).join("manifest")])
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let store = Store::open(dir.path()).unwrap();
    let (runs_memory, table) = store.index_memory();
    // Everything synced was in the runs: the open put nothing in the table
    // but the records after the last flush.
    assert!(table < 100, "the open indexed {table} entries itself");
    assert!(
        runs_memory > 0 && runs_memory < BLOBS * 4,
        "{runs_memory} bytes"
    );
    check(&store, &blobs);
    // A fresh open without the runs finds the same.
    drop(store);
    fs::remove_dir_all(dir.path().join(INDEX_DIR)).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.index_memory().1, BLOBS);
    check(&store, &blobs);
}

#[test]
fn a_damaged_run_or_manifest_is_rebuilt_from_the_packs() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = filled(dir.path());
    // A flipped byte in the entries of the biggest run: found by the first
    // lookup that reads its block, which rebuilds the index.
    let biggest = runs(dir.path())
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&biggest).unwrap();
    for at in (4096..bytes.len() / 2).step_by(4096) {
        bytes[at + 40] ^= 0x55;
    }
    fs::write(&biggest, &bytes).unwrap();
    let store = Store::open(dir.path()).unwrap();
    check(&store, &blobs);
    drop(store);
    // A damaged manifest: the open rebuilds.
    let store = Store::open(dir.path()).unwrap();
    store.set_index_memory_max_bytes(BUDGET_BYTES);
    store.sync().unwrap();
    drop(store);
    let manifest = dir.path().join(INDEX_DIR).join("manifest");
    let mut bytes = fs::read(&manifest).unwrap();
    bytes[9] ^= 1;
    fs::write(&manifest, &bytes).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.index_memory().1, BLOBS, "rebuilt from the packs");
    check(&store, &blobs);
}

//! The decoded chunk cache shared by every open launch volume of a store,
//! with a memory budget, and the readahead that fills it ahead of a
//! sequential reader.
//!
//! A launch reads the blocks it has not written from its base replica,
//! chunk by chunk: each chunk is read from a pack, decompressed, and checked
//! (its hash the first time this process reads it, its record's crc32 after:
//! `blobs/remembered.rs`). The cache keeps decoded chunks by id, so a random reader decodes
//! each chunk once, and launches of one source (whose chunks mostly share
//! ids) share their entries. A hit returns bytes whose id the reader's own
//! root names, and an id is the hash of its content, so sharing entries
//! between launches lets no launch read anything it could not read from the
//! store itself.
//!
//! The cache is `quick_cache` (S3-FIFO: a scan by one reader does not
//! evict what others use), weighted by bytes. Readahead hands the chunks
//! after a sequential read to one background thread, which decodes them into
//! the cache while the reader is busy with the current ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use blockrep_core::ChunkId;

use crate::mutex::lock;

/// A decoded chunk as the cache holds it: the `Vec` the read decoded into,
/// shared as it is (an `Arc<[u8]>` would copy it once more).
pub(crate) type ChunkBytes = Arc<Vec<u8>>;

/// Default memory budget of the decoded chunk cache (`--launch-cache-mib`).
pub const CHUNK_CACHE_BYTES_DEFAULT: u64 = 256 << 20;
/// Bytes charged per entry beyond its data (id, handle, table slot).
const ENTRY_OVERHEAD_BYTES: u64 = 96;
/// Readahead batches waiting for the thread at most; more are dropped (the
/// reader then decodes for itself).
const READAHEAD_QUEUE_MAX: usize = 16;

#[derive(Clone)]
struct ByLength;

impl quick_cache::Weighter<ChunkId, ChunkBytes> for ByLength {
    fn weight(&self, _id: &ChunkId, bytes: &ChunkBytes) -> u64 {
        bytes.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

type Cache = quick_cache::sync::Cache<ChunkId, ChunkBytes, ByLength>;

/// What the cache holds and how it served, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkCacheStats {
    /// The memory budget in bytes.
    pub budget_bytes: u64,
    /// Bytes held now (entries and their overhead).
    pub used_bytes: u64,
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that decoded a chunk from the store.
    pub misses: u64,
    /// Chunks decoded ahead of a sequential reader.
    pub readahead_chunks: u64,
}

/// See the module documentation.
pub(crate) struct ChunkCache {
    cache: RwLock<Arc<Cache>>,
    pub(crate) budget_bytes: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) readahead_chunks: AtomicU64,
    readahead: OnceLock<Mutex<SyncSender<Readahead>>>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("budget_bytes", &self.budget_bytes.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for ChunkCache {
    fn default() -> Self {
        Self {
            cache: RwLock::new(Arc::new(new_cache(CHUNK_CACHE_BYTES_DEFAULT))),
            budget_bytes: AtomicU64::new(CHUNK_CACHE_BYTES_DEFAULT),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            readahead_chunks: AtomicU64::new(0),
            readahead: OnceLock::new(),
        }
    }
}

/// A cache of `budget_bytes`.
fn new_cache(budget_bytes: u64) -> Cache {
    // Entries are mostly whole chunks of 64 KiB.
    let items = (budget_bytes / (64 << 10)).max(16) as usize;
    Cache::with_weighter(items, budget_bytes, ByLength)
}

/// Decoding to do ahead of a reader, on the readahead thread.
pub(crate) type Readahead = Box<dyn FnOnce() + Send>;

impl ChunkCache {
    fn current(&self) -> Arc<Cache> {
        Arc::clone(&self.cache.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn get(&self, id: &ChunkId) -> Option<ChunkBytes> {
        self.current().get(id)
    }

    pub(crate) fn insert(&self, id: ChunkId, bytes: ChunkBytes) {
        self.current().insert(id, bytes);
    }

    pub(crate) fn send(&self, batch: Readahead) {
        let sender = self.readahead.get_or_init(|| {
            let (sender, receiver) = sync_channel(READAHEAD_QUEUE_MAX);
            // A thread per store, ending when the store (and so the sender)
            // goes; a readahead that cannot start leaves readers to decode.
            let _ = std::thread::Builder::new()
                .name("blockrep-readahead".into())
                .spawn(move || run_readahead(receiver));
            Mutex::new(sender)
        });
        match lock(sender).try_send(batch) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn run_readahead(receiver: Receiver<Readahead>) {
    while let Ok(work) = receiver.recv() {
        work();
    }
}

impl ChunkCache {
    /// Replaces the cache with one of `budget_bytes` (entries held are
    /// dropped).
    /// Bytes held now.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.current().weight()
    }

    pub(crate) fn set_budget(&self, budget_bytes: u64) {
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new_cache(budget_bytes));
        self.budget_bytes.store(budget_bytes, Ordering::Relaxed);
    }
}

//! Test support: an in-memory object store whose requests a test holds at
//! gates, so that a race between a store's threads (or two stores sharing
//! the bucket) happens in the one order the test names.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use blockrep_core::ChunkId;
use blockrep_objects::{BlockingBucket, Bucket};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::{BlobKind, BucketOptions, Store, StoredCodec};

/// The size of every chunk the tests write: one fills a pack.
pub(super) const CHUNK: usize = 65_536;
/// The longest wait for a request to reach its gate.
pub(super) const WAIT: Duration = Duration::from_secs(20);

/// Holds the first request after it is armed until it is released.
pub(super) struct Gate {
    armed: AtomicBool,
    reached: Mutex<Option<mpsc::Sender<()>>>,
    open: tokio::sync::Semaphore,
}

impl Gate {
    /// A gate that holds nothing until armed.
    pub(super) fn new() -> Self {
        Self {
            armed: AtomicBool::new(false),
            reached: Mutex::new(None),
            open: tokio::sync::Semaphore::new(0),
        }
    }

    /// Holds the next request, until the returned guard is released or
    /// dropped: a test that fails while a thread is held lets it go, and
    /// fails instead of waiting forever for it.
    pub(super) fn arm(&self) -> Armed<'_> {
        let (tx, rx) = mpsc::channel();
        *self.reached.lock().unwrap() = Some(tx);
        self.armed.store(true, Ordering::SeqCst);
        Armed {
            gate: self,
            reached: rx,
        }
    }

    /// Called by each request the gate watches: the first one after the
    /// gate was armed waits until it is released.
    async fn pass(&self) {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return;
        }
        if let Some(tx) = self.reached.lock().unwrap().take() {
            let _ = tx.send(());
        }
        self.open.acquire().await.unwrap().forget();
    }
}

/// An armed [`Gate`]: releases the request it holds when dropped.
pub(super) struct Armed<'a> {
    gate: &'a Gate,
    reached: mpsc::Receiver<()>,
}

impl Armed<'_> {
    /// Waits until a request is held (at most [`WAIT`]); fails with `what`.
    pub(super) fn wait(&self, what: &str) {
        self.reached.recv_timeout(WAIT).expect(what);
    }

    /// Lets the held request go on.
    pub(super) fn release(self) {}
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.gate.open.add_permits(1);
    }
}

/// [`InMemory`], with puts and reads of pack indexes, claims of pack
/// numbers, writes of leases, reads of the collection round and listings
/// of `packs/` held at their gates (a claim, a lease write and a listing
/// once they have their answer).
pub(super) struct Gated {
    /// The objects, for a test to look at directly.
    pub(super) inner: InMemory,
    /// PUTs of `packs/N.idx` (which publish a pack).
    pub(super) index_puts: Gate,
    /// GETs of `packs/N.idx` (a refresh reading a new pack).
    pub(super) index_gets: Gate,
    /// Create-only PUTs of `packs/N.pack` (claims), once answered.
    pub(super) claims: Gate,
    /// Writes under `leases/`, once answered.
    pub(super) lease_puts: Gate,
    /// GETs of `gc/round`.
    pub(super) round_gets: Gate,
    /// Listings of `packs/`, once answered.
    pub(super) pack_listings: Gate,
}

impl fmt::Debug for Gated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gated")
    }
}

impl fmt::Display for Gated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gated")
    }
}

#[async_trait]
impl ObjectStore for Gated {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if location.as_ref().ends_with(".idx") {
            self.index_puts.pass().await;
        }
        let claim = location.as_ref().ends_with(".pack") && opts.mode == PutMode::Create;
        let lease = location.as_ref().contains("/leases/");
        let put = self.inner.put_opts(location, payload, opts).await;
        if claim {
            self.claims.pass().await;
        }
        if lease {
            self.lease_puts.pass().await;
        }
        put
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if location.as_ref().ends_with(".idx") {
            self.index_gets.pass().await;
        }
        if location.as_ref().ends_with("gc/round") {
            self.round_gets.pass().await;
        }
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let listed = self.inner.list_with_delimiter(prefix).await;
        if prefix.is_some_and(|p| p.as_ref().ends_with("packs")) {
            self.pack_listings.pass().await;
        }
        listed
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// A new, empty gated bucket.
pub(super) fn gated_bucket() -> Arc<Gated> {
    Arc::new(Gated {
        inner: InMemory::new(),
        index_puts: Gate::new(),
        index_gets: Gate::new(),
        claims: Gate::new(),
        lease_puts: Gate::new(),
        round_gets: Gate::new(),
        pack_listings: Gate::new(),
    })
}

/// A store on a new gated bucket (see [`open_on`]).
pub(super) fn gated_store() -> (Arc<Gated>, tempfile::TempDir, Store) {
    let gated = gated_bucket();
    let (dir, store) = open_on(&gated);
    (gated, dir, store)
}

/// A store on `gated`, as a server opens it, whose packs seal at every
/// chunk.
pub(super) fn open_on(gated: &Arc<Gated>) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let objects: Arc<dyn ObjectStore> = Arc::clone(gated) as Arc<dyn ObjectStore>;
    let bucket = BlockingBucket::new(Bucket::new(objects, "t")).unwrap();
    let store = Store::open_in_bucket(dir.path(), bucket, BucketOptions::default()).unwrap();
    store.set_pack_size_max_bytes(CHUNK as u64);
    (dir, store)
}

/// Stores a chunk of `fill` bytes (new to the store); its id.
pub(super) fn put_chunk(store: &Store, fill: u8) -> ChunkId {
    let bytes = vec![fill; CHUNK];
    let id = ChunkId(*blake3::hash(&bytes).as_bytes());
    assert!(
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, CHUNK as u32, &bytes)
            .unwrap()
    );
    id
}

/// The keys under `t/packs/` of the bucket.
pub(super) fn pack_keys(gated: &Gated) -> Vec<String> {
    let listed = futures::executor::block_on(
        gated
            .inner
            .list_with_delimiter(Some(&Path::from("t/packs"))),
    )
    .unwrap();
    listed
        .objects
        .iter()
        .map(|meta| meta.location.to_string())
        .collect()
}

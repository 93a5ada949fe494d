//! Opening a store: writable, exclusive, read-only, over another file
//! system or with another pack backend.

use super::*;

impl Store {
    /// Opens (creating if needed) the store in `dir` for writing. A torn tail of the
    /// last pack, left by a crash, is cut off.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        Self::open_with_index_memory(dir, crate::INDEX_MEMORY_DEFAULT_BYTES)
    }

    /// [`Store::open`] with the blob index keeping at most about
    /// `index_memory_bytes` of entries in memory (the rest in runs in
    /// `DATA/index`; see [`Store::set_index_memory_max_bytes`]), from the
    /// open on.
    pub fn open_with_index_memory(dir: &Path, index_memory_bytes: usize) -> Result<Self, Error> {
        let dir = &make_data_dir(dir)?;
        restrict_data_dir(dir)?;
        let index = IndexOptions::on_disk(dir.join(INDEX_DIR), index_memory_bytes);
        Self::open_writable(dir, Arc::new(RealFs), index)
    }

    /// [`Store::open`] on another file system: `dir` is an absolute path in
    /// `vfs`. The crash tests open stores on a simulated disk this way.
    pub fn open_with_vfs(dir: &Path, vfs: Arc<dyn Vfs>) -> Result<Self, Error> {
        // The index's runs are written with real files only: on another
        // file system the index stays in memory.
        Self::open_writable(dir, vfs, IndexOptions::default())
    }

    fn open_writable(dir: &Path, vfs: Arc<dyn Vfs>, index: IndexOptions) -> Result<Self, Error> {
        refuse_working_copy(vfs.as_ref(), dir)?;
        let guard = FsyncGuard::new(vfs);
        let sync_failed = guard.flag();
        let vfs: Arc<dyn Vfs> = Arc::new(guard);
        create_dir_durable(vfs.as_ref(), &dir.join("packs"))?;
        create_dir_durable(vfs.as_ref(), &dir.join("sources"))?;
        if let Some(index_dir) = &index.dir {
            create_dir_durable(vfs.as_ref(), index_dir)?;
        }
        // What this open is about to trust (pack records it indexes, heads,
        // names) may be in the page cache only, if the last process saw an
        // fsync fail: make it durable before anything new builds on it.
        sync_tree(vfs.as_ref(), dir).map_err(|e| {
            Error::io(
                format!("cannot make the contents of {} durable", dir.display()),
                e,
            )
        })?;
        Self::open_inner(dir, vfs, false, sync_failed, index)
    }

    /// [`Store::open`], holding an exclusive lock on the data directory for as
    /// long as the store is open: the server and offline commands that write
    /// use this, so that two processes never append to the same packs.
    pub fn open_exclusive(dir: &Path) -> Result<Self, Error> {
        Self::open_exclusive_with_index_memory(dir, crate::INDEX_MEMORY_DEFAULT_BYTES)
    }

    /// [`Store::open_exclusive`] with the index's memory budget of
    /// [`Store::open_with_index_memory`].
    pub fn open_exclusive_with_index_memory(
        dir: &Path,
        index_memory_bytes: usize,
    ) -> Result<Self, Error> {
        let dir = &make_data_dir(dir)?;
        let lock_file = lock_data_dir(dir)?;
        let mut store = Self::open_with_index_memory(dir, index_memory_bytes)?;
        store.lock_file = Some(lock_file);
        Ok(store)
    }

    /// Opens an existing store without changing anything, e.g. to export while the
    /// server runs. Only committed state is read.
    pub fn open_read_only(dir: &Path) -> Result<Self, Error> {
        if !dir.join("packs").is_dir() {
            return Err(Error::new(
                ErrorKind::Missing,
                format!("{} is not a blockrep data directory", dir.display()),
            ));
        }
        refuse_working_copy(&RealFs, dir)?;
        let index = match dir.join(INDEX_DIR) {
            index_dir if index_dir.is_dir() => {
                IndexOptions::on_disk(index_dir, crate::INDEX_MEMORY_DEFAULT_BYTES)
            }
            _ => IndexOptions::default(),
        };
        Self::open_inner(dir, Arc::new(RealFs), true, Arc::default(), index)
    }

    /// [`Store::open_read_only`] of what a bucket's working copy holds,
    /// records and cached packs alone: for the bench, whose cache holds
    /// everything it replicated. A blob of a pack dropped from the cache
    /// reads as missing.
    #[doc(hidden)]
    pub fn open_cached_read_only(dir: &Path) -> Result<Self, Error> {
        Self::open_inner(
            dir,
            Arc::new(RealFs),
            true,
            Arc::default(),
            IndexOptions::default(),
        )
    }

    fn open_inner(
        dir: &Path,
        vfs: Arc<dyn Vfs>,
        read_only: bool,
        sync_failed: Arc<std::sync::atomic::AtomicBool>,
        index: IndexOptions,
    ) -> Result<Self, Error> {
        let packs = LocalPacks::new(dir.join("packs"), Arc::clone(&vfs));
        Self::with_packs(dir, vfs, Box::new(packs), read_only, sync_failed, index)
    }

    pub(crate) fn with_packs(
        dir: &Path,
        vfs: Arc<dyn Vfs>,
        packs: Box<dyn PackBackend>,
        read_only: bool,
        sync_failed: Arc<std::sync::atomic::AtomicBool>,
        index: IndexOptions,
    ) -> Result<Self, Error> {
        let blobs = Blobs::open(packs, read_only, sync_failed, index)?;
        Ok(Self {
            dir: dir.to_owned(),
            vfs,
            lock_file: None,
            blobs,
            commit_locks: Mutex::new(HashMap::new()),
            catalog: Catalog::default(),
            chunk_cache: Default::default(),
            remote: None,
        })
    }
}

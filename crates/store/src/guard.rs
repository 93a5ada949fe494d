//! One failed fsync fails every later one, until the store is reopened.
//!
//! After an fsync reports an error, Linux may have marked the pages it failed
//! to write as clean, and a later fsync of the same file "succeeds" without
//! writing them. Worse, a retry may not fsync at all: a directory created
//! before a failed parent fsync is found existing, so the retry skips the
//! parent fsync and acknowledges a name that may not survive a power loss.
//! No retry can be trusted, so [`FsyncGuard`] wraps the store's file system
//! and, once any fsync (of a file or a directory, in the foreground or the
//! background) has failed, fails every later one without trying: nothing is
//! acknowledged until the store is reopened. A writable open first fsyncs the
//! names and small files it finds ([`sync_tree`]) and each pack it scans, so
//! that nothing it builds on was left pending by the failure. (A kernel that
//! dropped pages it failed to write and now reports them clean defeats any
//! fsync; that is beyond what a retry or a reopen can mend.)

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::vfs::{OpenMode, PendingSync, Vfs, VfsFile};

/// The error every fsync returns once one has failed.
fn refused() -> io::Error {
    io::Error::other(
        "an earlier fsync failed, so nothing written since can be trusted to be durable; \
         reopen the store (restart the server) to recover",
    )
}

/// Runs `sync` unless an fsync has already failed; records its failure.
fn guarded(failed: &AtomicBool, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    if failed.load(Ordering::SeqCst) {
        return Err(refused());
    }
    let result = sync();
    if result.is_err() {
        failed.store(true, Ordering::SeqCst);
    }
    result
}

/// The store's file system, with fsync failures made sticky.
#[derive(Debug)]
pub(crate) struct FsyncGuard {
    inner: Arc<dyn Vfs>,
    failed: Arc<AtomicBool>,
}

impl FsyncGuard {
    pub(crate) fn new(inner: Arc<dyn Vfs>) -> Self {
        Self {
            inner,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether an fsync has failed since the guard was made.
    #[cfg(test)]
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The flag set when an fsync fails, to share with the store.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.failed)
    }
}

#[derive(Debug)]
struct GuardedFile {
    inner: Arc<dyn VfsFile>,
    failed: Arc<AtomicBool>,
}

impl VfsFile for GuardedFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }

    // Forwarded, not left to the trait's default: the real file's reads
    // into a new buffer do not zero it first (pack reads of launches).
    fn read_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        self.inner.read_vec_at(len, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }

    fn write_all_at_parts(&self, head: &[u8], tail: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at_parts(head, tail, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.inner.set_len(len_bytes)
    }

    fn sync_all(&self) -> io::Result<()> {
        guarded(&self.failed, || self.inner.sync_all())
    }

    fn sync_data(&self) -> io::Result<()> {
        guarded(&self.failed, || self.inner.sync_data())
    }
}

impl Vfs for FsyncGuard {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VfsFile>> {
        Ok(Arc::new(GuardedFile {
            inner: self.inner.open(path, mode)?,
            failed: Arc::clone(&self.failed),
        }))
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.inner.file_len(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.inner.is_dir(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        self.inner.list_dir(path)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        guarded(&self.failed, || self.inner.sync_dir(path))
    }

    fn start_sync_data(&self, file: Arc<dyn VfsFile>) -> PendingSync {
        // `file` came from `open` above, so its own `sync_data` is guarded;
        // the inner file system decides when it runs.
        self.inner.start_sync_data(file)
    }
}

/// fsyncs every directory under `dir` and every file but the packs and their
/// saved scans (children before their directory), so that the names and the
/// small files a writable open is about to trust (heads, snapshots, records,
/// names created before a failed fsync) are durable, not merely in the page
/// cache. Packs are left to the open: it fsyncs each pack it scans, and a pack
/// with a saved scan was fsynced by the open that saved it. Cheap when nothing
/// is dirty, and it does not grow with the data stored.
/// A pack or a pack's saved scan (see [`sync_tree`]).
fn is_pack_data(path: &Path) -> bool {
    let in_packs = path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|dir| dir == "packs");
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    in_packs
        && (crate::blobs::parse_pack_file_name(name).is_some()
            || crate::blobs::parse_index_file_name(name).is_some())
}

pub(crate) fn sync_tree(vfs: &dyn Vfs, dir: &Path) -> io::Result<()> {
    for name in vfs.list_dir(dir)? {
        let path = dir.join(name);
        if vfs.is_dir(&path) {
            sync_tree(vfs, &path)?;
        } else if is_pack_data(&path) {
            continue;
        } else {
            match vfs.open(&path, OpenMode::Read) {
                Ok(file) => file.sync_all()?,
                // Removed since the listing (nothing else writes here while a
                // writable store opens, but a stale temporary name is harmless).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    vfs.sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose whole-buffer reads answer, and whose reads into a
    /// caller's buffer fail: which of the two a wrapper calls shows.
    #[derive(Debug)]
    struct VecOnly;

    impl VfsFile for VecOnly {
        fn read_exact_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            Err(io::Error::other("read into a zeroed buffer"))
        }
        fn read_vec_at(&self, len: usize, _: u64) -> io::Result<Vec<u8>> {
            Ok(vec![7; len])
        }
        fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync_all(&self) -> io::Result<()> {
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_guarded_file_reads_into_new_buffers_as_its_file_does() {
        let file = GuardedFile {
            inner: Arc::new(VecOnly),
            failed: Arc::new(AtomicBool::new(false)),
        };
        assert_eq!(file.read_vec_at(3, 0).unwrap(), vec![7; 3]);
    }
    use crate::sim::SimFs;
    use crate::testutil::{sample_disk, source};
    use crate::{BlobKind, Store, StoredCodec};
    use blockrep_core::{Geometry, Root, scan_buffer};

    /// Whether every crash image of `sim` opens with `source`'s head at `epoch`.
    fn head_survives_every_crash(sim: &SimFs, data: &Path, epoch: u64) -> Result<(), String> {
        for seed in 0..16 {
            let (image, _) = sim.crash_image(seed);
            let store = Store::open_with_vfs(data, Arc::new(image))
                .map_err(|e| format!("crash seed {seed}: open: {e}"))?;
            let head = store
                .head(&source())
                .map_err(|e| format!("crash seed {seed}: head: {e}"))?;
            if head.map(|h| h.epoch) != Some(epoch) {
                return Err(format!(
                    "crash seed {seed}: acknowledged epoch {epoch} lost, head {head:?}"
                ));
            }
            let report = store
                .verify(None, None)
                .map_err(|e| format!("crash seed {seed}: verify: {e}"))?;
            if !report.is_clean() {
                return Err(format!(
                    "crash seed {seed}: acknowledged data lost: {:?}",
                    report.damaged
                ));
            }
        }
        Ok(())
    }

    /// Each operation of a source's first commit fails in turn. A retry on
    /// the same store must not be acknowledged (it would have skipped the
    /// fsync that failed: the source's directory already exists); after a
    /// reopen the commit is acknowledged and survives every crash. Packs seal
    /// every two chunks, so the failed fsync may be a sealed pack's: the
    /// reopened store finds its records (in the page cache) and must make
    /// them durable before a commit names them.
    /// Two 4 KiB chunks to a pack.
    const PACK_BYTES: u64 = 8 * 1024;

    #[test]
    fn no_commit_is_acknowledged_after_a_failed_fsync_until_reopen() {
        let data = Path::new("/data");
        let geometry = Geometry::new(8 * 4096, 4096).unwrap();
        let disk = sample_disk(geometry.disk_size_bytes() as usize, 5);
        let ids = scan_buffer(&disk, geometry);
        let (root, pages) = Root::build(geometry, &ids);
        let insert = |store: &Store| {
            for (index, id) in ids.iter().enumerate() {
                let range = geometry.chunk_range(index as u64).unwrap();
                if !id.is_zero() {
                    store
                        .insert(BlobKind::Chunk, *id, StoredCodec::Raw, 4096, &disk[range])
                        .unwrap();
                }
            }
        };
        let mut fsync_failures = 0;
        for failing in 1.. {
            let sim = SimFs::new();
            let store = Store::open_with_vfs(data, Arc::new(sim.clone())).unwrap();
            store.set_pack_size_max_bytes(PACK_BYTES);
            insert(&store);
            sim.fail_operation(sim.operations() + failing);
            if store
                .commit(
                    &source(),
                    1,
                    &root,
                    &pages,
                    1,
                    blockrep_core::clock::now_unix_ms(),
                )
                .is_ok()
            {
                // The failure point lies past the commit: every point is done.
                assert!(sim.injected_failure().is_none());
                break;
            }
            let failed = sim.injected_failure().unwrap();
            if failed.contains(": fsync ") {
                fsync_failures += 1;
                // Retried as a server would, on the same store: refused.
                let retry = store.commit(
                    &source(),
                    1,
                    &root,
                    &pages,
                    1,
                    blockrep_core::clock::now_unix_ms(),
                );
                assert!(
                    retry.is_err(),
                    "commit acknowledged after `{failed}` failed on the same store"
                );
                // Nor is the head confirmed as it reads back (an agent whose
                // disk did not change asks just that), whatever it reads.
                let confirmed =
                    store.confirm_head(&source(), 1, &root.id(), blockrep_core::Consistency::Live);
                assert!(
                    confirmed.is_err(),
                    "head confirmed after `{failed}` failed on the same store"
                );
            } else if store
                .commit(
                    &source(),
                    1,
                    &root,
                    &pages,
                    1,
                    blockrep_core::clock::now_unix_ms(),
                )
                .is_ok()
            {
                // An operation that fails without effect (a create, a
                // rename) and is retried successfully proves durability
                // the normal way.
                head_survives_every_crash(&sim, data, 1)
                    .unwrap_or_else(|e| panic!("after `{failed}` and a retry: {e}"));
                continue;
            }
            drop(store);
            let store = Store::open_with_vfs(data, Arc::new(sim.clone())).unwrap();
            store.set_pack_size_max_bytes(PACK_BYTES);
            // The head may have been published before the failed fsync: the
            // agent then finds its commit there, made durable by the reopen.
            let published = store.head(&source()).unwrap();
            if published.map(|h| (h.epoch, h.root)) != Some((1, root.id())) {
                insert(&store);
                store
                    .commit(
                        &source(),
                        1,
                        &root,
                        &pages,
                        1,
                        blockrep_core::clock::now_unix_ms(),
                    )
                    .unwrap();
            }
            head_survives_every_crash(&sim, data, 1)
                .unwrap_or_else(|e| panic!("after `{failed}` and a reopen: {e}"));
        }
        assert!(fsync_failures >= 3, "only {fsync_failures} fsyncs failed");
    }

    #[test]
    fn one_failed_fsync_fails_every_later_one() {
        let sim = SimFs::new();
        let guard = FsyncGuard::new(Arc::new(sim.clone()));
        let root = Path::new("/");
        let file = guard.open(Path::new("/a"), OpenMode::CreateNew).unwrap();
        file.write_all_at(b"x", 0).unwrap();
        file.sync_all().unwrap();
        guard.sync_dir(root).unwrap();
        assert!(!guard.failed());

        sim.fail_operation(sim.operations() + 1);
        assert!(guard.sync_dir(root).is_err());
        assert!(guard.failed());
        // The simulated disk would succeed now; the guard does not ask it.
        let before = sim.operations();
        let refused = file.sync_data().unwrap_err();
        assert!(
            refused.to_string().contains("reopen the store"),
            "{refused}"
        );
        assert!(guard.sync_dir(root).is_err());
        assert!(guard.start_sync_data(Arc::clone(&file)).wait().is_err());
        assert_eq!(sim.operations(), before, "a refused fsync reached the disk");
        // Reads and writes go on: only durability is refused.
        file.write_all_at(b"y", 1).unwrap();
        let mut back = [0u8; 2];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"xy");
    }

    #[test]
    fn sync_tree_makes_names_and_small_files_durable_but_leaves_packs() {
        let sim = SimFs::new();
        for dir in ["/d", "/d/e", "/d/packs"] {
            sim.create_dir(Path::new(dir)).unwrap();
        }
        for name in ["/d/e/f", "/d/packs/00000001.pack"] {
            let file = sim.open(Path::new(name), OpenMode::CreateNew).unwrap();
            file.write_all_at(b"data", 0).unwrap();
        }
        sim.sync_dir(Path::new("/")).unwrap();
        sync_tree(&sim, Path::new("/d")).unwrap();
        let mut pack_kept = 0;
        for seed in 0..32 {
            let (image, _) = sim.crash_image(seed);
            let read = |name: &str| {
                let mut back = [0u8; 4];
                let file = image.open(Path::new(name), OpenMode::Read).unwrap();
                file.read_exact_at(&mut back, 0).map(|()| back)
            };
            assert_eq!(read("/d/e/f").unwrap(), *b"data", "crash seed {seed}");
            // The pack's name is durable (its directory was fsynced), its
            // data not: the open fsyncs the packs it scans itself.
            pack_kept += usize::from(read("/d/packs/00000001.pack").is_ok_and(|b| b == *b"data"));
        }
        assert!(pack_kept < 32, "the pack's data was made durable too");
    }
}

//! Garbage collection: chunks, index pages and roots that nothing references are
//! reclaimed, and sealed packs whose live share has fallen low are compacted.
//!
//! A collection runs while the server keeps replicating: sessions insert chunks,
//! answer `Offer`s with [`Store::contains`] and commit; launch volumes write and
//! flush. It never stops them for longer than a few short critical sections.
//!
//! # What is live
//!
//! Every root named by a source's head, a snapshot or a launch (its base and its
//! own flushed root: [`Store::referenced_roots`]), with every index page and chunk
//! reachable from them; plus what open launch volumes hold in memory (their
//! current chunk ids, unflushed writes included); plus every id *touched* while
//! the collection runs (below). Dead blobs in packs that are not compacted simply
//! stay: harmless, and they may be referenced again later.
//!
//! # The hazard, and the protocol against it
//!
//! A session may store chunks before a collection starts and commit a root
//! naming them after it marked; or learn through `contains` (the protocol's
//! `Offer`/`Have`) that the store holds a blob the collection considers dead, and
//! reference it. Three mechanisms close these windows:
//!
//! 1. **The GC fence**, a store-wide `RwLock<()>`. [`Store::commit_with`] and
//!    [`LaunchVolume::flush`](crate::LaunchVolume::flush) hold it for reading
//!    from "record the ids the new root names and check that every one is
//!    stored" to "the head is published"; snapshot creation holds it from
//!    reading the source's head to publishing the snapshot that names its root. The collector holds it for writing
//!    only while it lists the referenced roots, and while it relocates the
//!    records touched since its copy and drops the dead index entries.
//! 2. **The touched set**, which exists only while a collection runs (an atomic
//!    flag makes it free otherwise). `insert` records the id it stores or finds
//!    present, a `contains` hit records its id, and a commit or flush records,
//!    under the fence, the root id, every page id of the root and every chunk id
//!    of the pages it was given. Hits and inserts are recorded under the index
//!    lock, the same lock under which the collector decides to drop an entry.
//! 3. **Commits check existence**: every page the root names and every chunk of
//!    every page given is checked to be in the index, under the fence. Pages
//!    neither given nor in the previous head are read and their chunks checked
//!    too, so a commit can never name something a finished collection removed.
//!
//! # Steps
//!
//! 1. *Mark.* Start the touched set; under the write fence, list the referenced
//!    roots; release. Add the chunk ids held by open launch volumes (each under
//!    its own lock, never while holding the fence, since a flush takes the fence
//!    while holding its volume's lock). Walk the roots, reading each page once.
//! 2. *Plan.* From the index: live and dead bytes per pack. Candidates are the
//!    sealed packs (below the newest pack number, so never the active pack)
//!    whose live share is below [`GcOptions::live_share_min`], or that hold
//!    nothing live.
//! 3. *Copy.* Without the fence, every live (marked or touched) record of a
//!    candidate is copied, header and crc unchanged, into the active pack, and
//!    the index entry repointed ("relocate"); then `sync`.
//! 4. *Fenced sweep.* Under the write fence, under the index lock: records of the
//!    candidates that became touched meanwhile are relocated too (repeat until
//!    none is left); then, in the same index-lock step that found nothing more to
//!    keep, the remaining (dead) entries of the candidates are removed. Release.
//! 5. *Delete.* `sync` (the relocated copies are durable), delete the old pack
//!    files, fsync the packs directory, drop their cached file handles.
//!
//! # Invariants
//!
//! - A blob is removed from the index only under the write fence and the index
//!   lock, after a check that it is neither marked nor touched. So a commit
//!   either published before the roots were listed (its root was marked), or
//!   recorded its ids while the touched set existed (they are kept), or runs its
//!   existence check after the removal (and fails with `Missing`: nothing
//!   dangling is ever published, the agent resends on its next epoch).
//!   The last case needs a session that learned of a dead blob before the
//!   collection started and commits after it swept: the server reports the
//!   failed commit, and the agent's next session offers the id again, is told
//!   the store lacks it, and sends the data.
//! - A `contains` hit or an `insert` during the collection keeps its blob, so
//!   the dedup answers given while it runs stay true.
//! - A chunk that an open launch volume holds unflushed is either in the
//!   volume's state when the collector reads it, or was written after the
//!   touched set started (and `insert` or `contains` recorded it); its flush
//!   records and checks what it names like a commit.
//! - An old pack is deleted only after every entry pointing into it has been
//!   repointed to a copy that `sync` made durable, or removed as dead.
//! - A crash at any step loses nothing referenced: before the deletion both
//!   copies exist and both pass their crc; on open the newer copy wins (see
//!   `Store::load_index`) and the next collection deletes the old pack. A
//!   torn copy at the tail of the active pack is cut off on open like any torn
//!   tail, and the old record is still there.
//! - Readers that looked a blob up just before it moved keep working: an
//!   already-open pack stays readable after unlinking, and a read that finds its
//!   pack gone looks the blob up again.
//! - A record of a candidate that cannot be read or fails its crc is never
//!   dropped: its pack is kept whole (and counted in the report).
//! - A referenced root or page that cannot be read stops the collection before
//!   anything is removed: what is live is then unknown.
//!
//! # Costs
//!
//! The live set holds every distinct live id (about 32 bytes each plus hash
//! table overhead), the touched set every id touched during the run; the mark
//! reads every root and index page once, but no chunk. Copying is not rate
//! limited: it competes with replication for disk bandwidth.
//!
//! # Beside other servers of a bucket
//!
//! Their sessions and launches are fenced in their own memory, so a
//! collection there runs as a round they take part in (`bucket/round.rs`):
//! they join before the mark, send what they touched and hold their fences
//! from the sweep to the end, and read the pack listing again before they
//! let them go. The mark also lists the roots of every record in the bucket.
//!
//! # Where the code is
//!
//! This module marks: it lists the referenced roots under the fence and walks
//! them. The rest is the blob layer's: the fence and the touched set
//! (`blobs/fence.rs`), and the plan, copy, fenced sweep and delete
//! (`Blobs::collect`, `blobs/compact.rs`); the round is `bucket/round.rs`
//! and `bucket/take_part.rs`.

use std::collections::{BTreeSet, HashSet};

use blockrep_core::{ChunkId, SourceId};

use crate::blobs::{GcOptions, GcReport, GcStage};
use crate::catalog::list_names;
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::store::{Store, StoredRoot};

impl Store {
    /// Collects garbage: marks every blob reachable from a head, snapshot or
    /// launch (and what open launch volumes and running sessions hold), then
    /// compacts the sealed packs whose live share is below
    /// `options.live_share_min`. Safe to run while sessions commit and launch
    /// volumes write; see the module docs of `gc.rs` for the protocol. With
    /// `options.dry_run` nothing changes and the report says what would be freed.
    ///
    /// Fails with `Invalid` for a live share outside 0..=1 or a real run on a
    /// read-only store, and with the read error when a referenced root or page
    /// cannot be read (nothing is removed then: what is live is unknown).
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport, Error> {
        if options.dry_run {
            return self.gc_with_hook(options, &mut |_| true);
        }
        self.check_gc_allowed()?;
        // In a bucket, alone: claims of packs whose writer died first. Beside
        // other servers a claim may be the pack one of them is writing.
        if !self.collects_beside_others() {
            self.blobs.remove_unpublished()?;
        }
        let report = self.gc_with_hook(options, &mut |_| true);
        self.close_round(report.is_ok());
        report
    }

    /// The report of the last collection or dry run in this process, if any:
    /// cheap, for metrics (live and garbage bytes).
    pub fn last_gc_report(&self) -> Option<GcReport> {
        lock(&self.blobs.fence().last_report).clone()
    }

    /// [`Store::gc`] that calls `hook` at each [`GcStage`] and stops there, as a
    /// crash would, when it returns false.
    pub(crate) fn gc_with_hook(
        &self,
        options: &GcOptions,
        hook: &mut dyn FnMut(GcStage) -> bool,
    ) -> Result<GcReport, Error> {
        if !(0.0..=1.0).contains(&options.live_share_min) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "live share minimum {} is not between 0 and 1",
                    options.live_share_min
                ),
            ));
        }
        if !options.dry_run {
            self.check_writable()?;
        }
        let peers = crate::bucket::RoundPeers(self);
        self.blobs.collect(options, || self.mark(), &peers, hook)
    }

    /// The live set: ids reachable from the referenced roots and the open launch
    /// volumes. Returns it with the number of roots walked.
    fn mark(&self) -> Result<(HashSet<ChunkId>, u64), Error> {
        // Beside other servers of a bucket: they join first, so that their
        // commits from here on are touched (`bucket/round.rs`).
        self.open_round()?;
        let mut roots = {
            let _fence = self.blobs.fence().write_fence();
            self.referenced_roots()?
        };
        // In a bucket: every server's records, which this data directory may
        // not hold yet (a server that stopped published heads this one never
        // read). Not under the fence: this store's own commits are in its
        // records or touched, the others' were published before they joined
        // or are touched.
        roots.extend(self.bucket_roots()?);
        // A record is published only once the packs it names are: read after
        // the records, the listing holds every pack they name.
        self.blobs.refresh()?;
        let mut live = HashSet::new();
        // Not under the fence: a flush holds its volume's lock while it waits
        // for the fence. Whatever a volume writes after this read was inserted
        // or found while the touched set existed.
        for volume in self.open_launch_volumes() {
            let (root, ids) = volume.ids_in_memory();
            roots.push(root);
            live.extend(ids.into_iter().filter(|id| !id.is_zero()));
        }
        roots.sort_unstable();
        roots.dedup();
        let unreadable = |root_id: &ChunkId, e: Error| {
            Error::new(
                e.kind(),
                format!(
                    "gc: referenced root {root_id} cannot be read, nothing collected (run verify): {e}"
                ),
            )
        };
        // A machine root names the disk roots of its volumes: each is marked
        // as a referenced root of its own.
        let mut disk_roots = Vec::with_capacity(roots.len());
        for root_id in &roots {
            match self
                .read_stored_root(root_id)
                .map_err(|e| unreadable(root_id, e))?
            {
                StoredRoot::Disk(root) => disk_roots.push((*root_id, root)),
                StoredRoot::Machine(machine) => {
                    live.insert(*root_id);
                    for (_, volume_root) in machine.volumes() {
                        if roots.binary_search(volume_root).is_err() && live.insert(*volume_root) {
                            let root = self
                                .read_root(volume_root)
                                .map_err(|e| unreadable(volume_root, e))?;
                            disk_roots.push((*volume_root, root));
                        }
                    }
                }
            }
        }
        let mut roots_marked = 0;
        for (root_id, root) in &disk_roots {
            live.insert(*root_id);
            roots_marked += 1;
            for (page_index, page_id) in root.page_ids().iter().enumerate() {
                if page_id.is_zero() || !live.insert(*page_id) {
                    continue;
                }
                let page = self.read_page(root, page_index).map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!("gc: page {page_id} of root {root_id} cannot be read, nothing collected (run verify): {e}"),
                    )
                })?;
                live.extend(page.ids().iter().filter(|id| !id.is_zero()));
            }
        }
        Ok((live, roots_marked))
    }

    /// Every root that something durable refers to: each source's head, each
    /// snapshot, and each launch's base and its own flushed root. Sorted, without
    /// duplicates. A record that cannot be read is an error, never skipped, so a
    /// garbage collector marking from this list cannot miss a root.
    pub fn referenced_roots(&self) -> Result<Vec<ChunkId>, Error> {
        let mut roots = BTreeSet::new();
        for name in list_names(self.vfs(), &self.data_dir().join("sources"))? {
            let source = SourceId::new(&name)
                .map_err(|e| Error::new(ErrorKind::Invalid, format!("source {name}: {e}")))?;
            if let Some(head) = self.head(&source)? {
                roots.insert(head.root);
            }
        }
        for snapshot in self.list_snapshots(None)? {
            roots.insert(snapshot.root);
        }
        for launch in self.list_launches(None)? {
            roots.insert(launch.base_root);
            roots.insert(launch.root);
        }
        Ok(roots.into_iter().collect())
    }
}

#[cfg(test)]
mod tests;

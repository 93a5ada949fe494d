//! Compaction of packs for a collection: which sealed packs hold too little
//! that is live, copying their live records to the active pack, dropping the
//! dead entries under the fence, deleting the evacuated packs. What is live
//! comes from the store's mark (`gc.rs`, which also documents the protocol).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use blockrep_core::ChunkId;

use crate::error::{Error, ErrorKind};
use crate::mutex::lock;

use super::{Blobs, Location, pack_file_name};

/// Default for [`GcOptions::live_share_min`].
pub const GC_LIVE_SHARE_MIN_DEFAULT: f64 = 0.5;

/// How a collection runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcOptions {
    /// A sealed pack whose live bytes are less than this share of its size
    /// (0.0..=1.0) is compacted. Packs with nothing live are always removed.
    pub live_share_min: f64,
    /// Compute the report (what would be freed) and change nothing. Works on a
    /// store opened read-only. Chunks stored by sessions that have not
    /// committed yet count as dead here, so with replication running the
    /// figures are an estimate.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            live_share_min: GC_LIVE_SHARE_MIN_DEFAULT,
            dry_run: false,
        }
    }
}

/// What a collection found and did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Distinct roots walked by the mark.
    pub roots_marked: u64,
    /// Pack files when the collection started.
    pub packs_total: u64,
    /// Blobs in the index that are live.
    pub blobs_live: u64,
    /// Blobs in the index that are dead.
    pub blobs_dead: u64,
    /// Bytes of the live blobs' records.
    pub bytes_live: u64,
    /// Every other byte of the pack files: dead records, duplicates, torn tails.
    pub bytes_dead: u64,
    /// Packs deleted (would be deleted) after their live records were copied.
    pub packs_compacted: u64,
    /// Live records copied (to be copied) out of compacted packs.
    pub blobs_copied: u64,
    /// Bytes of those records.
    pub bytes_copied: u64,
    /// Dead blobs dropped from the index with their packs.
    pub blobs_removed: u64,
    /// Net bytes freed: sizes of the deleted packs minus the bytes copied.
    pub bytes_freed: u64,
    /// Candidate packs kept whole because a live record in them could not be
    /// read or failed its checksum (run [`Store::verify`](crate::Store::verify)).
    pub packs_kept_damaged: u64,
}

/// Points in a collection, for tests that stop it there as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GcStage {
    /// Mark done; nothing copied yet.
    Marked,
    /// Live records copied and synced; nothing removed yet.
    Copied,
    /// Dead entries removed from the index; no pack deleted yet.
    Swept,
    /// One more old pack file deleted.
    PackDeleted,
}

/// A pack as the plan sees it; the chosen ones are compacted.
#[derive(Debug)]
struct Candidate {
    number: u32,
    file_bytes: u64,
    live_bytes: u64,
    live_blobs: u64,
    /// Every index entry in the pack when the plan was made.
    entries: Vec<(ChunkId, Location)>,
    /// A live record could not be copied: the pack stays.
    damaged: bool,
}

/// What a collection needs of the other servers sharing a bucket
/// (`bucket/round.rs`); nothing on one server.
pub(crate) trait Peers {
    /// The ids they touched. From this call until the collection ends they
    /// hold their fences.
    fn touched(&self) -> Result<Vec<ChunkId>, Error>;
    /// Fails once they may let their fences go (the collection lease is
    /// about to lapse): nothing more may be removed then.
    fn still_fenced(&self) -> Result<(), Error>;
}

/// What [`Blobs::sweep_entries`] found.
#[derive(Debug)]
enum Sweep {
    /// Entries still in place that are to be kept: nothing was removed.
    Keep(Vec<(ChunkId, Location)>),
    /// Nothing to keep; this many entries were removed from the index.
    Removed(u64),
}

/// What [`Blobs::relocate`] did.
#[derive(Debug)]
enum Relocation {
    /// The record was copied to the active pack and the index points at the copy.
    Moved,
    /// The index no longer points at the old record: nothing to do.
    Gone,
    /// The old record cannot be read or fails its checksum; it stays where it is.
    Unreadable(Error),
}

impl Blobs {
    /// The compaction a collection drives, with the live set from `mark`:
    /// the touched set runs from before the mark until the sweep, live
    /// records of the chosen packs are copied to the active pack, the dead
    /// entries dropped under the fence, and the evacuated packs deleted
    /// (see `gc.rs` for the protocol), with `peers` (the servers sharing a
    /// bucket) fenced from the sweep on. `hook` is called at each [`GcStage`]
    /// and the collection stops there, as a crash would, when it returns false.
    pub(crate) fn collect(
        &self,
        options: &GcOptions,
        mark: impl FnOnce() -> Result<(HashSet<ChunkId>, u64), Error>,
        peers: &dyn Peers,
        hook: &mut dyn FnMut(GcStage) -> bool,
    ) -> Result<GcReport, Error> {
        let _run = lock(&self.fence.run);
        if self.is_read_only() {
            // Pick up what a running server committed since the open.
            self.load_index()?;
        }
        let rebuilds = self.index_rebuilds.load(Ordering::SeqCst);
        let tracking = (!options.dry_run).then(|| self.fence.start_tracking());
        let (marked, roots_marked) = mark()?;
        let (mut report, mut candidates) = self.plan(&marked, options)?;
        report.roots_marked = roots_marked;
        if options.dry_run {
            *lock(&self.fence.last_report) = Some(report.clone());
            return Ok(report);
        }
        if !hook(GcStage::Marked) {
            return Ok(report);
        }
        report.blobs_copied = 0;
        report.bytes_copied = 0;
        for candidate in &mut candidates {
            let live: Vec<(ChunkId, Location)> = candidate
                .entries
                .iter()
                .filter(|(id, _)| marked.contains(id) || self.fence.is_touched(id))
                .copied()
                .collect();
            self.relocate_all(candidate, &live, &mut report)?;
        }
        self.sync()?;
        if !hook(GcStage::Copied) {
            return Ok(report);
        }
        // What other servers sharing a bucket touched (they hold their
        // fences from now until the collection ends): kept like this
        // store's own touches.
        self.fence.note_all(&peers.touched()?);
        peers.still_fenced()?;
        let swept = self.sweep(&mut candidates, &marked, &mut report);
        drop(tracking);
        let finished = match swept {
            Ok(removed) => {
                report.blobs_removed = removed;
                if !hook(GcStage::Swept) {
                    return Ok(report);
                }
                // The copies made under the fence must be durable before
                // their old records go.
                self.sync().and_then(|()| {
                    self.delete_packs(&candidates, &mut report, peers, hook, rebuilds)
                })
            }
            Err(e) => Err(e),
        };
        if let Err(e) = finished {
            // Other servers sharing a bucket still index what the sweep
            // dropped here, and may name it: what stays of the candidates
            // comes back into this index, until a collection decides again.
            self.restore_candidates(&candidates);
            return Err(e);
        }
        self.checkpoint_index()?;
        *lock(&self.fence.last_report) = Some(report.clone());
        Ok(report)
    }

    /// Copies the record of `id` that is at `from` to the active pack, as it is
    /// (same header, same crc), then points the index at the copy. The copy is
    /// durable after the next [`Blobs::sync`]; until the old pack is deleted,
    /// both copies are valid.
    fn relocate(&self, id: &ChunkId, from: Location) -> Result<Relocation, Error> {
        let (header_bytes, stored) = match self.read_record(from) {
            Ok(record) => record,
            Err(e) => return Ok(Relocation::Unreadable(e)),
        };
        let mut inner = lock(&self.inner);
        if !inner.index.get(id).is_some_and(|at| at.is_at(&from)) {
            return Ok(Relocation::Gone);
        }
        let location = self.append_locked(&mut inner, &header_bytes, from.header, &stored)?;
        inner.index.relocate(*id, location, from);
        Ok(Relocation::Moved)
    }

    /// After a collection failed past its sweep: puts back the entries of
    /// every candidate pack still there. Best effort; a failure is logged.
    fn restore_candidates(&self, candidates: &[Candidate]) {
        let present: HashSet<u32> = match self.pack_numbers() {
            Ok(numbers) => numbers.into_iter().collect(),
            Err(e) => {
                eprintln!("blockrep-store: cannot list the packs to restore their entries: {e}");
                return;
            }
        };
        for candidate in candidates.iter().filter(|c| present.contains(&c.number)) {
            lock(&self.deleting).remove(&candidate.number);
            if let Err(e) = self.restore_entries(candidate.number) {
                eprintln!(
                    "blockrep-store: cannot restore the entries of pack {}: {e}",
                    pack_file_name(candidate.number)
                );
            }
        }
    }

    /// Puts back the entries of pack `number` that the index lacks (a sweep
    /// dropped them, and the pack stays).
    fn restore_entries(&self, number: u32) -> Result<(), Error> {
        let scan = match self.packs.load_scan(number) {
            Some(scan) => scan,
            None => self.packs.scan(number)?,
        };
        let mut inner = lock(&self.inner);
        for record in &scan.records {
            if inner.index.get(&record.header.id).is_none() {
                let location = Location {
                    pack: number,
                    offset: record.offset,
                    header: record.header,
                    crc_ok: record.crc_ok,
                };
                inner.index.insert_known(record.header.id, location, false);
            }
        }
        inner.index.note_pack(number, scan.valid_len);
        Ok(())
    }

    /// Every index entry, for the collector's accounting.
    fn index_entries(&self) -> Result<Vec<(ChunkId, Location)>, Error> {
        lock(&self.inner).index.entries()
    }

    /// Number of the newest pack: the active one, or the one that will be reused
    /// as active. Packs below it are sealed and never appended to again.
    pub(crate) fn newest_pack_number(&self) -> u32 {
        let inner = lock(&self.inner);
        inner.active.as_ref().map_or(inner.last_pack, |a| a.number)
    }

    /// Under the index lock: the entries of `candidates` that still point where
    /// they did, split by `keep`. When none is to be kept, the others are removed
    /// from the index in the same step, and their count returned.
    fn sweep_entries(
        &self,
        candidates: &[(ChunkId, Location)],
        keep: impl Fn(&ChunkId) -> bool,
    ) -> Sweep {
        let mut inner = lock(&self.inner);
        let present: Vec<(ChunkId, Location)> = candidates
            .iter()
            .filter(|(id, at)| inner.index.get(id).is_some_and(|now| now.is_at(at)))
            .copied()
            .collect();
        let kept: Vec<(ChunkId, Location)> =
            present.iter().filter(|(id, _)| keep(id)).copied().collect();
        if !kept.is_empty() {
            return Sweep::Keep(kept);
        }
        for (id, _) in &present {
            inner.index.remove(id);
        }
        Sweep::Removed(present.len() as u64)
    }

    /// Live and dead bytes per pack, and the packs to compact.
    fn plan(
        &self,
        marked: &HashSet<ChunkId>,
        options: &GcOptions,
    ) -> Result<(GcReport, Vec<Candidate>), Error> {
        let newest = self.newest_pack_number();
        let touched = self.fence.touched_snapshot();
        let mut report = GcReport {
            dry_run: options.dry_run,
            ..GcReport::default()
        };
        // The packs and the index read as one: a refresh running meanwhile
        // lists a pack another server published before it indexes it, and a
        // pack read in between, without its entries, would look dead.
        let refreshing = lock(&self.refreshing);
        let mut packs: HashMap<u32, Candidate> = HashMap::new();
        for number in self.pack_numbers()? {
            let file_bytes = self.packs.len(number)?;
            let pack = Candidate {
                number,
                file_bytes,
                live_bytes: 0,
                live_blobs: 0,
                entries: Vec::new(),
                damaged: false,
            };
            packs.insert(number, pack);
        }
        let bytes_total: u64 = packs.values().map(|pack| pack.file_bytes).sum();
        let entries = self.index_entries()?;
        drop(refreshing);
        for (id, location) in entries {
            let live = marked.contains(&id) || touched.contains(&id);
            if live {
                report.blobs_live += 1;
                report.bytes_live += location.record_len_bytes();
            } else {
                report.blobs_dead += 1;
            }
            // A pack created after the listing (the active one sealed) is not
            // listed and never a candidate.
            if let Some(pack) = packs.get_mut(&location.pack) {
                if live {
                    pack.live_bytes += location.record_len_bytes();
                    pack.live_blobs += 1;
                }
                pack.entries.push((id, location));
            }
        }
        report.packs_total = packs.len() as u64;
        report.bytes_dead = bytes_total.saturating_sub(report.bytes_live);
        let mut candidates = Vec::new();
        for mut pack in packs.into_values() {
            // In pack order: the copy reads each pack front to back, and a
            // collection does the same writes whatever the index's hash order.
            pack.entries
                .sort_unstable_by_key(|(_, location)| location.offset);
            if pack.number >= newest {
                continue;
            }
            let share = if pack.file_bytes == 0 {
                0.0
            } else {
                pack.live_bytes as f64 / pack.file_bytes as f64
            };
            if pack.live_bytes > 0 && share >= options.live_share_min {
                continue;
            }
            report.packs_compacted += 1;
            report.blobs_copied += pack.live_blobs;
            report.bytes_copied += pack.live_bytes;
            report.blobs_removed += pack.entries.len() as u64 - pack.live_blobs;
            report.bytes_freed += pack.file_bytes.saturating_sub(pack.live_bytes);
            candidates.push(pack);
        }
        candidates.sort_by_key(|c| c.number);
        Ok((report, candidates))
    }

    /// Relocates `records` of `candidate`, marking it damaged if one cannot be
    /// read (the pack then stays whole).
    fn relocate_all(
        &self,
        candidate: &mut Candidate,
        records: &[(ChunkId, Location)],
        report: &mut GcReport,
    ) -> Result<(), Error> {
        for (id, location) in records {
            match self.relocate(id, *location)? {
                Relocation::Moved => {
                    report.blobs_copied += 1;
                    report.bytes_copied += location.record_len_bytes();
                }
                Relocation::Gone => {}
                Relocation::Unreadable(e) => {
                    eprintln!(
                        "blockrep-store: gc keeps pack {} whole: {e}",
                        pack_file_name(candidate.number)
                    );
                    candidate.damaged = true;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The fenced sweep: relocates records that became touched since the copy,
    /// then drops the dead entries of the candidates. Returns how many entries
    /// were dropped.
    fn sweep(
        &self,
        candidates: &mut [Candidate],
        marked: &HashSet<ChunkId>,
        report: &mut GcReport,
    ) -> Result<u64, Error> {
        let _fence = self.fence.write_fence();
        let mut removed = 0;
        for candidate in candidates.iter_mut() {
            loop {
                if candidate.damaged {
                    break;
                }
                // `contains` and `insert` record touches under the index lock,
                // which `sweep_entries` holds while it checks and removes.
                let keep = |id: &ChunkId| marked.contains(id) || self.fence.is_touched(id);
                match self.sweep_entries(&candidate.entries, keep) {
                    Sweep::Removed(count) => {
                        removed += count;
                        break;
                    }
                    Sweep::Keep(records) => self.relocate_all(candidate, &records, report)?,
                }
            }
        }
        Ok(removed)
    }

    /// Deletes the evacuated candidate packs and fsyncs the packs directory.
    fn delete_packs(
        &self,
        candidates: &[Candidate],
        report: &mut GcReport,
        peers: &dyn Peers,
        hook: &mut dyn FnMut(GcStage) -> bool,
        rebuilds: u64,
    ) -> Result<(), Error> {
        report.packs_compacted = 0;
        report.bytes_freed = 0;
        report.packs_kept_damaged = 0;
        report.packs_kept_damaged = candidates.iter().filter(|c| c.damaged).count() as u64;
        let mut deleted_bytes = 0u64;
        let evacuated: Vec<&Candidate> = candidates.iter().filter(|c| !c.damaged).collect();
        for candidate in evacuated {
            // The other servers may name what the sweep dropped once they
            // let their fences go: nothing more is deleted then.
            peers.still_fenced()?;
            {
                let mut inner = lock(&self.inner);
                // An index rebuilt (or found damaged) since the collection
                // began may have answered "gone" for a live blob, or taken
                // back the dead entries the sweep removed: keep the packs.
                // Checked under the lock a rebuild takes, so a rebuild after
                // this point leaves the pack out (`deleting`).
                if self.index_rebuilds.load(Ordering::SeqCst) != rebuilds
                    || inner.index.is_damaged()
                {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        "the blob index failed a read during the collection; the packs \
                         left were not deleted (the next collection starts again)",
                    ));
                }
                // Its entries were moved or removed; the index's runs stop
                // covering it.
                inner.index.forget_pack(candidate.number);
                lock(&self.deleting).insert(candidate.number);
            }
            let outcome = self.packs.remove(candidate.number);
            if outcome.is_ok() {
                deleted_bytes += candidate.file_bytes;
                report.packs_compacted += 1;
            }
            if outcome.is_err() || !hook(GcStage::PackDeleted) {
                return outcome;
            }
        }
        if report.packs_compacted > 0 {
            self.packs.sync_listing()?;
        }
        report.bytes_freed = deleted_bytes.saturating_sub(report.bytes_copied);
        Ok(())
    }
}

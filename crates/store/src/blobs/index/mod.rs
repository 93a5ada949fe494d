//! The blob index (id -> where the record is), in memory only up to a
//! budget: the newest entries in a hash table, the rest in sorted runs on
//! disk (`run.rs`) under a manifest (`manifest.rs`).
//!
//! Why not an embedded store: the index is a cache of what the packs say,
//! rebuilt from them whenever in doubt, with one writer that already holds a
//! lock around every change, fixed-size keys that are hashes, and one kind of
//! query. A log-structured store (fjall) or a B-tree (redb) would bring a
//! write-ahead log and transactions the index has no use for, plus their own
//! caches to bound. What the index needs is a handful of sorted files with a
//! filter in front, so that a miss, the common case of an insert, costs no
//! read, and the rules that keep it true after a crash (`flush`).
//!
//! Entries in the table move to a new run when the table holds more than
//! its budget, at the end of a [`super::Blobs::sync`] (only records that
//! sync made durable move; see `manifest.rs`). Runs merge pairwise when the
//! newer is at least half the size of the older, so there are at most about
//! log2(ids / budget) of them and each entry is rewritten as often.
//! Everything happens under the blob layer's lock, as every change to the
//! index does: a flush of the default budget writes 16 MiB; a merge of large
//! runs blocks inserts while it runs.

mod manifest;
mod run;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blockrep_core::ChunkId;

use crate::blobs::Location;
use crate::error::Error;
use manifest::Manifest;
use run::{Run, Value};

/// Bytes the table keeps per entry (key, location, the hash table's slack).
pub(crate) const MEM_BYTES_PER_ENTRY: usize = 128;
/// The table's default budget: 32 MiB, some 262 000 entries (16 GiB of 64 KiB
/// chunks).
pub const INDEX_MEMORY_DEFAULT_BYTES: usize = 32 << 20;

/// Where and how the index keeps what does not fit its budget.
#[derive(Debug, Clone)]
pub(crate) struct IndexOptions {
    /// The index directory; `None` keeps everything in memory (a simulated
    /// disk, a bucket's working copy).
    pub(crate) dir: Option<PathBuf>,
    /// Entries the table holds before a sync moves them to a run.
    pub(crate) mem_max_entries: usize,
}

impl IndexOptions {
    /// Runs in `dir`, the table holding about `memory_bytes` of entries.
    pub(crate) fn on_disk(dir: PathBuf, memory_bytes: usize) -> Self {
        Self {
            dir: Some(dir),
            mem_max_entries: (memory_bytes / MEM_BYTES_PER_ENTRY).max(1),
        }
    }
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            dir: None,
            mem_max_entries: INDEX_MEMORY_DEFAULT_BYTES / MEM_BYTES_PER_ENTRY,
        }
    }
}

/// The index of one store's blobs.
#[derive(Debug, Default)]
pub(crate) struct BlobIndex {
    options: IndexOptions,
    read_only: bool,
    /// The newest entries; `None` is a removal that hides older runs.
    mem: HashMap<ChunkId, Value>,
    /// Newest first.
    runs: Vec<Run>,
    /// Ids with a location, all layers together.
    live: usize,
    /// Ids with a location in the runs alone.
    runs_live: u64,
    next_generation: u64,
    /// Pack -> length indexed so far.
    pack_lens: BTreeMap<u32, u64>,
    /// What the manifest on disk covers.
    covered: BTreeMap<u32, u64>,
    /// A run failed a read: the manifest is gone, and no run is written
    /// again until the next open rebuilds the index.
    damaged: AtomicBool,
    /// Writing a run failed: the index stays in memory until the next open.
    write_stopped: bool,
    /// For ids a collection copied whose copy is not durable yet: the place
    /// it copied them from, which a flush writes while the copy is not
    /// durable.
    fallback: HashMap<ChunkId, Location>,
    /// Packs deleted since the last manifest: the next one stops covering
    /// them.
    forgotten: BTreeSet<u32>,
}

impl BlobIndex {
    /// An empty index kept by `options`, before [`BlobIndex::open`] reads
    /// what is there.
    pub(crate) fn unopened(options: IndexOptions) -> Self {
        Self {
            options,
            ..Self::default()
        }
    }

    /// Where and how the index keeps its entries.
    pub(crate) fn options(&self) -> &IndexOptions {
        &self.options
    }

    /// Keeps the index in memory from now on (for its rebuild too): a run
    /// failed a read.
    pub(crate) fn keep_in_memory(&mut self) {
        self.options.dir = None;
    }

    /// The index as `options.dir` keeps it. Any doubt about what is there
    /// (a damaged manifest or run) gives an empty index, which the caller
    /// fills from the packs, and a writable open removes what was there.
    pub(crate) fn open(options: IndexOptions, read_only: bool) -> Self {
        let mut index = Self {
            options,
            read_only,
            ..Self::default()
        };
        let Some(dir) = index.options.dir.clone() else {
            return index;
        };
        // Generations are never reused, even after a manifest was lost (its
        // runs are removed below): a reader holding an old manifest must not
        // open a new run by its name.
        let highest = highest_generation(&dir);
        // A reader may find a run the writer's merge just removed: it reads
        // the newer manifest once more.
        let loaded = match load(&dir) {
            Err(e) if read_only && e.is_not_found() => load(&dir),
            other => other,
        };
        match loaded {
            Ok(Some((manifest, runs))) => {
                index.next_generation = manifest.next_generation;
                index.runs_live = manifest.live;
                index.live = usize::try_from(manifest.live).unwrap_or(usize::MAX);
                index.covered = manifest.coverage;
                index.runs = runs;
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("blockrep-store: {e}; the blob index is rebuilt from the packs");
                if !read_only {
                    index.discard_files();
                }
            }
        }
        if let Some(highest) = highest {
            index.next_generation = index.next_generation.max(highest + 1);
        }
        if !read_only {
            index.remove_strays();
        }
        index
    }

    /// What the runs cover: pack -> length (see `manifest.rs`).
    pub(crate) fn covered(&self) -> &BTreeMap<u32, u64> {
        &self.covered
    }

    /// Forgets the runs (their coverage did not hold): the caller indexes
    /// every pack again.
    pub(crate) fn reset(&mut self) {
        let options = self.options.clone();
        if !self.read_only {
            self.discard_files();
        }
        *self = Self {
            options,
            read_only: self.read_only,
            next_generation: self.next_generation,
            ..Self::default()
        };
    }

    /// Where blob `id` is, if the index knows it.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<Location> {
        match self.mem.get(id) {
            Some(value) => *value,
            None => self.runs_get(id).flatten(),
        }
    }

    /// Points `id` at `location`, a copy of the record at `from` that a
    /// collection made and that is not durable yet.
    pub(crate) fn relocate(&mut self, id: ChunkId, location: Location, from: Location) {
        self.insert_known(id, location, true);
        self.fallback.insert(id, from);
    }

    /// Points `id` at `location`.
    pub(crate) fn insert(&mut self, id: ChunkId, location: Location) {
        let known = self.get(&id).is_some();
        self.insert_known(id, location, known);
    }

    /// [`BlobIndex::insert`] when the caller has just looked `id` up
    /// (`known`: whether it had a location), saving a second lookup.
    pub(crate) fn insert_known(&mut self, id: ChunkId, location: Location, known: bool) {
        if !known {
            self.live += 1;
        }
        self.fallback.remove(&id);
        let end = location.offset + location.record_len_bytes();
        let len = self.pack_lens.entry(location.pack).or_default();
        *len = (*len).max(end);
        self.mem.insert(id, Some(location));
    }

    /// Removes `id`.
    pub(crate) fn remove(&mut self, id: &ChunkId) {
        if self.get(id).is_some() {
            self.live = self.live.saturating_sub(1);
        }
        self.fallback.remove(id);
        if self.runs.is_empty() {
            self.mem.remove(id);
        } else {
            self.mem.insert(*id, None);
        }
    }

    /// Entries in the table.
    pub(crate) fn mem_len(&self) -> usize {
        self.mem.len()
    }

    /// Number of ids with a location.
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Records that pack `number` is indexed up to `len` bytes.
    pub(crate) fn note_pack(&mut self, number: u32, len: u64) {
        let known = self.pack_lens.entry(number).or_default();
        *known = (*known).max(len);
    }

    /// Forgets pack `number` (deleted by a collection; its entries were
    /// moved or removed first).
    pub(crate) fn forget_pack(&mut self, number: u32) {
        self.pack_lens.remove(&number);
        self.forgotten.insert(number);
    }

    /// The packs indexed and their lengths, when a flush is due: what the
    /// caller makes durable before it calls [`BlobIndex::flush`].
    pub(crate) fn flush_due(&self) -> Option<BTreeMap<u32, u64>> {
        (self.can_write() && self.mem.len() > self.options.mem_max_entries)
            .then(|| self.pack_lens.clone())
    }

    /// The packs indexed and their lengths, when the index has runs whose
    /// manifest should be brought up to date (see
    /// [`super::Blobs::checkpoint_index`]).
    pub(crate) fn checkpoint_due(&self) -> Option<BTreeMap<u32, u64>> {
        (self.can_write() && !self.runs.is_empty()).then(|| self.pack_lens.clone())
    }

    fn can_write(&self) -> bool {
        self.options.dir.is_some()
            && !self.read_only
            && !self.write_stopped
            && !self.damaged.load(Ordering::Relaxed)
    }

    /// Stops the runs covering pack `number` from `offset` on (a record
    /// there was found damaged, which the runs do not know): an open reads
    /// the pack again from there. The next flush, which writes the damage to
    /// a run, covers it again.
    pub(crate) fn uncover(&mut self, number: u32, offset: u64) {
        if !self.can_write() {
            return;
        }
        match self.covered.get_mut(&number) {
            Some(len) if *len > offset => *len = offset,
            _ => return,
        }
        let Some(dir) = self.options.dir.clone() else {
            return;
        };
        if let Err(e) = self.manifest().publish(&dir) {
            eprintln!(
                "blockrep-store: cannot write the blob index's manifest ({e}); \
                 the index is rebuilt from the packs at the next open"
            );
            self.stop_writing();
            let _ = std::fs::remove_file(dir.join(manifest::MANIFEST_NAME));
        }
    }

    /// The manifest as the index stands.
    fn manifest(&self) -> Manifest {
        Manifest {
            next_generation: self.next_generation,
            live: self.runs_live,
            runs: self.runs.iter().map(|run| run.generation).collect(),
            coverage: self.covered.clone(),
        }
    }

    /// Whether a run failed a read since the index was opened.
    pub(crate) fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Writes no run again (one failed): the table grows past its budget.
    pub(crate) fn stop_writing(&mut self) {
        self.write_stopped = true;
    }

    /// Sets the table's budget, in entries, for the flushes to come.
    pub(crate) fn set_mem_max_entries(&mut self, entries: usize) {
        self.options.mem_max_entries = entries;
    }

    /// Every entry with a location, for a collection's accounting.
    pub(crate) fn entries(&self) -> Result<Vec<(ChunkId, Location)>, Error> {
        let mut all: HashMap<ChunkId, Value> = HashMap::with_capacity(self.live);
        for run in self.runs.iter().rev() {
            for entry in run.iter() {
                let (id, value) = entry.inspect_err(|e| self.note_run_damage(e))?;
                all.insert(id, value);
            }
        }
        all.extend(self.mem.iter().map(|(id, value)| (*id, *value)));
        Ok(all
            .into_iter()
            .filter_map(|(id, value)| value.map(|at| (id, at)))
            .collect())
    }

    /// Bytes of memory the runs keep (filters and block summaries).
    pub(crate) fn runs_memory_bytes(&self) -> usize {
        self.runs.iter().map(Run::memory_bytes).sum()
    }

    /// Moves the table's entries that `durable` covers (pack -> length made
    /// durable) to a new run, merges runs, and publishes the manifest. Does
    /// nothing for an index kept in memory.
    ///
    /// What the runs hold must stay true after a crash that loses everything
    /// not yet durable. So an id the table keeps (its place is not durable
    /// yet) still gets an entry when the runs would otherwise be wrong about
    /// it: the durable place a collection copied it from, or a removal when
    /// the runs name a pack that is gone.
    pub(crate) fn flush(&mut self, durable: &BTreeMap<u32, u64>) -> Result<(), Error> {
        if !self.can_write() {
            return Ok(());
        }
        let Some(dir) = self.options.dir.clone() else {
            return Ok(());
        };
        // Packs deleted since the snapshot are not covered any more.
        let coverage: BTreeMap<u32, u64> = durable
            .iter()
            .filter(|(pack, _)| self.pack_lens.contains_key(pack))
            .map(|(pack, len)| (*pack, *len))
            .collect();
        let mut covered = self.covered.clone();
        covered.retain(|pack, _| !self.forgotten.contains(pack));
        // What the runs were true for before this flush: a place they name
        // outside it (a deleted pack, a record found damaged since) must not
        // outlive a crash.
        let was_covered = covered.clone();
        for (pack, len) in &coverage {
            let known = covered.entry(*pack).or_default();
            *known = (*known).max(*len);
        }
        let within = |map: &BTreeMap<u32, u64>, at: &Location| {
            map.get(&at.pack)
                .is_some_and(|&len| at.offset + at.record_len_bytes() <= len)
        };
        let mut written: Vec<(ChunkId, Value)> = Vec::new();
        let mut moved: Vec<ChunkId> = Vec::new();
        for (id, value) in &self.mem {
            match value {
                Some(at) if !within(&coverage, at) => {
                    if let Some(old) = self.fallback.get(id).filter(|old| within(&coverage, old)) {
                        written.push((*id, Some(*old)));
                    } else if let Some(Some(named)) = self.runs_get(id)
                        && !within(&was_covered, &named)
                    {
                        written.push((*id, None));
                    }
                }
                _ => {
                    written.push((*id, *value));
                    moved.push(*id);
                }
            }
        }
        written.sort_unstable_by_key(|entry| entry.0);
        let mut runs_live = self.runs_live;
        for (id, value) in &written {
            let was = matches!(self.runs_get(id), Some(Some(_)));
            match (was, value.is_some()) {
                (false, true) => runs_live += 1,
                (true, false) => runs_live = runs_live.saturating_sub(1),
                _ => {}
            }
        }
        let mut retired = Vec::new();
        if !written.is_empty() {
            let generation = self.take_generation();
            let count = written.len() as u64;
            let run = Run::write(&dir, generation, count, written.iter().copied())?;
            self.runs.insert(0, run);
        }
        while self.runs.len() >= 2 && self.runs[0].len() * 2 >= self.runs[1].len() {
            let merged = self.merge_newest(&dir)?;
            retired.extend(self.runs.drain(0..2));
            self.runs.insert(0, merged);
        }
        if self.is_damaged() {
            // A run failed a read during this flush: the manifest is gone
            // and the next open rebuilds; none is published naming it.
            return Ok(());
        }
        self.covered = covered;
        self.runs_live = runs_live;
        self.manifest().publish(&dir)?;
        // Only now are the moved entries the runs' to keep.
        for id in &moved {
            self.mem.remove(id);
            self.fallback.remove(id);
        }
        self.forgotten.clear();
        for run in retired {
            // A reader that opened it keeps reading it; a file left behind
            // is removed by the next writable open.
            let _ = std::fs::remove_file(run.path());
        }
        Ok(())
    }

    fn take_generation(&mut self) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        generation
    }

    /// The runs' value for `id` (the table not consulted); nothing when a
    /// run fails the read.
    fn runs_get(&self, id: &ChunkId) -> Option<Value> {
        for run in &self.runs {
            match run.get(id) {
                Ok(Some(value)) => return Some(value),
                Ok(None) => {}
                Err(e) => {
                    // Not an older run's word instead: the damaged one may
                    // hold the newer place or the removal.
                    self.note_run_damage(&e);
                    return None;
                }
            }
        }
        None
    }

    /// Writes the merge of the two newest runs (the newer's entry wins); a
    /// merge into the oldest run drops removals, which hide nothing there.
    fn merge_newest(&mut self, dir: &Path) -> Result<Run, Error> {
        let drop_removals = self.runs.len() == 2;
        let generation = self.take_generation();
        let (newer, older) = (&self.runs[0], &self.runs[1]);
        let mut failure = None;
        let merged = {
            let mut a = newer.iter().peekable();
            let mut b = older.iter().peekable();
            let failure = &mut failure;
            std::iter::from_fn(move || {
                loop {
                    let next = match (a.peek(), b.peek()) {
                        (None, None) => return None,
                        (Some(Err(_)), _) | (_, None) => a.next(),
                        (_, Some(Err(_))) | (None, _) => b.next(),
                        (Some(Ok((x, _))), Some(Ok((y, _)))) => match x.cmp(y) {
                            std::cmp::Ordering::Less => a.next(),
                            std::cmp::Ordering::Greater => b.next(),
                            std::cmp::Ordering::Equal => {
                                b.next();
                                a.next()
                            }
                        },
                    };
                    match next? {
                        Ok((_, None)) if drop_removals => continue,
                        Ok(entry) => return Some(entry),
                        Err(e) => {
                            *failure = Some(e);
                            return None;
                        }
                    }
                }
            })
        };
        let run = Run::write(dir, generation, newer.len() + older.len(), merged)?;
        if let Some(e) = failure {
            let _ = std::fs::remove_file(run.path());
            return Err(e);
        }
        Ok(run)
    }

    fn note_run_damage(&self, error: &Error) {
        if !self.damaged.swap(true, Ordering::Relaxed) {
            eprintln!(
                "blockrep-store: {error}; the blob index is rebuilt from the packs at the next open"
            );
            if let (Some(dir), false) = (&self.options.dir, self.read_only) {
                let _ = std::fs::remove_file(dir.join(manifest::MANIFEST_NAME));
            }
        }
    }

    /// Removes the manifest (durably) and every run.
    fn discard_files(&self) {
        let Some(dir) = &self.options.dir else {
            return;
        };
        let manifest = dir.join(manifest::MANIFEST_NAME);
        match std::fs::remove_file(&manifest) {
            Ok(()) => {
                let _ = crate::fsutil::sync_dir(&crate::vfs::RealFs, dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("blockrep-store: cannot remove {}: {e}", manifest.display()),
        }
        self.remove_files(|_| true);
    }

    /// Removes run files the manifest does not name, and temporary files.
    fn remove_strays(&self) {
        let named: Vec<u64> = self.runs.iter().map(|run| run.generation).collect();
        self.remove_files(|generation| !named.contains(&generation));
    }

    fn remove_files(&self, remove_run: impl Fn(u64) -> bool) {
        let Some(dir) = &self.options.dir else {
            return;
        };
        let Ok(listing) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in listing.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stray = match run::parse_run_file_name(name) {
                Some(generation) => remove_run(generation),
                None => name.starts_with('.') && name.ends_with(".tmp"),
            };
            if stray {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The highest generation of a run file in `dir`.
fn highest_generation(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|entry| run::parse_run_file_name(entry.file_name().to_str()?))
        .max()
}

/// The manifest in `dir` and its runs, opened.
fn load(dir: &Path) -> Result<Option<(Manifest, Vec<Run>)>, Error> {
    let Some(manifest) = Manifest::load(dir)? else {
        return Ok(None);
    };
    let runs = manifest
        .runs
        .iter()
        .map(|&generation| Run::open(dir, generation))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((manifest, runs)))
}

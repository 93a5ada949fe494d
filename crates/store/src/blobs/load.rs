//! Building the blob index at open: what the index's runs cover is trusted
//! (`index/manifest.rs`), the rest is read from the packs' saved scans or
//! the packs themselves, so an open reads O(packs) when the runs are sound
//! and falls back to reading every pack's records when they are not.

use std::collections::BTreeMap;

use blockrep_core::ChunkId;

use super::backend::Refreshed;
use super::index::BlobIndex;
use super::{Blobs, Inner, Location, pack};
use crate::error::Error;
use crate::mutex::lock;

impl Blobs {
    /// Builds the blob index from its runs and the packs, cutting torn tails
    /// when writable. A read-only store calls it again to see what a running
    /// server added.
    pub(crate) fn load_index(&self) -> Result<(), Error> {
        let mut numbers = self.packs.list()?;
        {
            let deleting = lock(&self.deleting);
            numbers.retain(|number| !deleting.contains(number));
        }
        let mut inner = lock(&self.inner);
        // The options the index was given, or changed to since.
        inner.index = BlobIndex::open(inner.index.options().clone(), self.read_only);
        if !self.coverage_holds(inner.index.covered(), &numbers) {
            eprintln!(
                "blockrep-store: the blob index on disk names packs that changed; \
                 it is rebuilt from the packs"
            );
            inner.index.reset();
        }
        let covered = inner.index.covered().clone();
        for (position, &number) in numbers.iter().enumerate() {
            let is_last = position + 1 == numbers.len();
            // Records below `from` are in the runs.
            let from = covered.get(&number).copied().unwrap_or(0);
            let len = match self.packs.len(number) {
                Ok(len) => len,
                // Deleted by a collection since the listing (a read-only
                // store looking at a running server).
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            if from > 0 && !is_last && len == from {
                inner.index.note_pack(number, from);
                continue;
            }
            match self.index_pack(&mut inner, number, is_last, from)? {
                Indexed::Done | Indexed::Gone => {}
                Indexed::PastEnd => {
                    // The runs name records the pack no longer holds: start
                    // over without them.
                    eprintln!(
                        "blockrep-store: the blob index on disk names records past the end of \
                         {}; it is rebuilt from the packs",
                        self.packs.describe(number)
                    );
                    inner.index.reset();
                    return self.load_rest(inner, &numbers);
                }
            }
        }
        if let Some(&last) = numbers.last() {
            inner.last_pack = last;
        }
        if inner.index.is_damaged() {
            // A run failed a read while the packs were merged in.
            inner.index.reset();
            return self.load_rest(inner, &numbers);
        }
        drop(inner);
        // Saved pack indexes whose pack is gone (a collection deletes the
        // index first, but a crash may land the two removals in either order).
        if !self.read_only && self.packs.remove_orphan_scans(&numbers)? {
            self.packs.sync_listing()?;
        }
        Ok(())
    }

    /// Indexes every pack of `numbers` from its saved scan or its records,
    /// after the runs on disk were found not to hold.
    fn load_rest(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        numbers: &[u32],
    ) -> Result<(), Error> {
        for (position, &number) in numbers.iter().enumerate() {
            let is_last = position + 1 == numbers.len();
            self.index_pack(&mut inner, number, is_last, 0)?;
        }
        Ok(())
    }

    /// Indexes the records of pack `number` at or past `from` (below it the
    /// runs hold them), from its saved scan or its records; cuts the torn
    /// tail of the last pack when writable; moves entries to a run when the
    /// table is over budget.
    fn index_pack(
        &self,
        inner: &mut Inner,
        number: u32,
        is_last: bool,
        from: u64,
    ) -> Result<Indexed, Error> {
        // A sealed pack's saved scan, when there is a sound one (see
        // `pack_index.rs`); the newest pack is always scanned.
        let saved = if is_last && !self.packs.is_sealed(number) {
            None
        } else {
            self.packs.load_scan(number)
        };
        let scan = match saved {
            Some(scan) => scan,
            None => match self.packs.scan_from(number, from) {
                Ok(scan) => {
                    if !self.read_only {
                        // What this open indexes must be durable: an fsync
                        // that failed before it may have left writes to the
                        // pack pending. Only then is its scan saved.
                        self.packs.make_durable(number)?;
                        // A scan of part of the pack is no scan to save.
                        if !is_last && from == 0 {
                            self.save_scan(number, &scan);
                        }
                    }
                    scan
                }
                // Deleted by a collection since the listing (a read-only store
                // looking at a running server): its blobs are elsewhere now.
                Err(e) if e.is_not_found() => return Ok(Indexed::Gone),
                Err(e) => return Err(e),
            },
        };
        if scan.valid_len < from {
            return Ok(Indexed::PastEnd);
        }
        index_scan(inner, number, &scan, from);
        if scan.valid_len < scan.file_len && is_last && !self.read_only {
            // Only the last pack is ever appended to, so only it can have a torn
            // tail; nothing past `valid_len` was ever part of a commit.
            tracing_cut(&self.packs.describe(number), scan.valid_len, scan.file_len);
            self.packs.truncate(number, scan.valid_len)?;
        }
        inner.last_pack = number;
        // Everything indexed so far is durable (saved scans are of durable
        // packs; the rest was made durable above).
        self.flush_index(inner, None);
        Ok(Indexed::Done)
    }

    /// Whether what the runs cover is still there: every pack they name
    /// exists and is at least as long as covered.
    fn coverage_holds(&self, covered: &BTreeMap<u32, u64>, numbers: &[u32]) -> bool {
        covered.iter().all(|(number, &len)| {
            numbers.binary_search(number).is_ok()
                && self.packs.len(*number).is_ok_and(|now| now >= len)
        })
    }

    /// Moves index entries to a run when the table is over its budget.
    /// `durable` is what the caller made durable (pack -> length); `None`
    /// when everything indexed is. A failure costs memory, not data: it is
    /// reported once and no run is written again until the next open.
    pub(super) fn flush_index(&self, inner: &mut Inner, durable: Option<BTreeMap<u32, u64>>) {
        let Some(due) = inner.index.flush_due() else {
            return;
        };
        let durable = durable.unwrap_or(due);
        if let Err(e) = inner.index.flush(&durable) {
            eprintln!(
                "blockrep-store: cannot write the blob index to disk ({e}); \
                 it stays in memory until the next open"
            );
            inner.index.stop_writing();
        }
    }

    /// After a collection deleted packs: writes the index's table to a run
    /// and a manifest that no longer names them, so the next open need not
    /// rebuild the index. Nothing to do while the index has no runs.
    pub(super) fn checkpoint_index(&self) -> Result<(), Error> {
        let Some(durable) = lock(&self.inner).index.checkpoint_due() else {
            return Ok(());
        };
        self.sync()?;
        let mut inner = lock(&self.inner);
        if let Err(e) = inner.index.flush(&durable) {
            eprintln!(
                "blockrep-store: cannot write the blob index to disk ({e}); \
                 it stays in memory until the next open"
            );
            inner.index.stop_writing();
        }
        Ok(())
    }

    /// Adds to the index the packs that appeared in the backend since it
    /// was built (packs another server sharing the bucket published), and
    /// drops the entries of packs deleted there (by its collection).
    pub(crate) fn refresh(&self) -> Result<(), Error> {
        let _one = lock(&self.refreshing);
        let found = self.packs.refresh()?;
        match self.index_refreshed(&found) {
            Ok(()) => {
                self.packs.settle_refresh(&found);
                Ok(())
            }
            Err(e) => {
                self.packs.undo_refresh(&found);
                Err(e)
            }
        }
    }

    /// Takes what [`Blobs::refresh`] found into the index: everything that
    /// can fail first (the scans, the listing of entries), then the changes,
    /// in one step that cannot, so that a failure leaves the index as it was.
    fn index_refreshed(&self, found: &Refreshed) -> Result<(), Error> {
        let mut scans = Vec::with_capacity(found.added.len());
        for &number in &found.added {
            let scan = match self.packs.load_scan(number) {
                Some(scan) => scan,
                None => self.packs.scan(number)?,
            };
            scans.push((number, scan));
        }
        let mut inner = lock(&self.inner);
        let gone: std::collections::HashSet<u32> = found.gone.iter().copied().collect();
        let in_gone: Vec<ChunkId> = if gone.is_empty() {
            Vec::new()
        } else {
            inner
                .index
                .entries()?
                .into_iter()
                .filter(|(_, at)| gone.contains(&at.pack))
                .map(|(id, _)| id)
                .collect()
        };
        for (number, scan) in &scans {
            index_scan(&mut inner, *number, scan, 0);
            inner.last_pack = inner.last_pack.max(*number);
        }
        // After the packs added: the collector's copies of live records
        // replaced their entries, so what still points into a deleted pack
        // was dead and removed.
        for id in in_gone {
            if inner
                .index
                .get(&id)
                .is_some_and(|at| gone.contains(&at.pack))
            {
                inner.index.remove(&id);
            }
        }
        for &number in &found.gone {
            inner.index.forget_pack(number);
        }
        Ok(())
    }

    /// Saves the scan of sealed pack `number`. Failing to (a full disk) costs
    /// only a scan at the next open.
    fn save_scan(&self, number: u32, scan: &pack::PackScan) {
        if let Err(e) = self.packs.save_scan(number, scan) {
            // Rare, and worth a line (see `tracing_cut`).
            eprintln!(
                "blockrep-store: cannot save the index of pack {number} ({e}); \
                 it will be scanned again at the next open"
            );
        }
    }
}

/// What [`Blobs::index_pack`] did.
enum Indexed {
    Done,
    /// The pack was deleted since the listing.
    Gone,
    /// The pack ends before what the runs cover of it.
    PastEnd,
}

/// Adds the records of pack `number` at or past offset `from` to the index.
fn index_scan(inner: &mut Inner, number: u32, scan: &pack::PackScan, from: u64) {
    for record in scan.records.iter().filter(|r| r.offset >= from) {
        let location = Location {
            pack: number,
            offset: record.offset,
            header: record.header,
            crc_ok: record.crc_ok,
        };
        // The same id twice means a compaction copied it and stopped
        // before deleting the old pack. The newer copy is kept, so that
        // the next collection finds the old pack dead and deletes it
        // without copying again; but never a damaged copy over a sound
        // one: a copy not yet fsynced when the power went may be torn
        // while the old record still holds. The same record read again
        // (its pack's saved scan dropped) takes what the read found.
        // Among sound copies the one in the higher-numbered pack wins, in
        // whatever order the packs were learned: servers sharing a bucket
        // learn each other's packs late, and must agree on which copy an id
        // is at, or a collection that deletes the other copy's pack would
        // take the id from a server whose index pointed there.
        let known = inner.index.get(&record.header.id);
        let replace = match known {
            None => true,
            Some(known) => {
                location.is_at(&known)
                    || (location.crc_ok && (!known.crc_ok || location.pack >= known.pack))
                    || (!known.crc_ok && location.pack >= known.pack)
            }
        };
        if replace {
            inner
                .index
                .insert_known(record.header.id, location, known.is_some());
        }
    }
    inner.index.note_pack(number, scan.valid_len);
}

fn tracing_cut(pack: &str, valid_len: u64, file_len: u64) {
    // The store has no logging dependency; recovery is rare and worth one line.
    eprintln!(
        "blockrep-store: dropping torn tail of {pack}: {} bytes after offset {}",
        file_len - valid_len,
        valid_len
    );
}

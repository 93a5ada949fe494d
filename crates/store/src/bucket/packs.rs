//! Packs as immutable objects of the bucket, with the data directory's
//! `packs/` as the place they are written and a bounded cache of them (see
//! `mod.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{SharedRemote, bucket_error};
use crate::blobs::UploadStats;
use crate::blobs::backend::{LocalPacks, PackBackend, Refreshed};
use crate::blobs::pack::{PackScan, pack_file_name, parse_pack_file_name, scan_pack};
use crate::blobs::pack_index;
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::vfs::{PendingSync, Vfs, VfsFile};

/// Pack numbers tried past a taken one before giving up: another server
/// claims numbers one at a time, so a few suffice.
const CLAIM_ATTEMPTS_MAX: u32 = 10_000;

fn pack_key(number: u32) -> String {
    format!("packs/{}", pack_file_name(number))
}

fn index_key(number: u32) -> String {
    format!("packs/{number:08}.idx")
}

#[derive(Debug, Default)]
struct PackState {
    /// Packs in the bucket with their index, by number: their lengths.
    published: BTreeMap<u32, u64>,
    /// Published packs that also have a local copy: their lengths.
    cached: BTreeMap<u32, u64>,
    /// Packs claimed by this store and not published yet (the one being
    /// written, and sealed ones whose upload is pending or failed).
    claimed: BTreeSet<u32>,
    /// Numbers this store is claiming in the bucket right now: the claim
    /// may be there before it is in `claimed`.
    claiming: BTreeSet<u32>,
    /// Sealed, not yet published: their lengths.
    sealed: BTreeMap<u32, u64>,
    /// Sealed packs whose upload failed, retried by the next sync.
    failed: BTreeSet<u32>,
    /// Packs being uploaded now: one upload per pack at a time.
    uploading: BTreeSet<u32>,
    /// Packs this store's collection is deleting: a refresh meanwhile must
    /// not take them in again.
    removing: BTreeSet<u32>,
}

struct Shared {
    local: LocalPacks,
    dir: PathBuf,
    remote: SharedRemote,
    state: Mutex<PackState>,
    cache_bytes: u64,
}

/// Packs in a bucket (see the module docs).
pub(crate) struct BucketPacks {
    shared: Arc<Shared>,
}

impl fmt::Debug for BucketPacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BucketPacks")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// Pack lengths by number.
type Lengths = BTreeMap<u32, u64>;

/// The packs in the bucket, by number, with their lengths: all of them, and
/// those published (a pack and its index, not empty).
fn list_packs(remote: &SharedRemote) -> Result<(Lengths, Lengths), Error> {
    let listed = remote
        .bucket
        .list("packs")
        .map_err(|e| bucket_error("cannot list packs/ in the bucket", e))?;
    let mut lengths = BTreeMap::new();
    let mut indexed = BTreeSet::new();
    for (key, len) in &listed {
        let name = key.strip_prefix("packs/").unwrap_or(key);
        if let Some(number) = parse_pack_file_name(name) {
            lengths.insert(number, *len);
        } else if let Some(number) = pack_index::parse_index_file_name(name) {
            indexed.insert(number);
        }
    }
    let mut published = lengths.clone();
    published.retain(|number, len| indexed.contains(number) && *len > 0);
    Ok((lengths, published))
}

/// The published packs of the bucket: their lengths by number.
fn list_published(remote: &SharedRemote) -> Result<Lengths, Error> {
    Ok(list_packs(remote)?.1)
}

impl BucketPacks {
    /// The bucket's packs, with `dir` (which exists) of `vfs` as the local
    /// copy. A local pack the bucket does not have published is left over
    /// from a run that stopped before uploading it: no record names its
    /// blobs, so its local copy is deleted.
    pub(crate) fn open(
        dir: PathBuf,
        vfs: Arc<dyn Vfs>,
        remote: SharedRemote,
        cache_bytes: u64,
    ) -> Result<Self, Error> {
        let mut state = PackState {
            published: list_published(&remote)?,
            ..PackState::default()
        };
        let local = LocalPacks::new(dir.clone(), vfs);
        for number in local.list()? {
            match state.published.get(&number) {
                Some(&len) if local.len(number)? == len => {
                    state.cached.insert(number, len);
                }
                // Its claim in the bucket stays: the number may be another
                // server's by now (a collection removes orphaned claims
                // while its server is alone).
                Some(_) | None => local.remove(number)?,
            }
        }
        local.sync_listing()?;
        let packs = Self {
            shared: Arc::new(Shared {
                local,
                dir,
                remote,
                state: Mutex::new(state),
                cache_bytes,
            }),
        };
        packs.shared.evict();
        Ok(packs)
    }
}

impl Shared {
    fn is_local(&self, number: u32) -> bool {
        let state = lock(&self.state);
        state.claimed.contains(&number) || state.cached.contains_key(&number)
    }

    /// Uploads sealed pack `number`, then its index: the index is what
    /// publishes it.
    fn upload(&self, number: u32) -> Result<(), Error> {
        {
            let mut state = lock(&self.state);
            if !state.sealed.contains_key(&number) {
                // Uploaded meanwhile by another sync's retry.
                state.failed.remove(&number);
                return Ok(());
            }
            if !state.uploading.insert(number) {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("pack {number} is being uploaded by another sync; try again"),
                ));
            }
        }
        let outcome = self.try_upload(number);
        let mut state = lock(&self.state);
        state.uploading.remove(&number);
        match &outcome {
            Ok(len) => {
                state.failed.remove(&number);
                state.sealed.remove(&number);
                state.claimed.remove(&number);
                state.published.insert(number, *len);
                state.cached.insert(number, *len);
                drop(state);
                self.remote.note_uploaded(*len);
                self.evict();
            }
            Err(_) => {
                state.failed.insert(number);
                drop(state);
                self.remote.note_error();
            }
        }
        outcome.map(|_| ())
    }

    fn try_upload(&self, number: u32) -> Result<u64, Error> {
        let path = self.dir.join(pack_file_name(number));
        let bucket = &self.remote.bucket;
        bucket
            .upload_file(&pack_key(number), path.clone())
            .map_err(|e| bucket_error(format!("cannot upload {}", path.display()), e))?;
        let scan = self.local.scan(number)?;
        if scan.valid_len != scan.file_len {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "sealed pack {} ends in a torn record at {}",
                    path.display(),
                    scan.valid_len
                ),
            ));
        }
        bucket
            .put(&index_key(number), Bytes::from(pack_index::encode(&scan)))
            .map_err(|e| bucket_error(format!("cannot upload the index of pack {number}"), e))?;
        // The local index makes the next open of this cache cheap.
        let _ = self.local.save_scan(number, &scan);
        Ok(scan.file_len)
    }

    /// Drops the oldest cached packs until the cache fits its budget.
    fn evict(&self) {
        loop {
            let mut state = lock(&self.state);
            let total: u64 = state.cached.values().sum();
            if total <= self.cache_bytes {
                return;
            }
            let Some((number, _)) = state.cached.pop_first() else {
                return;
            };
            drop(state);
            // A copy that cannot be removed only costs disk space: reads of
            // that pack go to the bucket from now on either way.
            if let Err(e) = self.local.remove(number) {
                tracing_evict(number, &e);
            }
        }
    }
}

fn tracing_evict(number: u32, e: &Error) {
    eprintln!("blockrep-store: cannot drop the cached copy of pack {number}: {e}");
}

impl PackBackend for BucketPacks {
    fn describe(&self, number: u32) -> String {
        format!("{} in the bucket", pack_key(number))
    }

    fn list(&self) -> Result<Vec<u32>, Error> {
        let state = lock(&self.shared.state);
        let mut numbers: Vec<u32> = state.published.keys().copied().collect();
        numbers.extend(state.claimed.iter().copied());
        numbers.sort_unstable();
        numbers.dedup();
        Ok(numbers)
    }

    fn len(&self, number: u32) -> Result<u64, Error> {
        if let Some(len) = lock(&self.shared.state).published.get(&number) {
            return Ok(*len);
        }
        self.shared.local.len(number)
    }

    fn read_at(&self, number: u32, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        if self.shared.is_local(number) {
            match self.shared.local.read_at(number, offset, buf) {
                Ok(()) => return Ok(()),
                // Evicted since: the bucket has it.
                Err(_) if lock(&self.shared.state).published.contains_key(&number) => {}
                Err(e) => return Err(e),
            }
        }
        let end = offset + buf.len() as u64;
        let bytes = self
            .shared
            .remote
            .bucket
            .get_range(&pack_key(number), offset..end)
            .map_err(|e| {
                bucket_error(
                    format!("cannot read {offset}..{end} of {}", pack_key(number)),
                    e,
                )
            })?;
        if bytes.len() != buf.len() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} answered {} bytes for a read of {}",
                    pack_key(number),
                    bytes.len(),
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn scan(&self, number: u32) -> Result<PackScan, Error> {
        if self.shared.is_local(number) {
            return self.shared.local.scan(number);
        }
        // No sound index (it is what published the pack, so this is damage):
        // read the whole pack into the cache and scan it there.
        let key = pack_key(number);
        let Some((bytes, _)) = self
            .shared
            .remote
            .bucket
            .get(&key)
            .map_err(|e| bucket_error(format!("cannot read {key}"), e))?
        else {
            return Err(Error::io(
                format!("{key} is gone from the bucket"),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        };
        let path = self.shared.dir.join(pack_file_name(number));
        crate::fsutil::publish_atomic(&crate::vfs::RealFs, &path, &bytes)?;
        lock(&self.shared.state)
            .cached
            .insert(number, bytes.len() as u64);
        scan_pack(&crate::vfs::RealFs, &path)
    }

    fn make_durable(&self, number: u32) -> Result<(), Error> {
        if self.shared.is_local(number) {
            self.shared.local.make_durable(number)
        } else {
            Ok(())
        }
    }

    fn truncate(&self, number: u32, len: u64) -> Result<(), Error> {
        self.shared.local.truncate(number, len)
    }

    fn is_sealed(&self, number: u32) -> bool {
        let state = lock(&self.shared.state);
        state.published.contains_key(&number) || state.sealed.contains_key(&number)
    }

    fn open_active(&self, number: u32) -> Result<(Arc<dyn VfsFile>, u64), Error> {
        self.shared.local.open_active(number)
    }

    fn create_active(&self, after: u32) -> Result<(u32, Arc<dyn VfsFile>), Error> {
        let bucket = &self.shared.remote.bucket;
        for number in after.saturating_add(1)..after.saturating_add(CLAIM_ATTEMPTS_MAX) {
            {
                // Marked before the bucket is asked, so that a collection
                // listing meanwhile never takes the new claim for a dead one.
                let mut state = lock(&self.shared.state);
                if state.published.contains_key(&number) || !state.claiming.insert(number) {
                    continue;
                }
            }
            let claim = bucket.put_new(&pack_key(number), Bytes::new());
            {
                let mut state = lock(&self.shared.state);
                if claim.is_ok() {
                    state.claimed.insert(number);
                }
                state.claiming.remove(&number);
            }
            match claim {
                Ok(_) => {}
                Err(blockrep_objects::Error::Exists(_)) => continue,
                Err(e) => return Err(bucket_error(format!("cannot claim pack {number}"), e)),
            }
            match self.shared.local.create_active(number - 1) {
                Ok((_, file)) => return Ok((number, file)),
                Err(e) => {
                    // Nothing was written under the claim: give it back.
                    lock(&self.shared.state).claimed.remove(&number);
                    let _ = bucket.delete(&pack_key(number));
                    return Err(e);
                }
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!("no free pack number after {after} in the bucket"),
        ))
    }

    fn start_flush(&self, file: Arc<dyn VfsFile>) -> PendingSync {
        self.shared.local.start_flush(file)
    }

    fn seal(&self, number: u32, file: Arc<dyn VfsFile>) -> PendingSync {
        let len = file.len().unwrap_or(0);
        lock(&self.shared.state).sealed.insert(number, len);
        let shared = Arc::clone(&self.shared);
        PendingSync::Thread(std::thread::spawn(move || {
            file.sync_data()?;
            shared.upload(number).map_err(std::io::Error::from)
        }))
    }

    fn remove_unpublished(&self) -> Result<u64, Error> {
        let bucket = &self.shared.remote.bucket;
        let (all, published) = list_packs(&self.shared.remote)?;
        // Read after the listing: a pack of this store's listed without
        // its index may have been published since (its upload ended), and
        // it is then no longer claimed, but in `published`. A claim is in
        // `claiming` before it is made in the bucket (`create_active`).
        let keep: BTreeSet<u32> = {
            let state = lock(&self.shared.state);
            let known = state.published.keys().chain(&state.claimed);
            known.chain(&state.claiming).copied().collect()
        };
        let mut removed = 0;
        for number in all.into_keys() {
            if published.contains_key(&number) || keep.contains(&number) {
                continue;
            }
            let key = pack_key(number);
            bucket
                .delete(&key)
                .map_err(|e| bucket_error(format!("cannot delete {key}"), e))?;
            removed += 1;
        }
        Ok(removed)
    }

    fn refresh(&self) -> Result<Refreshed, Error> {
        // What this store knew before the listing began: the listing is
        // compared with that, not with what this store learned while it
        // ran. A pack of its own whose upload ends meanwhile is missing
        // from the listing but not gone, and a pack its collection deletes
        // meanwhile may still be listed but is not new.
        let (published_before, removing_before) = {
            let state = lock(&self.shared.state);
            let published: BTreeSet<u32> = state.published.keys().copied().collect();
            (published, state.removing.clone())
        };
        let listed = list_published(&self.shared.remote)?;
        let mut state = lock(&self.shared.state);
        let mut found = Refreshed::default();
        for (&number, &len) in &listed {
            if !state.published.contains_key(&number)
                && !state.claimed.contains(&number)
                && !state.removing.contains(&number)
                && !published_before.contains(&number)
                && !removing_before.contains(&number)
            {
                state.published.insert(number, len);
                found.added.push(number);
            }
        }
        // Deleted by another server's collection (its index goes first, so
        // a pack being deleted is gone already).
        found.gone = state
            .published
            .keys()
            .filter(|number| published_before.contains(number) && !listed.contains_key(number))
            .copied()
            .collect();
        for &number in &found.gone {
            let len = state.published.remove(&number).unwrap_or(0);
            let cached = state.cached.remove(&number).is_some();
            found.forgotten.push((number, len, cached));
        }
        Ok(found)
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn undo_refresh(&self, found: &Refreshed) {
        let mut state = lock(&self.shared.state);
        for number in &found.added {
            state.published.remove(number);
        }
        for &(number, len, cached) in &found.forgotten {
            state.published.insert(number, len);
            if cached {
                state.cached.insert(number, len);
            }
        }
    }

    fn settle_refresh(&self, found: &Refreshed) {
        for &(number, _, cached) in &found.forgotten {
            // A copy left behind costs disk space only: nothing reads it.
            if cached && let Err(e) = self.shared.local.remove(number) {
                tracing_evict(number, &e);
            }
        }
    }

    fn location(&self) -> String {
        self.shared.remote.bucket.bucket().name().to_owned()
    }

    fn check_reachable(&self) -> Result<(), Error> {
        // A key that is never written: the answer (absent) is a round trip.
        match self.shared.remote.bucket.get("packs/reachable") {
            Ok(_) => Ok(()),
            Err(e) => Err(bucket_error(
                format!("{} cannot be reached", self.location()),
                e,
            )),
        }
    }

    fn seals_at_sync(&self) -> bool {
        true
    }

    fn settle(&self) -> Result<(), Error> {
        let failed: Vec<u32> = lock(&self.shared.state).failed.iter().copied().collect();
        for number in failed {
            self.shared.upload(number)?;
        }
        Ok(())
    }

    fn upload_stats(&self) -> Option<UploadStats> {
        let state = lock(&self.shared.state);
        Some(UploadStats {
            bytes_pending: state.sealed.values().sum(),
            objects_pending: 2 * state.sealed.len() as u64,
            errors_total: self.shared.remote.errors_total(),
            uploaded_bytes_total: self.shared.remote.uploaded_bytes_total(),
        })
    }

    fn load_scan(&self, number: u32) -> Option<PackScan> {
        if lock(&self.shared.state).cached.contains_key(&number)
            && let Some(scan) = self.shared.local.load_scan(number)
        {
            return Some(scan);
        }
        let len = *lock(&self.shared.state).published.get(&number)?;
        let (bytes, _) = self.shared.remote.bucket.get(&index_key(number)).ok()??;
        pack_index::decode(&bytes, len)
    }

    fn save_scan(&self, number: u32, scan: &PackScan) -> Result<(), Error> {
        if self.shared.is_local(number) {
            self.shared.local.save_scan(number, scan)
        } else {
            Ok(())
        }
    }

    fn forget_scan(&self, number: u32) -> std::io::Result<()> {
        self.shared.local.forget_scan(number)
    }

    fn remove_orphan_scans(&self, packs: &[u32]) -> Result<bool, Error> {
        self.shared.local.remove_orphan_scans(packs)
    }

    fn remove(&self, number: u32) -> Result<(), Error> {
        let bucket = &self.shared.remote.bucket;
        // No longer published here from the start: a removal cut short must
        // not leave this store counting on a pack whose index may be gone.
        // A refresh finds it again if its index stayed.
        {
            let mut state = lock(&self.shared.state);
            state.published.remove(&number);
            state.removing.insert(number);
        }
        // The index first: without it the pack is no longer published, so a
        // removal cut short leaves an unpublished object, never a published
        // pack that lacks records.
        for key in [index_key(number), pack_key(number)] {
            if let Err(e) = bucket.delete(&key) {
                lock(&self.shared.state).removing.remove(&number);
                return Err(bucket_error(format!("cannot delete {key}"), e));
            }
        }
        let mut state = lock(&self.shared.state);
        state.removing.remove(&number);
        let was_local = state.cached.remove(&number).is_some() || state.claimed.remove(&number);
        drop(state);
        if was_local {
            self.shared.local.remove(number)?;
        }
        Ok(())
    }

    fn sync_listing(&self) -> Result<(), Error> {
        // Deletions in the bucket are durable once answered; the local copy
        // is a cache.
        Ok(())
    }
}

#[cfg(test)]
#[path = "packs_tests.rs"]
mod tests;

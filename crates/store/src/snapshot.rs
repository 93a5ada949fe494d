//! Snapshots: named, timestamped references to a source's committed root.
//!
//! A snapshot copies nothing: it names the root of the source's head at the time
//! it was taken, and that root (with its pages and chunks) stays in the store for
//! as long as the snapshot exists. Snapshots are immutable; they are created and
//! deleted whole.
//!
//! # File
//!
//! `DATA/sources/SOURCE/snapshots/NAME`, published atomically (temporary file,
//! fsync, rename, fsync of the directory); its layout is in `format.rs`
//! (`SNAPSHOT_MAGIC`).
//!
//! # Expiry
//!
//! A snapshot with an expiry time is deleted by [`Store::expire_snapshots`] once
//! that time has come. Automatic snapshots are also deleted once the
//! [`RetentionPolicy`](crate::RetentionPolicy) no longer keeps them; manual and
//! cutover snapshots only ever expire by their own TTL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use blockrep_core::{ChunkId, Consistency, SourceId};

use crate::catalog::{list_names, validate_name};
use crate::error::{Error, ErrorKind};
use crate::format::{
    NAME_FIELD_LEN, SNAPSHOT_LEN, SNAPSHOT_MAGIC, check_record, get_name, id_at, label_from_byte,
    put_name, seal_with_crc, u64_at,
};
use crate::fsutil::{create_dir_durable, publish_atomic, read_small_file, sync_dir};
use crate::mutex::lock;
use crate::retention::{RetentionPolicy, duration_ms};
use crate::store::Store;

/// Attempts at a free generated name before giving up (names carry the time in
/// ms, so a clash needs several snapshots of one source in the same millisecond).
const GENERATED_NAME_ATTEMPTS: u32 = 100;

/// Why a snapshot exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SnapshotKind {
    /// Asked for by an operator; expires only by its TTL.
    Manual = 1,
    /// Taken by the retention schedule; expires by policy (or its TTL).
    Auto = 2,
    /// Taken at cutover; expires only by its TTL.
    Cutover = 3,
}

impl SnapshotKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => SnapshotKind::Manual,
            2 => SnapshotKind::Auto,
            3 => SnapshotKind::Cutover,
            _ => return None,
        })
    }

    /// Prefix of generated names.
    fn name_prefix(self) -> &'static str {
        match self {
            SnapshotKind::Manual => "s",
            SnapshotKind::Auto => "auto",
            SnapshotKind::Cutover => "cutover",
        }
    }
}

/// A named reference to a committed root of one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Name, unique per source; a valid file name.
    pub name: String,
    /// The source the root belongs to.
    pub source: SourceId,
    /// Why it exists.
    pub kind: SnapshotKind,
    /// Epoch of the head the snapshot was taken from.
    pub epoch: u64,
    /// The committed root it refers to.
    pub root: ChunkId,
    /// When it was taken, Unix ms.
    pub created_unix_ms: u64,
    /// When it expires, Unix ms; 0 = never.
    pub expires_unix_ms: u64,
    /// The consistency of the root, as the head had it when taken.
    pub consistency: Consistency,
}

impl Snapshot {
    /// Whether its own expiry time has come at `now_unix_ms`.
    pub fn is_expired_at(&self, now_unix_ms: u64) -> bool {
        self.expires_unix_ms != 0 && now_unix_ms >= self.expires_unix_ms
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SNAPSHOT_LEN);
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.push(self.kind as u8);
        out.push(self.name.len() as u8);
        out.push(self.source.as_str().len() as u8);
        out.push(self.consistency.to_byte());
        out.extend_from_slice(&[0; 4]);
        put_name(&mut out, &self.name);
        put_name(&mut out, self.source.as_str());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(self.root.as_bytes());
        out.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_unix_ms.to_le_bytes());
        seal_with_crc(&mut out);
        debug_assert_eq!(out.len(), SNAPSHOT_LEN);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        check_record("snapshot file", bytes, &SNAPSHOT_MAGIC, SNAPSHOT_LEN)?;
        let corrupt = |what: &str| Error::new(ErrorKind::Corrupt, format!("snapshot file: {what}"));
        if bytes[12..16].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved bytes are not zero"));
        }
        let kind = SnapshotKind::from_u8(bytes[8]).ok_or_else(|| corrupt("unknown kind"))?;
        let name = get_name(&bytes[16..16 + NAME_FIELD_LEN], bytes[9])
            .ok_or_else(|| corrupt("invalid name"))?;
        let source = get_name(&bytes[80..80 + NAME_FIELD_LEN], bytes[10])
            .and_then(|s| SourceId::new(&s).ok())
            .ok_or_else(|| corrupt("invalid source id"))?;
        Ok(Self {
            name,
            source,
            kind,
            epoch: u64_at(bytes, 144),
            root: id_at(bytes, 152),
            created_unix_ms: u64_at(bytes, 184),
            expires_unix_ms: u64_at(bytes, 192),
            consistency: label_from_byte("snapshot file", bytes[11])?,
        })
    }
}

impl Store {
    fn snapshots_dir(&self, source: &SourceId) -> PathBuf {
        self.source_dir(source).join("snapshots")
    }

    /// Takes a manual snapshot of `source`'s committed head: O(1), no data is
    /// copied. Without a `name` one is generated (`s-EPOCH-UNIXMS`); with a `ttl`
    /// it expires at `now_unix_ms + ttl`. Fails with `NotFound` when the source
    /// has no head, `AlreadyExists` when the name is taken, `Invalid` for a bad
    /// name or a zero TTL.
    pub fn create_snapshot(
        &self,
        source: &SourceId,
        name: Option<&str>,
        ttl: Option<Duration>,
        now_unix_ms: u64,
    ) -> Result<Snapshot, Error> {
        self.create_snapshot_of_kind(source, SnapshotKind::Manual, name, ttl, now_unix_ms)
    }

    /// [`Store::create_snapshot`] for any kind. Generated names are
    /// `s-EPOCH-UNIXMS` (manual), `auto-UNIXMS` and `cutover-EPOCH-UNIXMS`, with
    /// `-2`, `-3`, ... appended on a clash.
    pub fn create_snapshot_of_kind(
        &self,
        source: &SourceId,
        kind: SnapshotKind,
        name: Option<&str>,
        ttl: Option<Duration>,
        now_unix_ms: u64,
    ) -> Result<Snapshot, Error> {
        self.check_writable()?;
        let _guard = lock(&self.catalog.lock);
        self.create_snapshot_locked(source, kind, name, ttl, now_unix_ms)
    }

    /// Takes an automatic snapshot of `source` if the retention policy says one is
    /// due at `now_unix_ms`; returns it, or `None` when none was due.
    pub fn create_auto_snapshot_if_due(
        &self,
        source: &SourceId,
        now_unix_ms: u64,
    ) -> Result<Option<Snapshot>, Error> {
        self.check_writable()?;
        let policy = self.retention_policy();
        let _guard = lock(&self.catalog.lock);
        let auto_created: Vec<u64> = self
            .list_snapshots(Some(source))?
            .iter()
            .filter(|s| s.kind == SnapshotKind::Auto)
            .map(|s| s.created_unix_ms)
            .collect();
        if !policy.auto_snapshot_due(&auto_created, now_unix_ms) {
            return Ok(None);
        }
        self.create_snapshot_locked(source, SnapshotKind::Auto, None, None, now_unix_ms)
            .map(Some)
    }

    /// Creation proper; the caller holds the catalog lock.
    fn create_snapshot_locked(
        &self,
        source: &SourceId,
        kind: SnapshotKind,
        name: Option<&str>,
        ttl: Option<Duration>,
        now_unix_ms: u64,
    ) -> Result<Snapshot, Error> {
        if let Some(name) = name {
            validate_name("snapshot", name)?;
        }
        let expires_unix_ms = match ttl.map(duration_ms) {
            None => 0,
            Some(0) => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    "a snapshot TTL must be at least 1 ms",
                ));
            }
            Some(ttl_ms) => now_unix_ms.saturating_add(ttl_ms),
        };
        // The GC fence, held from reading the head until the snapshot is
        // published, as a commit holds it: a collection lists the referenced
        // roots either before the head is read (and then the root is that
        // listed head's, or a later commit's, which recorded what it names
        // while the collection ran) or after the snapshot is published. Without
        // it, a commit moving the head and a collection in between would sweep
        // the blobs of the root this snapshot is about to name.
        let _fence = self.blobs.fence().read_fence();
        let head = self.head(source)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("source {source} has no committed head to snapshot"),
            )
        })?;
        self.note_snapshot_root(&head.root);
        #[cfg(test)]
        tests::pause_point();
        let dir = self.snapshots_dir(source);
        let name = match name {
            Some(name) => {
                if self.snapshot(source, name)?.is_some() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("source {source} already has a snapshot named {name}"),
                    ));
                }
                name.to_owned()
            }
            None => {
                let base = match kind {
                    SnapshotKind::Auto => format!("{}-{now_unix_ms}", kind.name_prefix()),
                    _ => format!("{}-{}-{now_unix_ms}", kind.name_prefix(), head.epoch),
                };
                let name = self.free_generated_name(source, &base)?;
                // Digits, dashes and a lowercase prefix, at most 53 bytes; checked
                // anyway, since the name becomes a file name.
                validate_name("snapshot", &name)?;
                name
            }
        };
        let snapshot = Snapshot {
            name,
            source: source.clone(),
            kind,
            epoch: head.epoch,
            root: head.root,
            created_unix_ms: now_unix_ms,
            expires_unix_ms,
            consistency: head.consistency,
        };
        create_dir_durable(self.vfs(), &dir)?;
        publish_atomic(self.vfs(), &dir.join(&snapshot.name), &snapshot.encode())?;
        Ok(snapshot)
    }

    /// Records the root a snapshot is about to name, and its pages, for a
    /// collection that may be running, as a commit does: belt and braces to the
    /// fence, so that nothing the snapshot names can be judged dead by a
    /// collection that started marking before the snapshot was published. A
    /// root that cannot be read is left to `verify` to report: the snapshot
    /// still records what the head names.
    fn note_snapshot_root(&self, root_id: &ChunkId) {
        self.blobs.fence().note(root_id);
        if !self.blobs.fence().is_tracking() {
            return;
        }
        if let Ok(root) = self.read_root(root_id) {
            self.blobs.fence().note_all(root.page_ids());
        }
    }

    fn free_generated_name(&self, source: &SourceId, base: &str) -> Result<String, Error> {
        for attempt in 1..=GENERATED_NAME_ATTEMPTS {
            let name = if attempt == 1 {
                base.to_owned()
            } else {
                format!("{base}-{attempt}")
            };
            if self.snapshot(source, &name)?.is_none() {
                return Ok(name);
            }
        }
        Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("source {source}: no free snapshot name like {base}"),
        ))
    }

    /// The snapshot `name` of `source`, if it exists.
    pub fn snapshot(&self, source: &SourceId, name: &str) -> Result<Option<Snapshot>, Error> {
        validate_name("snapshot", name)?;
        let path = self.snapshots_dir(source).join(name);
        let Some(bytes) = read_small_file(self.vfs(), &path, SNAPSHOT_LEN)? else {
            return Ok(None);
        };
        let snapshot = Snapshot::decode(&bytes)
            .map_err(|e| Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        if snapshot.name != name || snapshot.source != *source {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{} records another snapshot", path.display()),
            ));
        }
        Ok(Some(snapshot))
    }

    /// Snapshots of one source, or of every source, ordered by source, creation
    /// time and name.
    pub fn list_snapshots(&self, source: Option<&SourceId>) -> Result<Vec<Snapshot>, Error> {
        let sources = match source {
            Some(source) => vec![source.clone()],
            None => list_names(self.vfs(), &self.data_dir().join("sources"))?
                .iter()
                .filter_map(|name| SourceId::new(name).ok())
                .collect(),
        };
        let mut out = Vec::new();
        for source in &sources {
            for name in list_names(self.vfs(), &self.snapshots_dir(source))? {
                // Deleted between listing and reading: not an error.
                if let Some(snapshot) = self.snapshot(source, &name)? {
                    out.push(snapshot);
                }
            }
        }
        out.sort_by(|a, b| {
            (&a.source, a.created_unix_ms, &a.name).cmp(&(&b.source, b.created_unix_ms, &b.name))
        });
        Ok(out)
    }

    /// Deletes a snapshot and returns it. Launches made from it keep working: they
    /// record the root themselves. Fails with `NotFound` when it does not exist.
    pub fn delete_snapshot(&self, source: &SourceId, name: &str) -> Result<Snapshot, Error> {
        self.check_writable()?;
        let _guard = lock(&self.catalog.lock);
        self.delete_snapshot_locked(source, name)
    }

    fn delete_snapshot_locked(&self, source: &SourceId, name: &str) -> Result<Snapshot, Error> {
        let snapshot = self.snapshot(source, name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("source {source} has no snapshot named {name}"),
            )
        })?;
        let dir = self.snapshots_dir(source);
        let path = dir.join(name);
        self.vfs()
            .remove_file(&path)
            .map_err(|e| Error::io(format!("cannot delete {}", path.display()), e))?;
        sync_dir(self.vfs(), &dir)?;
        Ok(snapshot)
    }

    /// Deletes every snapshot that has expired at `now_unix_ms`: those whose own
    /// expiry time has come, and automatic ones the retention policy no longer
    /// keeps. Returns what was deleted.
    pub fn expire_snapshots(&self, now_unix_ms: u64) -> Result<Vec<Snapshot>, Error> {
        self.check_writable()?;
        let policy = self.retention_policy();
        let _guard = lock(&self.catalog.lock);
        let mut auto_by_source: BTreeMap<SourceId, Vec<Snapshot>> = BTreeMap::new();
        let mut doomed = Vec::new();
        for snapshot in self.list_snapshots(None)? {
            if snapshot.is_expired_at(now_unix_ms) {
                doomed.push(snapshot);
            } else if snapshot.kind == SnapshotKind::Auto {
                auto_by_source
                    .entry(snapshot.source.clone())
                    .or_default()
                    .push(snapshot);
            }
        }
        for auto in auto_by_source.into_values() {
            // Listed by creation time then name, so ties go to the first name.
            let created: Vec<u64> = auto.iter().map(|s| s.created_unix_ms).collect();
            let retained = policy.retained(&created, now_unix_ms);
            doomed.extend(
                auto.into_iter()
                    .zip(retained)
                    .filter_map(|(snapshot, keep)| (!keep).then_some(snapshot)),
            );
        }
        let mut removed = Vec::with_capacity(doomed.len());
        for snapshot in doomed {
            removed.push(self.delete_snapshot_locked(&snapshot.source, &snapshot.name)?);
        }
        Ok(removed)
    }
}

impl Store {
    /// Sets the policy used by [`Store::expire_snapshots`] and
    /// [`Store::create_auto_snapshot_if_due`]. The default is
    /// [`RetentionPolicy::default`]. Not persisted: set it after each open.
    pub fn set_retention_policy(&self, policy: RetentionPolicy) {
        *lock(&self.catalog.retention) = policy;
    }

    /// The policy for automatic snapshots.
    pub fn retention_policy(&self) -> RetentionPolicy {
        lock(&self.catalog.retention).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RetentionPolicy;
    use crate::testutil::{commit_disk, pack_bytes, sample_disk, source};
    use blockrep_core::Geometry;
    use std::fs;

    type PauseHook = Box<dyn FnOnce()>;

    thread_local! {
        /// Run once by the next snapshot taken on this thread, between reading
        /// the head and publishing the snapshot.
        static PAUSE: std::cell::RefCell<Option<PauseHook>> = const { std::cell::RefCell::new(None) };
    }

    /// The point between reading the head and publishing the snapshot, where a
    /// test stages what other threads do meanwhile.
    pub(super) fn pause_point() {
        if let Some(hook) = PAUSE.with(|pause| pause.borrow_mut().take()) {
            hook();
        }
    }

    const MINUTE_MS: u64 = 60_000;
    const HOUR_MS: u64 = 60 * MINUTE_MS;
    const DAY_MS: u64 = 24 * HOUR_MS;
    const T0_MS: u64 = 19_000 * DAY_MS;

    fn store_with_head() -> (tempfile::TempDir, Store, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let geometry = Geometry::new(20 * 4096 + 300, 4096).unwrap();
        let disk = sample_disk(geometry.disk_size_bytes() as usize, 3);
        commit_disk(&store, &source(), &disk, geometry, 1);
        (dir, store, disk)
    }

    #[test]
    fn record_round_trips_and_detects_damage() {
        let snapshot = Snapshot {
            name: "before-upgrade".into(),
            source: source(),
            kind: SnapshotKind::Cutover,
            epoch: 9,
            root: ChunkId([7; 32]),
            created_unix_ms: 123,
            expires_unix_ms: 456,
            consistency: Consistency::Quiesced,
        };
        let bytes = snapshot.encode();
        assert_eq!(bytes.len(), SNAPSHOT_LEN);
        assert_eq!(Snapshot::decode(&bytes).unwrap(), snapshot);
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x04;
            assert!(Snapshot::decode(&damaged).is_err(), "flip at {i}");
        }
        assert!(Snapshot::decode(&bytes[..200]).is_err());
    }

    #[test]
    fn create_list_get_delete() {
        let (_dir, store, _) = store_with_head();
        let head = store.head(&source()).unwrap().unwrap();
        let named = store
            .create_snapshot(&source(), Some("pre-test"), None, T0_MS)
            .unwrap();
        assert_eq!(named.root, head.root);
        assert_eq!(named.epoch, 1);
        assert_eq!(named.kind, SnapshotKind::Manual);
        assert_eq!(named.expires_unix_ms, 0);
        let generated = store
            .create_snapshot(&source(), None, Some(Duration::from_secs(60)), T0_MS + 1)
            .unwrap();
        assert_eq!(generated.name, format!("s-1-{}", T0_MS + 1));
        assert_eq!(generated.expires_unix_ms, T0_MS + 1 + 60_000);
        // Same millisecond again: the generated name moves aside.
        let again = store
            .create_snapshot(&source(), None, None, T0_MS + 1)
            .unwrap();
        assert_eq!(again.name, format!("s-1-{}-2", T0_MS + 1));

        assert_eq!(
            store.list_snapshots(Some(&source())).unwrap(),
            vec![named.clone(), generated.clone(), again.clone()]
        );
        assert_eq!(store.list_snapshots(None).unwrap().len(), 3);
        let other = SourceId::new("other").unwrap();
        assert!(store.list_snapshots(Some(&other)).unwrap().is_empty());
        assert_eq!(
            store.snapshot(&source(), "pre-test").unwrap(),
            Some(named.clone())
        );
        assert_eq!(store.snapshot(&source(), "nope").unwrap(), None);

        // Survives a reopen.
        let reopened = Store::open(store.data_dir()).unwrap();
        assert_eq!(reopened.list_snapshots(None).unwrap().len(), 3);

        assert_eq!(store.delete_snapshot(&source(), "pre-test").unwrap(), named);
        let err = store.delete_snapshot(&source(), "pre-test").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(store.list_snapshots(None).unwrap(), vec![generated, again]);
    }

    #[test]
    fn create_refuses_bad_requests() {
        let (_dir, store, _) = store_with_head();
        store
            .create_snapshot(&source(), Some("a"), None, T0_MS)
            .unwrap();
        let exists = store
            .create_snapshot(&source(), Some("a"), None, T0_MS)
            .unwrap_err();
        assert_eq!(exists.kind(), ErrorKind::AlreadyExists);
        let no_head = store
            .create_snapshot(&SourceId::new("idle").unwrap(), None, None, T0_MS)
            .unwrap_err();
        assert_eq!(no_head.kind(), ErrorKind::NotFound);
        for bad in ["", "..", "a/b", ".hidden", "Upper", &"x".repeat(65)] {
            let err = store
                .create_snapshot(&source(), Some(bad), None, T0_MS)
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Invalid, "{bad:?}");
        }
        let zero_ttl = store
            .create_snapshot(&source(), None, Some(Duration::ZERO), T0_MS)
            .unwrap_err();
        assert_eq!(zero_ttl.kind(), ErrorKind::Invalid);
        assert_eq!(store.list_snapshots(None).unwrap().len(), 1);
    }

    #[test]
    fn creating_a_snapshot_copies_no_data() {
        let (dir, store, _) = store_with_head();
        let blobs_before = store.blob_count();
        let packs_before = pack_bytes(dir.path());
        for i in 0..5 {
            store
                .create_snapshot(&source(), Some(&format!("s{i}")), None, T0_MS + i)
                .unwrap();
        }
        assert_eq!(store.blob_count(), blobs_before);
        assert_eq!(pack_bytes(dir.path()), packs_before);
        let snapshot_file = dir
            .path()
            .join("sources")
            .join(source().as_str())
            .join("snapshots")
            .join("s0");
        assert_eq!(
            fs::metadata(snapshot_file).unwrap().len(),
            SNAPSHOT_LEN as u64
        );
    }

    #[test]
    fn snapshots_keep_their_root_as_the_head_moves() {
        let (_dir, store, disk) = store_with_head();
        let first = store
            .create_snapshot(&source(), Some("first"), None, T0_MS)
            .unwrap();
        let geometry = Geometry::new(disk.len() as u64, 4096).unwrap();
        let head2 = commit_disk(&store, &source(), &sample_disk(disk.len(), 5), geometry, 2);
        let second = store
            .create_snapshot(&source(), Some("second"), None, T0_MS + 1)
            .unwrap();
        assert_ne!(first.root, second.root);
        assert_eq!(second.root, head2.root);
        assert_eq!((first.epoch, second.epoch), (1, 2));
        assert_eq!(
            store.snapshot(&source(), "first").unwrap().unwrap().root,
            first.root
        );
    }

    #[test]
    fn manual_snapshots_expire_only_by_ttl() {
        let (_dir, store, _) = store_with_head();
        let forever = store
            .create_snapshot(&source(), Some("forever"), None, T0_MS)
            .unwrap();
        let hour = store
            .create_snapshot(
                &source(),
                Some("one-hour"),
                Some(Duration::from_secs(3600)),
                T0_MS,
            )
            .unwrap();
        assert!(
            store
                .expire_snapshots(T0_MS + HOUR_MS - 1)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.expire_snapshots(T0_MS + HOUR_MS).unwrap(), vec![hour]);
        assert!(
            store
                .expire_snapshots(T0_MS + 365 * DAY_MS)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.list_snapshots(None).unwrap(), vec![forever]);
    }

    #[test]
    fn auto_snapshots_follow_the_policy_over_eight_days() {
        let (_dir, store, _) = store_with_head();
        store
            .create_snapshot(&source(), Some("manual"), None, T0_MS)
            .unwrap();
        let cutover = store
            .create_snapshot_of_kind(&source(), SnapshotKind::Cutover, None, None, T0_MS)
            .unwrap();
        assert_eq!(cutover.name, format!("cutover-1-{T0_MS}"));
        let end = T0_MS + 8 * DAY_MS;
        let mut now = T0_MS;
        let mut taken = 0;
        let mut removed = 0;
        // One check per 10 minutes; the pure tests cover checks off the slot grid.
        while now <= end {
            if let Some(snapshot) = store.create_auto_snapshot_if_due(&source(), now).unwrap() {
                assert_eq!(snapshot.kind, SnapshotKind::Auto);
                assert_eq!(snapshot.name, format!("auto-{now}"));
                taken += 1;
            }
            removed += store.expire_snapshots(now).unwrap().len();
            now += 10 * MINUTE_MS;
        }
        assert_eq!(taken, 8 * 144 + 1);
        let all = store.list_snapshots(Some(&source())).unwrap();
        let auto: Vec<u64> = all
            .iter()
            .filter(|s| s.kind == SnapshotKind::Auto)
            .map(|s| s.created_unix_ms)
            .collect();
        assert_eq!(removed, taken - auto.len());
        // 6 in the last hour, 24 hourly, 7 daily; the newest counts in all three.
        assert_eq!(auto.len(), 6 + 23 + 6);
        assert_eq!(auto.iter().filter(|&&t| end - t < HOUR_MS).count(), 6);
        assert_eq!(auto.iter().filter(|&&t| end - t < DAY_MS).count(), 6 + 23);
        assert_eq!(auto.first(), Some(&(T0_MS + 2 * DAY_MS)));
        // Manual and cutover snapshots without a TTL are untouched.
        assert_eq!(all.len(), auto.len() + 2);
    }

    #[test]
    fn a_configured_policy_is_used() {
        let (_dir, store, _) = store_with_head();
        store.set_retention_policy(
            RetentionPolicy::new(&[crate::RetentionTier {
                every: Duration::from_secs(60),
                keep_for: Duration::from_secs(120),
            }])
            .unwrap(),
        );
        for minute in 0..10 {
            let now = T0_MS + minute * MINUTE_MS;
            assert!(
                store
                    .create_auto_snapshot_if_due(&source(), now)
                    .unwrap()
                    .is_some()
            );
            assert!(
                store
                    .create_auto_snapshot_if_due(&source(), now + 1)
                    .unwrap()
                    .is_none()
            );
            store.expire_snapshots(now).unwrap();
        }
        let kept: Vec<u64> = store
            .list_snapshots(None)
            .unwrap()
            .iter()
            .map(|s| s.created_unix_ms)
            .collect();
        assert_eq!(kept, vec![T0_MS + 8 * MINUTE_MS, T0_MS + 9 * MINUTE_MS]);
    }

    /// The race of a snapshot with a commit and a collection: the snapshot
    /// reads head 1; meanwhile head 2 is committed (head 1's chunks are now
    /// named by nothing durable) and a collection starts; then the snapshot is
    /// published naming root 1. The snapshot's blobs must survive, and later
    /// collections must keep working.
    #[test]
    fn a_collection_racing_a_snapshot_keeps_what_it_names() {
        use crate::GcOptions;
        use crate::testutil::root_disk;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex, mpsc};

        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        // One record per pack: every blob of epoch 1 alone in a sealed pack
        // that a collection deletes once nothing names it.
        store.set_pack_size_max_bytes(1);
        let geometry = Geometry::new(20 * 4096 + 300, 4096).unwrap();
        let disk1 = sample_disk(geometry.disk_size_bytes() as usize, 3);
        let disk2 = sample_disk(geometry.disk_size_bytes() as usize, 5);
        let head1 = commit_disk(&store, &source(), &disk1, geometry, 1);

        let paused_ran = Arc::new(Mutex::new(None));
        let gc_thread = Arc::new(Mutex::new(None));
        {
            let (store, paused_ran, gc_thread) = (
                Arc::clone(&store),
                Arc::clone(&paused_ran),
                Arc::clone(&gc_thread),
            );
            PAUSE.with(|pause| {
                *pause.borrow_mut() = Some(Box::new(move || {
                    // The head moves on (on another thread: this one may hold
                    // the fence, which the commit takes too).
                    let committer = Arc::clone(&store);
                    std::thread::spawn(move || {
                        commit_disk(&committer, &source(), &disk2, geometry, 2);
                    })
                    .join()
                    .unwrap();
                    let started = Arc::new(AtomicBool::new(false));
                    let (done_tx, done_rx) = mpsc::channel();
                    let collector = Arc::clone(&store);
                    let collector_started = Arc::clone(&started);
                    *gc_thread.lock().unwrap() = Some(std::thread::spawn(move || {
                        collector_started.store(true, Ordering::SeqCst);
                        let result = collector.gc(&GcOptions::default());
                        let _ = done_tx.send(());
                        result
                    }));
                    // Until the collection has finished, or it cannot list the
                    // roots because this snapshot holds the fence: it then
                    // lists them after the publish.
                    loop {
                        if done_rx.try_recv().is_ok()
                            || (started.load(Ordering::SeqCst)
                                && store.blobs.fence().fence_is_held())
                        {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    *paused_ran.lock().unwrap() = Some(());
                }));
            });
        }
        let snapshot = store
            .create_snapshot(&source(), Some("raced"), None, T0_MS)
            .unwrap();
        assert!(paused_ran.lock().unwrap().is_some(), "the pause point ran");
        assert_eq!(snapshot.root, head1.root);
        assert_eq!(snapshot.epoch, 1);
        let report = gc_thread
            .lock()
            .unwrap()
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("the racing collection succeeds");
        assert!(report.roots_marked >= 1);

        // The snapshot is whole: it verifies, reads back as disk 1, and later
        // collections (which mark from it) work and keep it whole.
        let verified = store.verify(Some(&source()), Some("raced")).unwrap();
        assert!(verified.is_clean(), "{:#?}", verified.damaged);
        assert_eq!(root_disk(&store, &snapshot.root), disk1);
        let again = store.gc(&GcOptions::default()).unwrap();
        assert_eq!(again.roots_marked, 2);
        assert_eq!(root_disk(&store, &snapshot.root), disk1);
        assert!(store.verify(None, None).unwrap().is_clean());
    }
}

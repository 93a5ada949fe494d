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

use crate::authentic::{AUTH_TRAILER_LEN, RecordPlace};
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
    /// Taken of a launch volume (what clients wrote to it, frozen at one
    /// instant: [`Store::snapshot_launch`]); expires only by its TTL.
    Launch = 4,
}

impl SnapshotKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => SnapshotKind::Manual,
            2 => SnapshotKind::Auto,
            3 => SnapshotKind::Cutover,
            4 => SnapshotKind::Launch,
            _ => return None,
        })
    }

    /// Prefix of generated names.
    fn name_prefix(self) -> &'static str {
        match self {
            SnapshotKind::Manual => "s",
            SnapshotKind::Auto => "auto",
            SnapshotKind::Cutover => "cutover",
            SnapshotKind::Launch => "launch",
        }
    }
}

/// What a snapshot names: a root, the epoch it came from and its
/// consistency (a source's head's, or a launch's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SnapshotOf {
    pub(crate) epoch: u64,
    pub(crate) root: ChunkId,
    pub(crate) consistency: Consistency,
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
    pub(crate) fn snapshots_dir(&self, source: &SourceId) -> PathBuf {
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
        self.create_snapshot_locked(source, kind, name, ttl, now_unix_ms, None)
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
        self.create_snapshot_locked(source, SnapshotKind::Auto, None, None, now_unix_ms, None)
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
        of: Option<SnapshotOf>,
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
        let _fence = self.publishing_fence(now_unix_ms)?;
        let head = match of {
            Some(of) => of,
            None => self
                .head(source)?
                .map(|head| SnapshotOf {
                    epoch: head.epoch,
                    root: head.root,
                    consistency: head.consistency,
                })
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("source {source} has no committed head to snapshot"),
                    )
                })?,
        };
        self.note_snapshot_root(&head.root);
        if self.remote.is_some() {
            // In a bucket, another server may serve the source and this
            // copy of its head be old: only the lease holder snapshots it.
            self.check_lease(source, now_unix_ms)?;
        }
        // A root a collection removed (an old head read here) is never named.
        self.blobs.require_present("the snapshot", [&head.root])?;
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
        let place = RecordPlace {
            kind: "snapshot",
            source,
            name: &snapshot.name,
        };
        let record = self.authenticated(place, snapshot.encode());
        publish_atomic(self.vfs(), &dir.join(&snapshot.name), &record)?;
        Ok(snapshot)
    }

    /// [`Store::create_snapshot_of_kind`] of a root other than the source's
    /// head (a launch's), under the catalog's lock.
    pub(crate) fn create_snapshot_of_root(
        &self,
        source: &SourceId,
        kind: SnapshotKind,
        name: Option<&str>,
        ttl: Option<Duration>,
        now_unix_ms: u64,
        of: SnapshotOf,
    ) -> Result<Snapshot, Error> {
        self.check_writable()?;
        let _guard = lock(&self.catalog.lock);
        self.create_snapshot_locked(source, kind, name, ttl, now_unix_ms, Some(of))
    }

    /// Records the root a snapshot is about to name, and its pages, for a
    /// collection that may be running, as a commit does: belt and braces to the
    /// fence, so that nothing the snapshot names can be judged dead by a
    /// collection that started marking before the snapshot was published. A
    /// root that cannot be read is left to `verify` to report: the snapshot
    /// still records what the head names.
    pub(crate) fn note_snapshot_root(&self, root_id: &ChunkId) {
        self.blobs.fence().note(root_id);
        if !self.blobs.fence().is_tracking() {
            return;
        }
        // A machine root: each volume's disk root and its pages.
        let Ok(volumes) = self.volume_roots(root_id) else {
            return;
        };
        for (_, disk_root) in volumes {
            self.blobs.fence().note(&disk_root);
            if let Ok(root) = self.read_root(&disk_root) {
                self.blobs.fence().note_all(root.page_ids());
            }
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
        let Some(bytes) = read_small_file(self.vfs(), &path, SNAPSHOT_LEN + AUTH_TRAILER_LEN)?
        else {
            return Ok(None);
        };
        let place = RecordPlace {
            kind: "snapshot",
            source,
            name,
        };
        let snapshot = self
            .authentic(place, &bytes, SNAPSHOT_LEN)
            .and_then(Snapshot::decode)
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
        self.expire_snapshots_except(now_unix_ms, &Default::default())
    }

    /// [`Store::expire_snapshots`] of every source but those in `except`
    /// (in a shared bucket, the sources another server serves: it expires
    /// their snapshots from its own, newer view of them).
    pub fn expire_snapshots_except(
        &self,
        now_unix_ms: u64,
        except: &std::collections::HashSet<SourceId>,
    ) -> Result<Vec<Snapshot>, Error> {
        self.check_writable()?;
        let policy = self.retention_policy();
        let _guard = lock(&self.catalog.lock);
        let mut auto_by_source: BTreeMap<SourceId, Vec<Snapshot>> = BTreeMap::new();
        let mut doomed = Vec::new();
        for snapshot in self.list_snapshots(None)? {
            if except.contains(&snapshot.source) {
                continue;
            }
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
mod tests;

//! Launch volumes: writable copy-on-write views of a snapshot.
//!
//! A launch starts as its base snapshot's root. Writes never touch that root,
//! the snapshot or the source's head. They go to the volume's overlay
//! (`launch/overlay.rs`): 4 KiB blocks in a sparse file of this server, with
//! no hashing and no store insert, durable at every flush
//! ([`LaunchVolume::sync`], an NBD flush or FUA). Blocks not written are
//! read from the launch's root through the store's decoded chunk cache
//! (`chunk_cache.rs`).
//!
//! A fold ([`LaunchVolume::fold`], `launch/fold.rs`) moves the overlay into
//! the content-addressed store: the written chunks are hashed and stored, the
//! changed index pages and a new root too, every blob is made durable, and
//! only then does the launch's head move to that root; the folded blocks
//! leave the overlay after that. The server folds in the background and
//! whenever a root is needed (failback, finalize, a standby's follow). After a
//! crash or restart a launch shows its head with its overlay over it: every
//! write a flush acknowledged. In a bucket, and for an encrypted source, a
//! flush also folds (the overlay is this server's, and it holds plaintext).
//! Launch names are global (not per source).
//!
//! # Files
//!
//! `DATA/launches/NAME/` holds two files. The directory is built as
//! `DATA/launches/.NAME.tmp/` and renamed into place, so a launch exists whole or
//! not at all; deletion renames it to `.NAME.deleting` before removing it.
//!
//! `meta` is written once at creation; `head` is published atomically at
//! creation and by every fold that changed something. A volume's overlay is
//! in `DATA/overlays/` (see `launch/overlay.rs`), outside the launch's
//! directory: it is this server's, never the bucket's. The layouts of `meta` and `head` are in
//! `format.rs` (`LAUNCH_META_MAGIC`, `LAUNCH_HEAD_MAGIC`).

mod fold;
mod freeze;
mod materialize;
mod overlay;
mod pages;
mod standby;
mod volume;
mod workflow;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use blockrep_core::{ChunkId, Consistency, SourceId, VolumeName};

use crate::authentic::{AUTH_TRAILER_LEN, RecordPlace, key_error};
use crate::catalog::{list_names, validate_name};
use crate::error::{Error, ErrorKind};
use crate::format::{
    LAUNCH_HEAD_LEN as HEAD_LEN, LAUNCH_HEAD_MAGIC as HEAD_MAGIC, LAUNCH_META_LEN as META_LEN,
    LAUNCH_META_MAGIC as META_MAGIC, NAME_FIELD_LEN, check_record, get_name, id_at,
    label_from_byte, put_name, seal_with_crc, u64_at,
};
use crate::fsutil::{
    create_dir_durable, publish_atomic, read_small_file, remove_dir_durable, remove_leftover,
    sync_dir,
};
use crate::mutex::lock;
use crate::store::{Store, StoredRoot, choose_volume, single_volume};

pub use materialize::{Materialization, MaterializeProgress, MaterializeStep};
pub use overlay::OVERLAY_BLOCK_BYTES;
pub use standby::Rebased;
pub use volume::{LAUNCH_PAGES_CACHED_MAX, LaunchVolume};
pub use workflow::{
    CHECK_OUTPUT_TAIL_MAX_BYTES, CHECK_TEXT_MAX_BYTES, LAUNCH_CHECKS_MAX, LaunchCheck,
    LaunchWorkflow, check_output_tail,
};

/// What a launch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LaunchKind {
    /// A test launch: a drill, thrown away afterwards.
    Test = 1,
    /// The cutover launch: the volume the workload moves to.
    Cutover = 2,
    /// A warm standby: follows its source's newest committed point while
    /// it is unwritten, so a failover to it needs no copy.
    Standby = 3,
}

impl LaunchKind {
    /// The kind's name, as the API and NBD listings spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchKind::Test => "test",
            LaunchKind::Cutover => "cutover",
            LaunchKind::Standby => "standby",
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => LaunchKind::Test,
            2 => LaunchKind::Cutover,
            3 => LaunchKind::Standby,
            _ => return None,
        })
    }
}

/// A launch: its immutable origin and its last flushed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchInfo {
    /// Name, unique in the store.
    pub name: String,
    /// Source of the base snapshot.
    pub source: SourceId,
    /// Name of the base snapshot (which may since have been deleted).
    pub snapshot: String,
    /// What the launch is for.
    pub kind: LaunchKind,
    /// Root the launch started from: the snapshot's root.
    pub base_root: ChunkId,
    /// Epoch of the base snapshot.
    pub base_epoch: u64,
    /// When the launch was created, Unix ms.
    pub created_unix_ms: u64,
    /// Root of the launch's last flushed state (`base_root` until written).
    pub root: ChunkId,
    /// Flushes that moved the root since creation.
    pub generation: u64,
    /// When `root` was flushed (the creation time for generation 0), Unix ms.
    pub flushed_unix_ms: u64,
    /// The consistency of the base root, inherited from the snapshot: what
    /// the launch started as (its own writes are the user's).
    pub consistency: Consistency,
}

impl LaunchInfo {
    fn encode_meta(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_LEN);
        out.extend_from_slice(&META_MAGIC);
        out.push(self.kind as u8);
        out.push(self.name.len() as u8);
        out.push(self.source.as_str().len() as u8);
        out.push(self.snapshot.len() as u8);
        out.push(self.consistency.to_byte());
        out.extend_from_slice(&[0; 3]);
        put_name(&mut out, &self.name);
        put_name(&mut out, self.source.as_str());
        put_name(&mut out, &self.snapshot);
        out.extend_from_slice(self.base_root.as_bytes());
        out.extend_from_slice(&self.base_epoch.to_le_bytes());
        out.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        seal_with_crc(&mut out);
        debug_assert_eq!(out.len(), META_LEN);
        out
    }

    /// Where this launch's `kind` record is, for its authentication.
    fn place(&self, kind: &'static str) -> RecordPlace<'_> {
        RecordPlace {
            kind,
            source: &self.source,
            name: &self.name,
        }
    }

    fn encode_head(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_LEN);
        out.extend_from_slice(&HEAD_MAGIC);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(self.root.as_bytes());
        out.extend_from_slice(&self.flushed_unix_ms.to_le_bytes());
        seal_with_crc(&mut out);
        debug_assert_eq!(out.len(), HEAD_LEN);
        out
    }

    pub(crate) fn decode(meta: &[u8], head: &[u8]) -> Result<Self, Error> {
        check_record("launch meta file", meta, &META_MAGIC, META_LEN)?;
        check_record("launch head file", head, &HEAD_MAGIC, HEAD_LEN)?;
        let corrupt =
            |what: &str| Error::new(ErrorKind::Corrupt, format!("launch meta file: {what}"));
        if meta[13..16].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved bytes are not zero"));
        }
        let kind = LaunchKind::from_u8(meta[8]).ok_or_else(|| corrupt("unknown kind"))?;
        let name_field = |at: usize, len: u8| get_name(&meta[at..at + NAME_FIELD_LEN], len);
        let name = name_field(16, meta[9]).ok_or_else(|| corrupt("invalid launch name"))?;
        let source = name_field(80, meta[10])
            .and_then(|s| SourceId::new(&s).ok())
            .ok_or_else(|| corrupt("invalid source id"))?;
        let snapshot = name_field(144, meta[11]).ok_or_else(|| corrupt("invalid snapshot name"))?;
        Ok(Self {
            name,
            source,
            snapshot,
            kind,
            base_root: id_at(meta, 208),
            base_epoch: u64_at(meta, 240),
            created_unix_ms: u64_at(meta, 248),
            generation: u64_at(head, 8),
            root: id_at(head, 16),
            flushed_unix_ms: u64_at(head, 48),
            consistency: label_from_byte("launch meta file", meta[12])?,
        })
    }
}

impl Store {
    pub(crate) fn launches_dir(&self) -> PathBuf {
        self.data_dir().join("launches")
    }

    /// Creates a launch named `launch_name` from snapshot `snapshot_name` of
    /// `source`. O(1) in the disk size: the launch starts as the snapshot's root.
    /// Fails with `NotFound` when the snapshot does not exist, `AlreadyExists` when
    /// the launch name is taken, `Invalid` for a bad name. `now_unix_ms` is
    /// recorded as its creation time.
    pub fn create_launch(
        &self,
        source: &SourceId,
        snapshot_name: &str,
        launch_name: &str,
        kind: LaunchKind,
        now_unix_ms: u64,
    ) -> Result<LaunchInfo, Error> {
        let workflow = LaunchWorkflow::default();
        self.create_launch_with(
            source,
            snapshot_name,
            launch_name,
            kind,
            now_unix_ms,
            &workflow,
        )
    }

    /// [`Store::create_launch`] with a workflow record (expiry, checks,
    /// following), which exists from the moment the launch does.
    pub fn create_launch_with(
        &self,
        source: &SourceId,
        snapshot_name: &str,
        launch_name: &str,
        kind: LaunchKind,
        now_unix_ms: u64,
        workflow: &LaunchWorkflow,
    ) -> Result<LaunchInfo, Error> {
        self.check_writable()?;
        validate_name("launch", launch_name)?;
        let _guard = lock(&self.catalog.lock);
        let snapshot = self.snapshot(source, snapshot_name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("source {source} has no snapshot named {snapshot_name}"),
            )
        })?;
        if self.launch(launch_name)?.is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a launch named {launch_name} already exists"),
            ));
        }
        // The base must be readable now, not at the first read of the volume:
        // every volume's root, for a machine.
        if let StoredRoot::Machine(machine) = self.read_stored_root(&snapshot.root)? {
            for (_, root) in machine.volumes() {
                self.read_root(root)?;
            }
        }
        let created_unix_ms = now_unix_ms;
        let info = LaunchInfo {
            name: launch_name.to_owned(),
            source: source.clone(),
            snapshot: snapshot.name,
            kind,
            base_root: snapshot.root,
            base_epoch: snapshot.epoch,
            created_unix_ms,
            root: snapshot.root,
            generation: 0,
            flushed_unix_ms: created_unix_ms,
            consistency: snapshot.consistency,
        };
        let launches = self.launches_dir();
        let vfs = self.vfs();
        create_dir_durable(vfs, &launches)?;
        let building = launches.join(format!(".{launch_name}.tmp"));
        remove_leftover(vfs, &building)?;
        // A launch of this name deleted by a run that stopped before its
        // overlays went must not lend them to this one.
        self.remove_overlays(launch_name)?;
        create_dir_durable(vfs, &building)?;
        self.publish_launch_meta(&building, &info)?;
        self.publish_launch_head(&building, &info)?;
        if !workflow.is_default() {
            self.publish_launch_workflow(&building, workflow)?;
        }
        let path = launches.join(launch_name);
        vfs.rename(&building, &path)
            .map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))?;
        sync_dir(vfs, &launches)?;
        Ok(info)
    }

    /// The launch `name`, if it exists.
    pub fn launch(&self, name: &str) -> Result<Option<LaunchInfo>, Error> {
        self.read_launch(name, true)
    }

    /// The launch `name`, if it exists; checked against its MAC and witness
    /// when `authentic` (everything but deleting it: a launch whose records
    /// cannot be vouched for, or whose keys are gone, can still be deleted).
    pub(crate) fn read_launch(
        &self,
        name: &str,
        authentic: bool,
    ) -> Result<Option<LaunchInfo>, Error> {
        validate_name("launch", name)?;
        let dir = self.launches_dir().join(name);
        let vfs = self.vfs();
        let Some(meta) = read_small_file(vfs, &dir.join("meta"), META_LEN + AUTH_TRAILER_LEN)?
        else {
            return Ok(None);
        };
        let head = read_small_file(vfs, &dir.join("head"), HEAD_LEN + AUTH_TRAILER_LEN)?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("launch {name} has a meta file but no head"),
                )
            })?;
        let in_launch = |e: Error| Error::new(e.kind(), format!("launch {name}: {e}"));
        // The records name their source, whose key authenticates them: read
        // them (checksums only) first, then check that they are authentic.
        fn record(bytes: &[u8], len: usize) -> &[u8] {
            bytes.get(..len).unwrap_or(bytes)
        }
        let info = LaunchInfo::decode(record(&meta, META_LEN), record(&head, HEAD_LEN))
            .map_err(in_launch)?;
        if info.name != name {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{} records another launch", dir.display()),
            ));
        }
        if !authentic {
            return Ok(Some(info));
        }
        self.authentic(info.place("launch meta"), &meta, META_LEN)
            .and_then(|_| self.authentic(info.place("launch head"), &head, HEAD_LEN))
            .map_err(in_launch)?;
        // A launch witnessed under one source whose records name another
        // (a clear one, whose records need no MAC) was replaced. Records of
        // an encrypted source are bound to it by their MAC already, so only
        // a clear launch looks through the key directory.
        let witnessed_by = if self.keyring().is_encrypted(&info.source) {
            None
        } else {
            self.keyring()
                .launch_witnessed_by(name)
                .map_err(|e| in_launch(key_error(e)))?
        };
        if let Some(owner) = witnessed_by.filter(|owner| *owner != info.source) {
            return Err(in_launch(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "its records name source {}, but its head is witnessed under source \
                     {owner}: they were replaced",
                    info.source
                ),
            )));
        }
        self.keyring()
            .check_launch(&info.source, name, (info.generation, info.root.0))
            .map_err(|e| in_launch(key_error(e)))?;
        Ok(Some(info))
    }

    /// Publishes `info`'s meta record into the launch directory `dir`.
    pub(crate) fn publish_launch_meta(&self, dir: &Path, info: &LaunchInfo) -> Result<(), Error> {
        let meta = self.authenticated(info.place("launch meta"), info.encode_meta());
        publish_atomic(self.vfs(), &dir.join("meta"), &meta)
    }

    /// Publishes `info`'s head (generation, root, flush time) into the
    /// launch directory `dir`, then witnesses it in the key directory if its
    /// source is encrypted (the head first: a witness that lags its head is
    /// no alarm, one ahead of it would be).
    pub(crate) fn publish_launch_head(&self, dir: &Path, info: &LaunchInfo) -> Result<(), Error> {
        let head = self.authenticated(info.place("launch head"), info.encode_head());
        publish_atomic(self.vfs(), &dir.join("head"), &head)?;
        // As for a source's head: a failure here costs only the rollback
        // check of this one head.
        if let Err(e) =
            self.keyring()
                .witness_launch(&info.source, &info.name, info.generation, &info.root.0)
        {
            eprintln!(
                "blockrep-store: cannot witness the head of launch {}: {e}",
                info.name
            );
        }
        Ok(())
    }

    /// Launches of one source, or all of them, ordered by name.
    pub fn list_launches(&self, source: Option<&SourceId>) -> Result<Vec<LaunchInfo>, Error> {
        self.read_launches(source, true)
    }

    /// [`Store::list_launches`], each read as [`Store::read_launch`] says.
    pub(crate) fn read_launches(
        &self,
        source: Option<&SourceId>,
        authentic: bool,
    ) -> Result<Vec<LaunchInfo>, Error> {
        let mut out = Vec::new();
        for name in list_names(self.vfs(), &self.launches_dir())? {
            // Deleted between listing and reading: not an error.
            if let Some(info) = self.read_launch(&name, authentic)?
                && source.is_none_or(|s| *s == info.source)
            {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Deletes a launch and everything it wrote (its blobs become garbage). Fails
    /// with `Busy` while a volume of it is open, `NotFound` when it does not exist.
    pub fn delete_launch(&self, name: &str) -> Result<(), Error> {
        self.check_writable()?;
        validate_name("launch", name)?;
        let _guard = lock(&self.catalog.lock);
        let volume_prefix = format!("{name}/");
        let open = lock(&self.catalog.open_launches)
            .iter()
            .any(|(key, volume)| {
                (key == name || key.starts_with(&volume_prefix)) && volume.strong_count() > 0
            });
        if open {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("launch {name} is open; close it before deleting it"),
            ));
        }
        let Some(info) = self.read_launch(name, false)? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no launch named {name}"),
            ));
        };
        self.remove_launch_with(name, Some(&info.source), || {
            remove_dir_durable(self.vfs(), &self.launches_dir(), name)
        })
    }

    /// Removes what this data directory keeps of launch `name`, in the order
    /// of a deletion: what its volumes wrote since their last fold first (a
    /// stop in between leaves a launch without its overlays, being deleted
    /// anyway, never overlays without their launch), then its records
    /// (`remove_records`), then the witness of its head kept for `source`.
    pub(crate) fn remove_launch_with(
        &self,
        name: &str,
        source: Option<&SourceId>,
        remove_records: impl FnOnce() -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.remove_overlays(name)?;
        remove_records()?;
        // A witness left behind would make a later clear launch of this name
        // read as replaced (an encrypted one replaces it): a failure here is
        // reported, and the witness file is then to be removed by hand.
        if let Some(source) = source
            && let Err(e) = self.keyring().forget_launch(source, name)
        {
            eprintln!("blockrep-store: launch {name}: cannot remove its head's witness: {e}");
        }
        Ok(())
    }

    /// Opens a launch for reading and writing (reading only, on a store opened
    /// read-only). A launch already open in this
    /// process is shared: every caller gets the same volume, so writes are never
    /// split between two volumes that would overwrite each other's flushes.
    /// A launch of a machine of several volumes is opened a volume at a time
    /// ([`Store::open_launch_volume`]).
    pub fn open_launch(self: &Arc<Self>, name: &str) -> Result<Arc<LaunchVolume>, Error> {
        self.open_launch_volume(name, None)
    }

    /// Opens volume `volume` of launch `name` (with no name, its only volume),
    /// shared as [`Store::open_launch`] says. A launch of a single-disk
    /// source has one volume, [`blockrep_core::SINGLE_VOLUME_NAME`]. Fails
    /// with `NotFound` for a launch or volume that does not exist and
    /// `Invalid` when no volume is named and the launch has several.
    pub fn open_launch_volume(
        self: &Arc<Self>,
        name: &str,
        volume: Option<&str>,
    ) -> Result<Arc<LaunchVolume>, Error> {
        validate_name("launch", name)?;
        let _guard = lock(&self.catalog.lock);
        // Open already (every NBD connection asks): nothing to read. A
        // machine's volume opened without its name is found after the read.
        let cached = match volume {
            Some(volume) => format!("{name}/{volume}"),
            None => name.to_owned(),
        };
        if let Some(open) = lock(&self.catalog.open_launches)
            .get(&cached)
            .and_then(upgrade)
        {
            return Ok(open);
        }
        let info = self
            .launch(name)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no launch named {name}")))?;
        let in_launch = |e: Error| Error::new(e.kind(), format!("launch {name}: {e}"));
        // One read of the launch's root: a single disk's is the volume's
        // root itself (its one volume `disk`, opened under the launch's
        // name); a machine's names the volume's root.
        let (volume_name, root_id, decoded) = match self.read_stored_root(&info.root)? {
            StoredRoot::Disk(root) => {
                choose_volume(&single_volume(info.root), volume).map_err(in_launch)?;
                (None, info.root, Some(root))
            }
            StoredRoot::Machine(machine) => {
                let (chosen, root_id) = choose_volume(&machine, volume).map_err(in_launch)?;
                (Some(chosen.clone()), *root_id, None)
            }
        };
        let key = match &volume_name {
            Some(volume) => format!("{name}/{volume}"),
            None => name.to_owned(),
        };
        let mut open = lock(&self.catalog.open_launches);
        if let Some(volume) = open.get(&key).and_then(upgrade) {
            return Ok(volume);
        }
        let root = match decoded {
            Some(root) => root,
            None => self.read_root(&root_id)?,
        };
        let volume = Arc::new(LaunchVolume::new(
            Arc::clone(self),
            info,
            root,
            volume_name,
            key.clone(),
        )?);
        let erased: Arc<dyn Any + Send + Sync> = volume.clone();
        open.insert(key, Arc::downgrade(&erased));
        Ok(volume)
    }

    /// The volumes of a launch, sorted by name: one,
    /// [`blockrep_core::SINGLE_VOLUME_NAME`], for a single-disk source's
    /// launch. Each is served over NBD as `LAUNCH/VOLUME` (a single disk's
    /// as `LAUNCH` too).
    pub fn launch_volumes(&self, info: &LaunchInfo) -> Result<Vec<VolumeName>, Error> {
        Ok(self
            .volume_roots(&info.root)?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }
}

/// The volume behind an entry of the catalog's open launches, if it is
/// still open (the catalog holds volumes without their type).
fn upgrade(entry: &Weak<dyn Any + Send + Sync>) -> Option<Arc<LaunchVolume>> {
    entry.upgrade()?.downcast::<LaunchVolume>().ok()
}

impl Store {
    /// Launches (and volumes, for a machine's) with an overlay on this
    /// server: written since their last fold, or folded and not yet emptied.
    pub fn launches_with_overlays(&self) -> Result<Vec<(String, Option<String>)>, Error> {
        let dir = self.data_dir().join("overlays");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
            let Some(leaf) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            match leaf.split_once('@') {
                Some((name, volume)) => out.push((name.to_owned(), Some(volume.to_owned()))),
                None => out.push((leaf, None)),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes every overlay of launch `name`, and when its volumes last
    /// served (a launch of the name made later starts afresh, and the map
    /// does not grow with every launch the server ever served).
    fn remove_overlays(&self, name: &str) -> Result<(), Error> {
        let volume_prefix = format!("{name}/");
        lock(&self.catalog.launch_last_io)
            .retain(|key, _| key != name && !key.starts_with(&volume_prefix));
        for (launch, volume) in self.launches_with_overlays()? {
            if launch == name {
                overlay::remove(&overlay::Overlay::dir_of(
                    self.data_dir(),
                    &launch,
                    volume.as_deref(),
                ))?;
            }
        }
        Ok(())
    }

    /// Fails with `Invalid` when a volume of launch `name` holds writes not
    /// yet folded into the store (for work that must see the whole launch in
    /// the store with no server running); removes its empty overlays.
    pub(crate) fn require_folded(&self, name: &str) -> Result<(), Error> {
        for (launch, volume) in self.launches_with_overlays()? {
            if launch != name {
                continue;
            }
            let dir = overlay::Overlay::dir_of(self.data_dir(), &launch, volume.as_deref());
            if overlay::mapped_blocks_in(&dir)? > 0 {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!(
                        "launch {name} holds writes not yet folded into the store: start the \
                         server (it folds them at start) or run `blockrep launch fold {name}`, \
                         then try again"
                    ),
                ));
            }
            if overlay::read_target(&dir)?.is_some() {
                // A materialization: its target is this server's to serve from.
                continue;
            }
            overlay::remove(&dir)?;
        }
        Ok(())
    }

    /// Folds every overlay of launch `name` into the store, so that its head
    /// names everything written to it (see [`LaunchVolume::fold`]). Nothing
    /// to do for a launch without one. Returns the launch as folded;
    /// `NotFound` when it does not exist.
    pub fn fold_launch(
        self: &Arc<Self>,
        name: &str,
        now_unix_ms: u64,
    ) -> Result<LaunchInfo, Error> {
        validate_name("launch", name)?;
        for (launch, volume) in self.launches_with_overlays()? {
            if launch != name {
                continue;
            }
            let opened = self.open_launch_volume(&launch, volume.as_deref())?;
            opened
                .fold(now_unix_ms)
                .map_err(|e| Error::io(format!("cannot fold launch {name}"), e))?;
        }
        self.launch(name)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no launch named {name}")))
    }

    /// Bytes written to the launch volumes open in this process and not
    /// folded yet.
    pub fn launch_overlay_bytes(&self) -> u64 {
        self.open_launch_volumes()
            .iter()
            .map(|volume| volume.overlay_bytes())
            .sum()
    }

    /// Launch volumes open in this process.
    pub(crate) fn open_launch_volumes(&self) -> Vec<Arc<LaunchVolume>> {
        lock(&self.catalog.open_launches)
            .values()
            .filter_map(upgrade)
            .collect()
    }
}

#[cfg(test)]
mod tests;

//! Converting a source stored in clear to encrypted at rest (`blockrep
//! source encrypt`): every tree it names (its head, snapshots and
//! launches) is written again with its chunks sealed under their keyed ids
//! and its pages sealed, then each record is published anew, authenticated.
//! The clear blobs stay until GC finds them unreferenced.
//!
//! The caller has made the source's data key and added it to the keyring
//! first, so the source counts as encrypted from then on: a record not yet
//! converted is refused on read until the conversion finishes. A run that
//! stopped half way is finished by running it again: a converted record
//! (authenticated, or a head whose pages are sealed) is left as it is, and
//! chunks already sealed are not read again. The head goes last, one epoch
//! on, with the scan times and consistency of the head it replaces.

use std::collections::HashMap;
use std::sync::Arc;

use blockrep_core::{ChunkId, IdSpace, MachineRoot, Root, SourceId};
use blockrep_keys::Sealer;

use crate::authentic::{AUTH_TRAILER_LEN, RecordPlace};
use crate::blobs::{BlobKind, StoredCodec};
use crate::catalog::list_names;
use crate::error::{Error, ErrorKind};
use crate::format::{LAUNCH_HEAD_LEN, SNAPSHOT_LEN};
use crate::fsutil::{publish_atomic, read_small_file};
use crate::head::Head;
use crate::snapshot::Snapshot;
use crate::store::{Store, StoredRoot};

/// What converting a source did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SourceEncrypted {
    /// Snapshot records converted.
    pub snapshots: usize,
    /// Launches converted.
    pub launches: usize,
    /// Whether the head was converted (false: it already was, or there is
    /// none).
    pub head: bool,
    /// Chunks stored sealed (not counting those already sealed).
    pub chunks_sealed: u64,
}

impl Store {
    /// Converts `source`, stored in clear, to encrypted at rest under its
    /// data key (which the caller made and added to the keyring). Run with
    /// no server using the store. `now_unix_ms` is the new head's commit
    /// time.
    pub fn encrypt_source(
        &self,
        source: &SourceId,
        now_unix_ms: u64,
    ) -> Result<SourceEncrypted, Error> {
        self.check_writable()?;
        let sealer = self.sealer_of(source).ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!("source {source} has no data key to seal it with"),
            )
        })?;
        // A finished conversion (its head witnessed and converted) is not
        // run again: a clear record found then was put there, and is not to
        // be signed. The head is checked against its witness first.
        let head = self.head(source)?;
        self.keyring()
            .check_head(source, head.map(|h| (h.epoch, h.root.0)))
            .map_err(crate::authentic::key_error)?;
        if self.keyring().has_head_witness(source) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "source {source} is encrypted already (its head is witnessed): a record \
                     of it in clear was put there, not left by a conversion"
                ),
            ));
        }
        // A launch's writes not yet folded are in clear in its overlay, and
        // would stay so.
        for info in self.read_launches(Some(source), false)? {
            self.require_folded(&info.name)?;
        }
        // The clear blobs end in sealed packs, which a collection compacts
        // (it never compacts the active one).
        self.blobs.seal_active_pack();
        let mut converter = Converter {
            store: self,
            space: self.id_space_of(source),
            sealer,
            trees: HashMap::new(),
            report: SourceEncrypted::default(),
        };
        for name in list_names(self.vfs(), &self.snapshots_dir(source))? {
            let path = self.snapshots_dir(source).join(&name);
            let Some(bytes) = read_small_file(self.vfs(), &path, SNAPSHOT_LEN + AUTH_TRAILER_LEN)?
            else {
                continue;
            };
            if bytes.len() != SNAPSHOT_LEN {
                continue; // authenticated already (or damaged: reads will say)
            }
            let snapshot = Snapshot::decode(&bytes)
                .map_err(|e| Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let snapshot = Snapshot {
                root: converter.tree(snapshot.root)?,
                ..snapshot
            };
            self.sync()?;
            let place = RecordPlace {
                kind: "snapshot",
                source,
                name: &name,
            };
            publish_atomic(
                self.vfs(),
                &path,
                &self.authenticated(place, snapshot.encode()),
            )?;
            converter.report.snapshots += 1;
        }
        for info in self.read_launches(Some(source), false)? {
            let dir = self.launches_dir().join(&info.name);
            let head = read_small_file(
                self.vfs(),
                &dir.join("head"),
                LAUNCH_HEAD_LEN + AUTH_TRAILER_LEN,
            )?;
            // The head is written last: with it authenticated, the launch is.
            if head.is_none_or(|head| head.len() != LAUNCH_HEAD_LEN) {
                continue;
            }
            let info = crate::LaunchInfo {
                base_root: converter.tree(info.base_root)?,
                root: converter.tree(info.root)?,
                ..info
            };
            self.sync()?;
            self.publish_launch_meta(&dir, &info)?;
            self.publish_launch_head(&dir, &info)?;
            converter.report.launches += 1;
        }
        if let Some(head) = self.head(source)?
            && !converter.is_sealed(head.root)?
        {
            let root = converter.tree(head.root)?;
            self.sync()?;
            self.check_lease(source, now_unix_ms)?;
            let head = Head {
                epoch: head.epoch + 1,
                root,
                committed_unix_ms: now_unix_ms,
                ..head
            };
            self.publish_head(source, &head)?;
            converter.report.head = true;
        }
        self.sync()?;
        self.blobs.seal_active_pack();
        Ok(converter.report)
    }
}

/// Rewrites trees of one source into its id space, sealed.
struct Converter<'a> {
    store: &'a Store,
    space: IdSpace,
    sealer: Arc<Sealer>,
    /// Trees converted so far (a snapshot's root is often a launch's base).
    trees: HashMap<ChunkId, ChunkId>,
    report: SourceEncrypted,
}

impl Converter<'_> {
    /// The root (disk or machine) `id` converted: its id in the source's
    /// space, everything it names stored sealed. A tree already sealed is
    /// its own conversion.
    fn tree(&mut self, id: ChunkId) -> Result<ChunkId, Error> {
        if let Some(converted) = self.trees.get(&id) {
            return Ok(*converted);
        }
        let converted = match self.store.read_stored_root(&id)? {
            StoredRoot::Disk(root) => self.disk(&root)?,
            StoredRoot::Machine(machine) => {
                let mut volumes = Vec::with_capacity(machine.volumes().len());
                for (name, root_id) in machine.volumes() {
                    let root = self.store.read_root(root_id)?;
                    volumes.push((name.clone(), self.disk(&root)?));
                }
                let machine = MachineRoot::new(volumes)
                    .map_err(|e| Error::new(ErrorKind::Corrupt, format!("root {id}: {e}")))?;
                let machine_id = machine.id();
                self.store.blobs.put_index_blob(
                    BlobKind::Root,
                    machine_id,
                    &machine.encode(),
                    None,
                )?;
                machine_id
            }
        };
        self.trees.insert(id, converted);
        Ok(converted)
    }

    /// Whether the tree `id` names is sealed already: its pages are (a tree
    /// of no stored page, a blank disk, is the same in every space).
    fn is_sealed(&self, id: ChunkId) -> Result<bool, Error> {
        let roots = match self.store.read_stored_root(&id)? {
            StoredRoot::Disk(root) => vec![root],
            StoredRoot::Machine(machine) => machine
                .volumes()
                .iter()
                .map(|(_, root)| self.store.read_root(root))
                .collect::<Result<_, _>>()?,
        };
        for root in &roots {
            if let Some(page) = root.page_ids().iter().find(|id| !id.is_zero()) {
                return Ok(self.store.blobs.location(page)?.header.sealed);
            }
        }
        Ok(true)
    }

    /// The disk `root` converted; its id.
    fn disk(&mut self, root: &Root) -> Result<ChunkId, Error> {
        let Some(page) = root.page_ids().iter().find(|id| !id.is_zero()) else {
            return Ok(root.id());
        };
        if self.store.blobs.location(page)?.header.sealed {
            return Ok(root.id());
        }
        let mut ids = self.store.chunk_ids(root)?;
        for id in &mut ids {
            *id = self.chunk(*id)?;
        }
        let (converted, pages) = Root::build(root.geometry(), &ids);
        for page in &pages {
            if let Some((bytes, id)) = page.encode_with_id() {
                self.store
                    .blobs
                    .put_index_blob(BlobKind::Page, id, &bytes, Some(&self.sealer))?;
            }
        }
        let id = converted.id();
        self.store
            .blobs
            .put_index_blob(BlobKind::Root, id, &converted.encode(), None)?;
        Ok(id)
    }

    /// Chunk `id` (plain) stored sealed under its keyed id; that id.
    fn chunk(&mut self, id: ChunkId) -> Result<ChunkId, Error> {
        let keyed = self.space.map(id);
        if id.is_zero() || self.store.contains(&keyed) {
            return Ok(keyed);
        }
        // Read back against its plain id: what is sealed is what was stored.
        let data = self.store.read_blob(&id)?;
        let compressed = zstd::bulk::compress(&data, 1)
            .map_err(|e| Error::io(format!("cannot compress chunk {id}"), e))?;
        let (codec, stored) = if compressed.len() < data.len() - data.len() / 8 {
            (StoredCodec::Zstd, &compressed[..])
        } else {
            (StoredCodec::Raw, &data[..])
        };
        // A chunk's decoded length is at most the chunk size, a u32.
        let raw_len = data.len() as u32;
        if self
            .store
            .insert_sealed(&self.sealer, keyed, codec, raw_len, stored)?
        {
            self.report.chunks_sealed += 1;
        }
        Ok(keyed)
    }
}

#[cfg(test)]
mod tests;

//! Folding a launch volume's overlay into the store: each chunk with written
//! blocks is assembled (overlay blocks over the root's chunk), hashed,
//! stored as a blob, and named in the volume's index pages; then the pages
//! and a new root are stored and the launch's head moves to it, and only
//! then are the folded blocks unmapped from the overlay.
//!
//! The volume keeps serving while a fold runs: its lock is taken for one
//! chunk at a time (assembling the chunk, then storing it and naming it),
//! never across the store's sync or the head's publication. A chunk written
//! while it was being folded keeps its overlay blocks (the write's number
//! changed), and the next fold takes it again; its folded id still names a
//! true earlier content, which the overlay covers wherever it differs.
//!
//! A crash at any point loses nothing: until the head moves, the overlay
//! holds every block; after, both do, and the overlay's copy is the same
//! bytes; the unmap reaches the overlay's map only after that.

use std::io;

use blockrep_core::{ChunkId, MachineRoot, Page, Root, VolumeName};

use crate::blobs::{BlobKind, StoredCodec};
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::store::Store;

use super::LaunchInfo;
use super::overlay::OVERLAY_BLOCK_BYTES as BLOCK;
use super::volume::LaunchVolume;

impl LaunchVolume {
    /// Moves every write so far into the store: the written chunks become
    /// blobs, then pages and a root, and the launch's head moves to it
    /// (with `now_unix_ms` as its flush time) once they are durable. Returns
    /// the volume's root. Nothing is stored when nothing was written.
    pub fn fold(&self, now_unix_ms: u64) -> io::Result<Root> {
        self.fold_while(now_unix_ms, &|| true)
    }

    /// [`LaunchVolume::fold`] for as long as `go_on` says, asked before each
    /// chunk: what was folded by then is published, the rest waits for the
    /// next fold. A background fold stops so when clients come back.
    pub fn fold_while(&self, now_unix_ms: u64, go_on: &dyn Fn() -> bool) -> io::Result<Root> {
        self.store.check_writable()?;
        let _fold = lock(&self.fold_lock);
        let chunk_size = u64::from(self.geometry.chunk_size_bytes());
        let chunks: Vec<u64> = {
            let state = self.lock_state();
            match &state.overlay {
                None => Vec::new(),
                Some(overlay) => {
                    let per_chunk = chunk_size / BLOCK;
                    (0..self.geometry.chunk_count())
                        .filter(|chunk| {
                            let first = chunk * per_chunk;
                            first < overlay.blocks()
                                && overlay
                                    .any_mapped(first, per_chunk.min(overlay.blocks() - first))
                        })
                        .collect()
                }
            }
        };
        let mut compressor = zstd::bulk::Compressor::new(1).ok();
        let mut folded = Vec::with_capacity(chunks.len());
        for chunk_index in chunks {
            if !go_on() {
                break;
            }
            let len = self
                .geometry
                .chunk_len(chunk_index)
                .ok_or_else(|| Error::new(ErrorKind::Invalid, "fold past the last chunk"))?;
            let mut bytes = vec![0u8; len as usize];
            let (write, space, sealer) = {
                let mut state = self.lock_state();
                state.read_range(
                    &self.store,
                    self.geometry,
                    chunk_index * chunk_size,
                    &mut bytes,
                )?;
                let write = state.chunk_writes.get(&chunk_index).copied().unwrap_or(0);
                (write, state.space, state.sealer.clone())
            };
            // Hashed and compressed without the volume's lock.
            let id = space.hash_chunk(&bytes);
            // A chunk the store holds already (written twice, or as it was)
            // is not compressed for nothing.
            let compressed = if id.is_zero() || self.store.contains(&id) {
                None
            } else {
                compress(&mut compressor, &bytes)
            };
            {
                let mut state = self.lock_state();
                // Stored under the lock, so that a collection either finds
                // the id in the volume's pages or saw the insert.
                if !id.is_zero() {
                    // Incompressible bytes are stored from the chunk itself.
                    let (codec, stored) = match &compressed {
                        Some(compressed) => (StoredCodec::Zstd, compressed.as_slice()),
                        None => (StoredCodec::Raw, bytes.as_slice()),
                    };
                    store_chunk(&self.store, sealer.as_deref(), id, codec, len, stored)?;
                }
                state.set_chunk_id(&self.store, chunk_index, id)?;
            }
            if !id.is_zero() {
                self.store.cache_chunk(id, std::sync::Arc::new(bytes));
            }
            folded.push((chunk_index, write));
            std::thread::yield_now();
        }
        if !folded.is_empty() {
            // A materialization's target serves folded blocks once they read
            // as the base: durable before the root that names them.
            let target = self
                .lock_state()
                .overlay
                .as_ref()
                .filter(|overlay| overlay.is_materialized())
                .map(super::overlay::Overlay::reader);
            if let Some(target) = target {
                target.sync_data()?;
            }
        }
        self.publish(now_unix_ms)?;
        let mut state = self.lock_state();
        let per_chunk = chunk_size / BLOCK;
        for (chunk_index, write) in folded {
            if state.chunk_writes.get(&chunk_index).copied().unwrap_or(0) != write {
                continue;
            }
            state.chunk_writes.remove(&chunk_index);
            if let Some(overlay) = state.overlay.as_mut() {
                let first = chunk_index * per_chunk;
                overlay.unmap(first, per_chunk.min(overlay.blocks() - first))?;
            }
        }
        // The unmaps reach the map's durable part (and the blocks' space is
        // given back) at the next sync: a sync here would wait, under the
        // volume's lock, for every byte written since the last one.
        Ok(state.root.clone())
    }

    /// Stores the pages a fold changed and a new root, and moves the head.
    fn publish(&self, now_unix_ms: u64) -> Result<(), Error> {
        let store = &self.store;
        let (dirty_pages, old_root, mut info, sealer) = {
            let state = self.lock_state();
            if state.dirty_pages.is_empty() {
                return Ok(());
            }
            let mut dirty = Vec::with_capacity(state.dirty_pages.len());
            for &page_index in &state.dirty_pages {
                let ids = state.pages.get(&page_index).ok_or_else(|| {
                    Error::new(ErrorKind::Invalid, "a dirty index page is not loaded")
                })?;
                dirty.push((page_index, ids.clone()));
            }
            (
                dirty,
                state.root.clone(),
                state.info.clone(),
                state.sealer.clone(),
            )
        };
        let mut page_ids = old_root.page_ids().to_vec();
        let mut dirty = Vec::with_capacity(dirty_pages.len());
        for (page_index, ids) in dirty_pages {
            let page = Page::new(ids);
            // Encoded and hashed once: the id goes into the root, the bytes
            // into the store.
            let encoded = page.encode_with_id();
            page_ids[page_index] = encoded.as_ref().map_or(ChunkId::ZERO, |(_, id)| *id);
            dirty.push((page, encoded));
        }
        let root = Root::from_page_ids(self.geometry, page_ids)
            .map_err(|e| Error::new(ErrorKind::Invalid, format!("launch root: {e}")))?;
        let root_id = root.id();
        {
            // The GC fence, held until the head is published; the ids the new
            // root adds are recorded for a running collection and checked to
            // be stored (see `gc.rs`). Pages not dirty are those of the
            // folded root.
            let _fence = store.publishing_fence(now_unix_ms)?;
            store.blobs.fence().note(&root_id);
            for (page, encoded) in &dirty {
                if let Some((_, id)) = encoded {
                    store.blobs.fence().note(id);
                }
                store.blobs.fence().note_all(page.ids());
            }
            for (page, encoded) in &dirty {
                if let Some((bytes, id)) = encoded {
                    store
                        .blobs
                        .put_index_blob(BlobKind::Page, *id, bytes, sealer.as_deref())?;
                }
                store.blobs.require_present("launch flush", page.ids())?;
            }
            // Same geometry, so the roots differ exactly when their page ids
            // do: no need to hash the old root at every fold.
            if root.page_ids() != old_root.page_ids() {
                // Roots stay in clear, as the store's commits keep them.
                store
                    .blobs
                    .put_index_blob(BlobKind::Root, root_id, &root.encode(), None)?;
                match &self.volume {
                    None => {
                        // Blobs first, durably; only then the head that names them.
                        store.sync()?;
                        info.root = root_id;
                        info.generation += 1;
                        info.flushed_unix_ms = now_unix_ms;
                        publish_launch_head(store, &info)?;
                    }
                    Some(volume) => {
                        info = flush_machine_head(store, &info.name, volume, root_id, now_unix_ms)?;
                    }
                }
            }
        }
        let mut state = self.lock_state();
        state.info = info;
        state.root = root;
        state.dirty_pages.clear();
        // The pages just published are clean now, and count against the bound.
        let limit = state.clean_pages_max;
        state.drop_clean_pages_over(limit);
        Ok(())
    }
}

/// zstd level 1 when that saves more than an eighth (as the agent does);
/// `None`: the bytes are stored as they are.
fn compress(
    compressor: &mut Option<zstd::bulk::Compressor<'static>>,
    bytes: &[u8],
) -> Option<Vec<u8>> {
    compressor
        .as_mut()
        .and_then(|compressor| compressor.compress(bytes).ok())
        .filter(|compressed| compressed.len() < bytes.len() - bytes.len() / 8)
}

/// Stores a chunk blob unless the store has it.
fn store_chunk(
    store: &Store,
    sealer: Option<&blockrep_keys::Sealer>,
    id: ChunkId,
    codec: StoredCodec,
    raw_len: u32,
    stored: &[u8],
) -> Result<(), Error> {
    if store.contains(&id) {
        return Ok(());
    }
    let stored_now = match sealer {
        Some(sealer) => store.insert_sealed(sealer, id, codec, raw_len, stored)?,
        None => store.insert(BlobKind::Chunk, id, codec, raw_len, stored)?,
    };
    if stored_now {
        // Hashed here from the bytes just stored: launch reads (and a
        // materialization's copy) of the folded chunk check its crc32.
        store.blobs.note_checked(&id);
    }
    Ok(())
}

/// Publishes a launch's head (generation, root, flush time).
fn publish_launch_head(store: &Store, info: &LaunchInfo) -> Result<(), Error> {
    store.publish_launch_head(&store.launches_dir().join(&info.name), info)
}

/// Moves the head of machine launch `name` to a machine root in which
/// `volume`'s root is `root_id` (its pages and root already stored), leaving
/// the other volumes as the head names them now: volumes of one launch flush
/// independently, as a machine's disks do, so the head is read again under
/// the lock rather than taken from this volume's last flush. Returns the
/// launch as published.
fn flush_machine_head(
    store: &Store,
    name: &str,
    volume: &VolumeName,
    root_id: ChunkId,
    now_unix_ms: u64,
) -> Result<LaunchInfo, Error> {
    let _guard = lock(&store.catalog.launch_heads);
    let mut info = store
        .launch(name)?
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("launch {name} is gone")))?;
    let mut volumes = store.volume_roots(&info.root)?;
    let slot = volumes
        .iter_mut()
        .find(|(n, _)| n == volume)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("launch {name} lost volume {volume}"),
            )
        })?;
    slot.1 = root_id;
    let machine = MachineRoot::new(volumes)
        .map_err(|e| Error::new(ErrorKind::Corrupt, format!("launch {name}: {e}")))?;
    let machine_id = machine.id();
    store.blobs.fence().note(&machine_id);
    store
        .blobs
        .put_index_blob(BlobKind::Root, machine_id, &machine.encode(), None)?;
    // Blobs first, durably; only then the head that names them.
    store.sync()?;
    info.root = machine_id;
    info.generation += 1;
    info.flushed_unix_ms = now_unix_ms;
    publish_launch_head(store, &info)?;
    Ok(info)
}

#[cfg(test)]
#[path = "fold_tests.rs"]
mod tests;

//! The index pages an open launch volume keeps in memory: loaded from its
//! folded root on first use, changed by folds, and bounded (the least
//! recently used clean page goes first).

use blockrep_core::{CHUNKS_PER_PAGE, ChunkId};

use crate::error::Error;
use crate::store::Store;

use super::volume::VolumeState;

impl VolumeState {
    /// The current ids of page `page_index`, loading them when they are not in
    /// memory (first use, or dropped since as a clean page).
    pub(super) fn page_mut(
        &mut self,
        store: &Store,
        page_index: usize,
    ) -> Result<&mut Vec<ChunkId>, Error> {
        if !self.pages.contains_key(&page_index) {
            let ids = store.read_page(&self.root, page_index)?.ids().to_vec();
            // Room for the page about to come in, which is clean.
            self.drop_clean_pages_over(self.clean_pages_max.saturating_sub(1));
            self.pages.insert(page_index, ids);
        }
        self.use_clock += 1;
        self.page_used.insert(page_index, self.use_clock);
        Ok(self
            .pages
            .get_mut(&page_index)
            .expect("the page was loaded above"))
    }

    /// Drops least recently used clean pages until at most `limit` are left.
    /// A clean page equals the folded root's, which is durable and which the
    /// garbage collector marks from, so dropping one loses nothing.
    pub(super) fn drop_clean_pages_over(&mut self, limit: usize) {
        while self.pages.len().saturating_sub(self.dirty_pages.len()) > limit {
            let oldest = self
                .page_used
                .iter()
                .filter(|(page_index, _)| !self.dirty_pages.contains(page_index))
                .min_by_key(|(_, used)| **used)
                .map(|(page_index, _)| *page_index);
            let Some(page_index) = oldest else {
                return;
            };
            self.pages.remove(&page_index);
            self.page_used.remove(&page_index);
        }
    }

    pub(super) fn chunk_id(&mut self, store: &Store, chunk_index: u64) -> Result<ChunkId, Error> {
        let (page_index, position) = page_position(chunk_index);
        Ok(self.page_mut(store, page_index)?[position])
    }

    pub(super) fn set_chunk_id(
        &mut self,
        store: &Store,
        chunk_index: u64,
        id: ChunkId,
    ) -> Result<(), Error> {
        let (page_index, position) = page_position(chunk_index);
        let page = self.page_mut(store, page_index)?;
        if page[position] != id {
            page[position] = id;
            self.dirty_pages.insert(page_index);
        }
        Ok(())
    }
}

/// Page index and position in the page of a chunk.
pub(super) fn page_position(chunk_index: u64) -> (usize, usize) {
    // Chunk indices are below the geometry's chunk count, which fits in memory.
    let chunk_index = chunk_index as usize;
    (chunk_index / CHUNKS_PER_PAGE, chunk_index % CHUNKS_PER_PAGE)
}

//! The replica as one session knows it: the committed chunk ids and page ids
//! of the source's head, plus the chunks the epoch in progress has changed.
//!
//! A commit stores only the pages an epoch dirtied; every other page keeps the
//! id the head already names, so the root is rebuilt without touching them.

use std::collections::BTreeSet;

use blockrep_core::{CHUNKS_PER_PAGE, ChunkId, Geometry, Page, Root};

use super::references::References;

/// The committed ids plus this epoch's changes.
pub(super) struct Replica {
    pub geometry: Geometry,
    pub head_epoch: u64,
    pub ids: Vec<ChunkId>,
    pub page_ids: Vec<ChunkId>,
    pub dirty_pages: BTreeSet<usize>,
    /// What the agent may send as references; the chunks sent this epoch.
    pub references: References,
}

impl Replica {
    /// A source with no head yet: every chunk (and so every page) is zero.
    pub(super) fn empty(geometry: Geometry, references: References) -> Self {
        Self::from_head(
            geometry,
            0,
            vec![ChunkId::ZERO; geometry.chunk_count() as usize],
            vec![ChunkId::ZERO; geometry.page_count() as usize],
            references,
        )
    }

    /// The head of `head_epoch`, with its chunk ids and its root's page ids.
    pub(super) fn from_head(
        geometry: Geometry,
        head_epoch: u64,
        ids: Vec<ChunkId>,
        page_ids: Vec<ChunkId>,
        references: References,
    ) -> Self {
        Self {
            geometry,
            head_epoch,
            ids,
            page_ids,
            dirty_pages: BTreeSet::new(),
            references,
        }
    }

    /// Records the chunk at `index` as `id` in the epoch in progress. The
    /// caller has checked `index` against the geometry.
    pub(super) fn set(&mut self, index: u64, id: ChunkId) {
        self.ids[index as usize] = id;
        self.dirty_pages.insert(index as usize / CHUNKS_PER_PAGE);
    }

    /// The page at `page_index` as the replica holds it now (`None` beyond
    /// the disk's pages).
    pub(super) fn page(&self, page_index: usize) -> Option<Page> {
        if page_index >= self.page_ids.len() {
            return None;
        }
        let start = page_index * CHUNKS_PER_PAGE;
        let end = (start + CHUNKS_PER_PAGE).min(self.ids.len());
        Some(Page::new(self.ids[start..end].to_vec()))
    }

    /// The root of the replica now, and the pages the epoch dirtied (the only
    /// ones a commit stores).
    pub(super) fn build_root(&self) -> (Root, Vec<Page>) {
        let mut page_ids = self.page_ids.clone();
        let mut pages = Vec::with_capacity(self.dirty_pages.len());
        for &page_index in &self.dirty_pages {
            let page = self
                .page(page_index)
                .expect("dirty pages are within the disk");
            page_ids[page_index] = page.id();
            pages.push(page);
        }
        let root =
            Root::from_page_ids(self.geometry, page_ids).expect("page count follows geometry");
        (root, pages)
    }

    /// After a commit of the root [`Replica::build_root`] gave: its pages are
    /// the head's now, and nothing is dirty.
    pub(super) fn committed(&mut self, epoch: u64, page_ids: Vec<ChunkId>) {
        self.head_epoch = epoch;
        self.page_ids = page_ids;
        self.dirty_pages.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three pages' worth of chunks and a little more: the last page is short.
    fn geometry() -> Geometry {
        let chunks = 3 * CHUNKS_PER_PAGE as u64 + 5;
        Geometry::new(chunks * 65_536, 65_536).unwrap()
    }

    fn replica(geometry: Geometry) -> Replica {
        Replica::empty(geometry, References::new([7; 32], geometry, &[]))
    }

    /// The root of `ids` computed from every page, as a fresh scan would.
    fn root_of(geometry: Geometry, ids: &[ChunkId]) -> Root {
        let page_ids = ids
            .chunks(CHUNKS_PER_PAGE)
            .map(|page| Page::new(page.to_vec()).id())
            .collect();
        Root::from_page_ids(geometry, page_ids).unwrap()
    }

    #[test]
    fn the_root_rebuilt_from_dirty_pages_is_the_root_of_every_id() {
        let geometry = geometry();
        let mut replica = replica(geometry);
        let (empty, pages) = replica.build_root();
        assert!(pages.is_empty(), "an unchanged replica stores no page");
        assert_eq!(empty.id(), root_of(geometry, &replica.ids).id());
        let last = geometry.chunk_count() - 1;
        replica.set(1, ChunkId([1; 32]));
        replica.set(last, ChunkId([2; 32]));
        let (root, pages) = replica.build_root();
        assert_eq!(pages.len(), 2, "the first and the last page are dirty");
        assert_eq!(root.id(), root_of(geometry, &replica.ids).id());
        assert_ne!(root.id(), empty.id());
    }

    #[test]
    fn a_commit_keeps_the_pages_and_clears_what_is_dirty() {
        let geometry = geometry();
        let mut replica = replica(geometry);
        replica.set(CHUNKS_PER_PAGE as u64, ChunkId([3; 32]));
        let (root, _) = replica.build_root();
        replica.committed(1, root.page_ids().to_vec());
        assert_eq!(replica.head_epoch, 1);
        assert!(replica.dirty_pages.is_empty());
        let (again, pages) = replica.build_root();
        assert!(pages.is_empty());
        assert_eq!(again.id(), root.id());
        assert!(replica.page(geometry.page_count() as usize).is_none());
    }
}

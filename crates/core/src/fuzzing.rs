//! Checks shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay
//! test (`tests/it/fuzz_corpus.rs`). Not part of the API: panics are the point.

use crate::{CHUNKS_PER_PAGE, Page, Root};

/// Parses `data` as a root and as index pages. Whatever parses must be
/// canonical (encode back to the input) and consistent with its geometry.
pub fn check_index_parsing(data: &[u8]) {
    if let Ok(root) = Root::decode(data) {
        assert_eq!(root.encode(), data, "root does not re-encode to its input");
        let geometry = root.geometry();
        let pages = root.page_ids().len();
        assert_eq!(pages as u64, geometry.page_count());
        let chunks: usize = (0..pages).map(|i| root.page_len(i)).sum();
        assert_eq!(chunks as u64, geometry.chunk_count());
    }
    // A page is parsed with the length its root expects: try the length the
    // data implies and, from the first two bytes, an arbitrary one.
    let implied = data.len() / 32;
    let chosen = data
        .get(..2)
        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    for expected in [implied, chosen] {
        if let Ok(page) = Page::decode(data, expected) {
            assert!(expected <= CHUNKS_PER_PAGE);
            assert_eq!(page.ids().len(), expected);
            assert_eq!(page.encode(), data, "page does not re-encode to its input");
            assert_eq!(page.id().is_zero(), page.is_zero());
        }
    }
}

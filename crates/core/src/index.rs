//! Index pages and roots: the Merkle tree of a disk.
//!
//! Page encoding: the 32-byte ids of up to [`CHUNKS_PER_PAGE`] consecutive chunks,
//! concatenated. A page's id is the blake3 of that encoding; a page whose chunks are
//! all zero has the reserved id [`ChunkId::ZERO`] and is never stored.
//!
//! Root encoding (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BRROOT` + version `0x00 0x01` |
//! | 8 | 8 | disk size in bytes |
//! | 16 | 4 | chunk size in bytes |
//! | 20 | 4 | page count |
//! | 24 | 32 × page count | page ids |
//!
//! The root's id is the blake3 of its encoding. With the same geometry, equal roots
//! mean equal disks.

use crate::error::{Error, ErrorKind};
use crate::geometry::{CHUNKS_PER_PAGE, Geometry};
use crate::id::ChunkId;

const ROOT_MAGIC: [u8; 8] = *b"BRROOT\x00\x01";
const ROOT_HEADER_LEN: usize = 24;

/// Id of a root (blake3 of its encoding).
pub type RootId = ChunkId;

/// The ids of up to [`CHUNKS_PER_PAGE`] consecutive chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    ids: Vec<ChunkId>,
}

impl Page {
    /// Builds a page from at most [`CHUNKS_PER_PAGE`] ids.
    pub fn new(ids: Vec<ChunkId>) -> Self {
        assert!(
            ids.len() <= CHUNKS_PER_PAGE,
            "page holds at most {CHUNKS_PER_PAGE} ids"
        );
        Self { ids }
    }

    /// The chunk ids.
    pub fn ids(&self) -> &[ChunkId] {
        &self.ids
    }

    /// Whether every chunk of the page is zero.
    pub fn is_zero(&self) -> bool {
        self.ids.iter().all(ChunkId::is_zero)
    }

    /// The page's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ids.len() * 32);
        for id in &self.ids {
            out.extend_from_slice(id.as_bytes());
        }
        out
    }

    /// The page's id: [`ChunkId::ZERO`] for an all-zero page, else blake3 of the encoding.
    pub fn id(&self) -> ChunkId {
        if self.is_zero() {
            ChunkId::ZERO
        } else {
            ChunkId::from(blake3::hash(&self.encode()))
        }
    }

    /// The encoding and the id of a page that is not all zero (`None` for one
    /// that is: it is never stored), encoding it once for both.
    pub fn encode_with_id(&self) -> Option<(Vec<u8>, ChunkId)> {
        if self.is_zero() {
            return None;
        }
        let bytes = self.encode();
        let id = ChunkId::from(blake3::hash(&bytes));
        Some((bytes, id))
    }

    /// Parses a page encoding holding exactly `expected_len` ids.
    pub fn decode(bytes: &[u8], expected_len: usize) -> Result<Self, Error> {
        if expected_len > CHUNKS_PER_PAGE || bytes.len() != expected_len * 32 {
            return Err(Error::new(
                ErrorKind::InvalidEncoding,
                format!(
                    "index page of {} bytes, expected {} ids",
                    bytes.len(),
                    expected_len
                ),
            ));
        }
        Ok(Self {
            ids: bytes.chunks_exact(32).map(chunk_id_from_slice).collect(),
        })
    }
}

fn chunk_id_from_slice(bytes: &[u8]) -> ChunkId {
    let mut id = [0u8; 32];
    id.copy_from_slice(bytes);
    ChunkId(id)
}

/// The Merkle root of a disk: geometry plus the ids of its index pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    geometry: Geometry,
    page_ids: Vec<ChunkId>,
}

impl Root {
    /// Builds the root and its pages from one id per chunk.
    pub fn build(geometry: Geometry, chunk_ids: &[ChunkId]) -> (Root, Vec<Page>) {
        assert_eq!(chunk_ids.len() as u64, geometry.chunk_count());
        let pages: Vec<Page> = chunk_ids
            .chunks(CHUNKS_PER_PAGE)
            .map(|ids| Page::new(ids.to_vec()))
            .collect();
        let page_ids = pages.iter().map(Page::id).collect();
        (Root { geometry, page_ids }, pages)
    }

    /// The root of a disk of zeros: every page all zero, so every page id
    /// is [`ChunkId::ZERO`] ([`Page::id`]); nothing to build or hash.
    pub fn zero(geometry: Geometry) -> Root {
        Root {
            geometry,
            page_ids: vec![ChunkId::ZERO; geometry.page_count() as usize],
        }
    }

    /// Builds only the root from one id per chunk.
    pub fn from_chunk_ids(geometry: Geometry, chunk_ids: &[ChunkId]) -> Root {
        Self::build(geometry, chunk_ids).0
    }

    /// Builds a root from page ids already computed (e.g. only the changed pages
    /// rehashed). Fails when the count does not match the geometry.
    pub fn from_page_ids(geometry: Geometry, page_ids: Vec<ChunkId>) -> Result<Root, Error> {
        if page_ids.len() as u64 != geometry.page_count() {
            return Err(Error::new(
                ErrorKind::InvalidEncoding,
                format!(
                    "{} page ids for a geometry of {} pages",
                    page_ids.len(),
                    geometry.page_count()
                ),
            ));
        }
        Ok(Root { geometry, page_ids })
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Ids of the index pages, in order.
    pub fn page_ids(&self) -> &[ChunkId] {
        &self.page_ids
    }

    /// Number of chunk ids page `page_index` holds.
    pub fn page_len(&self, page_index: usize) -> usize {
        let chunk_count = self.geometry.chunk_count() as usize;
        let start = page_index * CHUNKS_PER_PAGE;
        chunk_count.saturating_sub(start).min(CHUNKS_PER_PAGE)
    }

    /// The root's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ROOT_HEADER_LEN + self.page_ids.len() * 32);
        out.extend_from_slice(&ROOT_MAGIC);
        out.extend_from_slice(&self.geometry.disk_size_bytes().to_le_bytes());
        out.extend_from_slice(&self.geometry.chunk_size_bytes().to_le_bytes());
        out.extend_from_slice(&(self.page_ids.len() as u32).to_le_bytes());
        for id in &self.page_ids {
            out.extend_from_slice(id.as_bytes());
        }
        out
    }

    /// The root's id: blake3 of its encoding.
    pub fn id(&self) -> RootId {
        ChunkId::from(blake3::hash(&self.encode()))
    }

    /// Parses a root encoding, checking magic, geometry and length.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let invalid = |what: &str| Error::new(ErrorKind::InvalidEncoding, format!("root: {what}"));
        if bytes.len() < ROOT_HEADER_LEN {
            return Err(invalid("shorter than its header"));
        }
        if bytes[..8] != ROOT_MAGIC {
            return Err(invalid("bad magic or unsupported version"));
        }
        let disk_size = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let chunk_size = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let page_count = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        let geometry =
            Geometry::new(disk_size, chunk_size).map_err(|e| invalid(&format!("geometry: {e}")))?;
        if u64::from(page_count) != geometry.page_count() {
            return Err(invalid("page count does not match the geometry"));
        }
        if bytes.len() != ROOT_HEADER_LEN + page_count as usize * 32 {
            return Err(invalid("length does not match the page count"));
        }
        let page_ids = bytes[ROOT_HEADER_LEN..]
            .chunks_exact(32)
            .map(chunk_id_from_slice)
            .collect();
        Ok(Root { geometry, page_ids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize, seed: u8) -> Vec<ChunkId> {
        (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    ChunkId::ZERO
                } else {
                    ChunkId::from(blake3::hash(&[seed, i as u8, (i >> 8) as u8]))
                }
            })
            .collect()
    }

    #[test]
    fn the_zero_root_is_the_root_built_from_zero_ids() {
        for size in [4096, 2500 * 4096 - 3, 70_000 * 65_536 + 1] {
            let geometry = Geometry::new(size, 4096).unwrap();
            let zeros = vec![ChunkId::ZERO; geometry.chunk_count() as usize];
            assert_eq!(Root::zero(geometry), Root::from_chunk_ids(geometry, &zeros));
        }
    }

    #[test]
    fn root_round_trips() {
        let geometry = Geometry::new(2500 * 4096 - 3, 4096).unwrap();
        let chunk_ids = ids(2500, 1);
        let (root, pages) = Root::build(geometry, &chunk_ids);
        assert_eq!(pages.len(), 3);
        assert_eq!(root.page_len(2), 2500 - 2048);
        let decoded = Root::decode(&root.encode()).unwrap();
        assert_eq!(decoded, root);
        assert_eq!(decoded.id(), root.id());
        let page = Page::decode(&pages[2].encode(), root.page_len(2)).unwrap();
        assert_eq!(page, pages[2]);
    }

    #[test]
    fn all_zero_pages_have_the_zero_id() {
        let geometry = Geometry::new(2048 * 4096, 4096).unwrap();
        let mut chunk_ids = vec![ChunkId::ZERO; 2048];
        chunk_ids[1500] = ChunkId([9; 32]);
        let root = Root::from_chunk_ids(geometry, &chunk_ids);
        assert!(root.page_ids()[0].is_zero());
        assert!(!root.page_ids()[1].is_zero());
        // Encoding with the id gives what `encode` and `id` give, and nothing
        // for a zero page (which is never stored).
        let zero = Page::new(vec![ChunkId::ZERO; 1024]);
        assert_eq!(zero.encode_with_id(), None);
        let page = Page::new(chunk_ids[1024..].to_vec());
        assert_eq!(page.encode_with_id(), Some((page.encode(), page.id())));
        assert_eq!(page.id(), root.page_ids()[1]);
    }

    #[test]
    fn different_disks_have_different_roots() {
        let geometry = Geometry::new(1000 * 4096, 4096).unwrap();
        let a = ids(1000, 1);
        let mut b = a.clone();
        b[999] = ChunkId([1; 32]);
        assert_ne!(
            Root::from_chunk_ids(geometry, &a).id(),
            Root::from_chunk_ids(geometry, &b).id()
        );
        let other_geometry = Geometry::new(1000 * 4096 - 1, 4096).unwrap();
        assert_ne!(
            Root::from_chunk_ids(geometry, &a).id(),
            Root::from_chunk_ids(other_geometry, &a).id()
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Root::decode(&bytes);
            let _ = Page::decode(&bytes, bytes.len() / 32);
        }

        #[test]
        fn decoding_a_mutated_header_is_checked(flip in 0usize..24, bit in 0u8..8) {
            let geometry = Geometry::new(5000 * 4096, 4096).unwrap();
            let root = Root::from_chunk_ids(geometry, &ids(5000, 2));
            let mut bytes = root.encode();
            bytes[flip] ^= 1 << bit;
            if let Ok(decoded) = Root::decode(&bytes) {
                // Only a flip that still describes a consistent root may parse.
                prop_assert_eq!(decoded.encode(), bytes);
            }
        }
    }
}

//! Where chunk ids live: a source's chunks are named by the blake3 of their
//! bytes, or, for a source encrypted at rest, by a keyed hash of that (its
//! *stored id*), so that a stored id says nothing of the content to whoever
//! lacks the key. Agent and server name an encrypted source's chunks by
//! stored ids everywhere (scans, pages, roots, the wire), so everything built
//! on ids (diffs, roots, patches, dedup within the source) works unchanged.

use std::fmt;

use crate::ChunkId;

/// Length of an id key.
pub const ID_KEY_LEN: usize = 32;

/// The mapping from a chunk's blake3 to the id it is known by.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct IdSpace {
    key: Option<[u8; ID_KEY_LEN]>,
}

impl fmt::Debug for IdSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key itself stays out of logs.
        f.write_str(if self.key.is_some() {
            "IdSpace::Keyed"
        } else {
            "IdSpace::Plain"
        })
    }
}

impl IdSpace {
    /// Ids are blake3 of the bytes (a source stored in clear).
    pub const PLAIN: Self = Self { key: None };

    /// Ids are the keyed blake3 of the blake3 of the bytes, under `key`.
    pub fn keyed(key: [u8; ID_KEY_LEN]) -> Self {
        Self { key: Some(key) }
    }

    /// The key, if keyed (what the server gives an encrypted source's agent).
    pub fn key(&self) -> Option<&[u8; ID_KEY_LEN]> {
        self.key.as_ref()
    }

    /// Whether ids are keyed.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// The id of a chunk whose blake3 is `plain` (the zero id, of an all-zero
    /// chunk, stays zero: zero chunks are never stored).
    pub fn map(&self, plain: ChunkId) -> ChunkId {
        match &self.key {
            Some(key) if !plain.is_zero() => ChunkId(*blake3::keyed_hash(key, &plain.0).as_bytes()),
            _ => plain,
        }
    }

    /// Maps every id of `ids` in place.
    pub fn map_all(&self, ids: &mut [ChunkId]) {
        if self.key.is_some() {
            for id in ids {
                *id = self.map(*id);
            }
        }
    }

    /// [`crate::hash_chunk`] in this space.
    pub fn hash_chunk(&self, data: &[u8]) -> ChunkId {
        self.map(crate::hash_chunk(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_hide_the_plain_ones_and_keep_zero() {
        let data = vec![7u8; 4096];
        let plain = crate::hash_chunk(&data);
        assert_eq!(IdSpace::PLAIN.hash_chunk(&data), plain);
        let space = IdSpace::keyed([1; 32]);
        let keyed = space.hash_chunk(&data);
        assert_ne!(keyed, plain);
        assert_eq!(keyed, space.map(plain));
        assert_ne!(keyed, IdSpace::keyed([2; 32]).map(plain));
        assert_eq!(space.map(ChunkId::ZERO), ChunkId::ZERO);
        let mut ids = vec![plain, ChunkId::ZERO];
        space.map_all(&mut ids);
        assert_eq!(ids, vec![keyed, ChunkId::ZERO]);
        assert_eq!(format!("{space:?}"), "IdSpace::Keyed");
    }
}

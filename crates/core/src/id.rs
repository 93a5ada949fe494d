//! Chunk ids: the blake3 hash that names a chunk, a page or a root.

use std::fmt;

/// Identity of a chunk: the blake3 hash of its bytes.
///
/// An all-zero chunk (of any length) has the reserved id [`ChunkId::ZERO`], which is
/// never stored or sent: sparse and fresh disks cost nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The reserved id of an all-zero chunk.
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// Whether this is the reserved all-zero id.
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex form.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl From<blake3::Hash> for ChunkId {
    fn from(hash: blake3::Hash) -> Self {
        ChunkId(*hash.as_bytes())
    }
}

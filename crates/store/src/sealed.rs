//! Blobs of encrypted sources: sealed on insert under a keyed stored id,
//! opened on read with the data key their record names (the record layout
//! is in `format.rs`, the sealing in `blobs/seal.rs`, the keys in
//! `blockrep_keys`).

use std::sync::Arc;

use blockrep_core::{ChunkId, SourceId};

use crate::blobs::{BlobKind, StoredCodec};
use crate::error::Error;
use crate::store::Store;

impl Store {
    /// Appends chunk `id` of an encrypted source, sealed by `sealer` (its
    /// source's current data key), unless a sound copy is stored; whether it
    /// was new. `id` is the chunk's stored id: the blake3 of its decoded
    /// bytes mapped into the source's id space ([`Store::id_space_of`]),
    /// which the caller has checked (as for
    /// [`Store::insert`]). Nothing is durable before [`Store::sync`]. The
    /// source's pages and roots are sealed by its commits.
    pub fn insert_sealed(
        &self,
        sealer: &blockrep_keys::Sealer,
        id: ChunkId,
        codec: StoredCodec,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<bool, Error> {
        self.blobs
            .put_sealed(sealer, BlobKind::Chunk, id, codec, raw_len, stored)
    }

    /// The data key that seals `source`'s new blobs, if it is encrypted and
    /// its keys are held.
    pub fn sealer_of(&self, source: &SourceId) -> Option<Arc<blockrep_keys::Sealer>> {
        self.keyring().current(source)
    }

    /// The id space `source`'s chunks are named in: keyed (by its first
    /// data key, for its whole life) if it is encrypted and its keys are
    /// held, plain otherwise.
    pub fn id_space_of(&self, source: &SourceId) -> blockrep_core::IdSpace {
        self.keyring()
            .id_space(source)
            .unwrap_or(blockrep_core::IdSpace::PLAIN)
    }

    /// The data keys that open this store's sealed blobs. Empty when opened;
    /// whoever holds the key directory and its KEK adds the keys
    /// ([`blockrep_keys::Keyring::extend_from`]). A sealed blob whose key is
    /// not here reads as [`crate::ErrorKind::KeyUnavailable`].
    pub fn keyring(&self) -> &Arc<blockrep_keys::Keyring> {
        self.blobs.keyring()
    }
}

#[cfg(test)]
mod tests;

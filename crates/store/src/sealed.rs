//! Blobs of encrypted sources: sealed on insert under a keyed stored id,
//! opened on read with the data key their record names (the record layout
//! is in `format.rs`, the sealing in `blobs/seal.rs`, the keys in
//! `blockrep_keys`).

use std::sync::Arc;

use blockrep_core::ChunkId;

use crate::blobs::{BlobKind, StoredCodec};
use crate::error::Error;
use crate::store::Store;

impl Store {
    /// Appends blob `plain_id` of an encrypted source, sealed by `sealer`
    /// (its source's current data key) under its stored id (the keyed hash
    /// of `plain_id`), unless a sound copy is stored. Returns the stored id,
    /// by which it is read, and whether it was new. As for
    /// [`Store::insert`], the caller has checked that `plain_id` is the
    /// blake3 of the decoded bytes, and nothing is durable before
    /// [`Store::sync`].
    pub fn insert_sealed(
        &self,
        sealer: &blockrep_keys::Sealer,
        kind: BlobKind,
        plain_id: &ChunkId,
        codec: StoredCodec,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<(ChunkId, bool), Error> {
        self.blobs
            .put_sealed(sealer, kind, plain_id, codec, raw_len, stored)
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

//! Reads of a chunk for its patches: the base a patch applies to, and a chunk
//! together with its block values, each with no more hashing than its caller
//! needs.

use blockrep_core::{BlockValue, ChunkId, hash_with_block_values};

use crate::error::{Error, ErrorKind};
use crate::store::Store;

impl Store {
    /// Reads and decodes a blob without checking its hash: for a caller that
    /// hashes what it makes of the bytes anyway (a patch's base: the rebuilt
    /// chunk must hash to the patch's id, so a damaged base cannot pass) and
    /// calls [`Store::read_blob`] when that check fails, to tell damage from
    /// a bad patch. A blob that does not decode, or decodes to another length
    /// than its record says, is still refused as corrupt.
    ///
    /// A sealed blob is authenticated when opened, so what this returns of
    /// one is what was sealed.
    pub fn read_blob_unverified(&self, id: &ChunkId) -> Result<Vec<u8>, Error> {
        Ok(self.read_decoded(id)?.raw)
    }

    fn read_decoded(&self, id: &ChunkId) -> Result<crate::blobs::seal::Decoded, Error> {
        let (location, stored) = self.blobs.get_stored(id)?;
        let header = location.header;
        let decoded = self.blobs.decode(location, stored)?;
        if decoded.raw.len() != header.raw_len as usize {
            self.blobs.note_damaged(location);
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "blob {id} decodes to {} bytes, not {}",
                    decoded.raw.len(),
                    header.raw_len
                ),
            ));
        }
        Ok(decoded)
    }

    /// Reads a chunk and gives its block values
    /// ([`hash_with_block_values`]) with it, checked against `id` by the same
    /// single pass of blake3 that yields them (not one pass to check and one
    /// for the values).
    pub fn read_blob_with_values(&self, id: &ChunkId) -> Result<(Vec<u8>, Vec<BlockValue>), Error> {
        let decoded = self.read_decoded(id)?;
        let raw = decoded.raw;
        let (computed, values) = hash_with_block_values(&raw);
        let stored_id = decoded.space.map_or(computed, |space| space.map(computed));
        // An all-zero chunk hashes to the zero id here, and a zero chunk is
        // never stored: it does not match either.
        if stored_id != *id {
            if let Ok(location) = self.blobs.location(id) {
                self.blobs.note_damaged(location);
            }
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("blob {id} does not hash to its id"),
            ));
        }
        Ok((raw, values))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::blobs::pack_file_name;
    use crate::format::RECORD_HEADER_LEN;
    use crate::{BlobKind, StoredCodec};

    #[test]
    fn values_come_checked_and_damage_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chunk: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 251) as u8).collect();
        let (id, values) = hash_with_block_values(&chunk);
        let compressed = zstd::bulk::compress(&chunk, 1).unwrap();
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Zstd, 65_536, &compressed)
            .unwrap();
        let (read, read_values) = store.read_blob_with_values(&id).unwrap();
        assert_eq!((read.as_slice(), read_values), (chunk.as_slice(), values));
        assert_eq!(store.read_blob_unverified(&id).unwrap(), chunk);

        // A raw chunk whose stored bytes rot: the unverified read gives the
        // rotten bytes (its caller hashes them), the checked reads refuse.
        let other: Vec<u8> = chunk.iter().map(|b| b ^ 0x5a).collect();
        let (other_id, _) = hash_with_block_values(&other);
        store
            .insert(BlobKind::Chunk, other_id, StoredCodec::Raw, 65_536, &other)
            .unwrap();
        let at = store.blobs.location(&other_id).unwrap();
        let pack = dir.path().join("packs").join(pack_file_name(at.pack));
        let file = std::fs::OpenOptions::new().write(true).open(pack).unwrap();
        file.write_all_at(
            &[other[100] ^ 1],
            at.offset + RECORD_HEADER_LEN as u64 + 100,
        )
        .unwrap();
        let rotten = store.read_blob_unverified(&other_id).unwrap();
        assert_eq!(rotten.len(), other.len());
        assert_ne!(rotten, other);
        let error = store.read_blob_with_values(&other_id).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Corrupt);
        assert!(
            error.to_string().contains("does not hash to its id"),
            "{error}"
        );
        assert!(store.read_blob(&other_id).is_err());
    }
}

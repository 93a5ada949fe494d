//! Reads of a chunk for its patches: the base a patch applies to, and a chunk
//! together with its block values, each with no more hashing than its caller
//! needs.

use blockrep_core::{BlockValue, ChunkId, hash_with_block_values};

use crate::blobs::decode_raw;
use crate::error::{Error, ErrorKind};
use crate::store::Store;

impl Store {
    /// Reads and decodes a blob without checking its hash: for a caller that
    /// hashes what it makes of the bytes anyway (a patch's base: the rebuilt
    /// chunk must hash to the patch's id, so a damaged base cannot pass) and
    /// calls [`Store::read_blob`] when that check fails, to tell damage from
    /// a bad patch. A blob that does not decode, or decodes to another length
    /// than its record says, is still refused as corrupt.
    pub fn read_blob_unverified(&self, id: &ChunkId) -> Result<Vec<u8>, Error> {
        let (location, stored) = self.blobs.get_stored(id)?;
        let header = location.header;
        let raw = decode_raw(header, stored)
            .map_err(|e| Error::new(ErrorKind::Corrupt, format!("blob {id}: {e}")))
            .and_then(|raw| {
                if raw.len() == header.raw_len as usize {
                    Ok(raw)
                } else {
                    Err(Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "blob {id} decodes to {} bytes, not {}",
                            raw.len(),
                            header.raw_len
                        ),
                    ))
                }
            });
        if raw.is_err() {
            self.blobs.note_damaged(location);
        }
        raw
    }

    /// Reads a chunk and gives its block values
    /// ([`hash_with_block_values`]) with it, checked against `id` by the same
    /// single pass of blake3 that yields them (not one pass to check and one
    /// for the values).
    pub fn read_blob_with_values(&self, id: &ChunkId) -> Result<(Vec<u8>, Vec<BlockValue>), Error> {
        let raw = self.read_blob_unverified(id)?;
        let (computed, values) = hash_with_block_values(&raw);
        // An all-zero chunk hashes to the zero id here, and a zero chunk is
        // never stored: it does not match either.
        if computed != *id {
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

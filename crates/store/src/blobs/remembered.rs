//! Reads of chunks for launch volumes, which read the same chunks again and
//! again: a chunk's blake3 is checked against its id the first time this
//! process reads it, and later reads check its record's crc32 (as a scan
//! does), which catches what the disk damaged since, at a fraction of the
//! cost. A collection that moves the blob copies a record whose crc32 then
//! covers the new place.
//!
//! The ids checked are remembered in a fixed table (`VERIFIED_SLOTS`
//! entries of 8 bytes, direct-mapped by the id's first 8 bytes, tagged by
//! the next 8): an id pushed out is checked by its hash again, and two ids
//! would have to share 128 bits to be taken for one another.

use std::sync::atomic::{AtomicU64, Ordering};

use blockrep_core::ChunkId;

use crate::error::{Error, ErrorKind};

use super::{Blobs, Location};

/// Entries of the table of checked ids: 2 MiB.
const VERIFIED_SLOTS: usize = 1 << 18;

/// Ids whose blake3 this process checked (see the module's docs).
pub(crate) struct VerifiedIds {
    slots: Box<[AtomicU64]>,
}

impl std::fmt::Debug for VerifiedIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedIds").finish_non_exhaustive()
    }
}

impl Default for VerifiedIds {
    fn default() -> Self {
        Self {
            slots: (0..VERIFIED_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl VerifiedIds {
    /// The slot and tag of `id` (a tag is never 0, an empty slot's value).
    fn place(id: &ChunkId) -> (usize, u64) {
        let bytes = id.as_bytes();
        let word = |at: usize| {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(eight)
        };
        ((word(0) as usize) % VERIFIED_SLOTS, word(8) | 1)
    }

    fn contains(&self, id: &ChunkId) -> bool {
        let (slot, tag) = Self::place(id);
        self.slots[slot].load(Ordering::Relaxed) == tag
    }

    fn insert(&self, id: &ChunkId) {
        let (slot, tag) = Self::place(id);
        self.slots[slot].store(tag, Ordering::Relaxed);
    }
}

impl Blobs {
    /// Reads blob `id` and decodes it: its hash checked the first time this
    /// process reads it, its record's crc32 after that.
    pub(crate) fn get_remembered(&self, id: &ChunkId) -> Result<Vec<u8>, Error> {
        if !self.verified.contains(id) {
            let raw = self.get(id)?;
            self.verified.insert(id);
            return Ok(raw);
        }
        let (location, stored) = self.get_stored_crc_checked(id)?;
        let decoded = self.decode(location, stored)?;
        if decoded.raw.len() != location.header.raw_len as usize {
            self.note_damaged(location);
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("blob {id} decodes to the wrong length"),
            ));
        }
        Ok(decoded.raw)
    }

    /// Remembers `id` as checked: its record was just written by this
    /// process from bytes it hashed to `id` itself, and the record's crc32
    /// covers what was written, so a first read need not hash it again.
    pub(crate) fn note_checked(&self, id: &ChunkId) {
        self.verified.insert(id);
    }

    /// Whether `id` is remembered as checked.
    #[cfg(test)]
    pub(crate) fn checked(&self, id: &ChunkId) -> bool {
        self.verified.contains(id)
    }

    /// [`Blobs::get_stored`] with its record's crc32 checked against the
    /// header as indexed (read from the pack when it was scanned or
    /// written): one read of the stored bytes, none of the header.
    fn get_stored_crc_checked(&self, id: &ChunkId) -> Result<(Location, Vec<u8>), Error> {
        let (location, stored) = self.get_stored(id)?;
        if !location
            .header
            .crc_matches(&location.header.to_bytes(), &stored)
        {
            return Err(self.fails_checksum(location));
        }
        Ok((location, stored))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use crate::blobs::pack_file_name;
    use crate::store::Store;
    use crate::{BlobKind, StoredCodec};

    #[test]
    fn a_chunk_damaged_after_its_first_read_fails_its_crc() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chunk: Vec<u8> = (0..65_536u32).map(|i| (i * 13 % 251) as u8).collect();
        let id = blockrep_core::ChunkId::from(blake3::hash(&chunk));
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, 65_536, &chunk)
            .unwrap();
        store.sync().unwrap();
        assert_eq!(store.blobs.get_remembered(&id).unwrap(), chunk);
        assert!(store.blobs.verified.contains(&id), "remembered as checked");
        assert_eq!(store.blobs.get_remembered(&id).unwrap(), chunk);
        // One byte of the stored chunk flipped on disk.
        let location = store.blobs.location(&id).unwrap();
        let pack = dir.path().join("packs").join(pack_file_name(location.pack));
        let file = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
        let at = location.offset + crate::format::RECORD_HEADER_LEN as u64 + 100;
        file.write_all_at(&[chunk[100] ^ 1], at).unwrap();
        let error = store.blobs.get_remembered(&id).unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::Corrupt, "{error}");
    }
}

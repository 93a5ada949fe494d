//! Sealed records: the blobs of an encrypted source, stored under a keyed id
//! and encrypted with its data key (see `blockrep_keys`).
//!
//! A sealed record's codec byte has its high bit set; its stored bytes are
//! the 16-byte reference of the data key, then AES-256-GCM's nonce, cipher
//! text (of the raw or zstd bytes, as the low bits of the codec say) and
//! tag. The cipher text is bound to the record's kind, codec, raw length and
//! stored id, so a sealed blob moved to another place, or to another
//! source, fails authentication. Its stored id is the keyed hash of its
//! plain id, which is how a sealed blob's content is checked once opened.

use std::cell::RefCell;

use blockrep_core::{ChunkId, IdSpace};
use blockrep_keys::{KeyRef, Keyring, Sealer};

use super::pack::{BlobKind, RecordHeader, StoredCodec};
use super::{Blobs, Location};
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;

/// Bytes a sealed record's stored bytes hold beyond the sealed ones: the
/// key reference.
pub(crate) const KEY_REF_LEN: usize = KeyRef::LEN;

/// Most bytes of sealing buffer a thread keeps between blobs (a few chunks'
/// worth; a larger blob's buffer is let go after it).
const SEALED_KEPT_BYTES: usize = 1 << 20;

thread_local! {
    /// A sealed record's stored bytes, built in a buffer each thread
    /// reuses: sealing allocates nothing per blob on the insert path.
    static SEALED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Why a record's bytes did not decode.
#[derive(Debug)]
pub(crate) enum DecodeFault {
    /// They are damaged: zstd fails, or a sealed record fails authentication.
    Damaged(String),
    /// They are sealed under a data key this store does not hold (shredded,
    /// or the store was opened without its key directory): not damage.
    NoKey(String),
}

/// A record's decoded bytes, and the key that opened them if it was sealed.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) raw: Vec<u8>,
    /// For a sealed record: the id space of the source whose key sealed it.
    pub(crate) space: Option<IdSpace>,
}

impl Decoded {
    /// Whether the decoded bytes are those of blob `id`: their blake3 is
    /// `id`, or for a sealed chunk the keyed hash of their blake3 (a sealed
    /// page or root holds stored ids only, and is named by its blake3), and
    /// their length is the header's.
    pub(crate) fn matches(&self, header: &RecordHeader, id: &ChunkId) -> bool {
        if self.raw.len() != header.raw_len as usize {
            return false;
        }
        let plain = blake3::hash(&self.raw);
        match &self.space {
            Some(space) if header.kind == BlobKind::Chunk => space.map(ChunkId::from(plain)) == *id,
            _ => ChunkId::from(plain) == *id,
        }
    }
}

impl Blobs {
    /// Appends blob `id` sealed by `sealer` unless a sound one is stored;
    /// whether it was new. A chunk's `id` is its stored id
    /// (its blake3 mapped into its source's id space), a page's or root's the blake3
    /// of its bytes (which hold stored ids only).
    pub(crate) fn put_sealed(
        &self,
        sealer: &Sealer,
        kind: BlobKind,
        id: ChunkId,
        codec: StoredCodec,
        raw_len: u32,
        stored: &[u8],
    ) -> Result<bool, Error> {
        self.check_writable()?;
        // Sealing costs a pass over the bytes: skip it for a blob that is
        // stored already (put checks again under the lock).
        {
            // Noted under the index lock, as `put` does: a collection's sweep
            // cannot drop the blob between the lookup and the note.
            let inner = lock(&self.inner);
            if inner.index.get(&id).is_some_and(|at| at.crc_ok) {
                self.fence.note(&id);
                return Ok(false);
            }
        }
        SEALED.with_borrow_mut(|sealed| {
            sealed.clear();
            sealed.extend_from_slice(&sealer.reference().0);
            sealer
                .seal_into(&aad(kind, codec, raw_len, &id), stored, sealed)
                .map_err(|e| Error::new(ErrorKind::Invalid, format!("cannot seal blob: {e}")))?;
            let put = self.put_record(kind, id, codec, true, raw_len, sealed, None);
            if sealed.capacity() > SEALED_KEPT_BYTES {
                *sealed = Vec::new();
            }
            put
        })
    }

    /// Decodes the stored bytes of the record at `location` (opening them if
    /// sealed). Damage is noted, so the record stops counting as stored; a
    /// missing data key is not damage.
    pub(crate) fn decode(&self, location: Location, stored: Vec<u8>) -> Result<Decoded, Error> {
        let id = location.header.id;
        decode(&self.keyring, &location.header, stored).map_err(|fault| match fault {
            DecodeFault::Damaged(why) => {
                self.note_damaged(location);
                Error::new(ErrorKind::Corrupt, format!("blob {id}: {why}"))
            }
            DecodeFault::NoKey(why) => {
                Error::new(ErrorKind::KeyUnavailable, format!("blob {id}: {why}"))
            }
        })
    }
}

/// What a sealed record's cipher text is bound to.
fn aad(kind: BlobKind, codec: StoredCodec, raw_len: u32, id: &ChunkId) -> [u8; 38] {
    let mut out = [0u8; 38];
    out[0] = kind as u8;
    out[1] = codec as u8;
    out[2..6].copy_from_slice(&raw_len.to_le_bytes());
    out[6..].copy_from_slice(id.as_bytes());
    out
}

/// Decodes a record's stored bytes (opening them first if sealed) to at
/// most its raw length.
pub(crate) fn decode(
    keyring: &Keyring,
    header: &RecordHeader,
    stored: Vec<u8>,
) -> Result<Decoded, DecodeFault> {
    let (stored, space) = if header.sealed {
        if stored.len() < KEY_REF_LEN {
            return Err(DecodeFault::Damaged("sealed record too short".into()));
        }
        let mut reference = [0u8; KEY_REF_LEN];
        reference.copy_from_slice(&stored[..KEY_REF_LEN]);
        let (sealer, space) = keyring
            .opener(&KeyRef(reference))
            .map_err(|e| DecodeFault::NoKey(e.to_string()))?;
        let aad = aad(header.kind, header.codec, header.raw_len, &header.id);
        let opened = sealer
            .open_from(&aad, stored, KEY_REF_LEN)
            .map_err(|e| DecodeFault::Damaged(e.to_string()))?;
        (opened, Some(space))
    } else {
        (stored, None)
    };
    let raw = match header.codec {
        StoredCodec::Raw => stored,
        StoredCodec::Zstd => decompress(&stored, header.raw_len as usize)
            .map_err(|e| DecodeFault::Damaged(format!("zstd: {e}")))?,
    };
    Ok(Decoded { raw, space })
}

/// `stored` decompressed into at most `capacity` bytes, by this thread's
/// own decompression context: making one per blob (over 100 KiB, zeroed)
/// cost as much as decompressing a 64 KiB chunk.
fn decompress(stored: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut()
            .expect("made above")
            .decompress(stored, capacity)
    })
}

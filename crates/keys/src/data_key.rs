//! A data key and what it does: seal and open bytes with AES-256-GCM, map a
//! blob's plain id to its stored id, and authenticate records.
//!
//! One 32-byte data key yields three independent keys by blake3's key
//! derivation, one per purpose, so that no key is ever used for two things:
//! the AEAD key that seals blobs, the id key of the keyed hash that names
//! them, and the MAC key of records (heads, snapshots, launches).

use std::fmt;
use std::path::PathBuf;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use zeroize::Zeroizing;

use crate::budget::{RESERVE_STEP, SealBudget};
use crate::error::{Error, ErrorKind};

/// Length of a data key (AES-256).
pub const DATA_KEY_LEN: usize = 32;
/// Length of the authentication tag AES-256-GCM appends.
pub const TAG_LEN: usize = 16;
/// Bytes sealing adds to a plain text: the nonce before it, the tag after.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Seals one data key may make: nonces are random 96-bit values, and NIST SP
/// 800-38D bounds their use to 2^32 messages per key. Seals are counted
/// durably in the key directory (see `budget.rs`) and refused past it; a
/// server starts a source's next key once a quarter is left. At 64 KiB per
/// chunk this is 256 TiB of new data per key.
pub const SEALS_PER_KEY_MAX: u64 = 1 << 32;

const SEAL_CONTEXT: &str = "blockrep 2026-12 blob seal key v1";
const ID_CONTEXT: &str = "blockrep 2026-12 stored id key v1";
const MAC_CONTEXT: &str = "blockrep 2026-12 record mac key v1";
const REF_CONTEXT: &str = "blockrep 2026-12 key reference v1";

/// A plain text data key. It lives only in memory (wiped when dropped); on
/// disk it exists only wrapped by a key-encryption key.
pub struct DataKey(Zeroizing<[u8; DATA_KEY_LEN]>);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({})", self.reference())
    }
}

impl DataKey {
    /// A new key from the system's random source.
    pub fn generate() -> Result<Self, Error> {
        let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        aws_lc_rs::rand::fill(key.as_mut())
            .map_err(|_| Error::new(ErrorKind::Io, "the system's random source failed"))?;
        Ok(Self(key))
    }

    /// The key whose bytes are `bytes`; they must be [`DATA_KEY_LEN`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let key: [u8; DATA_KEY_LEN] = bytes.try_into().map_err(|_| {
            Error::new(
                ErrorKind::Kek,
                format!("a data key is {DATA_KEY_LEN} bytes, not {}", bytes.len()),
            )
        })?;
        Ok(Self(Zeroizing::new(key)))
    }

    /// The key's bytes, for wrapping.
    pub(crate) fn bytes(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }

    /// The key's public name: derived from the key, so a record naming it
    /// cannot be pointed at another key, and it reveals nothing of the key.
    pub fn reference(&self) -> KeyRef {
        let derived = Zeroizing::new(blake3::derive_key(REF_CONTEXT, self.bytes()));
        let mut reference = [0u8; KeyRef::LEN];
        reference.copy_from_slice(&derived[..KeyRef::LEN]);
        KeyRef(reference)
    }

    /// What seals, opens and names blobs under this key.
    pub fn sealer(&self) -> Result<Sealer, Error> {
        let seal_key = Zeroizing::new(blake3::derive_key(SEAL_CONTEXT, self.bytes()));
        let aead = RandomizedNonceKey::new(&AES_256_GCM, seal_key.as_ref())
            .map_err(|_| Error::new(ErrorKind::Invalid, "AES-256-GCM refused the key"))?;
        Ok(Sealer {
            reference: self.reference(),
            aead,
            id_key: Zeroizing::new(blake3::derive_key(ID_CONTEXT, self.bytes())),
            mac_key: Zeroizing::new(blake3::derive_key(MAC_CONTEXT, self.bytes())),
            budget: SealBudget::in_memory(SEALS_PER_KEY_MAX),
        })
    }
}

/// The public name of a data key (16 bytes), recorded beside what it sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyRef(pub [u8; KeyRef::LEN]);

impl KeyRef {
    /// Length of a key reference.
    pub const LEN: usize = 16;

    /// Parses the 32 hex digits [`KeyRef`]'s `Display` writes.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != 2 * Self::LEN {
            return None;
        }
        let mut out = [0u8; Self::LEN];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Some(Self(out))
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Seals, opens and names blobs under one data key.
pub struct Sealer {
    reference: KeyRef,
    aead: RandomizedNonceKey,
    id_key: Zeroizing<[u8; 32]>,
    mac_key: Zeroizing<[u8; 32]>,
    /// Seals made and allowed under this key.
    budget: SealBudget,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer({})", self.reference)
    }
}

impl Sealer {
    /// The name of the data key this sealer uses.
    pub fn reference(&self) -> KeyRef {
        self.reference
    }

    /// This sealer with its seals counted in `file` (the key directory's
    /// `NNNNNNNN.seals` beside the key's record), from what it reserved.
    pub fn counted_in(self, file: PathBuf) -> Result<Self, Error> {
        Ok(Self {
            budget: SealBudget::load(file, SEALS_PER_KEY_MAX, RESERVE_STEP)?,
            ..self
        })
    }

    /// Seals this key may still make ([`SEALS_PER_KEY_MAX`] less those made
    /// or reserved, by this process or earlier ones).
    pub fn seals_left(&self) -> u64 {
        self.budget.left()
    }

    /// The id space of this key: a chunk's stored id is the keyed blake3
    /// of its blake3 (see `blockrep_core::IdSpace`). A source's chunks are
    /// named in the space of its first key (`Keyring::id_space`).
    pub fn id_space(&self) -> blockrep_core::IdSpace {
        blockrep_core::IdSpace::keyed(*self.id_key)
    }

    /// A MAC of `bytes` under this key, for records that are kept in clear
    /// but must not be swapped or rolled back unnoticed.
    pub fn mac(&self, bytes: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.mac_key);
        hasher.update(bytes);
        *hasher.finalize().as_bytes()
    }

    /// Seals `plain` bound to `aad` (what the sealed bytes belong to: their
    /// stored id and kind, so they cannot be moved to another place):
    /// appends nonce, cipher text and tag to `out`.
    pub fn seal_into(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        self.budget.take()?;
        // One copy of the plain text, encrypted where it lies: the nonce is
        // written in front of it and the tag after.
        let start = out.len();
        out.reserve(plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&[0u8; NONCE_LEN]);
        out.extend_from_slice(plain);
        let (nonce, tag) = self
            .aead
            .seal_in_place_separate_tag(Aad::from(aad), &mut out[start + NONCE_LEN..])
            .map_err(|_| Error::new(ErrorKind::Invalid, "AES-256-GCM cannot seal this"))?;
        out[start..start + NONCE_LEN].copy_from_slice(nonce.as_ref());
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens what [`Sealer::seal_into`] made with the same `aad`; refuses (and
    /// returns nothing) when a byte changed, the bytes were sealed under
    /// another key, or for another place. The sealed bytes start at `start` of `sealed` (what precedes them,
    /// a record's key reference, is dropped): they are opened where they lie.
    pub fn open_from(
        &self,
        aad: &[u8],
        mut sealed: Vec<u8>,
        start: usize,
    ) -> Result<Vec<u8>, Error> {
        let refused = || {
            Error::new(
                ErrorKind::Auth,
                format!(
                    "sealed bytes fail authentication under data key {}: damaged, \
                     tampered with, or sealed for another place",
                    self.reference
                ),
            )
        };
        if sealed.len() < start.saturating_add(SEAL_OVERHEAD) {
            return Err(refused());
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[start..start + NONCE_LEN])
            .map_err(|_| refused())?;
        let body = start + NONCE_LEN;
        let plain_len = self
            .aead
            .open_in_place(nonce, Aad::from(aad), &mut sealed[body..])
            .map_err(|_| refused())?
            .len();
        sealed.copy_within(body..body + plain_len, 0);
        sealed.truncate(plain_len);
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(sealer: &Sealer, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal_into(aad, plain, &mut out).unwrap();
        out
    }

    #[test]
    fn sealed_bytes_open_only_with_their_key_and_place() {
        let key = DataKey::generate().unwrap();
        let sealer = key.sealer().unwrap();
        let plain = b"the quick brown fox".repeat(100);
        let sealed = seal(&sealer, b"place-1", &plain);
        assert_eq!(sealed.len(), plain.len() + SEAL_OVERHEAD);
        assert!(!sealed.windows(9).any(|w| w == b"the quick"));
        assert_eq!(
            sealer.open_from(b"place-1", sealed.clone(), 0).unwrap(),
            plain
        );
        let mut prefixed = b"key-ref".to_vec();
        prefixed.extend_from_slice(&sealed);
        assert_eq!(sealer.open_from(b"place-1", prefixed, 7).unwrap(), plain);
        assert!(sealer.open_from(b"place-1", sealed.clone(), 1).is_err());

        // Another place, another key, a flipped byte, a cut: all refused.
        let error = sealer.open_from(b"place-2", sealed.clone(), 0).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Auth);
        let other = DataKey::generate().unwrap().sealer().unwrap();
        assert_eq!(
            other
                .open_from(b"place-1", sealed.clone(), 0)
                .unwrap_err()
                .kind(),
            ErrorKind::Auth
        );
        for at in [0, NONCE_LEN, sealed.len() / 2, sealed.len() - 1] {
            let mut flipped = sealed.clone();
            flipped[at] ^= 1;
            assert!(
                sealer.open_from(b"place-1", flipped, 0).is_err(),
                "byte {at}"
            );
        }
        assert!(
            sealer
                .open_from(b"place-1", sealed[..10].to_vec(), 0)
                .is_err()
        );

        // Two seals of the same bytes never share a nonce.
        let again = seal(&sealer, b"place-1", &plain);
        assert_ne!(again[..NONCE_LEN], sealed[..NONCE_LEN]);
    }

    #[test]
    fn stored_ids_are_keyed_and_stable() {
        let key = DataKey::generate().unwrap();
        let plain_id = *blake3::hash(b"chunk").as_bytes();
        let stored = |sealer: &Sealer| sealer.id_space().map(blockrep_core::ChunkId(plain_id)).0;
        let a = stored(&key.sealer().unwrap());
        assert_eq!(a, stored(&key.sealer().unwrap()));
        assert_ne!(a, plain_id);
        let other = DataKey::generate().unwrap().sealer().unwrap();
        assert_ne!(a, stored(&other));
        let space = key.sealer().unwrap().id_space();
        assert_eq!(space.map(blockrep_core::ChunkId(plain_id)).0, a);
        // The reference names the key and round-trips as text.
        let reference = key.reference();
        assert_eq!(KeyRef::parse(&reference.to_string()), Some(reference));
        assert_ne!(reference, other.reference());
        assert_eq!(KeyRef::parse("zz"), None);
    }
}

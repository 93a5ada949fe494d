//! Encryption at rest: the key hierarchy.
//!
//! - A **key-encryption key** ([`Kek`]) is held outside blockrep: a file of
//!   32 random bytes (`blockrep key init`), or a key service reached through
//!   a command (`--kek-cmd`, contract in [`kek_cmd`]).
//! - Each encrypted source has **data keys** ([`DataKey`]), made here from
//!   the system's random source and written only wrapped by the KEK, in the
//!   key directory ([`KeyDir`]) kept apart from the data.
//! - A data key yields, by blake3 key derivation, a sealing key
//!   (AES-256-GCM with random 96-bit nonces), an id key (the stored id of a
//!   blob is a keyed hash of its plain id) and a MAC key for records
//!   ([`Sealer`]).
//!
//! Re-wrapping under a new KEK ([`KeyDir::rewrap`]) rewrites only the small
//! key records; shredding ([`KeyDir::shred`]) destroys a source's keys, and
//! with them every byte sealed under them.
#![deny(unsafe_code)]

mod budget;
mod data_key;
mod error;
mod fsutil;
mod kek;
pub mod kek_cmd;
mod key_dir;
mod keyring;
mod witness;

pub use data_key::{
    DATA_KEY_LEN, DataKey, KeyRef, SEAL_OVERHEAD, SEALS_PER_KEY_MAX, Sealer, TAG_LEN,
};
pub use error::{Error, ErrorKind};
pub use kek::{KEK_FILE_LEN, Kek, KekKind, init_kek_file};
pub use key_dir::{KeyDir, KeyRecord, RewrapReport};
pub use keyring::Keyring;

//! Key-encryption keys (KEKs): what wraps every data key before it is
//! written anywhere. Two providers:
//!
//! - a **file** of 32 random bytes (`blockrep key init`), which wraps with
//!   AES-256-GCM here;
//! - a **command** (`--kek-cmd`) standing for a key service (AWS KMS, Vault
//!   transit, an HSM): blockrep hands it the data key through a pipe and
//!   keeps what it answers. Its contract is in `kek_cmd.rs`.
//!
//! Every wrap is bound to a context naming the source and the data key, so a
//! wrapped key copied into another source's record does not unwrap.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use zeroize::Zeroizing;

use crate::data_key::{DATA_KEY_LEN, DataKey};
use crate::error::{Error, ErrorKind};
use crate::kek_cmd::KekCommand;

/// Length of a KEK file.
pub const KEK_FILE_LEN: usize = 32;
const KEK_ID_CONTEXT: &str = "blockrep 2026-12 kek file id v1";

/// How a KEK is held, as recorded beside each key it wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekKind {
    /// A local file of 32 bytes.
    File,
    /// An external command (a key service).
    Command,
}

impl KekKind {
    /// The byte a key record stores.
    pub fn code(self) -> u8 {
        match self {
            Self::File => 1,
            Self::Command => 2,
        }
    }

    /// The kind of `code`, if known.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::File),
            2 => Some(Self::Command),
            _ => None,
        }
    }
}

impl fmt::Display for KekKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::File => "file",
            Self::Command => "command",
        })
    }
}

/// A key-encryption key.
pub enum Kek {
    /// A KEK file's key, read once into memory.
    File {
        /// Where it was read from (for messages).
        path: PathBuf,
        /// Its id: `file:` and 16 hex digits derived from the key.
        id: String,
        /// The wrapping cipher.
        aead: RandomizedNonceKey,
    },
    /// A key service reached through a command.
    Command(KekCommand),
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, id, .. } => write!(f, "Kek::File({}, {id})", path.display()),
            Self::Command(command) => write!(f, "Kek::Command({command:?})"),
        }
    }
}

impl Kek {
    /// Reads the KEK file at `path`: exactly [`KEK_FILE_LEN`] bytes, readable
    /// by its owner only.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Kek,
                format!("cannot read the KEK file {}", path.display()),
                e,
            )
        })?);
        if bytes.len() != KEK_FILE_LEN {
            return Err(Error::new(
                ErrorKind::Kek,
                format!(
                    "the KEK file {} holds {} bytes, not {KEK_FILE_LEN} (make one with \
                     `blockrep key init --out PATH`)",
                    path.display(),
                    bytes.len()
                ),
            ));
        }
        Self::from_key_bytes(path, &bytes)
    }

    fn from_key_bytes(path: &Path, key: &[u8]) -> Result<Self, Error> {
        let derived = blake3::derive_key(KEK_ID_CONTEXT, key);
        let id = format!(
            "file:{}",
            derived[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let aead = RandomizedNonceKey::new(&AES_256_GCM, key)
            .map_err(|_| Error::new(ErrorKind::Kek, "AES-256-GCM refused the KEK"))?;
        Ok(Self::File {
            path: path.to_owned(),
            id,
            aead,
        })
    }

    /// The key service behind `command` (run by `/bin/sh -c`); asks it for
    /// its KEK id, so a service that cannot answer is refused now.
    pub fn from_command(command: &str) -> Result<Self, Error> {
        KekCommand::new(command).map(Self::Command)
    }

    /// The KEK's id, recorded beside every key it wraps.
    pub fn id(&self) -> &str {
        match self {
            Self::File { id, .. } => id,
            Self::Command(command) => command.id(),
        }
    }

    /// How the KEK is held.
    pub fn kind(&self) -> KekKind {
        match self {
            Self::File { .. } => KekKind::File,
            Self::Command(_) => KekKind::Command,
        }
    }

    /// Wraps `key` bound to `context`.
    pub fn wrap(&self, key: &DataKey, context: &str) -> Result<Vec<u8>, Error> {
        match self {
            Self::File { aead, .. } => {
                let mut body = key.bytes().to_vec();
                let nonce = aead
                    .seal_in_place_append_tag(Aad::from(context.as_bytes()), &mut body)
                    .map_err(|_| Error::new(ErrorKind::Kek, "AES-256-GCM cannot wrap the key"))?;
                let mut out = nonce.as_ref().to_vec();
                out.extend_from_slice(&body);
                Ok(out)
            }
            Self::Command(command) => command.wrap(key, context),
        }
    }

    /// Unwraps what [`Kek::wrap`] made for `context`.
    pub fn unwrap_key(&self, wrapped: &[u8], context: &str) -> Result<DataKey, Error> {
        match self {
            Self::File { aead, id, path } => {
                let refused = || {
                    Error::new(
                        ErrorKind::Auth,
                        format!(
                            "the KEK file {} ({id}) cannot unwrap the data key for {context}: \
                             the wrapped key is damaged or was made for another place",
                            path.display()
                        ),
                    )
                };
                if wrapped.len() <= NONCE_LEN {
                    return Err(refused());
                }
                let nonce = Nonce::try_assume_unique_for_key(&wrapped[..NONCE_LEN])
                    .map_err(|_| refused())?;
                let mut body = Zeroizing::new(wrapped[NONCE_LEN..].to_vec());
                let plain = aead
                    .open_in_place(nonce, Aad::from(context.as_bytes()), &mut body)
                    .map_err(|_| refused())?;
                if plain.len() != DATA_KEY_LEN {
                    return Err(refused());
                }
                DataKey::from_bytes(plain)
            }
            Self::Command(command) => command.unwrap_key(wrapped, context),
        }
    }
}

/// Makes a new KEK file at `path`: 32 bytes from the system's random source,
/// mode 0600, fsynced with its directory. Refuses to replace an existing
/// file: a lost KEK loses every key it wrapped.
pub fn init_kek_file(path: &Path) -> Result<String, Error> {
    let mut key = Zeroizing::new([0u8; KEK_FILE_LEN]);
    aws_lc_rs::rand::fill(key.as_mut())
        .map_err(|_| Error::new(ErrorKind::Io, "the system's random source failed"))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::AlreadyExists {
                "it exists, and replacing a KEK loses every key it wrapped"
            } else {
                "cannot create it"
            };
            Error::with_source(
                ErrorKind::Io,
                format!("will not write the KEK file {}: {why}", path.display()),
                e,
            )
        })?;
    file.write_all(key.as_ref())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(format!("cannot write the KEK file {}", path.display()), e))?;
    crate::fsutil::sync_parent(path)?;
    Ok(Kek::from_key_bytes(path, key.as_ref())?.id().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kek_file_wraps_for_one_context_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let id = init_kek_file(&path).unwrap();
        assert!(id.starts_with("file:") && id.len() == 21, "{id}");
        let error = init_kek_file(&path).unwrap_err();
        assert!(error.to_string().contains("exists"), "{error}");
        let kek = Kek::from_file(&path).unwrap();
        assert_eq!(kek.id(), id);

        let key = DataKey::generate().unwrap();
        let wrapped = kek.wrap(&key, "source=a").unwrap();
        assert!(!wrapped.windows(8).any(|w| w == &key.bytes()[..8]));
        let back = kek.unwrap_key(&wrapped, "source=a").unwrap();
        assert_eq!(back.bytes(), key.bytes());
        let error = kek.unwrap_key(&wrapped, "source=b").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Auth);

        // Another KEK cannot unwrap it; a short or long file is refused.
        let other_path = dir.path().join("other");
        init_kek_file(&other_path).unwrap();
        let other = Kek::from_file(&other_path).unwrap();
        assert_ne!(other.id(), kek.id());
        assert!(other.unwrap_key(&wrapped, "source=a").is_err());
        std::fs::write(dir.path().join("short"), [1u8; 31]).unwrap();
        let error = Kek::from_file(&dir.path().join("short")).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Kek);
        assert!(error.to_string().contains("31 bytes"), "{error}");
    }
}

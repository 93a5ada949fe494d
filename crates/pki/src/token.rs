//! The admin bearer token: the admin identity of the plain-HTTP admin API.
//!
//! `DIR/admin.token` holds 32 random bytes as 64 lowercase hex digits and a
//! newline, mode 0600. `blockrep cert init` writes it; the server writes it at
//! start when it is missing, so directories made before the token existed get
//! one too. The server refuses a token file that every local user may read
//! (like ssh refuses such a key) and compares presented tokens in constant time.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::Error;

/// File name of the admin token inside a TLS directory.
pub const ADMIN_TOKEN_FILE_NAME: &str = "admin.token";

/// Random bytes in a generated token (64 hex digits).
const TOKEN_RANDOM_BYTES: usize = 32;
/// Shortest token accepted from a file: an operator's own token must carry at
/// least as many characters as a generated one has bytes.
const TOKEN_CHARS_MIN: usize = 32;
/// Longest token accepted from a file (and so the most a client sends).
const TOKEN_CHARS_MAX: usize = 512;
/// Permission bits a token file must not have: any access by others (every
/// local user), and writing by the group. Reading by the group is allowed,
/// for a token owned by root and read by the server's group; a group that
/// could write it could put in a token of its own choosing.
const TOKEN_FORBIDDEN_MODE_BITS: u32 = 0o027;

/// The admin bearer token. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct AdminToken(String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// A new random token.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| Error::Invalid("no random numbers for the admin token".into()))?;
        Ok(Self(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// Reads a token file: its one line, without surrounding white space.
    /// Refuses a file that others (every local user) may access, and a token that is too
    /// short, too long or not printable ASCII (it travels in an HTTP header).
    pub fn read(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io {
            what: format!("cannot read the admin token {}", path.display()),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(io)?;
        let mode = metadata.permissions().mode();
        if mode & TOKEN_FORBIDDEN_MODE_BITS != 0 {
            return Err(Error::Invalid(format!(
                "the admin token {} has mode {:o}: others may read it, or its group may \
                 change it; `chmod 600` it",
                path.display(),
                mode & 0o777
            )));
        }
        if metadata.len() > TOKEN_CHARS_MAX as u64 + 2 {
            return Err(Error::Invalid(format!(
                "the admin token {} is longer than {TOKEN_CHARS_MAX} characters",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(text.trim())
            .map_err(|why| Error::Invalid(format!("the admin token {}: {why}", path.display())))
    }

    /// Reads the token file, or writes a new token there (mode 0600) when it
    /// does not exist; the flag says whether it was written.
    pub fn read_or_create(path: &Path) -> Result<(Self, bool), Error> {
        match Self::create_new(path) {
            Ok(token) => Ok((token, true)),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::read(path).map(|token| (token, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Writes a new token to `path`, which must not exist (O_EXCL: two servers
    /// starting at once cannot each write their own).
    fn create_new(path: &Path) -> Result<Self, Error> {
        let token = Self::generate()?;
        let io = |source| Error::Io {
            what: format!("cannot write the admin token {}", path.display()),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(format!("{}\n", token.0).as_bytes())
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        crate::files::sync_parent(path)?;
        Ok(token)
    }

    /// Replaces the token file with a new token (mode 0600): `cert init --force`.
    pub(crate) fn replace(path: &Path) -> Result<Self, Error> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    what: format!("cannot replace the admin token {}", path.display()),
                    source,
                });
            }
        }
        Self::create_new(path)
    }

    fn parse(text: &str) -> Result<Self, String> {
        let chars = text.len();
        if !(TOKEN_CHARS_MIN..=TOKEN_CHARS_MAX).contains(&chars) {
            return Err(format!(
                "{chars} characters; a token has {TOKEN_CHARS_MIN} to {TOKEN_CHARS_MAX}"
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("only printable ASCII without spaces may be in a token".into());
        }
        Ok(Self(text.to_owned()))
    }

    /// The token as sent in `Authorization: Bearer ...`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they
    /// differ (a timing side channel would let a caller guess it byte by byte).
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq::constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_random_hex_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE_NAME);
        let (token, created) = AdminToken::read_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(token.as_str().len(), 64);
        assert!(token.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = AdminToken::read_or_create(&path).unwrap();
        assert!(!created);
        assert!(again.matches(token.as_str()));
        assert!(!token.matches(AdminToken::generate().unwrap().as_str()));
        assert!(!token.matches(&token.as_str()[..63]));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains(token.as_str()));
    }

    #[test]
    fn token_files_others_can_read_or_short_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE_NAME);
        AdminToken::read_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        AdminToken::read(&path).unwrap();
        for refused in [0o644, 0o660, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(refused)).unwrap();
            let error = AdminToken::read(&path).unwrap_err().to_string();
            assert!(error.contains("chmod 600"), "{refused:o}: {error}");
        }
        std::fs::write(&path, "short\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(AdminToken::read(&path).is_err());
        std::fs::write(&path, format!("{}\n", "a b".repeat(20))).unwrap();
        assert!(AdminToken::read(&path).is_err());
    }
}

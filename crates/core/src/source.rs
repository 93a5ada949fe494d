//! Source ids: the validated name of a replicated disk, safe as a path component.

use std::fmt;

use crate::error::{Error, ErrorKind};

/// Longest allowed source id.
pub const SOURCE_ID_MAX_LEN: usize = 64;

/// A validated source id: `[a-z0-9][a-z0-9._-]{0,63}`.
///
/// Source ids name directories in the store, so they are validated before any path
/// is built from them: no `/`, no `..` (a leading dot is impossible), no NUL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(String);

impl SourceId {
    /// Validates `id`.
    pub fn new(id: &str) -> Result<Self, Error> {
        if valid_name(id, SOURCE_ID_MAX_LEN) {
            Ok(Self(id.to_owned()))
        } else {
            Err(Error::new(
                ErrorKind::InvalidSourceId,
                format!(
                    "invalid source id {id:?}: must match [a-z0-9][a-z0-9._-]{{0,63}} \
                     without '..'"
                ),
            ))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SourceId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

/// Whether `name` matches `[a-z0-9][a-z0-9._-]*` without `..` and is at
/// most `max_len` bytes: the rule of every name that becomes a path component
/// (source ids, volume names).
pub(crate) fn valid_name(name: &str, max_len: usize) -> bool {
    let bytes = name.as_bytes();
    let valid_first = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid_rest = |b: u8| valid_first(b) || matches!(b, b'.' | b'_' | b'-');
    !bytes.is_empty()
        && bytes.len() <= max_len
        && valid_first(bytes[0])
        && bytes[1..].iter().all(|&b| valid_rest(b))
        && !name.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        for ok in ["a", "web-01", "db.prod_2", "0", &"a".repeat(64)] {
            assert!(SourceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_path_tricks() {
        for bad in [
            "",
            "a/b",
            "..",
            "a..b",
            ".hidden",
            "a\0b",
            "A",
            "-a",
            "a b",
            "é",
            &"a".repeat(65),
        ] {
            assert_eq!(
                SourceId::new(bad).unwrap_err().kind(),
                ErrorKind::InvalidSourceId,
                "{bad:?}"
            );
        }
    }
}

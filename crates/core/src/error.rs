//! Errors of the core data model: a kind to match on and a message to show.

use std::fmt;

/// What went wrong, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A geometry (disk size, chunk size) outside the supported limits.
    InvalidGeometry,
    /// A serialized page or root that does not parse.
    InvalidEncoding,
    /// A source id that does not match `[a-z0-9][a-z0-9._-]{0,63}`.
    InvalidSourceId,
    /// An I/O error opening or reading a disk.
    Io,
    /// Two roots or id lists that cannot be compared: their geometries (disk
    /// size, chunk size) or lengths differ. From a peer, a protocol error.
    GeometryMismatch,
    /// The disk became shorter than it was when opened while it was being read
    /// (a truncated image file). Transient from the reader's point of view: a
    /// later scan sees the disk as it is then.
    DiskShrank,
    /// A sub-chunk patch that cannot apply to its base: ranges empty, out of
    /// order, overlapping or beyond the chunk, or data of another length than
    /// its ranges. From a peer, a protocol error.
    InvalidPatch,
}

/// Error type of `blockrep-core`: a kind and a human-readable message.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<std::io::Error>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Self {
            kind: ErrorKind::Io,
            message: message.into(),
            source: Some(source),
        }
    }

    /// The cause of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {}", self.message, source),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

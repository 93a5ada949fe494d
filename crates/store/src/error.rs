use std::fmt;

/// What went wrong in the store, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O error (disk full, permission, ...). Nothing was committed.
    Io,
    /// Stored bytes fail their checksum or hash.
    Corrupt,
    /// A blob that should exist does not.
    Missing,
    /// A commit does not follow the current head (another writer moved it).
    EpochMismatch,
    /// Invalid input from the caller (bad geometry, bad id, ...).
    Invalid,
    /// A snapshot or launch of that name already exists.
    AlreadyExists,
    /// The named source head, snapshot or launch does not exist.
    NotFound,
    /// The launch is open and cannot be deleted now.
    Busy,
}

/// Error type of `blockrep-store`.
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

    /// Whether this is an I/O error for a file that does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        self.source
            .as_ref()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
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

impl From<Error> for std::io::Error {
    /// For callers that speak `std::io` (block-device style I/O on launch volumes):
    /// the kind maps to the nearest `io::ErrorKind`, the error itself is kept as
    /// the source.
    fn from(error: Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match error.kind {
            ErrorKind::Io => error
                .source
                .as_ref()
                .map_or(Io::Other, std::io::Error::kind),
            ErrorKind::Corrupt | ErrorKind::Missing => Io::InvalidData,
            ErrorKind::Invalid => Io::InvalidInput,
            ErrorKind::AlreadyExists => Io::AlreadyExists,
            ErrorKind::NotFound => Io::NotFound,
            ErrorKind::Busy => Io::ResourceBusy,
            ErrorKind::EpochMismatch => Io::Other,
        };
        std::io::Error::new(kind, error)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

//! Errors of the store: the shape every blockrep crate shares
//! (`blockrep_core::error_type!`) around the store's own kinds.

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
    /// The source is served by another server sharing the bucket (it holds
    /// the source's lease), or this server's lease lapsed.
    Leased,
    /// A blob is sealed under a data key this store does not hold: its
    /// source was shredded, or the store was opened without its key
    /// directory.
    KeyUnavailable,
}

blockrep_core::error_type! {
    /// Error type of `blockrep-store`.
    pub struct Error: ErrorKind, io = Io;
}

impl Error {
    /// Whether this is an I/O error for a file that does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        self.source
            .as_ref()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    }
}

impl Error {
    /// A write the bucket refused because another server wrote the record
    /// since this one read it (see `bucket/records.rs`), as `Leased`.
    pub(crate) fn lease_refusal(self) -> Self {
        let refused = self
            .source
            .as_ref()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied);
        if refused {
            Self::new(ErrorKind::Leased, self.to_string())
        } else {
            self
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
            ErrorKind::Busy | ErrorKind::Leased => Io::ResourceBusy,
            ErrorKind::KeyUnavailable => Io::PermissionDenied,
            ErrorKind::EpochMismatch => Io::Other,
        };
        std::io::Error::new(kind, error)
    }
}

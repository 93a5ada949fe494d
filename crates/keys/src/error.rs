//! Errors of the key layer: the shape every blockrep crate shares.

/// What went wrong with a key, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O error reading or writing a key file.
    Io,
    /// The key-encryption key cannot be used: its file is missing or of the
    /// wrong size, or the key service's command failed, timed out or
    /// answered something that is not a key.
    Kek,
    /// A key record fails its checksum or layout.
    Corrupt,
    /// Sealed bytes fail authentication: damaged, tampered with, or sealed
    /// under another key or for another place.
    Auth,
    /// A key record is wrapped under another key-encryption key than the
    /// ones given.
    WrongKek,
    /// No such key (never made, or shredded).
    NotFound,
    /// Invalid input from the caller.
    Invalid,
    /// A data key has sealed as many times as it may
    /// ([`crate::SEALS_PER_KEY_MAX`]): the source needs its next key.
    Exhausted,
}

blockrep_core::error_type! {
    /// Error type of `blockrep-keys`.
    pub struct Error: ErrorKind, io = Io;
}

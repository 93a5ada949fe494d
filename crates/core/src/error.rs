//! Errors of the core data model, and the one error shape every blockrep
//! library crate uses: a kind to match on, a message to show, and the I/O
//! error underneath where there is one.
//!
//! The shape is declared by the [`error_type!`](crate::error_type) macro
//! rather than written as a generic `Error<K>` here, because each crate's
//! error must stay a type of that crate:
//!
//! - its constructors are `pub(crate)`: only the crate itself makes its
//!   errors, so a caller cannot forge, say, a store `Corrupt` error; a generic
//!   type in this crate would have to make them public;
//! - a crate adds its own methods (the store's `is_not_found`, the NBD
//!   server's `tls` and `wire`), which Rust allows only on a crate's own types;
//! - a crate implements foreign traits for it (the store's
//!   `From<Error> for std::io::Error`), which the orphan rule forbids on
//!   another crate's generic type even when the kind is local.
//!
//! `blockrep-proto`'s `ProtoError` keeps a shape of its own on purpose: proto
//! does no I/O, so its errors report bytes a peer sent and never have an I/O
//! error beneath them. This shape would give it an `Io` kind and an `io`
//! constructor that mean nothing there, and would cost it `Clone` and `Eq`
//! (a `std::io::Error` is neither). The agent's and the server's errors are
//! enums whose variants carry different data (addresses, protocol error
//! codes): not this shape either.

/// Declares a crate's error type around its own kind enum.
///
/// `pub struct Error: ErrorKind, io = Io;` declares `Error` holding an
/// `ErrorKind`, a message and an optional `std::io::Error`, with:
///
/// - `Error::new(kind, message)` and `Error::with_source(kind, message,
///   source)`, and `Error::io(message, source)` for the kind named after
///   `io =` (all `pub(crate)`: only the declaring crate makes its errors);
/// - `Error::kind()`, the kind to match on;
/// - `Display`: the message, then `": "` and the source when there is one;
/// - `std::error::Error::source`: the I/O error, so that error chains reach it.
///
/// The fields (`kind`, `message`, `source`) are private to the module that
/// invokes the macro, which may add methods of its own beside these.
///
/// ```
/// #[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// pub enum ErrorKind {
///     Io,
///     Invalid,
/// }
///
/// blockrep_core::error_type! {
///     /// Error type of this crate.
///     pub struct Error: ErrorKind, io = Io;
/// }
///
/// let error = Error::new(ErrorKind::Invalid, "bad size");
/// assert_eq!(error.kind(), ErrorKind::Invalid);
/// assert_eq!(error.to_string(), "bad size");
/// ```
#[macro_export]
macro_rules! error_type {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident: $kind:ident, io = $io:ident;
    ) => {
        $(#[$meta])*
        #[derive(Debug)]
        $vis struct $name {
            kind: $kind,
            message: ::std::string::String,
            source: ::std::option::Option<::std::io::Error>,
        }

        impl $name {
            /// An error of `kind` described by `message`, with no underlying cause.
            pub(crate) fn new(
                kind: $kind,
                message: impl ::std::convert::Into<::std::string::String>,
            ) -> Self {
                Self {
                    kind,
                    message: message.into(),
                    source: ::std::option::Option::None,
                }
            }

            /// An error of `kind` caused by the I/O error `source`; `message`
            /// says what was being done.
            pub(crate) fn with_source(
                kind: $kind,
                message: impl ::std::convert::Into<::std::string::String>,
                source: ::std::io::Error,
            ) -> Self {
                Self {
                    kind,
                    message: message.into(),
                    source: ::std::option::Option::Some(source),
                }
            }

            /// An I/O error; `message` says what was being done.
            pub(crate) fn io(
                message: impl ::std::convert::Into<::std::string::String>,
                source: ::std::io::Error,
            ) -> Self {
                Self::with_source($kind::$io, message, source)
            }

            /// The cause of this error.
            pub fn kind(&self) -> $kind {
                self.kind
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                match &self.source {
                    ::std::option::Option::Some(source) => {
                        ::std::write!(f, "{}: {}", self.message, source)
                    }
                    ::std::option::Option::None => f.write_str(&self.message),
                }
            }
        }

        impl ::std::error::Error for $name {
            fn source(&self) -> ::std::option::Option<&(dyn ::std::error::Error + 'static)> {
                self.source
                    .as_ref()
                    .map(|source| source as &(dyn ::std::error::Error + 'static))
            }
        }
    };
}

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

crate::error_type! {
    /// Error type of `blockrep-core`: a kind and a human-readable message.
    pub struct Error: ErrorKind, io = Io;
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::{Error, ErrorKind};

    #[test]
    fn display_is_the_message_alone_without_a_source() {
        let error = Error::new(
            ErrorKind::InvalidGeometry,
            "chunk size 3 is not a power of two",
        );
        assert_eq!(error.kind(), ErrorKind::InvalidGeometry);
        assert_eq!(error.to_string(), "chunk size 3 is not a power of two");
        assert!(error.source().is_none());
    }

    #[test]
    fn display_appends_the_source_and_the_chain_reaches_it() {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = Error::io("cannot open disk /dev/x", cause);
        assert_eq!(error.kind(), ErrorKind::Io);
        assert_eq!(error.to_string(), "cannot open disk /dev/x: no such file");
        let source = error.source().expect("an I/O error keeps its source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the source is the I/O error itself");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(source.to_string(), "no such file");
    }

    #[test]
    fn a_source_may_come_with_any_kind() {
        let cause = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read");
        let error = Error::with_source(ErrorKind::DiskShrank, "disk shrank", cause);
        assert_eq!(error.kind(), ErrorKind::DiskShrank);
        assert_eq!(error.to_string(), "disk shrank: short read");
        assert!(error.source().is_some());
    }
}

//! Why a connection ended early.

use crate::wire::WireError;

/// What kind of failure ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading from or writing to the socket failed, or the peer hung up mid-message.
    Io,
    /// The peer broke the protocol (bad magic, unknown flags, oversized data);
    /// the connection was dropped because the stream can no longer be trusted.
    PeerMisbehaved,
    /// The client asked for something it may not have where the protocol
    /// allows no polite refusal (`NBD_OPT_EXPORT_NAME` of an unknown export, or
    /// before TLS when TLS is required).
    Refused,
    /// The TLS handshake failed.
    Tls,
    /// The handshake or an idle wait took longer than its limit.
    Timeout,
    /// The server is shutting down.
    Shutdown,
}

blockrep_core::error_type! {
    /// A connection-level failure: the kind, a message for logs, and the
    /// underlying I/O error where there is one.
    pub struct Error: ErrorKind, io = Io;
}

impl Error {
    pub(crate) fn tls(source: std::io::Error) -> Self {
        Self::with_source(ErrorKind::Tls, "TLS handshake failed", source)
    }

    pub(crate) fn wire(context: &str, source: WireError) -> Self {
        Self::new(ErrorKind::PeerMisbehaved, format!("{context}: {source}"))
    }
}

//! Why a connection ended early.

use std::fmt;

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

/// A connection-level failure: the kind, a message for logs, and the
/// underlying I/O error where there is one.
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

    pub(crate) fn io(context: &str, source: std::io::Error) -> Self {
        Self {
            kind: ErrorKind::Io,
            message: context.to_owned(),
            source: Some(source),
        }
    }

    pub(crate) fn tls(source: std::io::Error) -> Self {
        Self {
            kind: ErrorKind::Tls,
            message: "TLS handshake failed".to_owned(),
            source: Some(source),
        }
    }

    pub(crate) fn wire(context: &str, source: WireError) -> Self {
        Self::new(ErrorKind::PeerMisbehaved, format!("{context}: {source}"))
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

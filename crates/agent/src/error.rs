//! The agent's errors, and which of them a continuous run retries
//! (`Error::is_retryable`) rather than stopping on.

use blockrep_proto::ErrorCode;

/// Why the agent stopped or an epoch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The disk could not be opened, mapped or sized.
    #[error("disk: {0}")]
    Disk(#[from] blockrep_core::Error),
    /// The certificate files are missing or unusable.
    #[error("TLS setup: {0}")]
    Pki(#[from] blockrep_pki::Error),
    /// The `--to` address is not `host:port`.
    #[error("invalid server address {0:?}: expected host:port")]
    Address(String),
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong CA, rejected certificate, ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The server refused the TLS session (e.g. the client certificate).
    #[error("{0}")]
    CertificateRejected(String),
    /// The server ended the session with a reason.
    #[error("server refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    /// The connection broke.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The server ended the TLS session with an alert.
    #[error("connection lost: the server sent TLS alert {0:?}")]
    Alert(rustls::AlertDescription),
    /// The server sent something this agent does not accept.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The cutover could not run (e.g. the pre-cutover command failed).
    #[error("cutover: {0}")]
    Cutover(String),
    /// Failback would overwrite changes made to the disk since cutover.
    #[error("{0}")]
    Conflict(String),
    /// The disk changed size since the replica was made.
    #[error("{0}")]
    DiskChanged(String),
    /// The disk could not be read whole because it changed size while it was
    /// read (a truncated image file, during a scan or while its chunks were
    /// read for sending). Retried: the next scan sees the disk as it is then,
    /// and a disk that stays at another size is then refused as a resize.
    #[error("{0}")]
    DiskUnsteady(String),
    /// A frozen view of the disk could not be made this time (a failing or
    /// timed-out snapshot command, a clone that failed, e.g. for lack of
    /// space). Retried: the next epoch tries again.
    #[error("frozen view: {0}")]
    View(String),
    /// Frozen views cannot be made as configured (a file system that cannot
    /// clone in `--snapshot reflink` mode, a block device without
    /// `--snapshot-cmd`, a view of the wrong size or no path printed).
    /// Retrying cannot fix it.
    #[error("frozen view: {0}")]
    ViewConfig(String),
    /// Write capture could not read its cut (an I/O error on the disk or
    /// on the preserve spill file). Retried: the next cut reads again.
    #[error("write capture: {0}")]
    CutRead(String),
    /// A signal stopped `--once` before the replica caught up.
    #[error("{0}")]
    Stopped(String),
    /// Write capture could not open or save its disk or state file.
    #[error("write capture: {0}")]
    Capture(String),
}

impl Error {
    /// Whether trying again later may succeed (network trouble, a busy or
    /// restarting server), as opposed to a configuration error that retrying
    /// cannot fix.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Lost(_) | Error::Alert(_) => true,
            Error::DiskUnsteady(_) => true,
            Error::View(_) | Error::CutRead(_) => true,
            // The connection broke during the handshake (a server that crashed
            // or restarted, or one at its connection limit): the network's
            // fault, not the configuration's. A certificate the server or the
            // agent refuses fails as invalid data instead, and is not retried.
            Error::Handshake { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::TimedOut
            ),
            Error::Refused { code, .. } => matches!(
                code,
                ErrorCode::Busy
                    | ErrorCode::ServedElsewhere
                    | ErrorCode::Internal
                    | ErrorCode::EpochMismatch
                    | ErrorCode::RootMismatch
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(kind: std::io::ErrorKind) -> Error {
        Error::Handshake {
            addr: "127.0.0.1:7443".into(),
            source: std::io::Error::new(kind, "test"),
        }
    }

    #[test]
    fn handshake_cut_by_the_network_is_retried_but_a_refused_certificate_is_not() {
        // What tokio-rustls reports when the server dies mid-handshake.
        assert!(handshake(std::io::ErrorKind::UnexpectedEof).is_retryable());
        assert!(handshake(std::io::ErrorKind::ConnectionReset).is_retryable());
        // What it reports for a certificate that does not verify.
        assert!(!handshake(std::io::ErrorKind::InvalidData).is_retryable());
    }

    #[test]
    fn a_disk_that_changed_size_during_a_read_is_retried_but_a_resize_is_not() {
        assert!(Error::DiskUnsteady("shrank".into()).is_retryable());
        assert!(!Error::DiskChanged("resized".into()).is_retryable());
    }

    #[test]
    fn a_view_that_failed_once_is_retried_but_a_misconfigured_one_is_not() {
        assert!(Error::View("lvcreate failed".into()).is_retryable());
        assert!(!Error::ViewConfig("cannot reflink".into()).is_retryable());
    }
}

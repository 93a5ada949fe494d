//! Who is on the other end of a connection, as far as the transport can tell.
//!
//! The crate does not decide who may open what: it hands a [`Client`] to
//! [`crate::Registry::lookup`] and [`crate::Registry::list`], and the registry
//! (which knows what its exports belong to) decides.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

/// What the server knows of a client when the client names or lists exports.
///
/// The certificates are those rustls verified during `NBD_OPT_STARTTLS`
/// against the TLS configuration given to [`crate::NbdServer::with_tls`]; the
/// crate adds no trust of its own. A configuration that does not require
/// client certificates yields TLS clients with none.
#[derive(Clone, Debug, Default)]
pub struct Client {
    addr: Option<SocketAddr>,
    tls: bool,
    certificates: Option<Arc<[CertificateDer<'static>]>>,
}

impl Client {
    /// A client at `addr` (when known), before any TLS upgrade.
    pub fn new(addr: Option<SocketAddr>) -> Self {
        Self {
            addr,
            tls: false,
            certificates: None,
        }
    }

    /// The same client after a completed TLS handshake that verified
    /// `certificates` (end entity first; `None` when the client sent none).
    #[must_use]
    pub fn with_tls(mut self, certificates: Option<Vec<CertificateDer<'static>>>) -> Self {
        self.tls = true;
        self.certificates = certificates.map(Arc::from);
        self
    }

    /// The client's address, when the connection came from a socket.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Whether the connection is protected by TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The client's verified certificate chain, end entity first: `None`
    /// without TLS or without a client certificate.
    pub fn certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.certificates.as_deref()
    }
}

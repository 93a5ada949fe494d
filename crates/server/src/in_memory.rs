//! Sessions served in process, over any byte stream: the real session state
//! machine with no listener, no TLS and no socket, for tests that drive the
//! agent against it over `tokio::io::duplex` (in the manner of
//! `crate::fuzzing`, which feeds it bytes instead). Not part of the API.
//!
//! The identity a TLS handshake would have taken from the client certificate
//! is given by the caller; everything after the handshake (`Hello`, epochs,
//! commits, failback) is the production code path.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use blockrep_core::SourceId;
use blockrep_store::Store;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::ServerConfig;
use crate::connection::Connection;
use crate::session::Session;
use crate::shared::Shared;
use crate::status::SourceTable;

/// The address sessions served here report as their peer's.
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

/// A replication server's shared state (store, configuration, source slots,
/// counters) without its listeners: each [`InMemoryServer::serve`] runs one
/// session on a stream the caller made.
#[doc(hidden)]
pub struct InMemoryServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for InMemoryServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryServer").finish_non_exhaustive()
    }
}

impl InMemoryServer {
    /// A server over `store` with `config` (its addresses, certificate paths
    /// and background intervals are not used: nothing is bound or spawned).
    pub fn new(store: Arc<Store>, config: ServerConfig) -> Self {
        let shared = Shared::new(store, config, SourceTable::default(), None);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The store sessions commit to.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// One session on `stream` (what a TLS handshake would have left) for
    /// `source`, the identity its certificate would have named. The future
    /// ends with the session: when the agent leaves, the stream closes or the
    /// session rejects the agent (after sending it the `Error`).
    pub fn serve<S>(&self, stream: S, source: SourceId) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
    {
        let session = Session::new(
            Arc::clone(&self.shared),
            Connection::new(stream),
            source,
            PEER,
        );
        session.run()
    }
}

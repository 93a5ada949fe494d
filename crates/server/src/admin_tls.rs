//! The admin API over mutual TLS (`--admin-tls`): the same router as the plain
//! loopback listener, reachable only with the operator's certificate.
//!
//! Handshakes run on their own tasks (capped in number and time, like the
//! replication listener's) and only finished connections reach axum, so a
//! stalled handshake never holds up the accept loop. The client's identity is
//! taken from its verified certificate when the handshake ends and travels with
//! the connection as its `ConnectInfo`; a middleware lets `urn:blockrep:admin`
//! through and answers every other identity with 403, logged and counted.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use blockrep_pki::{Identity, identity_from_cert};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::warn;

use crate::ledger::{AdminRefusal, HandshakeFailure};
use crate::shared::Shared;

/// Most admin connections open at once, handshaking or not: operators and a
/// scraper need a handful; the cap keeps a flood from taking the server's memory.
const ADMIN_CONNECTIONS_MAX: usize = 64;

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
pub(crate) struct AdminPeer {
    addr: SocketAddr,
    /// The identity of the client certificate, or why it has none.
    identity: Result<Identity, String>,
}

impl Connected<IncomingStream<'_, AdminTlsListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, AdminTlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A finished TLS connection; holds its connection slot until dropped.
pub(crate) struct AdminIo {
    stream: TlsStream<TcpStream>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for AdminIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// An axum listener yielding connections whose TLS handshake has finished.
pub(crate) struct AdminTlsListener {
    finished: mpsc::Receiver<(AdminIo, AdminPeer)>,
    local_addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for AdminTlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl Listener for AdminTlsListener {
    type Io = AdminIo;
    type Addr = AdminPeer;

    async fn accept(&mut self) -> (AdminIo, AdminPeer) {
        match self.finished.recv().await {
            Some(connection) => connection,
            // The accept task has ended (only when the listener is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<AdminPeer> {
        Ok(AdminPeer {
            addr: self.local_addr,
            identity: Err("this server".into()),
        })
    }
}

impl AdminTlsListener {
    /// Starts accepting on `listener`, handshaking with `acceptor`.
    pub(crate) fn spawn(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        shared: Arc<Shared>,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (sender, finished) = mpsc::channel(ADMIN_CONNECTIONS_MAX);
        let accept_task = tokio::spawn(accept_loop(listener, acceptor, shared, sender));
        Ok(Self {
            finished,
            local_addr,
            accept_task,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    sender: mpsc::Sender<(AdminIo, AdminPeer)>,
) {
    let permits = Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // Typically EMFILE: back off briefly rather than spin.
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            warn!(peer = %addr, limit = ADMIN_CONNECTIONS_MAX, "admin connection refused: limit reached");
            continue;
        };
        let (acceptor, shared, sender) = (acceptor.clone(), Arc::clone(&shared), sender.clone());
        tokio::spawn(async move {
            let timeout = shared.config.handshake_timeout;
            let reason = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .ok_or_else(|| "no client certificate".to_owned())
                        .and_then(|cert| identity_from_cert(cert).map_err(|e| e.to_string()));
                    let io = AdminIo {
                        stream,
                        _permit: permit,
                    };
                    let _ = sender.send((io, AdminPeer { addr, identity })).await;
                    return;
                }
                Ok(Err(e)) => {
                    let class = HandshakeFailure::classify(&e.to_string());
                    warn!(peer = %addr, reason = %e, class = class.as_str(), "admin TLS handshake rejected");
                    class
                }
                Err(_) => {
                    warn!(peer = %addr, reason = "timeout", "admin TLS handshake rejected");
                    HandshakeFailure::Timeout
                }
            };
            shared.ledger.handshake_failed(reason);
        });
    }
}

/// Lets only the admin identity through; everyone else gets 403.
pub(crate) async fn require_admin(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<AdminPeer>,
    request: Request,
    next: Next,
) -> Response {
    let (refusal, reason) = match &peer.identity {
        Ok(Identity::Admin) => return next.run(request).await,
        Ok(Identity::Source(source)) => (
            AdminRefusal::SourceCertificate,
            format!("the certificate of source {source} cannot use the admin API"),
        ),
        Err(why) => (
            AdminRefusal::NoIdentity,
            format!("the client certificate carries no admin identity: {why}"),
        ),
    };
    shared.ledger.admin_refused(refusal);
    warn!(peer = %peer.addr, method = %request.method(), path = %request.uri().path(),
          reason = %reason, "admin request refused");
    crate::api_error::error(StatusCode::FORBIDDEN, reason)
}

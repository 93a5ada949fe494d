//! The server: accepts connections, runs the handshake under a time limit,
//! upgrades to TLS when asked, and hands the stream to transmission.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::error::{Error, ErrorKind};
use crate::handshake::{self, Handshake, Outcome};
use crate::slots::AddressSlots;
use crate::transmission;
use crate::{Client, Export, Limits, Registry};

/// Pause after a failed `accept` (usually out of file descriptors) so that the
/// loop does not spin while the condition lasts.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// An NBD server over the exports of one [`Registry`].
pub struct NbdServer {
    registry: Arc<dyn Registry>,
    limits: Limits,
    tls: Option<Tls>,
    /// Set once [`NbdServer::run`] sees its shutdown future complete; every
    /// connection watches it.
    stop: watch::Sender<bool>,
}

struct Tls {
    acceptor: TlsAcceptor,
    required: bool,
}

/// A stream ready for transmission, plain or upgraded.
enum Negotiated<S> {
    Plain(S, Arc<dyn Export>),
    Tls(Box<TlsStream<S>>, Arc<dyn Export>),
    Closed,
}

/// When a connection ends, however it ends, its completed writes are flushed:
/// clients such as `nbdcopy` disconnect without `NBD_CMD_FLUSH` and expect what
/// they wrote to stay, as it would on a file-backed server.
async fn flush_on_close(export: Arc<dyn Export>) {
    if export.read_only() {
        return;
    }
    match tokio::task::spawn_blocking(move || export.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "flushing an export after its connection closed failed")
        }
        Err(e) => tracing::warn!(error = %e, "flush task failed"),
    }
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("limits", &self.limits)
            .field("tls", &self.tls.as_ref().map(|tls| tls.required))
            .field("stopped", &*self.stop.borrow())
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// A server without TLS. Out-of-range limits are brought into range (see
    /// [`Limits`]).
    pub fn new(registry: Arc<dyn Registry>, limits: Limits) -> Self {
        Self {
            registry,
            limits: limits.normalized(),
            tls: None,
            stop: watch::Sender::new(false),
        }
    }

    /// Offers TLS through `NBD_OPT_STARTTLS` with this configuration. With
    /// `require`, every option but `STARTTLS` and `ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up, and `NBD_OPT_EXPORT_NAME` before
    /// then ends the connection. The registry sees the client certificates
    /// that `config`'s verifier accepted; with a configuration that does not
    /// require them, TLS clients may have none.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>, require: bool) -> Self {
        self.tls = Some(Tls {
            acceptor: TlsAcceptor::from(config),
            required: require,
        });
        self
    }

    /// The limits in force, after normalization.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves one already-accepted connection to completion: handshake (within
    /// [`Limits::handshake_timeout`]), then transmission until the client
    /// disconnects. A client leaving with `NBD_OPT_ABORT` or `NBD_CMD_DISC` is
    /// `Ok`. `client` is what the registry is told of the peer (its address;
    /// certificates are added if TLS comes up). [`Limits::connections_max`]
    /// and [`Limits::connections_per_address_max`] are enforced by
    /// [`NbdServer::run`], not here.
    pub async fn serve_connection<S>(&self, stream: S, client: Client) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            return Err(Error::new(ErrorKind::Shutdown, "server is stopping"));
        }
        let negotiated = tokio::select! {
            () = stopped(&mut stop) => {
                return Err(Error::new(ErrorKind::Shutdown, "server stopped during handshake"));
            }
            negotiated = tokio::time::timeout(self.limits.handshake_timeout, self.negotiate(stream, client)) => {
                negotiated.map_err(|_| Error::new(
                    ErrorKind::Timeout,
                    format!("handshake took longer than {:?}", self.limits.handshake_timeout),
                ))??
            }
        };
        let (result, export) = match negotiated {
            Negotiated::Plain(stream, export) => {
                let result =
                    transmission::transmit(stream, Arc::clone(&export), &self.limits, stop).await;
                (result, export)
            }
            Negotiated::Tls(stream, export) => {
                let result =
                    transmission::transmit(stream, Arc::clone(&export), &self.limits, stop).await;
                (result, export)
            }
            Negotiated::Closed => return Ok(()),
        };
        flush_on_close(export).await;
        result
    }

    /// Accepts connections on `listener` and serves each on its own task, at
    /// most [`Limits::connections_max`] at a time and at most
    /// [`Limits::connections_per_address_max`] from one address (a connection
    /// over that share is closed as soon as it is accepted), until `shutdown`
    /// completes.
    /// Then handshakes in progress are dropped, connections in transmission
    /// stop reading, send the replies of requests already running and close,
    /// and `run` returns once all have. The server refuses new connections
    /// afterwards.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let connections = Arc::new(Semaphore::new(self.limits.connections_max));
        let per_address = AddressSlots::new(self.limits.connections_per_address_max);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                () = &mut shutdown => break,
                permit = Arc::clone(&connections).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an NBD connection failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(ACCEPT_RETRY_DELAY) => continue,
                    }
                }
            };
            let Some(address_slot) = per_address.try_acquire(peer.ip()) else {
                // Closed before the greeting, so it costs no handshake; the
                // global slot goes back at once for other addresses.
                tracing::warn!(
                    %peer,
                    limit = self.limits.connections_per_address_max,
                    "NBD connection refused: its address holds every slot it may"
                );
                drop(stream);
                continue;
            };
            // Replies are written whole; Nagle would only delay the last segment.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "could not disable Nagle");
            }
            let server = Arc::clone(&self);
            tasks.spawn(async move {
                // Dropped in reverse: the address slot is free before the
                // server-wide slot lets the next connection be accepted.
                let _permit = permit;
                let _address_slot = address_slot;
                match server
                    .serve_connection(stream, Client::new(Some(peer)))
                    .await
                {
                    Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
                    Err(e) => {
                        tracing::info!(%peer, kind = ?e.kind(), error = %e, "NBD connection ended")
                    }
                }
            });
            // Reap finished connections so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
        }
        self.stop.send_replace(true);
        while tasks.join_next().await.is_some() {}
    }

    async fn negotiate<S>(&self, mut stream: S, peer: Client) -> Result<Negotiated<S>, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let client = handshake::greet(&mut stream).await?;
        let tls_required = self.tls.as_ref().is_some_and(|tls| tls.required);
        if tls_required && !client.fixed_newstyle {
            // TLS needs fixed newstyle; such a client can only be turned away.
            return Err(Error::new(
                ErrorKind::Refused,
                "TLS is required but the client does not speak fixed newstyle",
            ));
        }
        let mut handshake = Handshake::new(
            &self.registry,
            &self.limits,
            self.tls.is_some(),
            tls_required,
            client,
            peer,
        );
        match handshake.haggle(&mut stream).await? {
            Outcome::Transmit(export) => Ok(Negotiated::Plain(stream, export)),
            Outcome::Abort => {
                close_quietly(&mut stream).await;
                Ok(Negotiated::Closed)
            }
            Outcome::StartTls => {
                let Some(tls) = &self.tls else {
                    // haggle only acknowledges STARTTLS when TLS is configured.
                    return Err(Error::new(ErrorKind::Tls, "STARTTLS without configuration"));
                };
                let mut stream = tls.acceptor.accept(stream).await.map_err(Error::tls)?;
                handshake.tls_active = true;
                // Verified by rustls against the configuration's client verifier.
                let certificates = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                handshake.peer = handshake.peer.clone().with_tls(certificates);
                match handshake.haggle(&mut stream).await? {
                    Outcome::Transmit(export) => Ok(Negotiated::Tls(Box::new(stream), export)),
                    Outcome::Abort => {
                        close_quietly(&mut stream).await;
                        Ok(Negotiated::Closed)
                    }
                    Outcome::StartTls => Err(Error::new(
                        ErrorKind::PeerMisbehaved,
                        "STARTTLS accepted twice",
                    )),
                }
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens with the server.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn close_quietly<S: AsyncWrite + Unpin>(stream: &mut S) {
    // The client asked to leave; whether it waited for our close is its business.
    let _ = stream.shutdown().await;
}

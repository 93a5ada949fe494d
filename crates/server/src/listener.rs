//! Accepting connections: limits, TLS handshake, identity, then a session.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use blockrep_core::SourceId;
use blockrep_core::clock::now_unix_ms;
use blockrep_pki::{Identity, identity_from_cert, tenant_from_cert};
use blockrep_proto::ErrorCode;
use blockrep_store::Store;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span, warn};

use crate::connection::Connection;
use crate::encryption::ServerKeys;
use crate::ledger::HandshakeFailure;
use crate::revocation::Registration;
use crate::session::{Session, reject};
use crate::shared::Shared;
use crate::source_records::SourceRecords;
use crate::status::SourceTable;
use crate::{Error, ServerConfig};

/// Aborts a background task when dropped (when `run` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stops the materializations' copiers when dropped (when `run` returns).
struct StopCopiers(Arc<crate::materializing::Copiers>);

impl Drop for StopCopiers {
    fn drop(&mut self) {
        self.0.stop_all();
    }
}

/// A bound replication server.
pub struct Server {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    /// Who the admin listener lets in; present with `admin_listener`.
    admin_guard: Option<Arc<crate::admin_guard::AdminGuard>>,
    nbd_listener: Option<TcpListener>,
    tls: Arc<rustls::ServerConfig>,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    /// SIGHUP, subscribed at bind: it reloads the revocation list.
    hangups: Option<tokio::signal::unix::Signal>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the store, loads the TLS files and binds the listener.
    pub async fn bind(config: ServerConfig) -> Result<Server, Error> {
        crate::nbd_export::check_listen(&config)?;
        crate::admin_guard::check_listen(&config)?;
        let data_dir = config.data_dir.clone();
        let policy = config.retention.clone();
        let pack_size_max = config.pack_size_max_bytes;
        let index_memory = config.index_memory_bytes;
        let launch_cache = config.launch_cache_bytes;
        let bucket = match &config.bucket {
            Some(b) => {
                let bucket = blockrep_objects::Bucket::s3(&b.location, &b.service)
                    .and_then(blockrep_objects::BlockingBucket::new)
                    .map_err(|e| Error::Config(format!("bucket {}: {e}", b.location)))?;
                Some((bucket, b.cache_bytes))
            }
            None => None,
        };
        // With a bucket, every server sharing it is given the same key
        // directory (shared storage): keys one server makes are read by the
        // others when they miss them.
        let encryption = config.encryption.clone();
        let (store, known, keys, followed) = tokio::task::spawn_blocking(move || {
            let store = match bucket {
                Some((bucket, cache_bytes)) => {
                    let options = blockrep_store::BucketOptions { cache_bytes };
                    Store::open_in_bucket(&data_dir, bucket, options)?
                }
                None => Store::open_exclusive_with_index_memory(&data_dir, index_memory)?,
            };
            if let Some(policy) = policy {
                store.set_retention_policy(policy);
            }
            if let Some(bytes) = pack_size_max {
                store.set_pack_size_max_bytes(bytes);
            }
            store.set_chunk_cache_bytes(launch_cache);
            // Before anything reads the store: an encrypted source's
            // blobs open only with its keys, and a KEK that cannot be
            // reached refuses the start.
            let keys = match &encryption {
                Some(encryption) => Some(ServerKeys::load(encryption, &store)?),
                None => None,
            };
            let now = now_unix_ms();
            let mut known = Vec::new();
            for source in store.sources()? {
                if let Some(record) = SourceRecords::read(&store, &source)?.into_record(now) {
                    known.push((source, record));
                }
            }
            let followed = crate::drills::followed_sources(&store)?;
            Ok::<_, Error>((Arc::new(store), known, keys, followed))
        })
        .await
        .expect("store open task does not panic")?;
        let sources = SourceTable::default();
        for (source, record) in known {
            sources.insert(source, record);
        }
        let lists = match &config.crl_path {
            Some(path) => blockrep_pki::RevocationLists::load(path, &config.ca_path)?,
            None => blockrep_pki::RevocationLists::default(),
        };
        // One verifier for every listener: a reloaded list applies to all.
        let (tls, verifier) = blockrep_pki::server_config_reloadable(
            &config.ca_path,
            &config.cert_path,
            &config.key_path,
            &lists,
        )?;
        let tls = Arc::new(tls);
        let revocation = Arc::new(crate::revocation::Revocation::new(
            config.crl_path.clone(),
            config.ca_path.clone(),
            lists,
            verifier,
        ));
        let hangups = crate::revocation::hangups();
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let mut config = config;
        if let Some(bucket) = &mut config.bucket
            && bucket.holder.is_empty()
        {
            // The address agents reach it by: what an operator reads in a
            // lease to know which server has a source.
            bucket.holder = listener
                .local_addr()
                .map_or_else(|_| config.listen.to_string(), |a| a.to_string());
        }
        let admin_listener = match config.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        let nbd_listener = match config.nbd_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        let nbd_addr = nbd_listener.as_ref().and_then(|l| l.local_addr().ok());
        let admin_guard = match &admin_listener {
            Some(admin) => {
                let bound = admin.local_addr().map_err(|source| Error::Bind {
                    addr: config.admin_listen.unwrap_or(config.listen),
                    source,
                })?;
                Some(Arc::new(crate::admin_guard::AdminGuard::new(
                    &config, bound,
                )?))
            }
            None => None,
        };
        if let Some(bucket) = &config.bucket {
            let (store, bucket) = (Arc::clone(&store), bucket.clone());
            tokio::task::spawn_blocking(move || crate::leases::announce(&store, &bucket))
                .await
                .expect("announce task does not panic")?;
        }
        let mut shared = Shared::new(store, config, sources, nbd_addr);
        shared.keys = keys;
        for source in followed {
            shared.followed.insert(source);
        }
        shared.revocation = Some(revocation);
        Ok(Server {
            listener,
            admin_listener,
            admin_guard,
            nbd_listener,
            tls: Arc::clone(&tls),
            acceptor: TlsAcceptor::from(tls),
            shared: Arc::new(shared),
            hangups,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address of the NBD listener, if enabled.
    pub fn nbd_addr(&self) -> Option<SocketAddr> {
        self.shared.nbd_addr
    }

    /// The address of the admin API, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The store this server writes.
    pub fn store(&self) -> Arc<Store> {
        Arc::clone(&self.shared.store)
    }

    /// Accepts connections until `shutdown` completes. Sessions in progress are
    /// abandoned at shutdown; an abandoned epoch was never acknowledged, so
    /// nothing acknowledged is lost.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // The listener is bound: connections queue from here on.
        self.shared.health.set_accepting(true);
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        if let (Some(admin_listener), Some(guard)) = (self.admin_listener, self.admin_guard) {
            let router = crate::admin::router(Arc::clone(&self.shared), guard);
            let stopped = async {
                let _ = admin_stopped.await;
            };
            if self.shared.config.admin_tls {
                serve_admin_tls(
                    admin_listener,
                    self.acceptor.clone(),
                    &self.shared,
                    router,
                    stopped,
                );
            } else {
                tokio::spawn(async move {
                    let serve = axum::serve(admin_listener, router).with_graceful_shutdown(stopped);
                    if let Err(e) = serve.await {
                        warn!(error = %e, "admin API stopped");
                    }
                });
            }
        }
        let _stop_admin = stop_admin; // dropped when `run` returns: stops the admin API
        let (stop_nbd, nbd_stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(nbd_listener) = self.nbd_listener {
            crate::nbd_export::spawn(
                nbd_listener,
                Arc::clone(&self.shared.store),
                &self.shared.config,
                &self.tls,
                self.shared.revocation.clone(),
                Arc::clone(&self.shared.closers),
                async {
                    let _ = nbd_stopped.await;
                },
            );
        }
        let _stop_nbd = stop_nbd;
        let retention = tokio::spawn(crate::retention::run(Arc::clone(&self.shared)));
        let _stop_gc = AbortOnDrop(tokio::spawn(crate::maintenance::run_gc(Arc::clone(
            &self.shared,
        ))));
        let _stop_retention = AbortOnDrop(retention);
        let _stop_expiry = AbortOnDrop(tokio::spawn(crate::drills::run(Arc::clone(&self.shared))));
        let _stop_folding =
            AbortOnDrop(tokio::spawn(crate::folding::run(Arc::clone(&self.shared))));
        let _stop_copiers = StopCopiers(Arc::clone(&self.shared.copiers));
        {
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || {
                crate::materializing::resume(
                    &shared.store,
                    &shared.copiers,
                    &shared.closers,
                    shared.config.launch_materialize_rate,
                )
            });
        }
        tokio::spawn(crate::migration::reconcile(Arc::clone(&self.shared)));
        let alerts = tokio::spawn(crate::alerts::run(Arc::clone(&self.shared)));
        let _stop_alerts = AbortOnDrop(alerts);
        let stop_leases = AbortOnDrop(tokio::spawn(crate::leases::run(Arc::clone(&self.shared))));
        let _stop_rounds = AbortOnDrop(tokio::spawn(crate::leases::take_part(Arc::clone(
            &self.shared,
        ))));
        let _stop_revocation = self.shared.revocation.as_ref().map(|revocation| {
            AbortOnDrop(tokio::spawn(crate::revocation::run(
                Arc::clone(revocation),
                self.hangups,
                self.shared.config.crl_poll_interval,
            )))
        });
        let address_slots =
            blockrep_nbd::AddressSlots::new(self.shared.config.connections_per_address_max);
        let permits = Arc::new(Semaphore::new(self.shared.config.connections_max));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically EMFILE: back off briefly rather than spin.
                    warn!(error = %e, "accept failed");
                    self.shared.health.accept_failed(&e);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                self.shared.ledger.connection_refused(false);
                warn!(%peer, limit = self.shared.config.connections_max, "connection refused: limit reached");
                continue;
            };
            // Before any TLS work: one address may not hold every slot.
            let Some(address_slot) = address_slots.try_acquire(peer.ip()) else {
                self.shared.ledger.connection_refused(true);
                warn!(%peer, limit = self.shared.config.connections_per_address_max,
                      "connection refused: this address holds its share of the connections");
                continue;
            };
            let open = self.shared.ledger.connection_accepted();
            let shared = Arc::clone(&self.shared);
            let acceptor = self.acceptor.clone();
            tokio::spawn(async move {
                handle_connection(shared, acceptor, tcp, peer).await;
                drop(address_slot);
                drop(permit);
                drop(open);
            });
        }
        self.shared.health.set_accepting(false);
        info!("replication listener stopped");
        // No renewal starts after the release (one already running finds
        // its lease released, and releases what it wrote).
        drop(stop_leases);
        crate::leases::release(&self.shared).await;
    }
}

/// Serves the admin API over mutual TLS, to the admin identity only.
fn serve_admin_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: &Arc<Shared>,
    router: axum::Router,
    stopped: impl Future<Output = ()> + Send + 'static,
) {
    use crate::admin_tls::{AdminPeer, AdminTlsListener, require_admin};
    let listener = match AdminTlsListener::spawn(listener, acceptor, Arc::clone(shared)) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(error = %e, "admin API over TLS not started");
            return;
        }
    };
    let router = router.layer(axum::middleware::from_fn_with_state(
        Arc::clone(shared),
        require_admin,
    ));
    tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<AdminPeer>();
        let serve = axum::serve(listener, service).with_graceful_shutdown(stopped);
        if let Err(e) = serve.await {
            warn!(error = %e, "admin API stopped");
        }
    });
}

/// The most a replication connection reads from its socket at once, beneath
/// TLS (see `handle_connection`).
const SOCKET_READ_BYTES: usize = 64 * 1024;

async fn handle_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    // TLS reads its records 4 KiB at a time: straight from the socket that
    // is a system call (and often an ACK) per 4 KiB of a full sync. Reads
    // from a buffer of this size cost a copy instead, and the socket is read
    // in large pieces.
    let tcp = tokio::io::BufReader::with_capacity(SOCKET_READ_BYTES, tcp);
    let handshake =
        tokio::time::timeout(shared.config.handshake_timeout, acceptor.accept(tcp)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let class = HandshakeFailure::classify(&e.to_string());
            shared.ledger.handshake_failed(class);
            warn!(%peer, reason = %e, class = class.as_str(), "TLS handshake rejected");
            return;
        }
        Err(_) => {
            shared.ledger.handshake_failed(HandshakeFailure::Timeout);
            warn!(%peer, reason = "timeout", "TLS handshake rejected");
            return;
        }
    };
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first());
    let admitted = admit(&shared, certificate);
    let mut connection = Connection::new(tls);
    // A peer that stops reading (a dead path) must not hold a session, and
    // with it the source's slot, forever.
    connection.write_timeout = Some(shared.config.idle_timeout);
    let Admitted {
        source,
        tenant,
        registration,
    } = match admitted {
        Ok(admitted) => admitted,
        Err(reason) => {
            reject(
                &shared,
                &mut connection,
                peer,
                ErrorCode::Unauthorized,
                reason,
            )
            .await;
            return;
        }
    };
    // Every line the session logs carries its source, including lines that do
    // not name it themselves (such as `reject`'s).
    let span = info_span!("session", source = %source);
    Session::new(shared, connection, source, peer)
        .watch_revocation(registration)
        .with_tenant(tenant)
        .run()
        .instrument(span)
        .await;
}

/// A client certificate that may replicate: the source it names, its tenant,
/// and the watch that ends the session if the certificate is revoked.
struct Admitted {
    source: SourceId,
    tenant: Option<SourceId>,
    registration: Option<Registration>,
}

/// Reads who the client certificate says the peer is; `Err` says why it may
/// not replicate (sent to the agent as `Unauthorized`). The certificate is
/// watched for revocation from here on, once it is known to name a source.
fn admit(shared: &Shared, certificate: Option<&CertificateDer<'_>>) -> Result<Admitted, String> {
    let certificate = certificate.ok_or_else(|| "no client certificate".to_owned())?;
    let identity = identity_from_cert(certificate).map_err(|e| e.to_string());
    let tenant = tenant_from_cert(certificate).map_err(|e| e.to_string());
    let (source, tenant) = match (identity, tenant) {
        (Ok(Identity::Source(source)), Ok(tenant)) => (source, tenant),
        (Ok(Identity::Admin), _) => {
            return Err("the admin certificate cannot replicate a source".into());
        }
        (Err(reason), _) | (_, Err(reason)) => return Err(reason),
    };
    let registration = match &shared.revocation {
        Some(revocation) => {
            let serial = blockrep_pki::cert_serial(certificate).map_err(|e| e.to_string())?;
            Some(revocation.register(serial))
        }
        None => None,
    };
    Ok(Admitted {
        source,
        tenant,
        registration,
    })
}

//! Launch volumes as NBD exports: the registry the NBD server asks for names,
//! who may open which launch, and the NBD listener's start.
//!
//! A launch is its source's disk (a cutover launch is the production volume),
//! so an export opens only for:
//! - the certificate of the launch's own source (`urn:blockrep:source:ID`
//!   equal to the source recorded in the launch), or
//! - the admin certificate (`urn:blockrep:admin`),
//!
//! when the listener runs with TLS (`nbd_tls`), where every client must
//! present a certificate of the server's CA (the TLS configuration requires
//! one). `NBD_OPT_LIST` shows a client only the launches it may open, and any
//! other name is answered as a name that does not exist (`NBD_REP_ERR_UNKNOWN`),
//! so a certificate cannot be used to learn which launches other sources have.
//!
//! Without TLS there is no identity to check: every launch is open to whoever
//! reaches the listener. That is allowed only on a loopback address (local
//! users of the server's machine), and [`check_listen`] refuses any other
//! address before the server starts.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use blockrep_nbd::{Client, Export, Registry};
use blockrep_pki::{Identity, identity_from_cert};
use blockrep_store::{LaunchInfo, LaunchVolume, Store};
use tracing::{debug, warn};

use crate::revocation::{Registration, Revocation};
use crate::{Error, ServerConfig};

/// Default of [`ServerConfig::nbd_idle_timeout`]: long enough for a client
/// pausing between copies, short enough that abandoned connections do not
/// hold slots for days.
pub const NBD_IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10 * 60);
/// Default of [`ServerConfig::nbd_connections_max`].
pub const NBD_CONNECTIONS_MAX_DEFAULT: usize = 64;
/// Default of [`ServerConfig::nbd_connections_per_address_max`]: a quarter of
/// the server-wide slots, so that one address never holds them all.
pub const NBD_CONNECTIONS_PER_ADDRESS_MAX_DEFAULT: usize = 16;

/// Refuses an NBD listener that would serve every launch, readable and
/// writable, to the network: one on a non-loopback address without TLS.
pub(crate) fn check_listen(config: &ServerConfig) -> Result<(), Error> {
    match config.nbd_listen {
        Some(addr) if !config.nbd_tls && !addr.ip().to_canonical().is_loopback() => {
            Err(Error::Config(format!(
                "refusing to serve NBD on {addr} without TLS: every launch volume (each a \
                 replicated disk, a cutover launch being the production volume) would be \
                 readable and writable by anyone who can reach that address; add --nbd-tls \
                 (clients then need a certificate of this CA: the launch's own source or \
                 the admin), or listen on a loopback address"
            )))
        }
        _ => Ok(()),
    }
}

/// Starts serving launches on `listener` until `stopped` completes.
pub(crate) fn spawn(
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
    config: &ServerConfig,
    tls: &Arc<rustls::ServerConfig>,
    revocation: Option<Arc<Revocation>>,
    closers: Arc<crate::closers::Closers>,
    stopped: impl Future<Output = ()> + Send + 'static,
) {
    let registry = Arc::new(LaunchRegistry {
        store,
        closers,
        require_identity: config.nbd_tls,
        revocation,
        bucket: config.bucket.clone(),
    });
    let limits = blockrep_nbd::Limits {
        idle_timeout: config.nbd_idle_timeout,
        connections_max: config.nbd_connections_max,
        connections_per_address_max: config.nbd_connections_per_address_max,
        ..blockrep_nbd::Limits::default()
    };
    let mut nbd = blockrep_nbd::NbdServer::new(registry, limits);
    if config.nbd_tls {
        // The server's configuration requires a client certificate of the CA:
        // a TLS client without one never reaches the option haggling.
        nbd = nbd.with_tls(Arc::clone(tls), true);
    }
    tokio::spawn(Arc::new(nbd).run(listener, stopped));
}

/// Every launch in the store, by name, shown to those who may open it.
#[derive(Debug)]
pub(crate) struct LaunchRegistry {
    pub store: Arc<Store>,
    /// Launches being closed (expired drills, finalize) do not open.
    pub closers: Arc<crate::closers::Closers>,
    /// Whether clients are told apart by certificate (`nbd_tls`); without
    /// TLS the listener is on loopback and every launch is open to it.
    pub require_identity: bool,
    /// Watches the certificate of every export opened over TLS: an open
    /// connection of a certificate revoked later loses its export (every
    /// request fails) at once, not when it closes.
    pub revocation: Option<Arc<Revocation>>,
    /// With the store in a shared bucket: a launch is served only by the
    /// server that holds (or can take) its source's lease, so that one
    /// server at a time writes the source's records.
    pub bucket: Option<crate::BucketConfig>,
}

/// Who a client is, as far as launches are concerned.
#[derive(Debug, PartialEq, Eq)]
enum Viewer {
    /// Every launch: the admin certificate, or anyone on a loopback listener
    /// without TLS.
    Everything,
    /// The launches of this source.
    Source(blockrep_core::SourceId),
    /// No launch: no certificate, or one without a usable identity.
    Nothing,
}

impl Viewer {
    fn may_open(&self, launch: &LaunchInfo) -> bool {
        match self {
            Viewer::Everything => true,
            Viewer::Source(source) => *source == launch.source,
            Viewer::Nothing => false,
        }
    }
}

impl LaunchRegistry {
    fn viewer(&self, client: &Client) -> Viewer {
        if !self.require_identity {
            return Viewer::Everything;
        }
        let Some(cert) = client.certificates().and_then(<[_]>::first) else {
            debug!(peer = ?client.addr(), "NBD client without a certificate sees no launch");
            return Viewer::Nothing;
        };
        match identity_from_cert(cert) {
            Ok(Identity::Admin) => Viewer::Everything,
            Ok(Identity::Source(source)) => Viewer::Source(source),
            Err(e) => {
                warn!(peer = ?client.addr(), error = %e, "NBD client certificate has no usable identity");
                Viewer::Nothing
            }
        }
    }
}

impl LaunchRegistry {
    /// A watch on the client's certificate, when it has one and lists are kept.
    fn watch(&self, client: &Client) -> Option<Registration> {
        let revocation = self.revocation.as_ref()?;
        let cert = client.certificates().and_then(<[_]>::first)?;
        match blockrep_pki::cert_serial(cert) {
            Ok(serial) => Some(revocation.register(serial)),
            Err(e) => {
                warn!(peer = ?client.addr(), error = %e, "NBD client certificate has no serial");
                None
            }
        }
    }
}

impl Registry for LaunchRegistry {
    fn lookup(&self, client: &Client, export: &str) -> Option<Arc<dyn Export>> {
        let viewer = self.viewer(client);
        // `LAUNCH/VOLUME` names one volume of a machine's launch; `LAUNCH`
        // alone, a launch of one volume.
        let (name, volume) = match export.split_once('/') {
            Some((name, volume)) => (name, Some(volume)),
            None => (export, None),
        };
        // Decided on the launch's record before opening it, so a refused
        // client costs no volume; checked again on the volume opened, in case
        // the name was deleted and made anew for another source in between.
        let info = match self.store.launch(name) {
            Ok(Some(info)) => info,
            Ok(None) => return None,
            Err(e) => {
                warn!(launch = name, error = %e, "NBD export not available");
                return None;
            }
        };
        if !viewer.may_open(&info) {
            warn!(
                launch = name,
                owner = %info.source,
                peer = ?client.addr(),
                viewer = ?viewer,
                "NBD export refused: the client may not open this source's launch"
            );
            return None;
        }
        if let Some(bucket) = &self.bucket {
            let ttl_ms = bucket.lease_ttl.as_millis() as u64;
            let now = blockrep_core::clock::now_unix_ms();
            if let Err(e) = self
                .store
                .claim_source(&info.source, &bucket.holder, ttl_ms, now)
            {
                warn!(launch = name, owner = %info.source, error = %e,
                      "NBD export refused: its source is served by another server");
                return None;
            }
        }
        let Some(closing) = self.closers.watch(name) else {
            warn!(launch = name, peer = ?client.addr(), "NBD export refused: the launch is being deleted");
            return None;
        };
        match self.store.open_launch_volume(name, volume) {
            Ok(volume) if viewer.may_open(&volume.info()) => {
                let watch = self.watch(client);
                Some(Arc::new(LaunchExport {
                    volume,
                    watch,
                    closing,
                }))
            }
            Ok(_) => None,
            Err(e) => {
                warn!(launch = name, export, error = %e, "NBD export not available");
                None
            }
        }
    }

    fn list(&self, client: &Client) -> Vec<(String, String)> {
        let viewer = self.viewer(client);
        let source = match &viewer {
            Viewer::Nothing => return Vec::new(),
            Viewer::Source(source) => Some(source),
            Viewer::Everything => None,
        };
        match self.store.list_launches(source) {
            Ok(launches) => launches
                .into_iter()
                .filter(|l| viewer.may_open(l))
                .flat_map(|l| {
                    let kind = l.kind.as_str();
                    let text = format!(
                        "{kind} launch of {} from snapshot {} (epoch {})",
                        l.source, l.snapshot, l.base_epoch
                    );
                    // A launch of one volume is listed by its name; each
                    // volume of a machine's as `LAUNCH/VOLUME`.
                    let volumes = self.store.launch_volumes(&l).unwrap_or_else(|e| {
                        warn!(launch = l.name, error = %e, "cannot list the launch's volumes");
                        Vec::new()
                    });
                    match volumes.as_slice() {
                        [_] => vec![(l.name, text)],
                        _ => volumes
                            .iter()
                            .map(|v| (format!("{}/{v}", l.name), format!("{text}, volume {v}")))
                            .collect(),
                    }
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list launches for NBD");
                Vec::new()
            }
        }
    }
}

/// Where the NBD listener is and whether it speaks TLS, for the URIs the admin
/// API shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NbdEndpoint {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl NbdEndpoint {
    /// The URI of the export `name`: `nbds://` when TLS is required (clients
    /// add their certificates, e.g. libnbd's `?tls-certificates=DIR`).
    pub(crate) fn uri(&self, name: &str) -> String {
        let scheme = if self.tls { "nbds" } else { "nbd" };
        format!("{scheme}://{}/{name}", self.addr)
    }
}

/// A launch volume behind the NBD `Export` interface, for one connection.
struct LaunchExport {
    volume: Arc<LaunchVolume>,
    /// The connection's certificate, watched for revocation (TLS only).
    watch: Option<Registration>,
    /// Turns true when the launch is to be deleted (an expired drill).
    closing: tokio::sync::watch::Receiver<bool>,
}

impl LaunchExport {
    /// Fails every request once the client's certificate is revoked.
    fn check(&self) -> io::Result<()> {
        match &self.watch {
            Some(watch) if watch.is_revoked() => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the client certificate of this connection has been revoked",
            )),
            _ => Ok(()),
        }
    }
}

impl Export for LaunchExport {
    fn size_bytes(&self) -> u64 {
        self.volume.size_bytes()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check()?;
        self.volume.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.volume.write(offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.volume.write_zeroes(offset, len)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.volume.trim(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        self.check()?;
        self.volume.sync(blockrep_core::clock::now_unix_ms())
    }

    /// One volume object serves every connection to the same launch, behind one
    /// lock, so a flush on any connection covers writes completed on all of them.
    fn multi_conn_safe(&self) -> bool {
        true
    }

    fn closing(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.closing.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config(listen: &str, tls: bool) -> ServerConfig {
        let mut config = ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            PathBuf::from("data"),
            PathBuf::from("tls"),
        );
        config.nbd_listen = Some(listen.parse().unwrap());
        config.nbd_tls = tls;
        config
    }

    #[test]
    fn only_loopback_may_serve_nbd_without_tls() {
        for open in ["0.0.0.0:10809", "[::]:10809", "192.0.2.1:10809"] {
            let error = check_listen(&config(open, false)).unwrap_err().to_string();
            assert!(error.contains("without TLS"), "{open}: {error}");
            assert!(error.contains("--nbd-tls"), "{open}: {error}");
            check_listen(&config(open, true)).unwrap();
        }
        for local in [
            "127.0.0.1:10809",
            "127.0.0.2:0",
            "[::1]:10809",
            "[::ffff:127.0.0.1]:1",
        ] {
            check_listen(&config(local, false)).unwrap();
        }
    }

    #[test]
    fn uris_name_the_scheme_clients_must_speak() {
        let addr = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(
            NbdEndpoint { addr, tls: false }.uri("web"),
            "nbd://127.0.0.1:10809/web"
        );
        assert_eq!(
            NbdEndpoint { addr, tls: true }.uri("web"),
            "nbds://127.0.0.1:10809/web"
        );
    }
}

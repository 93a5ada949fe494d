//! Serving the source disk to its workload over NBD (`agent --serve`).
//!
//! The workload uses the export as its disk (QEMU's
//! `-drive file=nbd+unix:///SOURCE?socket=PATH`, `nbd-client`, `nbdfuse`), so
//! every write passes through write capture. The export is the workload's
//! disk and nobody else's:
//!
//! - a Unix socket is created mode 0600 (bound in a private directory and
//!   renamed into place, so it is never reachable with looser permissions);
//!   a stale socket left by a killed agent is replaced, a live one is not;
//! - a TCP address must be loopback, unless TLS is required, and then a
//!   client must present a certificate of the agent's CA that is this
//!   source's own or the admin's: another source's certificate, though the
//!   same CA issued it, is told there is no such export.
//!
//! Serving starts before the agent first connects to the replication server
//! and never waits on it.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockrep_core::SourceId;
use blockrep_nbd::{Client, Export, Limits, NbdServer, Registry};
use blockrep_pki::Identity;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

use crate::capture::Capture;

/// Default [`ServeOptions::connections_max`].
pub const SERVE_CONNECTIONS_DEFAULT: usize = 16;

/// Where the export is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeAddr {
    /// A Unix socket at this path (`unix:PATH`).
    Unix(PathBuf),
    /// A TCP `host:port`, resolved when serving starts.
    Tcp(String),
}

impl ServeAddr {
    /// Parses `unix:PATH` or `host:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/blockrep/disk.sock".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Self::Tcp(text.to_owned()))
            }
            _ => Err(format!(
                "{text:?} is neither unix:PATH nor host:port (e.g. unix:/run/blockrep/disk.sock or 127.0.0.1:10809)"
            )),
        }
    }
}

impl ServeAddr {
    /// Checks, before anything is opened, that the address may be served:
    /// a TCP address must resolve, and to loopback only unless `tls`.
    pub async fn check(&self, tls: bool) -> Result<(), ServeError> {
        match self {
            Self::Unix(_) => Ok(()),
            Self::Tcp(address) => resolve_tcp(address, tls).await.map(drop),
        }
    }
}

/// How the export is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The address.
    pub addr: ServeAddr,
    /// Require TLS with this configuration (it must require client
    /// certificates); needed for a TCP address that is not loopback.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The source whose disks these are: over TLS, only its certificate and
    /// the admin's open them.
    pub source: SourceId,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
}

/// Errors starting to serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address may not be used as given.
    #[error("{0}")]
    Refused(String),
    /// The socket could not be made.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// The exports: the source disk under the source's id (an empty name, the
/// client's default, opens it too), or each disk of a machine under its
/// volume's name (no default: a client names the disk it uses).
struct Disks {
    exports: Vec<(String, Arc<dyn Export>)>,
    /// Over TLS: the one source (besides the admin) whose certificate sees
    /// the exports. `None` where the socket's permissions or loopback are
    /// the protection.
    owner: Option<SourceId>,
}

impl Disks {
    /// Whether `client` may see the exports at all.
    fn may_open(&self, client: &Client) -> bool {
        let Some(owner) = &self.owner else {
            return true;
        };
        let Some(cert) = client.certificates().and_then(<[_]>::first) else {
            return false;
        };
        match blockrep_pki::identity_from_cert(cert) {
            Ok(Identity::Admin) => true,
            Ok(Identity::Source(source)) if source == *owner => true,
            Ok(Identity::Source(source)) => {
                warn!(peer = ?client.addr(), %source, "another source's certificate asked for this disk");
                false
            }
            Err(error) => {
                warn!(peer = ?client.addr(), %error, "NBD client certificate has no usable identity");
                false
            }
        }
    }
}

impl Registry for Disks {
    fn lookup(&self, client: &Client, name: &str) -> Option<Arc<dyn Export>> {
        if !self.may_open(client) {
            return None;
        }
        if let [(_, only)] = self.exports.as_slice()
            && name.is_empty()
        {
            return Some(Arc::clone(only));
        }
        self.exports
            .iter()
            .find(|(export, _)| export == name)
            .map(|(_, export)| Arc::clone(export))
    }

    fn list(&self, client: &Client) -> Vec<(String, String)> {
        if !self.may_open(client) {
            return Vec::new();
        }
        let what = match self.exports.len() {
            1 => "the source disk, replicated by write capture",
            _ => "a disk of the machine, replicated by write capture",
        };
        self.exports
            .iter()
            .map(|(name, _)| (name.clone(), what.into()))
            .collect()
    }
}

/// The export being served; [`Serving::stop`] ends it.
#[derive(Debug)]
pub struct Serving {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// The socket file this process made, and its inode (removed on stop
    /// only if it is still the same file).
    socket: Option<(PathBuf, u64)>,
    /// Where a TCP listener is bound.
    local_addr: Option<SocketAddr>,
    captures: Vec<Arc<Capture>>,
}

impl Serving {
    /// Starts serving `capture`'s export as `name`.
    pub async fn start(
        capture: &Arc<Capture>,
        name: &str,
        options: ServeOptions,
    ) -> Result<Self, ServeError> {
        Self::start_disks(&[(name.to_owned(), Arc::clone(capture))], options).await
    }

    /// Starts serving each disk's capture as the export of its name (a
    /// machine's volumes), on one socket or address.
    pub async fn start_disks(
        disks: &[(String, Arc<Capture>)],
        options: ServeOptions,
    ) -> Result<Self, ServeError> {
        let registry = Arc::new(Disks {
            exports: disks
                .iter()
                .map(|(name, capture)| (name.clone(), capture.export()))
                .collect(),
            owner: options.tls.as_ref().map(|_| options.source.clone()),
        });
        let name = disks
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let name = name.as_str();
        let limits = Limits {
            connections_max: options.connections_max.max(1),
            ..Limits::default()
        };
        let mut server = NbdServer::new(registry, limits);
        if let Some(config) = &options.tls {
            server = server.with_tls(Arc::clone(config), true);
        }
        let server = Arc::new(server);
        let (stop, stopped) = watch::channel(false);
        let mut serving = Self {
            stop,
            task: None,
            socket: None,
            local_addr: None,
            captures: disks.iter().map(|(_, c)| Arc::clone(c)).collect(),
        };
        match &options.addr {
            ServeAddr::Unix(path) => {
                let (listener, inode) = bind_unix(path)?;
                serving.socket = Some((path.clone(), inode));
                info!(socket = %path.display(), export = name, "serving the disk over NBD");
                serving.task = Some(tokio::spawn(accept_unix(
                    server,
                    listener,
                    options.connections_max.max(1),
                    stopped,
                )));
            }
            ServeAddr::Tcp(address) => {
                let listener = bind_tcp(address, options.tls.is_some()).await?;
                let local = listener
                    .local_addr()
                    .map_err(io("cannot read the bound address"))?;
                serving.local_addr = Some(local);
                info!(address = %local, export = name, tls = options.tls.is_some(), "serving the disk over NBD");
                let mut stopped = stopped;
                serving.task = Some(tokio::spawn(server.run(listener, async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })));
            }
        }
        Ok(serving)
    }

    /// The TCP address served, if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops serving: no new connections, open ones are closed, then every
    /// write already accepted is waited for (the capture stops taking
    /// writes) and the disk flushed. The capture may then be saved.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.remove_socket();
        let captures = self.captures.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            // Every disk frozen and flushed, even after one failed.
            let mut flushed = Ok(());
            for capture in &captures {
                capture.freeze();
                let result = capture.export().flush();
                flushed = flushed.and(result);
            }
            flushed
        })
        .await;
        match flushed {
            Ok(Ok(())) => info!("export stopped and flushed"),
            Ok(Err(error)) => warn!(%error, "flushing the disk after serving failed"),
            Err(error) => warn!(%error, "the flush task failed"),
        }
    }

    fn remove_socket(&mut self) {
        if let Some((path, inode)) = self.socket.take()
            && std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == inode)
            && let Err(error) = std::fs::remove_file(&path)
        {
            warn!(socket = %path.display(), %error, "cannot remove the socket");
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.remove_socket();
    }
}

/// Resolves a TCP address; a non-loopback one without TLS is refused.
async fn resolve_tcp(address: &str, tls: bool) -> Result<SocketAddr, ServeError> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(io(format!("cannot resolve --serve {address}")))?
        .collect();
    let Some(&first) = resolved.first() else {
        return Err(ServeError::Refused(format!(
            "--serve {address} resolves to no address"
        )));
    };
    if !tls && let Some(open) = resolved.iter().find(|a| !a.ip().is_loopback()) {
        return Err(ServeError::Refused(format!(
            "refusing to serve the disk on {open} (from --serve {address}) without TLS: it is not a \
             loopback address, so anyone who reaches it could read and write the disk; use a \
             loopback address, unix:PATH, or --serve-tls (the agent then needs a serving \
             certificate, `cert issue --serve-name`, and clients this source's certificate or \
             the admin's)"
        )));
    }
    Ok(first)
}

/// Binds a TCP listener; a non-loopback address without TLS is refused.
async fn bind_tcp(address: &str, tls: bool) -> Result<tokio::net::TcpListener, ServeError> {
    let first = resolve_tcp(address, tls).await?;
    tokio::net::TcpListener::bind(first)
        .await
        .map_err(io(format!("cannot listen on {first}")))
}

/// Binds the Unix socket at `path` mode 0600: bound in a private directory
/// beside it, restricted, then renamed into place. Returns it and its inode.
fn bind_unix(path: &Path) -> Result<(tokio::net::UnixListener, u64), ServeError> {
    remove_stale_socket(path)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ServeError::Refused(format!("{} is not a socket path", path.display())))?;
    let mut private = std::ffi::OsString::from(".");
    private.push(file_name);
    private.push(format!(".blockrep-bind-{}", std::process::id()));
    let private = parent.join(private);
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io(format!("cannot create {}", private.display())))?;
    let staged = private.join("s");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)
            .map_err(io(format!("cannot bind {}", path.display())))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("cannot restrict {}", path.display())))?;
        std::fs::rename(&staged, path).map_err(io(format!(
            "cannot move the socket into place at {}",
            path.display()
        )))?;
        let inode = std::fs::symlink_metadata(path)
            .map_err(io(format!("cannot stat {}", path.display())))?
            .ino();
        listener
            .set_nonblocking(true)
            .map_err(io("cannot make the socket non-blocking"))?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(io("cannot register the socket"))?;
        Ok((listener, inode))
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Removes a socket file no process listens on (left by a killed agent);
/// refuses a live socket or a file that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(ServeError::Refused(format!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServeError::Refused(format!(
            "{} is in use by another process (another agent serving this disk?)",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(io(format!(
        "cannot remove the stale socket {}",
        path.display()
    )))?;
    info!(socket = %path.display(), "removed a stale socket");
    Ok(())
}

/// Accepts Unix connections, at most `connections_max` at once, until stopped;
/// then closes the open ones.
async fn accept_unix(
    server: Arc<NbdServer>,
    listener: tokio::net::UnixListener,
    connections_max: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(connections_max));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Usually out of file descriptors: wait for the condition to pass.
                warn!(%error, "accepting an NBD connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = Arc::clone(&server);
        connections.spawn(async move {
            let _permit = permit;
            match server.serve_connection(stream, Client::new(None)).await {
                Ok(()) => tracing::debug!("NBD connection closed"),
                Err(error) => info!(kind = ?error.kind(), %error, "NBD connection ended"),
            }
        });
        while connections.try_join_next().is_some() {}
    }
    // Requests still running on the blocking pool finish on their own; the
    // caller waits for them through the capture before saving it.
    connections.shutdown().await;
}

//! Shared helpers for blockrep's tests: certificates made at run time, the real
//! server binary on 127.0.0.1:0, disk images with known content, and a raw TLS
//! client for speaking (and mis-speaking) the protocol directly, and a TCP
//! proxy that injects network faults ([`proxy`]).
//!
//! The rooms beside it: [`rig`] (a server with its certificates and work
//! directory, the start of most end-to-end tests), [`agent`] (a running agent
//! process), [`admin`] (the admin API's requests, and recovery points taken
//! through it), [`raw`] (protocol sessions opened by hand), [`tools`]
//! (external programs and waiting), [`scripts`] (operator hooks and their
//! logs), [`ack_log`] (the agent's acknowledgement log read back),
//! [`fs_writer`] (a file-system workload that records what it made durable),
//! [`loopfs`] (kernel file systems on loop devices), [`nbdfuse`] (an NBD
//! export as a file) and [`store`] (disks and machines written into a store
//! before a server runs).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, missing_docs)]

pub mod ack_log;
pub mod admin;
pub mod agent;
pub mod fs_writer;
pub mod loopfs;
pub mod nbdfuse;
pub mod proxy;
pub mod raw;
pub mod rig;
pub mod scripts;
pub mod seaweedfs;
pub mod store;
pub mod tools;
/// The seeded generator lives in `blockrep_core::rng`; re-exported for tests.
pub use blockrep_core::rng;

pub use agent::{AgentProcess, wait_exit};
pub use proxy::{BlackHoleFault, DirectionFaults, FaultConfig, FaultProxy, ResetFault, Which};
pub use rig::AgentRig;
pub use rng::SplitMix64;
pub use seaweedfs::BucketAccess;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockrep_core::SourceId;
use blockrep_proto::{Message, decode, encode};
use bytes::BytesMut;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A directory of certificates: a CA, a server certificate, and source certificates.
#[derive(Debug)]
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA and server certificate for localhost/127.0.0.1, plus a certificate
    /// for each source in `sources`.
    pub fn new(sources: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        blockrep_pki::init_ca(dir.path(), &["localhost".into(), "127.0.0.1".into()], false)
            .unwrap();
        for source in sources {
            blockrep_pki::issue_source(dir.path(), &SourceId::new(source).unwrap()).unwrap();
        }
        Self { dir }
    }

    /// Issues a certificate for `source` in `tenant` (`blockrep cert issue
    /// --source S --tenant T`), replacing any it had.
    pub fn issue_in_tenant(&self, source: &str, tenant: &str) {
        blockrep_pki::issue_source_in_tenant(
            self.dir.path(),
            &SourceId::new(source).unwrap(),
            Some(&SourceId::new(tenant).unwrap()),
        )
        .unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.crt"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }

    /// Signs a client certificate whose SAN is the raw `uri`, bypassing the id
    /// validation of `blockrep cert issue` (to test the server's own checks).
    /// Writes `stem.crt`/`stem.key`.
    pub fn issue_raw_uri(&self, stem: &str, uri: &str) {
        self.issue_with(stem, &[uri], |_| {});
    }

    /// Signs a client certificate with the real CA whose SAN holds every URI of
    /// `uris`, after `edit` has changed its parameters (validity, key usage...).
    /// Writes `stem.crt`/`stem.key`.
    pub fn issue_with(&self, stem: &str, uris: &[&str], edit: impl FnOnce(&mut CertificateParams)) {
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.key("ca")).unwrap()).unwrap();
        let issuer =
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(self.cert("ca")).unwrap(), ca_key)
                .unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI((*uri).try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(self.cert(stem), cert.pem()).unwrap();
        std::fs::write(self.key(stem), key.serialize_pem()).unwrap();
    }
}

/// The admin token of every server this process started, by admin address.
static ADMIN_TOKENS: Mutex<BTreeMap<SocketAddr, String>> = Mutex::new(BTreeMap::new());

/// The admin token of the server this process started with its admin API at
/// `admin` (helpers that only know the address use it).
pub fn admin_token_for(admin: SocketAddr) -> Option<String> {
    ADMIN_TOKENS.lock().unwrap().get(&admin).cloned()
}

/// The real `blockrep server` binary, listening on an ephemeral port.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The admin API's address (servers here listen on 127.0.0.1:0 for it too).
    pub admin_addr: Option<SocketAddr>,
    /// The admin token the server reads (its TLS directory's `admin.token`, or
    /// the file given with `--admin-token`); `None` once it has none there
    /// (`--admin-tls`).
    pub admin_token: Option<String>,
    /// The NBD listener's address, when started with `--nbd-listen`.
    pub nbd_addr: Option<SocketAddr>,
    /// Everything the server logged on stderr so far.
    pub log: Arc<Mutex<String>>,
    /// From the spawn to the listening line: the time to open the store.
    pub started_in: Duration,
}

/// What a server killed by [`ServerProcess::kill_during_startup`] had done.
#[derive(Debug)]
pub struct StartupKill {
    /// Whether it had printed its listening line (store open, sockets bound).
    pub listened: bool,
    /// Its exit status if it stopped before the kill: a start that failed.
    pub exited: Option<ExitStatus>,
    /// Everything it logged on stderr.
    pub log: String,
}

/// Runs `blockrep server` (on loopback, the admin API too) that must refuse
/// to start: its exit status and stderr. Fails the test, killing it, if it
/// is still running after 30 s.
pub fn refused_start(
    bin: &Path,
    data: &Path,
    tls: &Path,
    extra: &[&str],
) -> (std::process::ExitStatus, String) {
    let mut child = server_command(bin, "127.0.0.1:0", data, tls, extra, None)
        .spawn()
        .expect("start blockrep server");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started where it had to refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    (status, stderr)
}

/// `blockrep server` on `listen` (the admin API on 127.0.0.1:0), with stdout
/// and stderr piped.
fn server_command(
    bin: &Path,
    listen: &str,
    data: &Path,
    tls: &Path,
    extra: &[&str],
    bucket: Option<&BucketAccess>,
) -> Command {
    let mut command = Command::new(bin);
    command
        .args([
            "server",
            "--listen",
            listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data)
        .arg("--tls-dir")
        .arg(tls)
        .args(extra);
    if let Some(bucket) = bucket {
        bucket.apply(&mut command);
    }
    command
        .env("RUST_LOG", "info")
        // The token file is the one in `tls` (or in `extra`), whatever the environment says.
        .env_remove("BLOCKREP_ADMIN_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

impl ServerProcess {
    pub fn start(bin: &Path, data: &Path, tls: &Path) -> Self {
        Self::start_with(bin, data, tls, &[])
    }

    pub fn start_with(bin: &Path, data: &Path, tls: &Path, extra: &[&str]) -> Self {
        Self::start_on(bin, "127.0.0.1:0", data, tls, extra)
    }

    /// Starts a server on a given replication address (e.g. to restart one where
    /// its agents expect it).
    pub fn start_on(bin: &Path, listen: &str, data: &Path, tls: &Path, extra: &[&str]) -> Self {
        Self::start_in(bin, listen, data, tls, extra, None)
    }

    /// [`ServerProcess::start_on`] with the store in a bucket when `bucket`
    /// says so (`data` its working copy).
    pub fn start_in(
        bin: &Path,
        listen: &str,
        data: &Path,
        tls: &Path,
        extra: &[&str],
        bucket: Option<&BucketAccess>,
    ) -> Self {
        let spawned = Instant::now();
        let mut child = server_command(bin, listen, data, tls, extra, bucket)
            .spawn()
            .expect("start blockrep server");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let log_writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = log_writer.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (addr, admin_addr, nbd_addr) = match fields.as_slice() {
            ["listening", "on", addr, "admin", admin, "nbd", nbd] => {
                (addr.parse().unwrap(), admin.parse().ok(), nbd.parse().ok())
            }
            _ => panic!(
                "unexpected server output {line:?}; log: {}",
                log.lock().unwrap()
            ),
        };
        let started_in = spawned.elapsed();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink);
        });
        let token_path = extra
            .iter()
            .position(|arg| *arg == "--admin-token")
            .and_then(|i| extra.get(i + 1))
            .map_or_else(
                || tls.join(blockrep_pki::ADMIN_TOKEN_FILE_NAME),
                PathBuf::from,
            );
        let admin_token = std::fs::read_to_string(token_path)
            .ok()
            .map(|text| text.trim().to_owned());
        if let (Some(admin), Some(token)) = (admin_addr, &admin_token) {
            ADMIN_TOKENS.lock().unwrap().insert(admin, token.clone());
        }
        Self {
            child,
            addr,
            admin_addr,
            admin_token,
            nbd_addr,
            log,
            started_in,
        }
    }

    /// Spawns a server as [`ServerProcess::start_on`] does, but SIGKILLs it
    /// `after` the spawn, whether it is still opening its store (scanning
    /// packs, cutting a torn tail, loading heads) or already listening.
    pub fn kill_during_startup(
        bin: &Path,
        listen: &str,
        data: &Path,
        tls: &Path,
        extra: &[&str],
        after: Duration,
    ) -> StartupKill {
        let mut child = server_command(bin, listen, data, tls, extra, None)
            .spawn()
            .expect("start blockrep server");
        std::thread::sleep(after);
        // A server that stopped by itself before the kill is a failed start.
        let exited = child.try_wait().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        // The process is gone, so both pipes end.
        let mut stdout = String::new();
        let _ = child.stdout.take().unwrap().read_to_string(&mut stdout);
        let mut log = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut log);
        StartupKill {
            listened: stdout.starts_with("listening on "),
            exited,
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the log contains `needle`, up to `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// SIGKILL, as a crash would.
    /// Stops the server as an operator would (SIGTERM) and waits for it to
    /// exit: a clean stop, which releases what it holds.
    pub fn stop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let block = blake3::hash(&[seed.to_le_bytes(), counter.to_le_bytes()].concat());
        out.extend_from_slice(block.as_bytes());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// An image of `len` bytes cycling through zero, text-like and random 1 MiB regions.
pub fn mixed_image(len: usize, seed: u64) -> Vec<u8> {
    const REGION: usize = 1 << 20;
    let mut out = vec![0u8; len];
    let text = b"the quick brown fox jumps over the lazy dog; blockrep replicates disks. ";
    for (region_index, region) in out.chunks_mut(REGION).enumerate() {
        match region_index % 3 {
            0 => {}
            1 => {
                for (i, b) in region.iter_mut().enumerate() {
                    *b = text[(i + region_index) % text.len()];
                }
            }
            _ => region.copy_from_slice(&random_bytes(region.len(), seed ^ region_index as u64)),
        }
    }
    out
}

/// Overwrites `data` at `offset` in the file at `path`.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
    file.sync_all().unwrap();
}

/// A raw protocol client over real mutual TLS.
#[derive(Debug)]
pub struct RawClient {
    pub stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl RawClient {
    /// Connects with the given client certificate, or none.
    pub async fn connect(
        addr: SocketAddr,
        ca: &Path,
        client: Option<(&Path, &Path)>,
    ) -> std::io::Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in blockrep_pki::read_certs(ca).unwrap() {
            roots.add(cert).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    blockrep_pki::read_certs(cert).unwrap(),
                    blockrep_pki::read_key(key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = TcpStream::connect(addr).await?;
        let stream = TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().unwrap(), tcp)
            .await?;
        Ok(Self {
            stream,
            buf: BytesMut::new(),
        })
    }

    /// Connects as `source`, with its certificate from `pki`.
    pub async fn connect_as(addr: SocketAddr, pki: &Pki, source: &str) -> Self {
        Self::connect(
            addr,
            &pki.cert("ca"),
            Some((&pki.cert(source), &pki.key(source))),
        )
        .await
        .unwrap()
    }

    /// Sends the `Hello` of this protocol version for `source` and a disk of
    /// that geometry.
    pub async fn hello(&mut self, source: &str, disk_size_bytes: u64, chunk_size_bytes: u32) {
        self.send(&raw::hello(source, disk_size_bytes, chunk_size_bytes))
            .await
            .unwrap();
    }

    pub async fn send(&mut self, message: &Message) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        encode(message, &mut out);
        self.send_raw(&out).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next message, or the I/O error that ended the stream. `Ok(None)` on EOF.
    pub async fn recv(&mut self) -> std::io::Result<Option<Message>> {
        loop {
            if let Some(message) = decode(&mut self.buf).map_err(std::io::Error::other)? {
                return Ok(Some(message));
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .map_err(|_| std::io::Error::other("timed out waiting for the server"))??;
            if read == 0 {
                return Ok(None);
            }
        }
    }
}

/// SIGTERM to `child`, then waits for it to exit; SIGKILL if it has not
/// within `grace`.
pub fn terminate(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

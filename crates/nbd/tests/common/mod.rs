//! Shared helpers: a file-backed export, a server on 127.0.0.1:0 in a
//! background runtime, external clients run with a deadline, and a raw client
//! for speaking (and mis-speaking) the protocol.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_nbd::wire::{self, ClientFlags, InfoRequest, OptionHeader, OptionType, Request};
use blockrep_nbd::{Client, Export, FileExport, Limits, NbdServer, Registry};

/// A CA and a server certificate for localhost, an admin certificate for the
/// client, the server's TLS configuration, and the client's certificates in a
/// directory laid out as libnbd wants it.
pub struct Tls {
    pub pki: tempfile::TempDir,
    pub config: Arc<rustls::ServerConfig>,
    /// The client's certificate (the admin's).
    pub client_cert: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub libnbd_dir: tempfile::TempDir,
}

impl Tls {
    pub fn new() -> Self {
        let pki = tempfile::tempdir().unwrap();
        blockrep_pki::init_ca(pki.path(), &["localhost".into(), "127.0.0.1".into()], false)
            .unwrap();
        let (client_cert, client_key) = blockrep_pki::issue_admin(pki.path()).unwrap();
        let config = blockrep_pki::server_config(
            &pki.path().join("ca.crt"),
            &pki.path().join("server.crt"),
            &pki.path().join("server.key"),
        )
        .unwrap();
        // libnbd looks for fixed file names in its certificate directory.
        let libnbd_dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            pki.path().join("ca.crt"),
            libnbd_dir.path().join("ca-cert.pem"),
        )
        .unwrap();
        std::fs::copy(&client_cert, libnbd_dir.path().join("client-cert.pem")).unwrap();
        std::fs::copy(&client_key, libnbd_dir.path().join("client-key.pem")).unwrap();
        Self {
            pki,
            config: Arc::new(config),
            client_cert,
            libnbd_dir,
        }
    }

    /// The `nbds://` URI of `name` at `addr`, with the client's certificates.
    pub fn uri(&self, addr: SocketAddr, name: &str) -> String {
        format!(
            "nbds://{addr}/{name}?tls-certificates={}",
            self.libnbd_dir.path().display()
        )
    }
}

/// The crate's [`FileExport`] of the file at `path`, shared.
pub fn file_export(path: &Path, read_only: bool) -> Arc<FileExport> {
    Arc::new(FileExport::open(path, read_only).unwrap())
}

/// Exports by name.
#[derive(Default)]
pub struct MapRegistry {
    exports: HashMap<String, (Arc<dyn Export>, String)>,
}

impl MapRegistry {
    pub fn with(mut self, name: &str, description: &str, export: Arc<dyn Export>) -> Self {
        self.exports
            .insert(name.to_owned(), (export, description.to_owned()));
        self
    }
}

impl Registry for MapRegistry {
    fn lookup(&self, _client: &Client, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.get(name).map(|(export, _)| Arc::clone(export))
    }
    fn list(&self, _client: &Client) -> Vec<(String, String)> {
        let mut list: Vec<_> = self
            .exports
            .iter()
            .map(|(name, (_, description))| (name.clone(), description.clone()))
            .collect();
        list.sort();
        list
    }
}

/// A server on 127.0.0.1:0 running in its own runtime until dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(server: NbdServer) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                Arc::new(server)
                    .run(listener, async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn with_registry(registry: MapRegistry, limits: Limits) -> Self {
        Self::start(NbdServer::new(Arc::new(registry), limits))
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.addr)
    }

    /// Stops the server and waits for `run` to return.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The path of an external client, or `None` (with a note) when it is not
/// installed. With `BLOCKREP_REQUIRE_TOOLS` set, a missing client fails the test.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        if std::env::var_os("BLOCKREP_REQUIRE_TOOLS").is_some() {
            panic!("{name} is required (BLOCKREP_REQUIRE_TOOLS is set) but not on PATH");
        }
        eprintln!(
            "note: skipping, {name} is not installed (apt-get install libnbd-bin qemu-utils)"
        );
    }
    found
}

/// Runs a client to completion, killing it after `deadline` so that a server
/// bug shows up as a failure rather than a hung test.
pub fn run(program: &Path, args: &[&str]) -> Output {
    let deadline = Duration::from_secs(120);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so a chatty client cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stderr.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!(
                "{} {args:?} ran longer than {deadline:?}",
                program.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs a client and insists that it succeeds; returns its stdout.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Deterministic bytes that differ at every offset, so that a misplaced
/// block cannot compare equal by accident.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    blockrep_core::rng::bytes(len, seed)
}

/// A temp dir with `name` holding `bytes`.
pub fn image(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A blocking client that speaks the protocol byte by byte, for tests that
/// need to send what real clients never would.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    /// Connects and reads the greeting; sends nothing.
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut client = Self { stream };
        let greeting = client.read_vec(wire::GREETING_LEN);
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&greeting[16..], &[0, 3]);
        client
    }

    /// Connects and sends fixed-newstyle, no-zeroes client flags.
    pub fn negotiating(addr: SocketAddr) -> Self {
        let mut client = Self::connect(addr);
        client.send(&wire::encode_client_flags(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        }));
        client
    }

    /// Negotiates `name` with `NBD_OPT_GO`; returns (size, transmission flags).
    pub fn go(addr: SocketAddr, name: &str) -> (Self, u64, u16) {
        let mut client = Self::negotiating(addr);
        client.send_option(
            OptionType::Go,
            &wire::encode_info_request(&InfoRequest {
                name: name.to_owned(),
                info_types: vec![wire::INFO_BLOCK_SIZE],
            }),
        );
        let mut export = None;
        loop {
            let (reply_type, data) = client.read_option_reply(OptionType::Go);
            match reply_type {
                wire::REPLY_INFO if data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                    export = Some((size, flags));
                }
                wire::REPLY_INFO => {}
                wire::REPLY_ACK => break,
                other => panic!("GO answered {other:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
        let (size, flags) = export.expect("GO sent NBD_INFO_EXPORT");
        (client, size, flags)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_option(&mut self, option: OptionType, data: &[u8]) {
        let header = wire::encode_option_header(OptionHeader {
            option,
            length: data.len() as u32,
        });
        self.send(&header);
        self.send(data);
    }

    /// Reads one option reply, checking it answers `option`.
    /// Sends `NBD_OPT_GO` for `name`, asking for no particular information.
    pub fn send_go(&mut self, name: &str) {
        self.send_option(
            OptionType::Go,
            &wire::encode_info_request(&InfoRequest {
                name: name.into(),
                info_types: vec![],
            }),
        );
    }

    pub fn read_option_reply(&mut self, option: OptionType) -> (u32, Vec<u8>) {
        let header: [u8; wire::OPTION_REPLY_HEADER_LEN] = self
            .read_vec(wire::OPTION_REPLY_HEADER_LEN)
            .try_into()
            .unwrap();
        let header = wire::parse_option_reply_header(&header).unwrap();
        assert_eq!(header.option, option.to_u32());
        let data = self.read_vec(header.length as usize);
        (header.reply_type, data)
    }

    pub fn send_request(&mut self, request: &Request, payload: &[u8]) {
        self.send(&wire::encode_request(request));
        self.send(payload);
    }

    /// Reads a simple reply header; returns (error, handle).
    pub fn read_reply(&mut self) -> (u32, u64) {
        let header: [u8; wire::SIMPLE_REPLY_LEN] =
            self.read_vec(wire::SIMPLE_REPLY_LEN).try_into().unwrap();
        let reply = wire::parse_simple_reply(&header).unwrap();
        (reply.error, reply.handle)
    }

    pub fn read_vec(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.stream.read_exact(&mut bytes).unwrap();
        bytes
    }

    /// True when the server has closed the connection: the next read sees
    /// end of stream (or a reset) instead of data or a timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}

pub fn request(command: wire::Command, handle: u64, offset: u64, length: u32) -> Request {
    Request {
        flags: 0,
        command,
        handle,
        offset,
        length,
    }
}

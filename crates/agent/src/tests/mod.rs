//! The agent's protocol logic against the real server session, in process:
//! each test serves sessions with `blockrep_server::in_memory` over
//! `tokio::io::duplex` (no TLS, no socket, no process) and checks what the
//! agent did against the store the server committed to.

mod epoch;
mod failback;
mod resume;
mod writes;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use blockrep_core::rng::SplitMix64;
use blockrep_core::{ChunkId, Geometry, Root, SourceId};
use blockrep_server::ServerConfig;
use blockrep_server::in_memory::InMemoryServer;
use blockrep_store::Store;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;

use crate::connection::{Connection, Transport};
use crate::epoch::Session;
use crate::view::{Scan, scan_live};
use crate::{AgentConfig, Compression};

/// Chunk size of the test disks: small, so that a disk of many chunks is small.
const CHUNK: u32 = 64 * 1024;
/// Bytes each direction of an in-memory stream buffers.
const PIPE_BYTES: usize = 1 << 20;
/// A session still running this long after its agent left is stuck.
const SESSION_END_MAX: Duration = Duration::from_secs(20);

/// A source disk (an image file of random chunks), the agent's configuration
/// for it, and a server with its store.
struct Rig {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    source: SourceId,
    config: AgentConfig,
    server: InMemoryServer,
    rng: SplitMix64,
}

impl Rig {
    /// A disk of `chunks` chunks of random data (no two alike, none zero).
    fn new(chunks: u64, seed: u64) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; (chunks * u64::from(CHUNK)) as usize])
            .expect("create the disk");
        let source = SourceId::new("web-1").expect("valid source id");
        let mut config = AgentConfig::new(
            disk.clone(),
            "in-memory:0".into(),
            source.clone(),
            // No TLS: the certificates are never read.
            dir.path().join("ca.crt"),
            dir.path().join("agent.crt"),
            dir.path().join("agent.key"),
        );
        config.chunk_size_bytes = CHUNK;
        // Frames of a known size and kind: whole chunks, uncompressed.
        config.compression = Compression::None;
        config.patches = false;
        config.io_timeout = Duration::from_secs(10);
        let data_dir = dir.path().join("server");
        let store = Arc::new(Store::open(&data_dir).expect("open the store"));
        let mut server_config = ServerConfig::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir.clone(),
            data_dir,
        );
        server_config.retention = None;
        let server = InMemoryServer::new(store, server_config);
        let mut rig = Self {
            _dir: dir,
            disk,
            source,
            config,
            server,
            rng: SplitMix64::new(seed),
        };
        for index in 0..chunks {
            rig.rewrite_chunk(index);
        }
        rig
    }

    fn store(&self) -> &Store {
        self.server.store()
    }

    /// Fills chunk `index` of the disk with new random bytes.
    fn rewrite_chunk(&mut self, index: u64) {
        let data: Vec<u8> = (0..CHUNK / 8)
            .flat_map(|_| self.rng.next_u64().to_le_bytes())
            .collect();
        let file = OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .expect("open the disk");
        file.write_all_at(&data, index * u64::from(CHUNK))
            .expect("write the disk");
    }

    fn disk_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.disk).expect("read the disk")
    }

    /// A live scan of the disk, as an epoch or a failback starts with.
    async fn scan(&self) -> Scan {
        scan_live(&self.config, CHUNK).await.expect("scan the disk")
    }

    /// The root of a scan: what the server's head must be once it committed.
    fn root_of(scan: &Scan) -> ChunkId {
        Root::from_chunk_ids(scan.geometry, &scan.ids).id()
    }

    /// The server's head: its epoch and root.
    fn head(&self) -> Option<(u64, ChunkId)> {
        let head = self.store().head(&self.source).expect("read the head");
        head.map(|head| (head.epoch, head.root))
    }

    /// The chunk ids of the server's head.
    fn head_ids(&self) -> Vec<ChunkId> {
        let (_, root) = self.head().expect("a head");
        let root = self.store().read_root(&root).expect("read the head root");
        self.store()
            .chunk_ids(&root)
            .expect("read the head's pages")
    }

    /// Opens a session (`Hello`, `Welcome`) for a disk of `geometry` over a
    /// new in-memory stream, its agent end wrapped by `wrap`; the server's
    /// side runs on its own task, returned to be awaited once the agent left.
    async fn connect_with<S: Transport>(
        &self,
        geometry: Geometry,
        wrap: impl FnOnce(DuplexStream) -> S,
    ) -> (Session<S>, JoinHandle<()>) {
        let (agent_end, server_end) = tokio::io::duplex(PIPE_BYTES);
        let served = tokio::spawn(self.server.serve(server_end, self.source.clone()));
        let connection = Connection::new(wrap(agent_end), &self.config);
        let session = Session::start(connection, &self.config, geometry)
            .await
            .expect("the server welcomes the agent");
        (session, served)
    }

    async fn connect(&self, geometry: Geometry) -> (Session<DuplexStream>, JoinHandle<()>) {
        self.connect_with(geometry, |stream| stream).await
    }
}

/// Waits for the server's side of a session to end (the agent has left).
async fn ended(served: JoinHandle<()>) {
    tokio::time::timeout(SESSION_END_MAX, served)
        .await
        .expect("the server's session ends once the agent left")
        .expect("the server's session did not panic");
}

/// A stream that accepts `budget` bytes from the agent and then fails every
/// write, as a connection that dies in the middle of an epoch; it notes the
/// length of every write it takes, and the bytes taken.
struct CutAfter {
    inner: DuplexStream,
    budget: usize,
    writes: Arc<Mutex<Vec<usize>>>,
    taken: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for CutAfter {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CutAfter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.budget == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let allowed = buf.len().min(self.budget);
        let polled = Pin::new(&mut self.inner).poll_write(cx, &buf[..allowed]);
        if let Poll::Ready(Ok(written)) = polled {
            self.budget -= written;
            self.writes.lock().unwrap().push(written);
            self.taken
                .lock()
                .unwrap()
                .extend_from_slice(&buf[..written]);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

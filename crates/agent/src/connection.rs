//! The agent's side of a session: frames in and out over any byte stream
//! (mutual TLS over TCP in production, an in-memory pipe in tests). Reading
//! runs on its own task so that a server's `Error` is seen even while we are
//! sending.
//!
//! The I/O time-out is about progress, not about how long one call takes: a
//! write or a wait for an answer fails only when no byte has moved either way
//! for `--io-timeout`. Bytes our socket accepts count, and so do bytes from the
//! server, which sends `Progress` while our frames keep arriving. A slow link
//! that drains megabytes of socket buffers before the server can answer is
//! then not taken for a dead one, and a dead one still goes silent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use blockrep_proto::{ErrorCode, Message, decode, encode};
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, WriteHalf,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::{AgentConfig, Error};

/// Bytes buffered before a write reaches the stream: small frames (a
/// reference, a zero chunk, a compressed chunk) gather into one TLS write.
/// A frame at least this large (a whole 64 KiB chunk with its header) goes
/// to the stream as it is, after what is buffered: copying it into the buffer
/// first cost the agent a copy of every byte it sent.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// The production transport: mutual TLS over TCP, the socket read through a
/// buffer of [`SOCKET_READ_BYTES`].
pub(crate) type TlsTransport = TlsStream<BufReader<TcpStream>>;

/// The most read from the socket at once beneath TLS, which asks for its
/// records 4 KiB at a time: a failback's stream of chunks would otherwise
/// cost a system call per 4 KiB (the server reads the same way).
const SOCKET_READ_BYTES: usize = 64 * 1024;

/// A byte stream a session can run over: TLS in production, one end of
/// `tokio::io::duplex` in unit tests.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Transport for S {}

/// The stream's write side, noting each byte it accepts as progress.
type StreamWriter<S> = Progressing<WriteHalf<S>>;
/// Where frames go: the stream, behind a write buffer.
#[cfg(not(feature = "fault-injection"))]
type FrameWriter<S> = BufWriter<StreamWriter<S>>;
/// Where frames go in test builds: through the fault-injection tap (which sees
/// each frame whole, before the write buffer splits it), then as above.
#[cfg(feature = "fault-injection")]
type FrameWriter<S> = crate::fault::Tapped<BufWriter<StreamWriter<S>>>;

/// When a byte last moved on the connection, either way.
#[derive(Clone)]
struct Liveness {
    since: Instant,
    /// Milliseconds after `since`.
    last_ms: Arc<AtomicU64>,
}

impl Liveness {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A writer that notes progress whenever its inner writer accepts bytes.
struct Progressing<W> {
    inner: W,
    liveness: Liveness,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Progressing<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.liveness.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            self.liveness.touch();
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One session's frames over a stream `S`; the server's `Session<S>` is the
/// other end.
pub(crate) struct Connection<S = TlsTransport> {
    writer: FrameWriter<S>,
    incoming: mpsc::Receiver<Result<Message, Error>>,
    scratch: BytesMut,
    reader_task: tokio::task::JoinHandle<()>,
    /// See [`AgentConfig::io_timeout`].
    io_timeout: Duration,
    liveness: Liveness,
    /// The agent's choice of server and the one this connection reached: a
    /// server that says the source is served elsewhere moves the choice on.
    choice: Option<(Arc<AtomicUsize>, usize)>,
}

impl<S> Drop for Connection<S> {
    fn drop(&mut self) {
        self.reader_task.abort();
    }
}

fn server_name(addr: &str) -> Result<ServerName<'static>, Error> {
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| Error::Address(addr.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| Error::Address(addr.to_owned()))
}

impl Connection<TlsTransport> {
    /// Connects to `config.server` and completes the TLS handshake, each
    /// bounded by the I/O time-out.
    pub(crate) async fn connect(config: &AgentConfig) -> Result<Self, Error> {
        let servers = config.servers();
        if servers.is_empty() {
            return Err(Error::Address(config.server.clone()));
        }
        let first = config.server_choice.load(Ordering::Relaxed) % servers.len();
        let mut failure = None;
        // Each address in turn from the current choice: a server that is
        // down (refused, or silent past the time-out) hands over to the next.
        for step in 0..servers.len() {
            let index = (first + step) % servers.len();
            match Self::connect_to(config, servers[index]).await {
                Ok(mut connection) => {
                    config.server_choice.store(index, Ordering::Relaxed);
                    connection.choice = Some((Arc::clone(&config.server_choice), index));
                    return Ok(connection);
                }
                Err(e) if e.is_retryable() && servers.len() > 1 => {
                    tracing::warn!(server = servers[index], error = %e, "trying the next server");
                    failure = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(failure.unwrap_or_else(|| Error::Address(config.server.clone())))
    }

    async fn connect_to(config: &AgentConfig, server: &str) -> Result<Self, Error> {
        let tls =
            blockrep_pki::client_config(&config.ca_path, &config.cert_path, &config.key_path)?;
        let name = server_name(server)?;
        let io_timeout = config.io_timeout;
        let timed_out = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what} did not finish within {io_timeout:?}"),
            )
        };
        let tcp = tokio::time::timeout(io_timeout, TcpStream::connect(server))
            .await
            .unwrap_or_else(|_| Err(timed_out("connect")))
            .map_err(|source| Error::Connect {
                addr: server.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tcp = BufReader::with_capacity(SOCKET_READ_BYTES, tcp);
        let handshake = TlsConnector::from(Arc::new(tls)).connect(name, tcp);
        let stream = tokio::time::timeout(io_timeout, handshake)
            .await
            .unwrap_or_else(|_| Err(timed_out("the TLS handshake")))
            .map_err(|source| Error::Handshake {
                addr: server.to_owned(),
                source,
            })?;
        Ok(Connection::new(stream, config))
    }
}

impl<S: Transport> Connection<S> {
    /// Speaks frames over `stream`, an established session's transport (the
    /// I/O time-out and, in test builds, the plaintext tap from `config`).
    pub(crate) fn new(stream: S, config: &AgentConfig) -> Self {
        let io_timeout = config.io_timeout;
        let (mut read_half, write_half) = tokio::io::split(stream);
        let (tx, incoming) = mpsc::channel(64);
        let liveness = Liveness::new();
        let read_liveness = liveness.clone();
        let reader_task = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match decode(&mut buf) {
                    // Its bytes have counted as progress; nothing waits for it.
                    Ok(Some(Message::Progress { .. })) => continue,
                    Ok(Some(message)) => {
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send(Err(Error::Protocol(e.to_string()))).await;
                        return;
                    }
                }
                match read_half.read_buf(&mut buf).await {
                    Ok(0) => {
                        let _ = tx
                            .send(Err(Error::Lost("server closed the connection".into())))
                            .await;
                        return;
                    }
                    Ok(_) => read_liveness.touch(),
                    Err(e) => {
                        // In TLS 1.3 a rejected client certificate shows up here, as an
                        // alert after the handshake seemed to succeed; tokio-rustls
                        // carries the rustls error inside the io::Error.
                        let error = match e
                            .get_ref()
                            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                        {
                            Some(rustls::Error::AlertReceived(alert)) => Error::Alert(*alert),
                            _ => Error::Lost(e.to_string()),
                        };
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            }
        });
        let write_half = Progressing {
            inner: write_half,
            liveness: liveness.clone(),
        };
        let writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write_half);
        #[cfg(feature = "fault-injection")]
        let writer = crate::fault::Tapped::new(writer, config.plaintext_tap.clone());
        Self {
            writer,
            incoming,
            scratch: BytesMut::new(),
            reader_task,
            io_timeout,
            liveness,
            choice: None,
        }
    }

    /// Runs `work` until it finishes or no byte has moved either way for the
    /// I/O time-out (`None`). Time before the call does not count: the
    /// connection may have rested between epochs.
    async fn until_stalled<F: Future>(
        io_timeout: Duration,
        liveness: &Liveness,
        work: F,
    ) -> Option<F::Output> {
        let started = Instant::now();
        let mut work = std::pin::pin!(work);
        loop {
            let deadline = liveness.last().max(started) + io_timeout;
            tokio::select! {
                biased;
                out = &mut work => return Some(out),
                () = tokio::time::sleep_until(deadline.into()) => {
                    if liveness.last().max(started) + io_timeout <= Instant::now() {
                        return None;
                    }
                }
            }
        }
    }

    /// Queues a message (buffered; see [`Connection::flush`]). Returns its frame size.
    pub(crate) async fn send(&mut self, message: &Message) -> Result<u64, Error> {
        // Taken out for the write and put back, so its capacity is reused
        // message after message.
        let mut frame = std::mem::take(&mut self.scratch);
        frame.clear();
        encode(message, &mut frame);
        let len = frame.len() as u64;
        let written = self.write_raw(&frame).await;
        self.scratch = frame;
        written.map(|()| len)
    }

    /// Queues already-encoded frame bytes.
    pub(crate) async fn write_raw(&mut self, frame: &[u8]) -> Result<(), Error> {
        let written = Self::until_stalled(
            self.io_timeout,
            &self.liveness,
            self.writer.write_all(frame),
        )
        .await;
        match written {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.explain(e).await),
            None => Err(self.stalled()),
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        match Self::until_stalled(self.io_timeout, &self.liveness, self.writer.flush()).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.explain(e).await),
            None => Err(self.stalled()),
        }
    }

    fn stalled(&self) -> Error {
        Error::Lost(format!(
            "the path to the server moved no byte for {:?} (--io-timeout)",
            self.io_timeout
        ))
    }

    /// Flushes and closes the TLS stream cleanly (close_notify), so the server sees
    /// an orderly end of session rather than a lost connection.
    pub(crate) async fn close(mut self) {
        let (io_timeout, liveness) = (self.io_timeout, self.liveness.clone());
        let closing = async {
            let _ = self.writer.flush().await;
            let _ = self.writer.shutdown().await;
        };
        // Bounded like every other write: a path that dies now must not hang
        // the agent at the end of `--once` or a cutover.
        let _ = Self::until_stalled(io_timeout, &liveness, closing).await;
    }

    /// The server's refusal; one saying that another server serves the
    /// source moves the agent's choice to the next address.
    fn refused(&self, code: ErrorCode, message: String) -> Error {
        if code == ErrorCode::ServedElsewhere
            && let Some((choice, index)) = &self.choice
        {
            let _ = choice.compare_exchange(
                *index,
                index.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Error::Refused { code, message }
    }

    /// A write failed: the server probably said why before closing.
    async fn explain(&mut self, e: std::io::Error) -> Error {
        let wait = std::time::Duration::from_millis(500);
        while let Ok(Some(next)) = tokio::time::timeout(wait, self.incoming.recv()).await {
            match next {
                Ok(Message::Error { code, message }) => return self.refused(code, message),
                Ok(_) => continue,
                Err(error) => return error,
            }
        }
        Error::Lost(e.to_string())
    }

    /// The next message from the server; an `Error` frame becomes `Error::Refused`.
    /// Every call waits for an answer to something just sent, so a silence
    /// longer than the I/O time-out means the path is dead.
    pub(crate) async fn recv(&mut self) -> Result<Message, Error> {
        let Some(next) =
            Self::until_stalled(self.io_timeout, &self.liveness, self.incoming.recv()).await
        else {
            return Err(Error::Lost(format!(
                "no answer from the server, and no sign of progress, within {:?} (--io-timeout)",
                self.io_timeout
            )));
        };
        match next {
            Some(Ok(Message::Error { code, message })) => Err(self.refused(code, message)),
            Some(Ok(message)) => Ok(message),
            Some(Err(e)) => Err(e),
            None => Err(Error::Lost("connection closed".into())),
        }
    }
}

/// Refuses a head epoch the server announced that has no next epoch: every
/// commit of this session names `head_epoch + 1`.
pub(crate) fn check_head_epoch(head_epoch: u64) -> Result<(), Error> {
    match head_epoch.checked_add(1) {
        Some(_) => Ok(()),
        None => Err(Error::Protocol(format!(
            "server's head epoch {head_epoch} has no next epoch"
        ))),
    }
}

/// Explains a TLS alert received before `Welcome`: the server's verdict on
/// this agent's certificate, in words an operator can act on.
pub(crate) fn certificate_rejected(alert: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    let why = match alert {
        A::CertificateExpired => "the certificate has expired (or is not valid yet)",
        A::CertificateRevoked => "the certificate has been revoked",
        A::UnknownCA | A::DecryptError => {
            "the certificate was not issued by the server's CA (check --ca and --cert)"
        }
        A::CertificateRequired => "no client certificate was presented",
        A::UnsupportedCertificate => {
            "the certificate is not a client certificate (a server certificate used as a client?)"
        }
        _ => "the certificate was not accepted",
    };
    format!(
        "the server refused this agent's certificate: {why} (TLS alert {alert:?}); \
         issue a new one with `blockrep cert issue --source <id>` if needed"
    )
}

/// Whether the certificate at `path` names a tenant; yes when it cannot be
/// read (the connection that read it has already been made), so that the
/// epoch offers what it sends rather than guess.
pub(crate) fn names_tenant(path: &std::path::Path) -> bool {
    let Ok(certs) = blockrep_pki::read_certs(path) else {
        return true;
    };
    certs
        .first()
        .is_none_or(|leaf| !matches!(blockrep_pki::tenant_from_cert(leaf), Ok(None)))
}

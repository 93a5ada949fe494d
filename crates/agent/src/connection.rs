//! The agent's side of a session: TLS connect, then frames in and out. Reading runs
//! on its own task so that a server's `Error` is seen even while we are sending.

use std::sync::Arc;
use std::time::Duration;

use blockrep_proto::{Message, decode, encode};
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::{AgentConfig, Error};

/// Bytes buffered before a write reaches TLS: several frames per TLS record batch.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Where frames go: TLS, behind a write buffer.
#[cfg(not(feature = "fault-injection"))]
type FrameWriter = BufWriter<WriteHalf<TlsStream<TcpStream>>>;
/// Where frames go in test builds: through the fault-injection tap (which sees
/// each frame whole, before the write buffer splits it), then as above.
#[cfg(feature = "fault-injection")]
type FrameWriter = crate::fault::Tapped<BufWriter<WriteHalf<TlsStream<TcpStream>>>>;

pub(crate) struct Connection {
    writer: FrameWriter,
    incoming: mpsc::Receiver<Result<Message, Error>>,
    scratch: BytesMut,
    reader_task: tokio::task::JoinHandle<()>,
    /// See [`AgentConfig::io_timeout`].
    io_timeout: Duration,
}

impl Drop for Connection {
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

impl Connection {
    pub(crate) async fn connect(config: &AgentConfig) -> Result<Self, Error> {
        let tls =
            blockrep_pki::client_config(&config.ca_path, &config.cert_path, &config.key_path)?;
        let name = server_name(&config.server)?;
        let io_timeout = config.io_timeout;
        let timed_out = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what} did not finish within {io_timeout:?}"),
            )
        };
        let tcp = tokio::time::timeout(io_timeout, TcpStream::connect(&config.server))
            .await
            .unwrap_or_else(|_| Err(timed_out("connect")))
            .map_err(|source| Error::Connect {
                addr: config.server.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let handshake = TlsConnector::from(Arc::new(tls)).connect(name, tcp);
        let stream = tokio::time::timeout(io_timeout, handshake)
            .await
            .unwrap_or_else(|_| Err(timed_out("the TLS handshake")))
            .map_err(|source| Error::Handshake {
                addr: config.server.clone(),
                source,
            })?;
        let (mut read_half, write_half) = tokio::io::split(stream);
        let (tx, incoming) = mpsc::channel(64);
        let reader_task = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match decode(&mut buf) {
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
                    Ok(_) => {}
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
        let writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write_half);
        #[cfg(feature = "fault-injection")]
        let writer = crate::fault::Tapped::new(writer, config.plaintext_tap.clone());
        Ok(Self {
            writer,
            incoming,
            scratch: BytesMut::new(),
            reader_task,
            io_timeout,
        })
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
        // A frame is at most one chunk plus the write buffer's worth: taking
        // longer than the time-out means the path is dead, not slow.
        match tokio::time::timeout(self.io_timeout, self.writer.write_all(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.explain(e).await),
            Err(_) => Err(self.stalled()),
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        match tokio::time::timeout(self.io_timeout, self.writer.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.explain(e).await),
            Err(_) => Err(self.stalled()),
        }
    }

    fn stalled(&self) -> Error {
        Error::Lost(format!(
            "a write to the server did not finish within {:?} (--io-timeout)",
            self.io_timeout
        ))
    }

    /// Flushes and closes the TLS stream cleanly (close_notify), so the server sees
    /// an orderly end of session rather than a lost connection.
    pub(crate) async fn close(mut self) {
        let _ = self.writer.flush().await;
        let _ = self.writer.shutdown().await;
    }

    /// A write failed: the server probably said why before closing.
    async fn explain(&mut self, e: std::io::Error) -> Error {
        let wait = std::time::Duration::from_millis(500);
        while let Ok(Some(next)) = tokio::time::timeout(wait, self.incoming.recv()).await {
            match next {
                Ok(Message::Error { code, message }) => return Error::Refused { code, message },
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
        let Ok(next) = tokio::time::timeout(self.io_timeout, self.incoming.recv()).await else {
            return Err(Error::Lost(format!(
                "no answer from the server within {:?} (--io-timeout)",
                self.io_timeout
            )));
        };
        match next {
            Some(Ok(Message::Error { code, message })) => Err(Error::Refused { code, message }),
            Some(Ok(message)) => Ok(message),
            Some(Err(e)) => Err(e),
            None => Err(Error::Lost("connection closed".into())),
        }
    }
}

//! The agent's side of a session: TLS connect, then frames in and out. Reading runs
//! on its own task so that a server's `Error` is seen even while we are sending.

use std::sync::Arc;

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
        let tcp = TcpStream::connect(&config.server)
            .await
            .map_err(|source| Error::Connect {
                addr: config.server.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
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
                        // alert after the handshake seemed to succeed.
                        let _ = tx.send(Err(Error::Lost(e.to_string()))).await;
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
        })
    }

    /// Queues a message (buffered; see [`Connection::flush`]). Returns its frame size.
    pub(crate) async fn send(&mut self, message: &Message) -> Result<u64, Error> {
        self.scratch.clear();
        encode(message, &mut self.scratch);
        let len = self.scratch.len() as u64;
        let frame = self.scratch.split().freeze();
        self.write_raw(&frame).await?;
        Ok(len)
    }

    /// Queues already-encoded frame bytes.
    pub(crate) async fn write_raw(&mut self, frame: &[u8]) -> Result<(), Error> {
        if let Err(e) = self.writer.write_all(frame).await {
            return Err(self.explain(e).await);
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        if let Err(e) = self.writer.flush().await {
            return Err(self.explain(e).await);
        }
        Ok(())
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
    pub(crate) async fn recv(&mut self) -> Result<Message, Error> {
        match self.incoming.recv().await {
            Some(Ok(Message::Error { code, message })) => Err(Error::Refused { code, message }),
            Some(Ok(message)) => Ok(message),
            Some(Err(e)) => Err(e),
            None => Err(Error::Lost("connection closed".into())),
        }
    }
}

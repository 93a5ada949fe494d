//! A framed connection: owns the stream and its read buffer, speaks in messages.

use blockrep_proto::{FRAME_HEADER_LEN, Message, ProtoError, decode, encode};
use bytes::BytesMut;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("connection closed by peer")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Proto(#[from] ProtoError),
}

#[derive(Debug)]
pub(crate) struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Frame bytes read so far (headers included).
    pub bytes_read: u64,
    /// Frame bytes written so far.
    pub bytes_written: u64,
    /// A flush that cannot finish within this long fails (`TimedOut`).
    pub write_timeout: Option<Duration>,
    /// When set, reading sends [`Message::Progress`] at most this often while
    /// bytes keep arriving (see there for why).
    pub progress_every: Option<Duration>,
    /// Bytes read from the stream so far, partial frames included.
    bytes_arrived: u64,
    /// When the last flush finished: any frame tells the peer we are alive.
    last_flush: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(crate) fn new(stream: S) -> Self {
        Self {
            stream,
            read_buf: BytesMut::with_capacity(256 * 1024),
            write_buf: BytesMut::with_capacity(64 * 1024),
            bytes_read: 0,
            bytes_written: 0,
            write_timeout: None,
            progress_every: None,
            bytes_arrived: 0,
            last_flush: Instant::now(),
        }
    }

    /// Reads the next message; `ReadError::Closed` on a clean end of stream
    /// between frames.
    pub(crate) async fn read_message(&mut self) -> Result<Message, ReadError> {
        loop {
            let before = self.read_buf.len();
            if let Some(message) = decode(&mut self.read_buf)? {
                self.bytes_read += (before - self.read_buf.len()) as u64;
                return Ok(message);
            }
            if self.read_buf.capacity() - self.read_buf.len() < FRAME_HEADER_LEN {
                self.read_buf.reserve(64 * 1024);
            }
            let n = self.stream.read_buf(&mut self.read_buf).await?;
            if n == 0 {
                return if self.read_buf.is_empty() {
                    Err(ReadError::Closed)
                } else {
                    Err(ReadError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a frame",
                    )))
                };
            }
            self.bytes_arrived += n as u64;
            if let Some(every) = self.progress_every
                && self.last_flush.elapsed() >= every
            {
                self.send(&Message::Progress {
                    bytes_received: self.bytes_arrived,
                })
                .await?;
            }
        }
    }

    /// Queues a message; [`Connection::flush`] sends what is queued.
    pub(crate) fn queue(&mut self, message: &Message) {
        encode(message, &mut self.write_buf);
    }

    /// Writes every queued message and flushes the stream.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        let Some(limit) = self.write_timeout else {
            return self.flush_now().await;
        };
        tokio::time::timeout(limit, self.flush_now())
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer accepted no data for {limit:?}"),
                ))
            })
    }

    async fn flush_now(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&self.write_buf).await?;
        self.bytes_written += self.write_buf.len() as u64;
        self.write_buf.clear();
        self.stream.flush().await?;
        self.last_flush = Instant::now();
        Ok(())
    }

    /// Sends one message now.
    pub(crate) async fn send(&mut self, message: &Message) -> std::io::Result<()> {
        self.queue(message);
        self.flush().await
    }

    /// Sends a closing error and shuts the stream down, ignoring failures: the peer
    /// may already be gone.
    pub(crate) async fn close_with_error(&mut self, message: Message) {
        let _ = self.send(&message).await;
        let _ = self.stream.shutdown().await;
    }
}

//! A framed connection: owns the stream and its read buffer, speaks in messages.

use blockrep_proto::{Decoded, FRAME_HEADER_LEN, Message, ProtoError, decode_frame, encode};
use bytes::{Bytes, BytesMut};
use std::time::Duration;
// tokio's clock, so that the beats follow paused time in tests.
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

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

/// Room a session's read buffer starts with, and keeps between bursts of
/// chunks: decoding grows it by a megabyte at a time while chunks arrive.
const READ_BUF_BYTES: usize = 256 * 1024;

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
    /// When the last flush finished: any frame tells the peer we are alive.
    last_flush: Instant,
    /// Set when a write failed or timed out: part of a frame may have gone
    /// out, so nothing more may follow it.
    write_failed: Option<std::io::ErrorKind>,
    /// The last chunk read: where its data lies, how long it is, and the
    /// crc32 decoding computed of it (see [`Connection::data_crc`]).
    last_chunk: Option<(usize, usize, u32)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub(crate) fn new(stream: S) -> Self {
        Self {
            stream,
            read_buf: BytesMut::with_capacity(READ_BUF_BYTES),
            write_buf: BytesMut::with_capacity(64 * 1024),
            bytes_read: 0,
            bytes_written: 0,
            write_timeout: None,
            progress_every: None,
            last_flush: Instant::now(),
            write_failed: None,
            last_chunk: None,
        }
    }

    /// The crc32 of `data`, if it is the data of the last chunk read: it was
    /// computed with the frame's checksum, and the chunk's record in a pack
    /// carries a crc of the same bytes. The data is known by where it lies,
    /// which no other bytes can share while `data` holds them.
    pub(crate) fn data_crc(&self, data: &Bytes) -> Option<u32> {
        let (at, len, crc) = self.last_chunk?;
        (at == data.as_ptr() as usize && len == data.len()).then_some(crc)
    }

    /// Reads the next message; `ReadError::Closed` on a clean end of stream
    /// between frames.
    pub(crate) async fn read_message(&mut self) -> Result<Message, ReadError> {
        loop {
            let before = self.read_buf.len();
            if let Some(Decoded { message, data_crc }) = decode_frame(&mut self.read_buf)? {
                self.last_chunk = match (&message, data_crc) {
                    (Message::Chunk { data, .. }, Some(crc)) => {
                        Some((data.as_ptr() as usize, data.len(), crc))
                    }
                    _ => None,
                };
                self.bytes_read += (before - self.read_buf.len()) as u64;
                // A commit or a question ends a burst of chunks: an idle
                // session (of hundreds connected) keeps no grown buffer. Its
                // capacity says only what is left past the frames split off,
                // not what it holds, so an empty one is replaced whatever it
                // says (such messages are few: one per step, offer or commit).
                let burst_over = !matches!(message, Message::Chunk { .. } | Message::Patch { .. });
                if burst_over && self.read_buf.is_empty() {
                    self.read_buf = BytesMut::with_capacity(READ_BUF_BYTES);
                }
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
            if let Some(every) = self.progress_every
                && self.last_flush.elapsed() >= every
            {
                self.send(&Message::Progress {
                    bytes_received: self.bytes_arrived(),
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
        if let Some(kind) = self.write_failed {
            return Err(std::io::Error::new(
                kind,
                "an earlier write to the peer failed",
            ));
        }
        // Set until the write completes: a write cancelled part-way (a read
        // time-out or a supersession ends the future holding it) may have sent
        // part of a frame, and nothing may follow that.
        self.write_failed = Some(std::io::ErrorKind::Interrupted);
        let result = match self.write_timeout {
            None => self.flush_now().await,
            Some(limit) => tokio::time::timeout(limit, self.flush_now())
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the peer accepted no data for {limit:?}"),
                    ))
                }),
        };
        self.write_failed = result.as_ref().err().map(std::io::Error::kind);
        result
    }

    async fn flush_now(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&self.write_buf).await?;
        self.bytes_written += self.write_buf.len() as u64;
        self.write_buf.clear();
        self.stream.flush().await?;
        self.last_flush = Instant::now();
        Ok(())
    }

    /// Bytes read from the stream so far, partial frames included.
    fn bytes_arrived(&self) -> u64 {
        self.bytes_read + self.read_buf.len() as u64
    }

    /// Runs `work` (the server's side of a commit: verifying, fsyncing,
    /// building a cutover launch) while sending [`Message::Progress`] every
    /// `progress_every`, so that an agent waiting for the answer knows the
    /// server is busy on its behalf, not gone. The work always runs to its
    /// end: an agent that cannot be written to stops the beats, and the
    /// session learns of it at its next send, as it would without them.
    pub(crate) async fn working<F: Future>(&mut self, work: F) -> F::Output {
        let Some(every) = self.progress_every else {
            return work.await;
        };
        let mut work = std::pin::pin!(work);
        loop {
            let beat = tokio::time::sleep_until(self.last_flush + every);
            let beating = self.write_failed.is_none();
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = beat, if beating => {
                    let progress = Message::Progress {
                        bytes_received: self.bytes_arrived(),
                    };
                    // A failure is kept in `write_failed` for the next send.
                    let _ = self.send(&progress).await;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep_core::ChunkId;
    use blockrep_proto::decode;
    use tokio::io::DuplexStream;

    /// Counts the `Progress` frames among everything the peer received.
    async fn progress_frames(mut peer: DuplexStream) -> usize {
        let mut bytes = Vec::new();
        peer.read_to_end(&mut bytes).await.unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut count = 0;
        while let Some(message) = decode(&mut buf).unwrap() {
            count += usize::from(matches!(message, Message::Progress { .. }));
        }
        assert!(buf.is_empty(), "a partial frame");
        count
    }

    fn beating(stream: DuplexStream) -> Connection<DuplexStream> {
        let mut connection = Connection::new(stream);
        connection.progress_every = Some(Duration::from_secs(1));
        connection
    }

    #[tokio::test(start_paused = true)]
    async fn working_beats_every_interval_until_the_work_ends() {
        let (ours, peer) = tokio::io::duplex(64 * 1024);
        let mut connection = beating(ours);
        let work = async {
            tokio::time::sleep(Duration::from_millis(3500)).await;
            7
        };
        assert_eq!(connection.working(work).await, 7);
        drop(connection);
        assert_eq!(progress_frames(peer).await, 3);

        // Without `progress_every` (before `Welcome`), no beats.
        let (ours, peer) = tokio::io::duplex(64 * 1024);
        let mut connection = Connection::new(ours);
        connection
            .working(tokio::time::sleep(Duration::from_secs(5)))
            .await;
        drop(connection);
        assert_eq!(progress_frames(peer).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn working_runs_to_its_end_when_the_peer_is_gone() {
        let (ours, peer) = tokio::io::duplex(64 * 1024);
        drop(peer);
        let mut connection = beating(ours);
        let work = async {
            tokio::time::sleep(Duration::from_millis(3500)).await;
            "done"
        };
        assert_eq!(connection.working(work).await, "done");
        // The failed beat is remembered: nothing more is written.
        let later = connection.send(&Message::Progress { bytes_received: 0 });
        assert!(later.await.is_err());
    }

    /// A write cancelled part-way (as a read time-out or a supersession
    /// cancels one) leaves part of a frame on the wire: nothing may follow.
    #[tokio::test(start_paused = true)]
    async fn nothing_is_written_after_a_write_cancelled_part_way() {
        let (ours, mut peer) = tokio::io::duplex(16);
        let mut connection = Connection::new(ours);
        let message = Message::Progress { bytes_received: 7 };
        let cancelled =
            tokio::time::timeout(Duration::from_secs(1), connection.send(&message)).await;
        assert!(
            cancelled.is_err(),
            "the peer reads nothing: the write must block"
        );
        let mut part = [0u8; 16];
        peer.read_exact(&mut part).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(1), connection.send(&message)).await;
        assert!(
            matches!(again, Ok(Err(_))),
            "a send after a partial frame must fail at once, not write"
        );
        drop(connection);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "{} bytes followed a partial frame",
            rest.len()
        );
    }

    /// A frame arriving slowly gets beats while it arrives; silence gets none.
    #[tokio::test(start_paused = true)]
    async fn reading_beats_while_bytes_arrive_and_not_while_silent() {
        let (ours, mut peer) = tokio::io::duplex(64 * 1024);
        let mut connection = beating(ours);
        let mut frame = BytesMut::new();
        encode(
            &Message::Commit {
                epoch: 1,
                root: ChunkId([3; 32]),
                scan_started_unix_ms: 1,
                complete: true,
                last: false,
                consistency: blockrep_core::Consistency::Live,
            },
            &mut frame,
        );
        let arriving = Duration::from_millis(100) * frame.len() as u32;
        let writer = tokio::spawn(async move {
            // One byte every 100 ms: the frame takes several seconds.
            for byte in frame.iter() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                peer.write_all(&[*byte]).await.unwrap();
            }
            // Then silence, well past several intervals.
            tokio::time::sleep(Duration::from_secs(10)).await;
            peer
        });
        let message = connection.read_message().await.unwrap();
        assert!(matches!(message, Message::Commit { epoch: 1, .. }));
        let silent = tokio::time::timeout(Duration::from_secs(5), connection.read_message());
        assert!(silent.await.is_err(), "nothing was sent");
        drop(connection);
        let peer = writer.await.unwrap();
        let beats = progress_frames(peer).await;
        assert!(
            beats >= 3 && beats as u64 <= arriving.as_secs(),
            "{beats} beats for a frame that took {arriving:?} to arrive, then silence"
        );
    }

    /// The crc of a chunk's data comes with it from decoding, for that very
    /// data only: equal bytes elsewhere, or a chunk read before the last
    /// frame, get none (their crc is computed afresh).
    #[tokio::test]
    async fn the_crc_of_a_chunks_data_is_known_for_that_data_only() {
        let (mut agent, server) = tokio::io::duplex(64 * 1024);
        let mut connection = Connection::new(server);
        let mut wire = BytesMut::new();
        for index in 0..2u8 {
            let chunk = Message::Chunk {
                index: u64::from(index),
                id: ChunkId([index; 32]),
                codec: blockrep_proto::Codec::Raw,
                raw_len: 5000,
                data: Bytes::from(vec![index + 1; 5000]),
            };
            encode(&chunk, &mut wire);
        }
        encode(&Message::GetPages { indices: vec![1] }, &mut wire);
        agent.write_all(&wire).await.unwrap();
        let data_of = |message: Message| match message {
            Message::Chunk { data, .. } => data,
            other => panic!("{other:?} is not a chunk"),
        };
        let first = data_of(connection.read_message().await.unwrap());
        assert_eq!(connection.data_crc(&first), Some(crc32fast::hash(&first)));
        assert_eq!(connection.data_crc(&Bytes::from(first.to_vec())), None);
        let second = data_of(connection.read_message().await.unwrap());
        assert_eq!(connection.data_crc(&first), None, "not the last chunk");
        assert_eq!(connection.data_crc(&second), Some(crc32fast::hash(&second)));
        assert!(matches!(
            connection.read_message().await.unwrap(),
            Message::GetPages { .. }
        ));
        assert_eq!(connection.data_crc(&second), None, "not the last frame");
    }

    /// A burst of chunks grows the read buffer; the `Backlog` (or commit)
    /// after it gives the room back, so an idle session keeps its first
    /// buffer only.
    #[tokio::test]
    async fn the_read_buffer_shrinks_back_after_a_burst_of_chunks() {
        let (mut agent, server) = tokio::io::duplex(64 * 1024);
        let mut connection = Connection::new(server);
        let data = bytes::Bytes::from(vec![5u8; 64 * 1024]);
        let mut wire = BytesMut::new();
        for index in 0..32 {
            let chunk = Message::Chunk {
                index,
                id: ChunkId([2; 32]),
                codec: blockrep_proto::Codec::Raw,
                raw_len: data.len() as u32,
                data: data.clone(),
            };
            encode(&chunk, &mut wire);
        }
        let backlog = Message::Backlog {
            scan_started_unix_ms: 1,
            chunks_pending: 0,
            bytes_pending: 0,
        };
        encode(&backlog, &mut wire);
        let writer = tokio::spawn(async move { agent.write_all(&wire).await });
        let mut held = Vec::new();
        let mut grown = 0;
        for _ in 0..32 {
            let message = connection.read_message().await.unwrap();
            assert!(matches!(message, Message::Chunk { .. }));
            held.push(message);
            grown = grown.max(connection.read_buf.capacity());
        }
        assert!(grown > READ_BUF_BYTES, "chunks held grow the buffer");
        assert_eq!(connection.read_message().await.unwrap(), backlog);
        // A fresh buffer of the first size, not what is left past the frames
        // split off the grown one (whose storage they still share).
        assert_eq!(connection.read_buf.capacity(), READ_BUF_BYTES);
        writer.await.unwrap().unwrap();
    }
}

//! The transmission phase: requests in, simple replies out.
//!
//! One reader (this task) parses requests and reads write payloads; each
//! accepted request runs either inline, on this task, or on the blocking pool
//! (see [`crate::pace`]), and hands its finished reply to a writer task through
//! a channel, so replies leave in completion order. A
//! semaphore of in-flight bytes, taken before any buffer is allocated and
//! released once the reply is on the wire, bounds memory per connection.
//!
//! Flush ordering needs no extra care: a write's reply is only queued after
//! the export has completed it, so every write the client has seen acknowledged
//! before it sends `FLUSH` is covered by [`Export::flush`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::buffers::Buffers;
use crate::error::{Error, ErrorKind};
use crate::pace::Pace;
use crate::wire::{self, Command, ErrorCode, ExportLimits, Refusal, Request, SimpleReply};
use crate::{Export, Limits, REQUEST_OVERHEAD_BYTES};

/// Read-ahead for request headers and write payloads.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Write-behind for small replies; large read replies bypass it.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A reply ready to send, holding its share of the in-flight budget.
struct Reply {
    bytes: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

/// Serves requests until the client disconnects, breaks the protocol, idles
/// out, or the server stops; then drains in-flight replies and closes.
pub(crate) async fn transmit<S>(
    stream: S,
    export: Arc<dyn Export>,
    limits: &Limits,
    stop: watch::Receiver<bool>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let export_closing = export.closing();
    let (replies, queue) = mpsc::unbounded_channel();
    let buffers = Arc::new(Buffers::default());
    let writer = tokio::spawn(write_replies(
        write_half,
        queue,
        limits.idle_timeout,
        Arc::clone(&buffers),
    ));
    let mut reader = Reader {
        stream: BufReader::with_capacity(READ_BUFFER_BYTES, read_half),
        export_limits: ExportLimits {
            size_bytes: export.size_bytes(),
            read_only: export.read_only(),
            request_bytes_max: limits.request_bytes_max,
        },
        export,
        in_flight: Arc::new(Semaphore::new(limits.in_flight_bytes_max as usize)),
        idle_timeout: limits.idle_timeout,
        pace: Pace::new(limits.inline_request_bytes_max),
        replies,
        stop,
        closing: export_closing,
        buffers,
    };
    let read_result = reader.run().await;
    // The writer ends once every sender is gone: ours here, and the clones
    // held by requests still running on the blocking pool.
    drop(reader);
    let write_result = match writer.await {
        Ok(result) => result,
        Err(e) => Err(Error::new(ErrorKind::Io, format!("reply writer: {e}"))),
    };
    read_result.and(write_result)
}

struct Reader<S> {
    stream: BufReader<ReadHalf<S>>,
    export: Arc<dyn Export>,
    export_limits: ExportLimits,
    in_flight: Arc<Semaphore>,
    idle_timeout: Duration,
    pace: Pace,
    replies: mpsc::UnboundedSender<Reply>,
    stop: watch::Receiver<bool>,
    /// The export's own close signal ([`Export::closing`]).
    closing: Option<watch::Receiver<bool>>,
    /// Payload and reply buffers, reused.
    buffers: Arc<Buffers>,
}

/// Why the reader stopped waiting for a request.
enum Next {
    Request(Request),
    /// The client closed cleanly between requests, or the writer is gone.
    Closed,
}

impl<S: AsyncRead + Unpin> Reader<S> {
    async fn run(&mut self) -> Result<(), Error> {
        loop {
            let request = match self.next_request().await? {
                Next::Request(request) => request,
                Next::Closed => return Ok(()),
            };
            if request.command == Command::Disc {
                return Ok(());
            }
            match wire::check_request(&request, &self.export_limits) {
                Ok(()) => self.dispatch(request).await?,
                Err(Refusal::Reply(code)) => {
                    self.skip_payload(&request).await?;
                    let permit = self.reserve(0).await?;
                    self.send(error_reply(request.handle, code), permit);
                }
                Err(Refusal::Disconnect) => {
                    return Err(Error::new(
                        ErrorKind::PeerMisbehaved,
                        format!(
                            "write of {} bytes exceeds the {}-byte request limit",
                            request.length, self.export_limits.request_bytes_max
                        ),
                    ));
                }
            }
        }
    }

    async fn next_request(&mut self) -> Result<Next, Error> {
        let mut header = [0; wire::REQUEST_LEN];
        let read = tokio::select! {
            () = stopped(&mut self.stop) => return Ok(Next::Closed),
            () = export_closed(&mut self.closing) => return Ok(Next::Closed),
            () = self.replies.closed() => return Ok(Next::Closed),
            read = tokio::time::timeout(self.idle_timeout, read_header(&mut self.stream, &mut header)) => read,
        };
        match read {
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no request for {:?}", self.idle_timeout),
            )),
            Ok(Err(e)) => Err(Error::io("reading request", e)),
            Ok(Ok(false)) => Ok(Next::Closed),
            Ok(Ok(true)) => wire::parse_request(&header)
                .map(Next::Request)
                .map_err(|e| Error::wire("request", e)),
        }
    }

    /// Runs an accepted request inline or on the blocking pool.
    async fn dispatch(&mut self, request: Request) -> Result<(), Error> {
        let buffer_bytes = match request.command {
            Command::Read | Command::Write => request.length,
            _ => 0,
        };
        // Reserved before allocating: check_request capped `length`.
        let permit = self.reserve(buffer_bytes).await?;
        let payload = if request.command == Command::Write {
            let mut payload = self.buffers.take(request.length as usize);
            self.read_payload(&mut payload).await?;
            payload
        } else {
            Vec::new()
        };
        if self.pace.inline(&request, Instant::now()) {
            let started = Instant::now();
            let bytes = execute_guarded(self.export.as_ref(), &request, &payload, &self.buffers);
            self.buffers.give(payload);
            let now = Instant::now();
            self.pace.ran_inline(now - started, now);
            self.send(bytes, permit);
            if self.stream.buffer().len() >= wire::REQUEST_LEN {
                // More requests are already here: let the writer send this
                // reply first, so that the client can go on while we work
                // through them, rather than getting every reply at the end.
                tokio::task::yield_now().await;
            }
            return Ok(());
        }
        let export = Arc::clone(&self.export);
        let replies = self.replies.clone();
        let buffers = Arc::clone(&self.buffers);
        tokio::task::spawn_blocking(move || {
            let bytes = execute_guarded(export.as_ref(), &request, &payload, &buffers);
            buffers.give(payload);
            // A closed channel means the connection is going away.
            let _ = replies.send(Reply {
                bytes,
                _permit: permit,
            });
        });
        Ok(())
    }

    async fn reserve(&self, buffer_bytes: u32) -> Result<OwnedSemaphorePermit, Error> {
        // check_request capped buffer_bytes at request_bytes_max, and the
        // budget always fits one largest request plus its overhead.
        let weight = buffer_bytes.saturating_add(REQUEST_OVERHEAD_BYTES);
        Arc::clone(&self.in_flight)
            .acquire_many_owned(weight)
            .await
            .map_err(|_| Error::new(ErrorKind::Io, "in-flight budget closed"))
    }

    async fn read_payload(&mut self, payload: &mut [u8]) -> Result<(), Error> {
        match tokio::time::timeout(self.idle_timeout, self.stream.read_exact(payload)).await {
            Err(_) => Err(Error::new(ErrorKind::Timeout, "write payload stalled")),
            Ok(Err(e)) => Err(Error::io("reading write payload", e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Consumes a refused write's payload so the next header lines up.
    async fn skip_payload(&mut self, request: &Request) -> Result<(), Error> {
        let bytes = u64::from(request.payload_bytes());
        if bytes == 0 {
            return Ok(());
        }
        let mut payload = (&mut self.stream).take(bytes);
        let mut sink = tokio::io::sink();
        let skip = tokio::io::copy(&mut payload, &mut sink);
        match tokio::time::timeout(self.idle_timeout, skip).await {
            Err(_) => Err(Error::new(ErrorKind::Timeout, "write payload stalled")),
            Ok(Err(e)) => Err(Error::io("skipping write payload", e)),
            Ok(Ok(skipped)) if skipped < bytes => Err(Error::io(
                "skipping write payload",
                std::io::ErrorKind::UnexpectedEof.into(),
            )),
            Ok(Ok(_)) => Ok(()),
        }
    }

    fn send(&self, bytes: Vec<u8>, permit: OwnedSemaphorePermit) {
        // A closed channel means the writer failed; its error is reported.
        let _ = self.replies.send(Reply {
            bytes,
            _permit: permit,
        });
    }
}

/// Reads one request header; `false` on a clean end of stream before its
/// first byte.
async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
    header: &mut [u8; wire::REQUEST_LEN],
) -> std::io::Result<bool> {
    let first = stream.read(header).await?;
    if first == 0 {
        return Ok(false);
    }
    stream.read_exact(&mut header[first..]).await?;
    Ok(true)
}

/// Returns once the export says it is closing; never for one that cannot.
async fn export_closed(closing: &mut Option<watch::Receiver<bool>>) {
    match closing {
        // An error means the sender is gone: the export closed with it.
        Some(closing) => {
            let _ = closing.wait_for(|closed| *closed).await;
        }
        None => std::future::pending().await,
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the server itself is gone: stop as well.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// [`execute`], answering `EIO` if the export panics: that is a bug on our
/// side of the wire, and the client still gets an answer rather than a hang.
fn execute_guarded(
    export: &dyn Export,
    request: &Request,
    payload: &[u8],
    buffers: &Buffers,
) -> Vec<u8> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        execute(export, request, payload, buffers)
    }))
    .unwrap_or_else(|_| error_reply(request.handle, ErrorCode::Io))
}

/// Runs one checked request against the export and builds its reply.
fn execute(export: &dyn Export, request: &Request, payload: &[u8], buffers: &Buffers) -> Vec<u8> {
    let fua = request.flags & wire::COMMAND_FLAG_FUA != 0;
    let offset = request.offset;
    let length = u64::from(request.length);
    let then_flush = |result: std::io::Result<()>| {
        result.and_then(|()| if fua { export.flush() } else { Ok(()) })
    };
    let result = match request.command {
        Command::Read => return read_reply(export, request, buffers),
        Command::Write => then_flush(export.write(offset, payload)),
        Command::WriteZeroes => then_flush(export.write_zeroes(offset, length)),
        Command::Trim => then_flush(export.trim(offset, length)),
        Command::Flush => export.flush(),
        // Filtered out before dispatch; answered rather than asserted.
        Command::Disc | Command::Other(_) => {
            return error_reply(request.handle, ErrorCode::Inval);
        }
    };
    match result {
        Ok(()) => ok_reply(request.handle),
        Err(e) => {
            tracing::debug!(command = ?request.command, offset, length, error = %e, "export failed");
            error_reply(request.handle, ErrorCode::from_io(&e))
        }
    }
}

/// A read reply is the header followed by the data, built in one buffer so
/// that it leaves in one write.
fn read_reply(export: &dyn Export, request: &Request, buffers: &Buffers) -> Vec<u8> {
    // The export fills every byte of a read it answers.
    let mut bytes = buffers.take(wire::SIMPLE_REPLY_LEN + request.length as usize);
    match export.read(request.offset, &mut bytes[wire::SIMPLE_REPLY_LEN..]) {
        Ok(()) => {
            bytes[..wire::SIMPLE_REPLY_LEN].copy_from_slice(&wire::encode_simple_reply(
                SimpleReply {
                    error: 0,
                    handle: request.handle,
                },
            ));
            bytes
        }
        Err(e) => {
            tracing::debug!(offset = request.offset, length = request.length, error = %e, "read failed");
            error_reply(request.handle, ErrorCode::from_io(&e))
        }
    }
}

fn ok_reply(handle: u64) -> Vec<u8> {
    wire::encode_simple_reply(SimpleReply { error: 0, handle }).to_vec()
}

fn error_reply(handle: u64, code: ErrorCode) -> Vec<u8> {
    wire::encode_simple_reply(SimpleReply {
        error: code.to_u32(),
        handle,
    })
    .to_vec()
}

/// Sends replies as they finish, flushing whenever the queue runs dry, and
/// closes the stream (TLS close_notify included) once every sender is gone.
async fn write_replies<S: AsyncWrite>(
    stream: WriteHalf<S>,
    mut queue: mpsc::UnboundedReceiver<Reply>,
    idle_timeout: Duration,
    buffers: Arc<Buffers>,
) -> Result<(), Error> {
    let mut stream = BufWriter::with_capacity(WRITE_BUFFER_BYTES, stream);
    while let Some(reply) = queue.recv().await {
        with_timeout(idle_timeout, stream.write_all(&reply.bytes)).await?;
        let Reply { bytes, _permit } = reply;
        buffers.give(bytes);
        drop(_permit);
        if queue.is_empty() {
            with_timeout(idle_timeout, stream.flush()).await?;
        }
    }
    with_timeout(idle_timeout, stream.shutdown()).await
}

async fn with_timeout(
    idle_timeout: Duration,
    io: impl Future<Output = std::io::Result<()>>,
) -> Result<(), Error> {
    match tokio::time::timeout(idle_timeout, io).await {
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("client did not take replies for {idle_timeout:?}"),
        )),
        Ok(result) => result.map_err(|e| Error::io("sending reply", e)),
    }
}

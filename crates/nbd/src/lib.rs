//! An async server for the Network Block Device (NBD) protocol.
//!
//! blockrep serves launch volumes (copy-on-write views of snapshots) over NBD
//! so that a VM, `qemu-img`, `nbdinfo` or `nbdcopy` can use them directly. An
//! [`Export`] is one block device; a [`Registry`] finds exports by name; an
//! [`NbdServer`] speaks the protocol over any byte stream, optionally upgrading
//! it to TLS with `NBD_OPT_STARTTLS`.
//!
//! The crate has three layers, each with one job: [`wire`] parses and encodes
//! headers with no I/O (and holds the per-request policy as a pure function);
//! the handshake turns options into a chosen export; transmission reads
//! requests, runs them (small reads and writes inline while the export answers
//! them in microseconds, everything else on tokio's blocking pool), and writes
//! replies.
//!
//! # Who may open what
//!
//! The crate knows nothing of what an export belongs to. Every lookup and
//! listing carries a [`Client`] (its address, whether TLS is up, and the
//! certificate chain rustls verified), and the [`Registry`] decides. An export
//! the registry will not show a client is, to that client, an export that does
//! not exist: `NBD_OPT_GO`/`INFO` get `NBD_REP_ERR_UNKNOWN` with the same text
//! as for a name that exists nowhere, `NBD_OPT_LIST` leaves it out, and
//! `NBD_OPT_EXPORT_NAME` ends the connection. A client therefore cannot learn
//! which names exist beyond those it may open.
//!
//! # What is spoken
//!
//! Fixed newstyle negotiation only (oldstyle and non-fixed newstyle clients are
//! long gone). Options: `EXPORT_NAME`, `GO`, `INFO` (`INFO_EXPORT` and
//! `INFO_BLOCK_SIZE` always, `INFO_NAME` when asked), `LIST`, `ABORT`,
//! `STARTTLS`. `STRUCTURED_REPLY`, meta contexts, extended headers and unknown
//! options are answered `NBD_REP_ERR_UNSUP`, so every transmission reply is a
//! simple reply. Commands: `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`,
//! `DISC`, with `FUA` honoured by a flush after the operation.
//!
//! # Wire formats (all integers big-endian)
//!
//! Greeting, server to client, once:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | `NBDMAGIC` (`0x4e42444d41474943`) |
//! | 8 | 8 | `IHAVEOPT` (`0x49484156454f5054`) |
//! | 16 | 2 | handshake flags: `FIXED_NEWSTYLE` (1) \| `NO_ZEROES` (2) |
//!
//! then the client's 4-byte flags (only those two bits are accepted).
//!
//! Option, client to server, repeated until `GO`, `EXPORT_NAME` or `ABORT`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | `IHAVEOPT` |
//! | 8 | 4 | option number |
//! | 12 | 4 | data length, at most [`wire::OPTION_DATA_BYTES_MAX`] |
//! | 16 | n | data (`GO`/`INFO`: u32 name length, name, u16 count, count × u16 info types) |
//!
//! Option reply, server to client (every option but `EXPORT_NAME`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | `0x0003e889045565a9` |
//! | 8 | 4 | option number being answered |
//! | 12 | 4 | reply type (`ACK` 1, `SERVER` 2, `INFO` 3, errors have bit 31 set) |
//! | 16 | 4 | data length |
//! | 20 | n | data |
//!
//! Request, client to server, in transmission:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `0x25609513` |
//! | 4 | 2 | command flags (`FUA` 1, `NO_HOLE` 2) |
//! | 6 | 2 | command (`READ` 0, `WRITE` 1, `DISC` 2, `FLUSH` 3, `TRIM` 4, `WRITE_ZEROES` 6) |
//! | 8 | 8 | handle |
//! | 16 | 8 | offset in bytes |
//! | 24 | 4 | length in bytes, followed by that much payload for `WRITE` |
//!
//! Simple reply, server to client: `0x67446698`, u32 error (0 or an NBD errno),
//! u64 handle, then the data for a successful `READ`.
//!
//! # Limits and failure
//!
//! Every length a peer sends is checked before memory is reserved for it (see
//! [`Limits`]). Connections are capped server-wide and per client address
//! (an IPv6 client by its /64), so one address cannot hold every slot. A request the server can answer (past the end, too long, read
//! only, unknown command or flag) gets an error reply and the connection goes
//! on; a broken stream (bad magic, unknown client flags, a write larger than
//! [`Limits::request_bytes_max`], oversized option data) ends the connection.
//! Requests are pipelined: the server keeps reading while earlier requests run,
//! up to [`Limits::in_flight_bytes_max`] per connection, and replies may come
//! back in any order.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use blockrep_nbd::{Client, Export, Limits, NbdServer, Registry};
//!
//! struct Memory(Mutex<Vec<u8>>);
//!
//! impl Export for Memory {
//!     fn size_bytes(&self) -> u64 { self.0.lock().unwrap().len() as u64 }
//!     fn read_only(&self) -> bool { false }
//!     fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
//!         let start = offset as usize;
//!         buf.copy_from_slice(&self.0.lock().unwrap()[start..start + buf.len()]);
//!         Ok(())
//!     }
//!     fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
//!         let start = offset as usize;
//!         self.0.lock().unwrap()[start..start + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//!     fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
//!         let (start, end) = (offset as usize, (offset + len) as usize);
//!         self.0.lock().unwrap()[start..end].fill(0);
//!         Ok(())
//!     }
//!     fn trim(&self, _offset: u64, _len: u64) -> std::io::Result<()> { Ok(()) }
//!     fn flush(&self) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! struct One(Arc<Memory>);
//!
//! impl Registry for One {
//!     // One disk, open to every client: only for a listener no one else reaches.
//!     fn lookup(&self, _client: &Client, name: &str) -> Option<Arc<dyn Export>> {
//!         (name == "disk").then(|| Arc::clone(&self.0) as Arc<dyn Export>)
//!     }
//!     fn list(&self, _client: &Client) -> Vec<(String, String)> {
//!         vec![("disk".into(), "1 MiB in memory".into())]
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let registry = Arc::new(One(Arc::new(Memory(Mutex::new(vec![0; 1 << 20])))));
//! let server = Arc::new(NbdServer::new(registry, Limits::default()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! // `nbdinfo nbd://127.0.0.1:PORT/disk` would now work until the future completes.
//! server.run(listener, async {}).await;
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod buffers;
mod client;
mod error;
mod file;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod pace;
mod server;
mod slots;
mod transmission;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

pub use client::Client;
pub use error::{Error, ErrorKind};
pub use file::FileExport;
pub use pace::{INLINE_SLOW, INLINE_WINDOW, OFFLOAD_PERIOD, OFFLOAD_PERIOD_MAX, SLOW_IN_WINDOW};
pub use server::NbdServer;
pub use slots::{AddressSlot, AddressSlots};

/// A block device served over NBD.
///
/// Data methods are blocking: the server calls them on tokio's blocking pool
/// (`spawn_blocking`), so implementations may do file I/O, except reads and
/// writes of up to [`Limits::inline_request_bytes_max`], which it calls on the
/// connection's task as long as they usually return within [`INLINE_SLOW`]
/// (an export found slower gets the connection's requests on the pool for
/// [`OFFLOAD_PERIOD`] or longer). The server checks
/// every range against [`Export::size_bytes`] before calling, and may call
/// methods from several threads at once (requests are pipelined, and several
/// connections may share one export). `size_bytes` and `read_only` are called
/// on the async runtime and must not block.
pub trait Export: Send + Sync + 'static {
    /// The export's size; constant while it is served.
    fn size_bytes(&self) -> u64;
    /// Whether writes, zeroes and trims are refused with `EPERM`.
    fn read_only(&self) -> bool;
    /// Fills all of `buf` from `offset`. `buf` may hold bytes of an earlier
    /// request of the same connection (buffers are reused): an export that
    /// returns `Ok` must have overwritten every byte.
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes `len` bytes from `offset` read as zeroes. `len` is not capped by
    /// [`Limits::request_bytes_max`], so implementations must not allocate it.
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// A hint that `len` bytes from `offset` are no longer needed; doing
    /// nothing is correct.
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> std::io::Result<()>;
    /// Whether a flush through one connection also covers writes completed
    /// through every other connection to this export, so clients may spread
    /// I/O over several connections (`NBD_FLAG_CAN_MULTI_CONN`). True only
    /// when the export keeps no per-connection cache and the registry hands
    /// every connection the same underlying state; hence off unless claimed.
    fn multi_conn_safe(&self) -> bool {
        false
    }
    /// A signal that the export is going away (a drill that expired): once
    /// it reads `true`, each connection stops taking requests, answers those
    /// in flight and closes, as at server shutdown. `None`: never closed
    /// from the export's side.
    fn closing(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// Looks exports up by name (the replication server's launch volumes), and
/// decides which of them each client may see.
///
/// Both methods run on tokio's blocking pool, so they may touch the disk.
pub trait Registry: Send + Sync + 'static {
    /// The export called `name`, if it exists and `client` may open it. An
    /// empty name is the client asking for a default export; returning `None`
    /// refuses it. A client refused an export it may not open is told exactly
    /// what it is told for a name that does not exist.
    fn lookup(&self, client: &Client, name: &str) -> Option<Arc<dyn Export>>;
    /// (name, description) of every export `client` may open, for
    /// `NBD_OPT_LIST`.
    fn list(&self, client: &Client) -> Vec<(String, String)>;
}

/// Caps on what one server and one client may cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest `READ` or `WRITE` accepted, advertised as the maximum block
    /// size. A longer read gets `EINVAL`; a longer write ends the connection.
    /// Clamped to 4 KiB ..= 1 GiB.
    pub request_bytes_max: u32,
    /// Buffer bytes that one connection may have in flight (read data waiting
    /// to be sent, write payloads waiting to be stored), plus a fixed charge
    /// per request. Raised to fit at least one largest request.
    pub in_flight_bytes_max: u32,
    /// Connections served at once by [`NbdServer::run`]; further clients wait
    /// in the listen backlog.
    pub connections_max: usize,
    /// Connections served at once from one client address (an IPv6 client
    /// counts by its /64); a further connection from that address is closed
    /// at once, before the greeting. Brought down to `connections_max`: keep
    /// it below, so that one address cannot hold every slot.
    pub connections_per_address_max: usize,
    /// Time allowed from accepting a connection to entering transmission,
    /// TLS included.
    pub handshake_timeout: Duration,
    /// Time a connection may spend waiting for the next request, or stuck
    /// sending a reply, before it is closed, freeing its slot. A VM whose disk
    /// may stay quiet for longer needs a longer limit, or a client that
    /// reconnects (qemu's `reconnect-delay`).
    pub idle_timeout: Duration,
    /// Options accepted in one handshake before the client is dropped.
    pub options_max: u32,
    /// Largest `READ` or `WRITE` (without `FUA`) run on the connection's own
    /// task rather than handed to a thread, which saves two thread wake-ups
    /// per request when the export answers from memory or the page cache; 0
    /// hands every request to a thread. See [`INLINE_SLOW`] for how a slow
    /// export is detected and kept off the task.
    pub inline_request_bytes_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_bytes_max: 32 * 1024 * 1024,
            in_flight_bytes_max: 64 * 1024 * 1024,
            connections_max: 64,
            connections_per_address_max: 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10 * 60),
            options_max: 1024,
            inline_request_bytes_max: 64 * 1024,
        }
    }
}

/// Smallest [`Limits::request_bytes_max`]: the advertised preferred block size
/// must not exceed the maximum.
pub const REQUEST_BYTES_MAX_FLOOR: u32 = 4096;
/// Largest [`Limits::request_bytes_max`].
pub const REQUEST_BYTES_MAX_CEILING: u32 = 1 << 30;
/// In-flight bytes charged per request on top of its buffer, so that a flood of
/// zero-length requests is bounded too.
pub const REQUEST_OVERHEAD_BYTES: u32 = 16 * 1024;

impl Limits {
    /// These limits with every field brought into its allowed range.
    fn normalized(mut self) -> Self {
        self.request_bytes_max = self
            .request_bytes_max
            .clamp(REQUEST_BYTES_MAX_FLOOR, REQUEST_BYTES_MAX_CEILING);
        self.in_flight_bytes_max = self
            .in_flight_bytes_max
            .max(self.request_bytes_max + REQUEST_OVERHEAD_BYTES);
        self.connections_max = self.connections_max.max(1);
        self.connections_per_address_max = self
            .connections_per_address_max
            .clamp(1, self.connections_max);
        self.options_max = self.options_max.max(1);
        self
    }
}

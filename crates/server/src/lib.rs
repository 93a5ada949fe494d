//! The replication server: accepts agents over mutual TLS, verifies every chunk
//! they send, and commits each epoch durably to the store before acknowledging it.
//!
//! Layers, each with one job:
//! - [`Server`] binds the listener, caps connections and handshakes, and spawns one
//!   task per connection (`listener` module);
//! - `connection` owns the TLS stream and its read buffer and speaks only in frames;
//! - `session` is the per-source state machine (`Hello` -> `Welcome` -> epochs),
//!   with its epochs, cutover and failback in rooms of their own;
//! - `verify` checks chunks (size, decompression cap, blake3 == id) off the
//!   network task and appends them to the store;
//! - `shared` is the state they all share, built once by the listener.
//!
//! The source's identity comes from its verified client certificate; the id an
//! agent names in `Hello` is only compared with it.
//!
//! Observability lives beside the admin API: `metrics` (Prometheus text on
//! `/metrics`), `health` (`/health`: store writable, listener accepting) and
//! `alerts` (RPO breach detection and the `--on-rpo-breach` hook). They read
//! one ledger of events (`ledger`), which [`ServerStats`] also reads.
#![forbid(unsafe_code)]

mod admin;
mod admin_guard;
mod admin_tls;
mod alerts;
mod api_error;
mod block_values;
mod breaches;
mod budget;
mod capture;
mod closers;
mod connection;
mod drills;
mod encryption;
mod folding;
#[doc(hidden)]
pub mod fuzzing;
mod health;
#[doc(hidden)]
pub mod in_memory;
mod launch_gate;
mod leases;
mod ledger;
mod lifecycle;
mod listener;
mod maintenance;
mod materializing;
mod metrics;
mod migration;
mod nbd_export;
mod reject;
mod retention;
mod revocation;
mod session;
mod shared;
mod source_records;
mod status;
mod verify;
mod views;
mod workflow_api;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use capture::{CaptureView, SourceMode};
pub use encryption::{EncryptionConfig, KekConfig};
pub use ledger::ServerStats;
pub use listener::Server;
pub use maintenance::report_json as gc_report_json;
pub use nbd_export::{
    NBD_CONNECTIONS_MAX_DEFAULT, NBD_CONNECTIONS_PER_ADDRESS_MAX_DEFAULT, NBD_IDLE_TIMEOUT_DEFAULT,
};
pub use status::{
    CutoverView, EncryptionView, LeaseView, SourceState, SourceView, StateThresholds, VolumeView,
};
pub use views::{
    CheckView, CreateLaunch, CreateSnapshot, LaunchView, LaunchVolumeView, MaterializeView,
    SnapshotView,
};
pub use workflow_api::{EventView, OPERATOR_HEADER};

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the replication listener.
    pub listen: SocketAddr,
    /// Data directory of the store.
    pub data_dir: PathBuf,
    /// CA certificate that client certificates must chain to.
    pub ca_path: PathBuf,
    /// The server's certificate chain.
    pub cert_path: PathBuf,
    /// The server's private key.
    pub key_path: PathBuf,
    /// Most connections open at once (handshaking or in session).
    pub connections_max: usize,
    /// Most of those one peer address may hold (IPv6: one /64); a connection
    /// over it is closed at once, before any TLS work.
    pub connections_per_address_max: usize,
    /// Time allowed for TCP accept to finished TLS handshake and `Hello`.
    pub handshake_timeout: Duration,
    /// A session with no frame from the agent for this long is closed.
    pub idle_timeout: Duration,
    /// A new session of a source supersedes the source's session in progress
    /// if that one has received no frame for this long (else it is `Busy`).
    pub supersede_after: Duration,
    /// Address of the admin HTTP API; `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Lag above this makes a source `lagging`.
    pub rpo_target: Duration,
    /// No agent contact for this long makes a source `stalled`.
    pub stall_after: Duration,
    /// Automatic snapshots and their retention; `None` takes none (snapshots with
    /// an explicit TTL still expire).
    pub retention: Option<blockrep_store::RetentionPolicy>,
    /// How often automatic snapshots and expiry are considered.
    pub retention_tick: Duration,
    /// Address of the NBD listener serving launch volumes; `None` disables it.
    /// Without `nbd_tls` it must be a loopback address: [`Server::bind`]
    /// refuses any other, since every launch would be open to the network.
    pub nbd_listen: Option<SocketAddr>,
    /// Require TLS (NBD STARTTLS, client certificates from the same CA) on the
    /// NBD listener. A launch then opens only for its own source's
    /// certificate and the admin certificate.
    pub nbd_tls: bool,
    /// An NBD connection that sends no request (or takes no reply) for this
    /// long is closed.
    pub nbd_idle_timeout: Duration,
    /// Most NBD connections open at once; further clients wait in the backlog.
    pub nbd_connections_max: usize,
    /// Most NBD connections open at once from one address (an IPv6 client by
    /// its /64); further ones are closed at once. At most `nbd_connections_max`.
    pub nbd_connections_per_address_max: usize,
    /// How often garbage collection runs in the background; `None` never.
    pub gc_interval: Option<Duration>,
    /// Pack size limit (tests use small packs so that compaction happens).
    pub pack_size_max_bytes: Option<u64>,
    /// Memory the blob index keeps for its newest entries; the rest lives
    /// in sorted runs in the data directory (a local store).
    pub index_memory_bytes: usize,
    /// How often every source's lag is compared with its RPO target.
    pub alert_interval: Duration,
    /// Shell command run (`sh -c`) once when a source breaches its RPO target and
    /// once when it recovers, with `BLOCKREP_EVENT`, `BLOCKREP_SOURCE`,
    /// `BLOCKREP_LAG_SECONDS` and `BLOCKREP_RPO_TARGET_SECONDS` set.
    pub on_rpo_breach: Option<String>,
    /// Certificate revocation lists (PEM) checked against every client
    /// certificate, on every listener; `None` checks none.
    pub crl_path: Option<PathBuf>,
    /// How often the `crl_path` file is checked for a change (it is also
    /// reloaded on SIGHUP); a changed list applies to new handshakes at once
    /// and ends the open sessions of the certificates it revokes.
    pub crl_poll_interval: Duration,
    /// Serve the admin API over mutual TLS, to the admin certificate only
    /// (sources get 403), instead of plain HTTP.
    pub admin_tls: bool,
    /// The admin token file of the plain-HTTP admin API (written, 0600, when
    /// missing); requests other than reading `/health` and `/metrics` must
    /// carry the token. Unused with `admin_tls`.
    pub admin_token_path: PathBuf,
    /// Names (or addresses) the admin API may be reached by besides
    /// `localhost`, loopback addresses and its listen address: any other
    /// `Host` is refused (DNS rebinding).
    pub admin_hosts: Vec<String>,
    /// Most memory all sessions together may hold for their disks' chunk ids
    /// (about 160 bytes per chunk, see `budget`); a session whose disk does not
    /// fit is refused.
    pub session_memory_max_bytes: u64,
    /// Most of that budget one session may reserve, so that one source's
    /// `Hello` cannot take the memory every other source needs.
    pub session_memory_per_source_max_bytes: u64,
    /// Most bytes of pages or chunks a session reads from the store and queues
    /// for the agent before it writes them out (answers to `GetPages`,
    /// `GetBasePages` and failback's `Want`).
    pub send_buffer_max_bytes: u64,
    /// Keep the store in this bucket, `data_dir` being its working copy and
    /// cache; `None` keeps it in `data_dir`.
    pub bucket: Option<BucketConfig>,
    /// Encryption at rest: the KEK and key directory; `None` stores in
    /// clear (and cannot read an encrypted source).
    pub encryption: Option<EncryptionConfig>,
    /// How long a test launch made without a TTL of its own lives (`None`:
    /// until deleted).
    pub test_launch_ttl: Option<Duration>,
    /// Memory budget of the decoded chunk cache that every launch volume
    /// reads its unwritten blocks through (0: none).
    pub launch_cache_bytes: u64,
    /// How often what clients wrote to launch volumes is folded into the
    /// store in the background (`None`: only when a root is needed).
    pub launch_fold_interval: Option<Duration>,
    /// Most bytes a second each launch materialization copies in the
    /// background (`None`: as fast as the disks go).
    pub launch_materialize_rate: Option<u64>,
    /// The directory launch materializations are written in (`None`:
    /// `DATA/materialized`); see `materializing::confine`.
    pub launch_materialize_dir: Option<PathBuf>,
}

/// A store kept in an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct BucketConfig {
    pub location: blockrep_objects::S3Location,
    pub service: blockrep_objects::S3Service,
    /// Most bytes of sealed packs kept in the data directory.
    pub cache_bytes: u64,
    /// How long a source's lease lasts unless renewed: after a server stops
    /// (or is cut off), another takes its sources after at most this long.
    pub lease_ttl: Duration,
    /// This server's name in leases; empty: its replication address.
    pub holder: String,
}

impl ServerConfig {
    /// A configuration with default limits, taking the TLS files from `tls_dir`
    /// (`ca.crt`, `server.crt`, `server.key`, `admin.token`).
    pub fn new(listen: SocketAddr, data_dir: PathBuf, tls_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            ca_path: tls_dir.join("ca.crt"),
            cert_path: tls_dir.join("server.crt"),
            key_path: tls_dir.join("server.key"),
            connections_max: 1024,
            connections_per_address_max: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            supersede_after: Duration::from_secs(10),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7444))),
            rpo_target: Duration::from_secs(15 * 60),
            stall_after: Duration::from_secs(60),
            retention: Some(blockrep_store::RetentionPolicy::default()),
            retention_tick: Duration::from_secs(30),
            nbd_listen: None,
            nbd_tls: false,
            nbd_idle_timeout: NBD_IDLE_TIMEOUT_DEFAULT,
            nbd_connections_max: NBD_CONNECTIONS_MAX_DEFAULT,
            nbd_connections_per_address_max: NBD_CONNECTIONS_PER_ADDRESS_MAX_DEFAULT,
            gc_interval: Some(Duration::from_secs(600)),
            pack_size_max_bytes: None,
            index_memory_bytes: blockrep_store::INDEX_MEMORY_DEFAULT_BYTES,
            alert_interval: Duration::from_millis(500),
            on_rpo_breach: None,
            crl_path: None,
            crl_poll_interval: Duration::from_secs(2),
            admin_tls: false,
            admin_token_path: tls_dir.join(blockrep_pki::ADMIN_TOKEN_FILE_NAME),
            admin_hosts: Vec::new(),
            // Enough for the largest valid geometry (2^28 chunks) and a little.
            session_memory_max_bytes: 9 << 30,
            // A third of the total: a 1.2 TiB disk at 64 KiB chunks, 80 TiB at 4 MiB.
            session_memory_per_source_max_bytes: 3 << 30,
            send_buffer_max_bytes: 4 << 20,
            bucket: None,
            encryption: None,
            test_launch_ttl: None,
            launch_cache_bytes: blockrep_store::CHUNK_CACHE_BYTES_DEFAULT,
            launch_fold_interval: Some(crate::folding::FOLD_INTERVAL_DEFAULT),
            launch_materialize_rate: None,
            launch_materialize_dir: None,
        }
    }
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] blockrep_store::Error),
    /// The TLS files are missing or unusable.
    #[error("TLS: {0}")]
    Tls(#[from] blockrep_pki::Error),
    /// The configuration would be unsafe to run; the message says why.
    #[error("{0}")]
    Config(String),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

//! The agent: scans a source disk, learns the server's committed head, and streams
//! the chunks that differ over mutual TLS, one epoch at a time.
//!
//! One epoch: scan the disk with blake3 on every core -> diff against the server's
//! head (the server's head is the truth, learned after every connect) -> stream the
//! changed chunks through a pipeline (copy + hash + compress on worker threads, TLS
//! on the network task, no per-chunk round trip) -> `Commit` with the root the
//! agent expects -> `Committed` once the server has made it durable.
//!
//! Each epoch reads one view of the disk, taken before its scan (a reflink
//! clone, an operator's snapshot, or the live disk; see the `view` module), and
//! labels its root by it: the send workers read the same view as the scan.
//!
//! A session runs over any byte stream (the `connection` module): mutual TLS
//! over TCP in production, one end of `tokio::io::duplex` in the unit tests,
//! which drive epochs, resumes and failback against the server's real session
//! in process. docs/architecture.md ("The agent's rooms") maps the modules.
#![forbid(unsafe_code)]

mod ack_log;
mod adaptive;
pub mod capture;
mod connection;
mod epoch;
mod error;
mod failback;
mod failback_patch;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod machine;
mod machine_step;
mod pages;
mod patch;
mod progress;
mod rate;
mod run;
mod send;
pub mod serve;
#[cfg(test)]
mod tests;
mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blockrep_core::{ChunkId, SourceId};

pub use ack_log::AckLog;
pub use adaptive::AdaptiveCompression;
pub use error::Error;
pub use failback::{FailbackOptions, FailbackPass, failback};
pub use rate::{RateLimiter, parse_rate};
pub use run::{RunOutcome, run, run_once, run_once_until};
pub use view::{SnapshotMode, VIEW_COMMAND_TIMEOUT_DEFAULT, ViewOptions};

/// When chunks are compressed before sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Compress when it makes replication faster: measured compression speed
    /// against measured link speed (see [`AdaptiveCompression`]), and per chunk
    /// only when it shrinks by an eighth.
    #[default]
    Auto,
    /// Always zstd (level 1) where a chunk shrinks by an eighth.
    Zstd,
    /// Never compress.
    None,
}

/// Everything the agent needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The source disk: a raw image file or a block device.
    pub disk: PathBuf,
    /// A machine's disks by volume name, replicated as one source with one
    /// recovery point for all; empty for a single disk (`disk`).
    pub volumes: Vec<(blockrep_core::VolumeName, PathBuf)>,
    /// A machine's volumes that the replica has and `volumes` lacks may be
    /// dropped from it (else the server refuses the session).
    pub allow_volume_removal: bool,
    /// `host:port` of the replication server, or several separated by
    /// commas: servers sharing one bucket, tried in turn (see
    /// [`AgentConfig::server_choice`]).
    pub server: String,
    /// Index in [`AgentConfig::servers`] of the server to try first: the
    /// one last reached, moved on when it is unreachable or says that
    /// another server serves the source.
    pub server_choice: Arc<std::sync::atomic::AtomicUsize>,
    /// This source's id; must match the id in the certificate.
    pub source: SourceId,
    /// CA certificate that the server's certificate must chain to.
    pub ca_path: PathBuf,
    /// This source's client certificate.
    pub cert_path: PathBuf,
    /// This source's private key.
    pub key_path: PathBuf,
    /// Chunk size for a new replica (an existing replica keeps its own).
    pub chunk_size_bytes: u32,
    /// Compression policy.
    pub compression: Compression,
    /// Time from the start of one scan to the start of the next (continuous mode).
    pub interval: Duration,
    /// Longest wait between reconnection attempts.
    pub backoff_max: Duration,
    /// A connect or handshake that takes longer, or a session on which no
    /// byte moves either way for this long while the agent writes or waits
    /// for a reply, ends the connection as lost (and a continuous run
    /// reconnects). Without it a silently dead path (a black hole: no reset,
    /// no data) would hold the agent forever. The server's `Progress` frames
    /// keep a slow but live path from being taken for dead, provided this is
    /// at least [`blockrep_proto::IO_TIMEOUT_MIN`].
    pub io_timeout: Duration,
    /// Caps the sending rate; shared so it can be changed while replicating.
    pub rate_limiter: Arc<RateLimiter>,
    /// Measurements behind `Compression::Auto`, kept across epochs.
    pub adaptive: Arc<AdaptiveCompression>,
    /// A large epoch commits an intermediate step after this many bytes sent...
    pub step_bytes: u64,
    /// ...or after this long, whichever comes first.
    pub step_interval: Duration,
    /// Show a progress bar for large epochs (when stderr is a terminal).
    pub progress: bool,
    /// Cut over once caught up, then exit.
    pub cutover: bool,
    /// Command that stops the workload before the final epoch (run with `sh -c`).
    pub pre_cutover_cmd: Option<String>,
    /// Test builds only: sees, and may corrupt or cut, every plaintext frame
    /// the agent writes into TLS (see [`fault`]).
    #[cfg(feature = "fault-injection")]
    pub plaintext_tap: Option<fault::SharedTap>,
    /// Where every acknowledged commit is recorded, if anywhere.
    pub ack_log: Option<Arc<AckLog>>,
    /// How each epoch's frozen view of the disk is taken (see the `view` module).
    pub view: ViewOptions,
    /// Send a changed chunk as the 4 KiB blocks that differ from the chunk the
    /// replica holds at its index (a patch) where that saves bytes; `false`
    /// sends whole changed chunks.
    pub patches: bool,
    /// Capture mode (`agent --serve`): the workload writes through this
    /// capture's export, and each epoch sends a cut of what it wrote instead
    /// of scanning the disk.
    pub capture: Option<Arc<capture::Capture>>,
    /// Capture mode of a machine: each volume's capture, in the order of
    /// `volumes` (empty when the machine's disks are scanned). Every epoch
    /// cuts all of them at one instant.
    pub volume_captures: Vec<Arc<capture::Capture>>,
}

impl AgentConfig {
    /// The addresses of [`AgentConfig::server`], in order.
    pub fn servers(&self) -> Vec<&str> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// A configuration with defaults for everything but the essentials.
    pub fn new(
        disk: PathBuf,
        server: String,
        source: SourceId,
        ca_path: PathBuf,
        cert_path: PathBuf,
        key_path: PathBuf,
    ) -> Self {
        Self {
            disk,
            volumes: Vec::new(),
            allow_volume_removal: false,
            server,
            server_choice: Arc::default(),
            source,
            ca_path,
            cert_path,
            key_path,
            chunk_size_bytes: blockrep_core::CHUNK_SIZE_DEFAULT_BYTES,
            compression: Compression::Auto,
            interval: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            io_timeout: Duration::from_secs(60),
            rate_limiter: Arc::new(RateLimiter::unlimited()),
            adaptive: Arc::new(AdaptiveCompression::default()),
            step_bytes: 1 << 30,
            step_interval: Duration::from_secs(30),
            progress: false,
            cutover: false,
            pre_cutover_cmd: None,
            #[cfg(feature = "fault-injection")]
            plaintext_tap: None,
            ack_log: None,
            view: ViewOptions::default(),
            patches: true,
            capture: None,
            volume_captures: Vec::new(),
        }
    }
}

/// A completed cutover and its downtime breakdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoverReport {
    /// The final epoch.
    pub epoch: u64,
    /// Its root: the cutover launch starts from exactly this.
    pub root: ChunkId,
    /// The cutover snapshot.
    pub snapshot: String,
    /// The cutover launch volume (served over NBD under this name).
    pub launch: String,
    /// The pre-cutover command (before the downtime clock starts).
    pub hook: Duration,
    /// The final scan.
    pub scan: Duration,
    /// Diff and transfer of the final changes.
    pub transfer: Duration,
    /// The final commit on the server.
    pub commit: Duration,
    /// Snapshot and launch creation on the server.
    pub launch_ready: Duration,
    /// From the end of the command (or the request) to ready.
    pub downtime: Duration,
    /// Chunks the final epoch sent (data, zero and references).
    pub chunks_sent: u64,
    /// Bytes the final epoch sent.
    pub bytes_sent: u64,
    /// How the final epoch's disk was read: `Quiesced` after a pre-cutover
    /// command, else its view's label.
    pub consistency: blockrep_core::Consistency,
}

/// What one committed epoch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochReport {
    /// The epoch number committed.
    pub epoch: u64,
    /// The committed root.
    pub root: ChunkId,
    /// Chunks whose data was sent.
    pub chunks_sent: u64,
    /// Chunks sent as "now zero" (no data).
    pub zero_chunks_sent: u64,
    /// Chunks sent as references to data the server already held (deduplicated).
    pub ref_chunks_sent: u64,
    /// Frame bytes written for this epoch (headers and data, before TLS).
    pub bytes_sent: u64,
    /// Bytes of chunk data before compression, for the chunks sent (for a
    /// patch, the bytes of its ranges).
    pub raw_bytes_sent: u64,
    /// Changed chunks sent as patches (counted here, not in `chunks_sent`).
    pub patches_sent: u64,
    /// Frame bytes of those patches (part of `bytes_sent`).
    pub patch_bytes_sent: u64,
    /// Data chunks and patches sent zstd-compressed.
    pub compressed_chunks_sent: u64,
    /// Whether the agent compressed when the epoch ended (`--compress
    /// auto`: the controller's choice then).
    pub compressing: bool,
    /// Times the controller changed its choice since the agent started.
    pub compression_changes: u64,
    /// Bytes of the bases' block values the server sent for the patches (the
    /// downstream cost of patching; requests count in `bytes_sent`).
    pub block_values_bytes_received: u64,
    /// Data chunks the server reports receiving in this epoch.
    pub server_chunks_received: u64,
    /// Chunks the server stored as new (the rest it already held).
    pub server_chunks_stored: u64,
    /// Time spent scanning.
    pub scan_duration: Duration,
    /// Time from the end of the scan to `Committed`.
    pub transfer_duration: Duration,
    /// How the scanned view was taken: what the committed root holds.
    pub consistency: blockrep_core::Consistency,
}

impl EpochReport {
    /// A report of nothing sent yet, for the epoch after `epoch`, whose
    /// views claim `consistency`.
    pub(crate) fn nothing_yet(
        epoch: u64,
        scan_duration: Duration,
        consistency: blockrep_core::Consistency,
    ) -> Self {
        Self {
            epoch,
            root: ChunkId::ZERO,
            chunks_sent: 0,
            zero_chunks_sent: 0,
            ref_chunks_sent: 0,
            bytes_sent: 0,
            raw_bytes_sent: 0,
            patches_sent: 0,
            patch_bytes_sent: 0,
            compressed_chunks_sent: 0,
            compressing: false,
            compression_changes: 0,
            block_values_bytes_received: 0,
            server_chunks_received: 0,
            server_chunks_stored: 0,
            scan_duration,
            transfer_duration: Duration::ZERO,
            consistency,
        }
    }

    /// Records the compression choice as the epoch ends.
    pub(crate) fn note_compression(&mut self, config: &AgentConfig) {
        self.compressing = match config.compression {
            Compression::Auto => config.adaptive.enabled(),
            Compression::Zstd => true,
            Compression::None => false,
        };
        self.compression_changes = config.adaptive.changes();
    }

    /// Adds what one volume of a machine's epoch sent. The volumes' views
    /// are timed from one start (taken together), so the machine's scan took
    /// as long as the last of them: the longest, not their sum.
    pub(crate) fn add_volume(&mut self, volume: &EpochReport) {
        self.chunks_sent += volume.chunks_sent;
        self.zero_chunks_sent += volume.zero_chunks_sent;
        self.ref_chunks_sent += volume.ref_chunks_sent;
        self.bytes_sent += volume.bytes_sent;
        self.raw_bytes_sent += volume.raw_bytes_sent;
        self.patches_sent += volume.patches_sent;
        self.patch_bytes_sent += volume.patch_bytes_sent;
        self.compressed_chunks_sent += volume.compressed_chunks_sent;
        self.block_values_bytes_received += volume.block_values_bytes_received;
        self.scan_duration = self.scan_duration.max(volume.scan_duration);
    }
}

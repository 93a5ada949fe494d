//! `blockrep bench`: replication measured end to end on a synthetic disk, over real
//! TLS on loopback, through the same server and agent code as production.
//!
//! The server runs as a child process (the `blockrep` binary named by
//! [`Options::server_exe`]), the agent in this process, so each side's CPU
//! time and memory are measured on its own. Every figure is reported next to a
//! reference measured in the same run (blake3 of the whole disk on every core),
//! because absolute numbers drift between machines. The run ends with a
//! cutover whose volume is verified against the disk byte for byte
//! ([`verify_cutover`]); a mismatch makes the bench fail.
//!
//! With [`Options::disks`] above one it replicates a machine of that many
//! disks as one source (see `disks.rs` for their sizes and seeds), cuts the
//! whole machine over, and verifies every volume of the cutover launch
//! against its disk ([`verify_machine_cutover`]).
//!
//! With [`Options::capture`] it measures instead the lag of write capture
//! against a rescan of the disk every epoch.

mod capture;
mod delta;
mod disks;
mod fsdisk;
mod measure;
mod plot;
mod replication;
mod server;
mod synthetic;
mod table;
mod verify;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

pub use verify::{
    CutoverMachine, CutoverVolume, Verification, VolumeVerification, verify_cutover,
    verify_machine_cutover,
};

/// What the bench's disks hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// The seeded synthetic mix: holes, text, structured records, random
    /// bytes and duplicated extents.
    Synthetic,
    /// The synthetic mix without holes: every byte is data.
    Dense,
    /// An ext4 file system filled from this machine's files under `/usr`
    /// (`mke2fs -d`), as real disks are.
    Fs,
}

impl DiskKind {
    /// Its name in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Synthetic => "synthetic",
            Self::Dense => "dense",
            Self::Fs => "fs",
        }
    }
}

/// What to measure, and where; `blockrep bench`'s flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `blockrep` executable whose `server` command is the server under test.
    pub server_exe: PathBuf,
    /// Size of the synthetic disk in bytes; of each disk of a machine but
    /// the last, which is half of it plus 4 KiB.
    pub size: u64,
    /// Disks of the synthetic source: 1 replicates a single disk, more a
    /// machine of that many disks (at most `blockrep_core::VOLUMES_MAX`).
    pub disks: usize,
    /// What the disks hold.
    pub disk_kind: DiskKind,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Bytes per second of the churn writer during continuous replication.
    pub churn_rate: u64,
    /// How long continuous replication runs under churn before the cutover.
    pub duration: Duration,
    /// Share of the disk's 4 KiB blocks rewritten before the delta sync, in percent.
    pub change_percent: f64,
    /// Seed of the synthetic disk, the changes and the churn.
    pub seed: u64,
    /// Agent interval during continuous replication.
    pub interval: Duration,
    /// Working directory (`None`: a temporary directory, removed afterwards).
    /// A given one keeps the disk and the server's data after the run.
    pub workdir: Option<PathBuf>,
    /// Also write every figure as JSON to this file.
    pub json: Option<PathBuf>,
    /// Also draw throughput and lag over time as SVG to this file.
    pub plot: Option<PathBuf>,
    /// Measure write capture's lag against a rescan instead.
    pub capture: bool,
    /// Sizes of the sparse disks of `capture`.
    pub capture_sizes: Vec<u64>,
    /// Measured time of each `capture` run, after its initial sync.
    pub capture_duration: Duration,
    /// More flags of the server under test (e.g. `--store s3://...`: the
    /// store kept in a bucket).
    pub server_args: Vec<String>,
    /// Encrypt the source at rest (`server --encrypt-at-rest`, with a KEK
    /// file and key directory made in the work directory).
    pub encrypt_at_rest: bool,
    /// The agent's compression (`Auto` decides while sending).
    pub compression: blockrep_agent::Compression,
}

/// Runs the bench: prints its table on stdout (progress on stderr), writes
/// the JSON and plot asked for, and fails if the cutover volume differs from
/// the disk.
pub async fn run(options: Options) -> Result<()> {
    if options.capture {
        ensure!(
            options.disks == 1,
            "--capture measures one disk at a time (--capture-sizes): it cannot be combined \
             with --disks"
        );
        return capture::run(capture::CaptureBench {
            server_exe: options.server_exe,
            sizes: options.capture_sizes,
            duration: options.capture_duration,
            rate: options.churn_rate,
            interval: options.interval,
            chunk_size_bytes: u32::try_from(options.chunk_size).context("chunk size too large")?,
            seed: options.seed,
            workdir: options.workdir,
            json: options.json,
        })
        .await;
    }
    replication::run(options).await
}

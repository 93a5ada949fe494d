//! `blockrep bench`'s flags (the bench itself is the `blockrep-bench` crate).

use std::path::PathBuf;
use std::time::Duration;

use blockrep_agent::parse_rate;
use clap::Args;

use crate::units::{parse_duration, parse_size};

/// `--disk-kind`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum DiskKindArg {
    /// The seeded synthetic mix.
    Synthetic,
    /// The synthetic mix without holes.
    Dense,
    /// ext4 filled from /usr.
    Fs,
}

impl From<DiskKindArg> for blockrep_bench::DiskKind {
    fn from(arg: DiskKindArg) -> Self {
        match arg {
            DiskKindArg::Synthetic => Self::Synthetic,
            DiskKindArg::Dense => Self::Dense,
            DiskKindArg::Fs => Self::Fs,
        }
    }
}

/// Options of `blockrep bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Size of the synthetic disk; with --disks N > 1, of each disk but the
    /// last, which is half of it plus 4 KiB (not a whole chunk).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub(crate) size: u64,
    /// Disks of the synthetic source: more than one replicates a machine
    /// of that many disks (one recovery point, one cutover of every disk,
    /// each volume verified against its disk; each disk its own seed).
    /// Not with --capture.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=blockrep_core::VOLUMES_MAX as i64),
        conflicts_with = "capture"
    )]
    pub(crate) disks: u8,
    /// What the disks hold: `synthetic` (a seeded mix of holes, text,
    /// records, random bytes and duplicated extents), `dense` (the same
    /// without holes) or `fs` (an ext4 file system filled to 70% from this
    /// machine's files under /usr with mke2fs -d, as real disks are).
    #[arg(long, value_enum, default_value_t = DiskKindArg::Synthetic, conflicts_with = "capture")]
    pub(crate) disk_kind: DiskKindArg,
    /// Chunk size.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub(crate) chunk_size: u64,
    /// Rate of the churn writer during continuous replication (random 4 KiB
    /// writes, plus a sequential append region), e.g. 4MiB/s.
    #[arg(long, default_value = "4MiB/s", value_parser = parse_rate)]
    pub(crate) churn_rate: u64,
    /// How long continuous replication runs under churn before the cutover.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Share of the disk's 4 KiB blocks rewritten before the delta sync, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) change_percent: f64,
    /// Seed of the synthetic disk, the changes and the churn.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Agent interval during continuous replication.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(crate) interval: Duration,
    /// Working directory (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub(crate) workdir: Option<PathBuf>,
    /// Also write every figure as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Also draw throughput and lag over time, with the cutover marked, as SVG.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Instead: the lag of write capture (`agent --serve`) against a rescan
    /// of the disk every epoch, on sparse disks of --capture-sizes under
    /// random 4 KiB writes at --churn-rate, --capture-duration per run.
    #[arg(long)]
    pub(crate) capture: bool,
    /// Sizes of the sparse disks of `--capture` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1GiB,64GiB", value_parser = parse_size)]
    pub(crate) capture_sizes: Vec<u64>,
    /// Measured time of each `--capture` run, after its initial sync.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub(crate) capture_duration: Duration,
    /// Keep the server's store in a bucket (its flags as `server`'s): the
    /// figures are then those of replication into the bucket.
    #[command(flatten)]
    pub(crate) store: super::StoreArgs,
    /// Encrypt the source at rest, as `server --encrypt-at-rest` does, with
    /// a KEK file and key directory made in the work directory.
    #[arg(long)]
    pub(crate) encrypt_at_rest: bool,
    /// The agent's compression, as `agent --compress`: `auto` decides from
    /// measurements while sending; `zstd` or `none` fix it, so that two runs
    /// (e.g. clear and encrypted) compare the same work.
    #[arg(long, value_enum, default_value_t = super::CompressArg::Auto)]
    pub(crate) compress: super::CompressArg,
}

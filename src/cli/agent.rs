//! `blockrep agent`'s flags: replication, frozen views (`ViewArgs`) and write
//! capture (`CaptureArgs`).

use std::path::PathBuf;
use std::time::Duration;

use blockrep_agent::serve::{SERVE_CONNECTIONS_DEFAULT, ServeAddr};
use clap::{Args, ValueEnum};

use super::ClientTls;
use crate::units;

#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Source disk: a raw image file or a block device. Repeat it for a
    /// machine of several disks, replicated as one source with one recovery
    /// point for all of them; `NAME=PATH` names a disk's volume (by default
    /// the file name: `/dev/sdb` is `sdb`).
    #[arg(long, required = true, value_name = "[NAME=]PATH")]
    pub(crate) disk: Vec<String>,
    /// Let the replica of a machine drop the volumes it has and the --disk
    /// list no longer names (without it the server refuses the session,
    /// naming the missing volume). Their data stays in older snapshots.
    #[arg(long)]
    pub(crate) allow_volume_removal: bool,
    /// Replication server, host:port; or several, separated by commas
    /// (servers sharing one bucket): the agent uses one and moves to the
    /// next when it is unreachable or says another server has the source.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub(crate) to: String,
    /// This source's id (must match its certificate).
    #[arg(long)]
    pub(crate) source: String,
    #[command(flatten)]
    pub(crate) tls: ClientTls,
    /// Sync until the replica equals the disk, then exit.
    #[arg(long)]
    pub(crate) once: bool,
    /// Chunk size of a new replica: a power of two from 4KiB to 4MiB.
    #[arg(long, default_value = "64KiB", value_parser = units::parse_size)]
    pub(crate) chunk_size: u64,
    /// Time from the start of one scan to the next, in continuous mode.
    #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
    pub(crate) interval: Duration,
    /// Compression of changed chunks.
    #[arg(long, value_enum, default_value_t = CompressArg::Auto)]
    pub(crate) compress: CompressArg,
    /// Cap on the sending rate, e.g. 100MiB/s, 800Mbit/s, unlimited.
    #[arg(long, default_value = "unlimited", value_parser = blockrep_agent::parse_rate)]
    pub(crate) max_rate: u64,
    /// Settings file re-read on SIGHUP, so the rate changes without restarting
    /// replication. Lines of `key = value`; known key: `max-rate`.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// A large epoch (e.g. the initial sync) commits an intermediate step after
    /// this much data, so a crash loses at most one step.
    #[arg(long, default_value = "1GiB", value_parser = units::parse_size)]
    pub(crate) commit_every: u64,
    /// ...or after this long, whichever comes first.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    pub(crate) commit_interval: Duration,
    /// A connect or TLS handshake that takes longer, or a session on which no
    /// byte moves either way for this long, drops the connection, and the
    /// agent reconnects: a silently dead path (no reset, no data) is noticed.
    /// A slow path that still moves is not dropped: the server reports its
    /// progress every second while frames arrive. At least 2s.
    #[arg(long, default_value = "60s", value_parser = parse_io_timeout)]
    pub(crate) io_timeout: Duration,
    /// Cut over once caught up: run --pre-cutover-cmd, a final sync, and exit
    /// with the cutover launch ready.
    #[arg(long)]
    pub(crate) cutover: bool,
    /// Command that stops the workload before the final sync of a cutover (run
    /// with `sh -c`); its end starts the downtime clock.
    #[arg(long)]
    pub(crate) pre_cutover_cmd: Option<String>,
    /// Append one line per commit the server acknowledged to FILE:
    /// `epoch=N root=HEX complete=true|false unix_ms=N scan_started_unix_ms=N`
    /// (complete=false for an intermediate step of a large epoch; an idle epoch
    /// repeats the head's epoch and root; scan_started_unix_ms is the point in
    /// time the root holds: when the disk's view was taken). Each line is written after the server made the commit
    /// durable, so every root listed stays exportable with `blockrep export
    /// --root` until GC collects it. Written and flushed, not fsynced; kept
    /// across runs.
    #[arg(long, value_name = "FILE")]
    pub(crate) ack_log: Option<PathBuf>,
    /// Send whole changed chunks. By default a changed chunk travels as the
    /// 4 KiB blocks that differ from the replica's chunk at its index (a
    /// patch) where that is smaller.
    #[arg(long)]
    pub(crate) no_patches: bool,
    #[command(flatten)]
    pub(crate) view: ViewArgs,
    #[command(flatten)]
    pub(crate) capture: CaptureArgs,
}

/// How the agent freezes the disk for each epoch (see docs/architecture.md,
/// "Frozen views").
#[derive(Debug, Args)]
pub(crate) struct ViewArgs {
    /// What each epoch scans and sends. auto: a reflink clone of the image
    /// (XFS, btrfs) where its file system can make one, else the live disk
    /// (warned once at start); reflink: a clone or an error; none: the live
    /// disk, whose recovery points are labelled live (they may be torn).
    #[arg(long, value_enum, default_value_t = SnapshotArg::Auto)]
    pub(crate) snapshot: SnapshotArg,
    /// Command (run with `sh -c`) that makes a frozen view of the disk, e.g. an
    /// LVM snapshot, and prints its path (a file or block device of the disk's
    /// size) as its last line of output. Gets BLOCKREP_DISK and BLOCKREP_SOURCE
    /// in its environment. Replaces --snapshot.
    #[arg(long, value_name = "CMD", conflicts_with = "snapshot")]
    pub(crate) snapshot_cmd: Option<String>,
    /// Command (run with `sh -c`) that removes a view once its epoch is done
    /// with it: after success, failure, or shutdown. Gets BLOCKREP_VIEW (the
    /// path the snapshot command printed) besides BLOCKREP_DISK and
    /// BLOCKREP_SOURCE.
    #[arg(long, value_name = "CMD", requires = "snapshot_cmd")]
    pub(crate) release_cmd: Option<String>,
    /// Command (run with `sh -c`) run just before each view is made, e.g.
    /// `fsfreeze -f /mnt`: points made while it held are labelled quiesced.
    /// Not run for live reads.
    #[arg(long, value_name = "CMD")]
    pub(crate) quiesce_cmd: Option<String>,
    /// Command (run with `sh -c`) run just after each view is made, also when
    /// making it failed, e.g. `fsfreeze -u /mnt`.
    #[arg(long, value_name = "CMD")]
    pub(crate) thaw_cmd: Option<String>,
    /// Longest run of each of the view commands above; one still running then
    /// is killed (with everything it started) and the epoch fails.
    #[arg(long, default_value = "5min", value_parser = units::parse_duration)]
    pub(crate) snapshot_cmd_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SnapshotArg {
    /// A reflink clone where the file system supports it, else a live read.
    Auto,
    /// A reflink clone of the image, or an error.
    Reflink,
    /// Read the live disk (recovery points labelled live).
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum CompressArg {
    /// Compress when it makes replication faster (measured: compression speed
    /// against link speed), e.g. on a WAN link but not on a LAN or loopback.
    Auto,
    /// Always zstd where a chunk shrinks.
    Zstd,
    /// Never compress.
    None,
}

impl From<CompressArg> for blockrep_agent::Compression {
    fn from(arg: CompressArg) -> Self {
        match arg {
            CompressArg::Auto => Self::Auto,
            CompressArg::Zstd => Self::Zstd,
            CompressArg::None => Self::None,
        }
    }
}

/// Write capture: the agent serves the disk to its workload and replicates
/// what is written, without scanning the disk.
#[derive(Debug, Args)]
pub(crate) struct CaptureArgs {
    /// Capture mode: serve the disk over NBD at ADDR (`unix:PATH`, or
    /// `host:port`) and replicate only what is written through it: an epoch
    /// costs the bytes written, whatever the disk's size, and every recovery
    /// point is crash-consistent. The workload must use the export as its
    /// disk, and nothing else may write the disk: QEMU
    /// `-drive file=nbd+unix:///SOURCE?socket=PATH` (or
    /// `nbd://127.0.0.1:PORT/SOURCE`), `nbd-client` for /dev/nbdX, or
    /// `nbdfuse` plus a loop device. The export is named by --source (the
    /// default name opens it too). With several --disk, each disk is the
    /// export of its volume's name (`nbd+unix:///NAME?socket=PATH`), and
    /// every epoch cuts all of them at one instant. A Unix socket is made
    /// mode 0600; a TCP address must be loopback unless --serve-tls.
    /// --interval is then the time from one cut to the next.
    #[arg(
        long,
        value_name = "ADDR",
        value_parser = ServeAddr::parse,
        conflicts_with_all = ["snapshot", "snapshot_cmd", "release_cmd", "quiesce_cmd", "thaw_cmd"]
    )]
    pub(crate) serve: Option<ServeAddr>,
    /// Where the capture's dirty set is kept between runs: saved on a clean
    /// stop, so a restart sends only what was written (default:
    /// `.NAME.blockrep-capture` beside the disk; a machine's disks always
    /// keep theirs beside them). After an unclean stop the first epoch reads
    /// the whole disk once, consistently.
    #[arg(long, value_name = "PATH", requires = "serve")]
    pub(crate) capture_state: Option<PathBuf>,
    /// Old contents of blocks overwritten while their epoch is being sent are
    /// preserved, in memory up to this much, then in a file beside the disk.
    #[arg(long, value_name = "SIZE", requires = "serve", default_value = "64MiB", value_parser = units::parse_size)]
    pub(crate) preserve_memory: u64,
    /// Most bytes preserved for one epoch (memory and file); past it the
    /// epoch stops preserving and is labelled live instead of
    /// crash-consistent.
    #[arg(long, value_name = "SIZE", requires = "serve", default_value = "1GiB", value_parser = units::parse_size)]
    pub(crate) preserve_max: u64,
    /// Require TLS on the --serve TCP address: clients must present a
    /// certificate issued by this agent's --ca that is this source's own or
    /// the admin's; another source's certificate sees no export. The agent
    /// presents --serve-cert. Needed to serve on an address that is not
    /// loopback.
    #[arg(long, requires = "serve")]
    pub(crate) serve_tls: bool,
    /// With --serve-tls: refuse client certificates this list revokes (PEM,
    /// the crl.pem `blockrep cert revoke` writes). Checked for a change every
    /// 2 s: a new list applies to every later connection (those open stay
    /// open); one that does not load leaves the list in force.
    #[arg(long, value_name = "PATH", requires = "serve_tls")]
    pub(crate) serve_crl: Option<PathBuf>,
    /// With --serve-tls: the certificate the agent presents to its clients,
    /// a server certificate for the names they reach this host by (default:
    /// serve/ID.crt beside the client certificate, as `blockrep cert issue
    /// --source ID --serve-name HOST` writes it).
    #[arg(long, value_name = "PATH", requires_all = ["serve_tls", "serve_key"])]
    pub(crate) serve_cert: Option<PathBuf>,
    /// With --serve-tls: the key of --serve-cert (default: serve/ID.key
    /// beside the client certificate).
    #[arg(long, value_name = "PATH", requires_all = ["serve_tls", "serve_cert"])]
    pub(crate) serve_key: Option<PathBuf>,
    /// NBD connections served at once; more wait in the listen backlog.
    #[arg(long, value_name = "N", requires = "serve", default_value_t = SERVE_CONNECTIONS_DEFAULT)]
    pub(crate) serve_connections_max: usize,
}

/// `--io-timeout`: a duration no shorter than two of the server's progress
/// intervals, so that one late `Progress` does not end a live session.
fn parse_io_timeout(text: &str) -> Result<Duration, String> {
    let timeout = units::parse_duration(text)?;
    if timeout < blockrep_proto::IO_TIMEOUT_MIN {
        return Err(format!(
            "{timeout:?} is shorter than {:?}, twice the interval at which the server reports progress",
            blockrep_proto::IO_TIMEOUT_MIN
        ));
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_timeout_shorter_than_two_progress_intervals_is_refused() {
        assert_eq!(parse_io_timeout("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_io_timeout("60s"), Ok(Duration::from_secs(60)));
        let refused = parse_io_timeout("1500ms").unwrap_err();
        assert!(refused.contains("shorter than 2s"), "{refused}");
        assert!(parse_io_timeout("soon").is_err());
    }
}

//! The command line: every command, flag and help text of `blockrep` (clap
//! definitions only; what each command does is in `cmd`).

mod agent;
mod bench;
mod key;
mod server;
mod source;
mod store;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use blockrep_core::SourceId;
use clap::{Args, Parser, Subcommand, ValueEnum};

pub(crate) use agent::{AgentArgs, CaptureArgs, CompressArg, SnapshotArg, ViewArgs};
pub(crate) use bench::BenchArgs;
pub(crate) use key::{EncryptionArgs, KeyCommand, KeyDirArgs};
pub(crate) use server::ServerArgs;
pub(crate) use source::{SourceCommand, SourceDeleteArgs, SourceEncryptArgs, SourceStepArgs};
pub(crate) use store::StoreArgs;

use crate::units;

/// Continuous block-level replication of whole disks over mutual TLS.
///
/// An agent beside a source disk finds changed chunks by blake3 hashing and
/// streams them to a replication server, which keeps a verified, durable replica
/// of every source.
#[derive(Debug, Parser)]
#[command(name = "blockrep", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Reach the admin API over mutual TLS (a server run with --admin-tls),
    /// with ca.crt, admin.crt and admin.key from this directory.
    #[arg(long, global = true, env = "BLOCKREP_ADMIN_TLS_DIR")]
    pub(crate) admin_tls_dir: Option<PathBuf>,
    /// The admin API's bearer token file. `server` reads it (default
    /// TLS_DIR/admin.token, written 0600 if missing); admin commands send it
    /// (default: tls/admin.token, else /etc/blockrep/tls/admin.token).
    #[arg(
        long,
        global = true,
        env = "BLOCKREP_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub(crate) admin_token: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
// One value per process, parsed once: boxing the large variants buys nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    /// Make the private CA and certificates for servers, sources and the admin.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Run the replication server.
    Server(ServerArgs),
    /// Replicate a disk to a server: by scanning it each epoch, or (with
    /// --serve) by serving it to its workload and capturing every write.
    Agent(AgentArgs),
    /// Write a source's committed replica, a snapshot or any stored root to a sparse raw image.
    Export(ExportArgs),
    /// Show every source's replication state, lag and backlog (admin API).
    Status(StatusArgs),
    /// Reclaim space no head, snapshot or launch references; compact packs.
    Gc(GcArgs),
    /// Re-read every referenced chunk and check its hash; name what damage affects.
    Verify(VerifyArgs),
    /// Point-in-time snapshots of replicas (admin API).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Writable copy-on-write launch volumes made from snapshots, served over NBD (admin API).
    #[command(subcommand)]
    Launch(LaunchCommand),
    /// Ask a source's running agent to cut over (admin API), or reset a cut-over source.
    Cutover(CutoverArgs),
    /// Bring the original disk back to a launch volume's content (run beside the disk),
    /// or complete a running failback (`failback complete`).
    Failback(FailbackArgs),
    /// Measure replication end to end on a synthetic disk (real TLS on loopback).
    Bench(BenchArgs),
    /// Keys of encryption at rest: make a KEK, list data keys, rotate them.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Sources: their migration workflow (mark-ready, finalize, archive,
    /// history; admin API), and, in a stopped server's store, deletion (and
    /// shredding of keys) and conversion to encryption at rest.
    #[command(subcommand)]
    Source(SourceCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum CertCommand {
    /// Create a private CA (ca.crt, ca.key) and a server certificate (server.crt, server.key).
    Init {
        /// Directory for the files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address the server is reached at (repeatable).
        #[arg(long = "server-name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        server_names: Vec<String>,
        /// Replace an existing CA (certificates it issued stop working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for a source (ID.crt, ID.key) or the admin;
    /// with --serve-name, the certificate a source's agent serves its disk
    /// with instead (serve/ID.crt, serve/ID.key).
    Issue {
        /// Directory holding ca.crt and ca.key; the new files go there too.
        #[arg(long)]
        dir: PathBuf,
        /// Source id to bind into the certificate: [a-z0-9][a-z0-9._-]{0,63}.
        #[arg(long, required_unless_present = "admin", conflicts_with = "admin")]
        source: Option<String>,
        /// Issue the admin certificate (admin.crt, admin.key) instead.
        #[arg(long)]
        admin: bool,
        /// Tenant of the source, bound into the certificate beside its id (same
        /// rule as a source id). Sources of one tenant share deduplicated data;
        /// without it a source is its own tenant and shares nothing.
        #[arg(long, conflicts_with = "admin")]
        tenant: Option<String>,
        /// Issue the certificate the source's agent presents when it serves
        /// its disk over TLS (`agent --serve-tls`), valid for this DNS name
        /// or IP address its clients reach it by (repeatable): serve/ID.crt
        /// and serve/ID.key. It is a server certificate and no identity; the
        /// source's own ID.crt is left as it is. The replication server's
        /// names (server.crt) are refused: the agent's host could pose as it.
        #[arg(long = "serve-name", value_name = "NAME", conflicts_with_all = ["admin", "tenant"])]
        serve_names: Vec<String>,
    },
    /// Revoke a client certificate: add it to the CA's revocation list
    /// (DIR/crl.pem), which servers load with --crl. A running server reloads
    /// it within --crl-poll-interval (or at once on SIGHUP) and ends the open
    /// sessions of the certificate.
    Revoke {
        /// Directory holding ca.crt and ca.key (and the certificate).
        #[arg(long)]
        dir: PathBuf,
        /// Revoke DIR/ID.crt, the certificate of this source.
        #[arg(long, required_unless_present_any = ["admin", "cert"], conflicts_with_all = ["admin", "cert"])]
        source: Option<String>,
        /// Revoke DIR/admin.crt.
        #[arg(long, conflicts_with = "cert")]
        admin: bool,
        /// Revoke this certificate file.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

/// TLS files of a client: `--tls-dir` with per-file overrides.
#[derive(Debug, Args)]
pub(crate) struct ClientTls {
    /// Directory with ca.crt, ID.crt and ID.key.
    #[arg(long)]
    pub(crate) tls_dir: Option<PathBuf>,
    /// CA certificate (default: TLS_DIR/ca.crt).
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate (default: TLS_DIR/ID.crt).
    #[arg(long)]
    pub(crate) cert: Option<PathBuf>,
    /// Client private key (default: TLS_DIR/ID.key).
    #[arg(long)]
    pub(crate) key: Option<PathBuf>,
}

impl ClientTls {
    pub(crate) fn resolve(&self, source: &SourceId) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let pick = |explicit: &Option<PathBuf>, name: String| -> Result<PathBuf> {
            match (explicit, &self.tls_dir) {
                (Some(path), _) => Ok(path.clone()),
                (None, Some(dir)) => Ok(dir.join(name)),
                (None, None) => bail!("give --tls-dir, or --ca, --cert and --key"),
            }
        };
        Ok((
            pick(&self.ca, "ca.crt".into())?,
            pick(&self.cert, format!("{source}.crt"))?,
            pick(&self.key, format!("{source}.key"))?,
        ))
    }
}

/// Where the admin API is, and how to print its answers.
#[derive(Debug, Args)]
pub(crate) struct AdminArgs {
    /// Address of the server's admin API (its --admin-listen).
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub(crate) admin: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// Snapshot a source's current committed replica (O(1): no data is copied).
    Create {
        /// Source to snapshot (its newest committed point).
        #[arg(long, required_unless_present = "launch")]
        source: Option<String>,
        /// Snapshot this launch instead: what clients wrote to it, all its
        /// volumes at one instant (writes wait for the moment it takes),
        /// kept as a snapshot of its source that can be launched, exported
        /// and failed back from.
        #[arg(long)]
        launch: Option<String>,
        /// Name (default: generated from the epoch and time).
        #[arg(long)]
        name: Option<String>,
        /// Expire the snapshot after this long, e.g. 7d, 12h (default: never).
        #[arg(long, value_parser = units::parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List snapshots.
    List {
        /// Only this source's snapshots.
        #[arg(long)]
        source: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a snapshot (launches made from it keep working).
    Delete {
        #[arg(long)]
        source: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum LaunchCommand {
    /// Make a writable launch volume from a snapshot; it is served over NBD under its name.
    Create {
        /// Source whose snapshot is launched.
        #[arg(long)]
        source: String,
        /// Snapshot to launch from.
        #[arg(long)]
        snapshot: String,
        /// Name of the launch (and of its NBD export).
        #[arg(long)]
        name: String,
        /// What the launch is for.
        #[arg(long, value_enum, default_value_t = LaunchKindArg::Test)]
        kind: LaunchKindArg,
        /// Launch a `live` snapshot anyway (read from the live disk while it
        /// changed: its file system may be torn). Refused without it.
        #[arg(long)]
        allow_live: bool,
        /// Delete the launch after this long (a drill: `30m`, `2h`); its NBD
        /// clients are disconnected first. Default: the server's
        /// --test-launch-ttl for a test launch, else never.
        #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
        ttl: Option<Duration>,
        /// A standby (`--kind standby`) that moves to every new committed
        /// point of its source while it is unwritten and no client has it
        /// open, so a failover to it needs no copy; its first write stops
        /// the following, and it keeps its data.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        checks: Box<LaunchCheckArgs>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List launch volumes.
    List {
        #[arg(long)]
        source: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a launch volume and its writes.
    Delete {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Fold what clients wrote to a launch into the store now, and move its
    /// head there (the server also does this in the background, every
    /// --launch-fold-interval). Writes are durable at each flush either way;
    /// a fold makes them part of the launch's root, for tools that read the
    /// store without a server.
    Fold {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Copy a launch volume whole to a file or block device on the server
    /// while it stays served and written (a background copy, plus every
    /// read of a part not copied yet); once complete, the volume is served
    /// from that file and no read touches the store. A stopped server
    /// resumes the copy where it was. The launch keeps folding into the
    /// store, so failback and finalize work as before. Waits for the copy,
    /// showing its progress, unless --no-wait.
    Materialize {
        #[arg(long)]
        name: String,
        /// A new file in the server's --launch-materialize-dir (a name, or a
        /// path under it; created owner-only), or a link there to a block
        /// device at least the volume's size.
        #[arg(long, value_name = "PATH")]
        to: String,
        /// The volume of a machine's launch.
        #[arg(long)]
        volume: Option<String>,
        /// Return once the copy has started.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Checks run on a launch once it is served (post-launch actions). They run
/// here, where this command runs, with its tools and privileges, and report
/// to the server, which keeps each result with the launch; when every check
/// of a test launch passes, its source becomes `ready_for_cutover`.
#[derive(Debug, Clone, Args)]
pub(crate) struct LaunchCheckArgs {
    /// Run CMD (with `sh -c`) with the launch in its environment:
    /// BLOCKREP_NBD_URL (the export; the first volume's for a machine),
    /// BLOCKREP_NBD_URLS (`VOLUME URL` lines), BLOCKREP_LAUNCH,
    /// BLOCKREP_SOURCE. Exit status 0 passes. Repeatable.
    #[arg(long = "check", value_name = "CMD")]
    pub(crate) commands: Vec<String>,
    /// Check the launch's file systems read through NBD, changing nothing:
    /// `e2fsck -fn` (ext2/3/4) or `xfs_repair -n` (XFS), on the whole disk
    /// or each partition.
    #[arg(long)]
    pub(crate) check_fs: bool,
    /// Boot the launch in QEMU (KVM when it can, else TCG) from its NBD
    /// export, with --boot-kernel and --boot-initrd, and pass when a line of
    /// the serial console contains --boot-expect.
    #[arg(long, requires = "boot_expect")]
    pub(crate) check_boot: bool,
    /// The kernel --check-boot boots (default: BLOCKREP_DRILL_KERNEL, else
    /// /var/lib/blockrep/drill/vmlinux, or vmlinuz where there is no
    /// vmlinux, as `scripts/drill-kernel.sh` makes them).
    #[arg(long, value_name = "PATH")]
    pub(crate) boot_kernel: Option<PathBuf>,
    /// The initrd --check-boot boots (default: BLOCKREP_DRILL_INITRD, else
    /// /var/lib/blockrep/drill/initrd.img).
    #[arg(long, value_name = "PATH")]
    pub(crate) boot_initrd: Option<PathBuf>,
    /// Text a serial console line must contain for the boot to pass.
    #[arg(long, value_name = "TEXT", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub(crate) boot_expect: Option<String>,
    /// Kernel command line of --check-boot.
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "console=ttyS0 root=/dev/vda ro panic=-1 quiet"
    )]
    pub(crate) boot_append: String,
    /// How long a boot may take to print --boot-expect.
    #[arg(long, default_value = "5m", value_parser = units::parse_duration)]
    pub(crate) boot_timeout: Duration,
    /// The accelerator of --check-boot: `auto` tries KVM where /dev/kvm
    /// exists and boots again under TCG when KVM prints nothing for 15 s
    /// (a KVM that opens but cannot run the kernel); `kvm` or `tcg` only.
    #[arg(long, value_enum, default_value_t = BootAccel::Auto)]
    pub(crate) boot_accel: BootAccel,
    /// How long any other check may run before it is killed (and fails).
    #[arg(long, default_value = "10m", value_parser = units::parse_duration)]
    pub(crate) check_timeout: Duration,
    /// The checks must pass: until they do, the source cannot be marked
    /// ready or cut over without --force.
    #[arg(long)]
    pub(crate) must_succeed: bool,
}

impl LaunchCheckArgs {
    /// The names the checks report under, in the order they run.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.check_fs {
            names.push("fs".to_owned());
        }
        if self.check_boot {
            names.push("boot".to_owned());
        }
        for index in 0..self.commands.len() {
            names.push(format!("cmd{}", index + 1));
        }
        names
    }
}

/// The accelerator a boot check runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BootAccel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LaunchKindArg {
    /// A test launch (a drill).
    Test,
    /// A warm standby for disaster recovery (see --follow).
    Standby,
    /// The cutover launch.
    Cutover,
}

#[derive(Debug, Args)]
pub(crate) struct CutoverArgs {
    /// Source to cut over.
    #[arg(long)]
    pub(crate) source: String,
    /// Lift the fence of a cut-over source so that it may replicate again
    /// (its migration goes back to `ready_for_cutover`).
    #[arg(long)]
    pub(crate) reset: bool,
    /// Cut over a source that has not passed its test (`ready_for_test` or
    /// `testing`), or whose must-succeed launch checks fail; recorded in
    /// its history as forced.
    #[arg(long, conflicts_with = "reset")]
    pub(crate) force: bool,
    /// Return once the request is accepted instead of waiting for the cutover.
    #[arg(long)]
    pub(crate) no_wait: bool,
    /// How long to wait for the agent to finish the cutover.
    #[arg(long, default_value = "10m", value_parser = units::parse_duration)]
    pub(crate) timeout: Duration,
    #[command(flatten)]
    pub(crate) admin: AdminArgs,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct FailbackArgs {
    #[command(subcommand)]
    pub(crate) command: Option<FailbackCommand>,
    /// The original disk to bring back (raw image file or block device).
    /// Repeat it for each disk of a machine, as given to the agent
    /// (`NAME=PATH`): each takes the content of the launch's volume of its
    /// name, and changes since cutover on any of them are reported together
    /// before anything is written.
    #[arg(long, value_name = "[NAME=]PATH")]
    pub(crate) disk: Vec<String>,
    /// Replication server, host:port.
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// The source id (its certificate is used, as for the agent).
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// Launch volume whose content the disk takes (e.g. the cutover launch).
    #[arg(long)]
    pub(crate) launch: Option<String>,
    #[command(flatten)]
    pub(crate) tls: ClientTls,
    /// One pass, then finish (the source becomes failed_back).
    #[arg(long)]
    pub(crate) once: bool,
    /// Same as --once: a final pass that finishes the failback.
    #[arg(long)]
    pub(crate) finalize: bool,
    /// Replace chunks changed on the disk since cutover (otherwise failback stops
    /// and reports them before writing anything).
    #[arg(long)]
    pub(crate) overwrite_source_changes: bool,
    /// Time between passes of reverse replication (without --once).
    #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
    pub(crate) interval: Duration,
    /// Chunk size of the replica.
    #[arg(long, default_value = "64KiB", value_parser = units::parse_size)]
    pub(crate) chunk_size: u64,
    /// Receive whole chunks. By default the server may send a chunk as the
    /// 4 KiB blocks that differ from what the disk holds (a patch), checked
    /// against the target's id before it is written.
    #[arg(long)]
    pub(crate) no_patches: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum FailbackCommand {
    /// Ask a running failback to make its final pass and finish (admin API).
    Complete {
        #[arg(long)]
        source: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Address of the server's admin API.
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub(crate) admin: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also archived sources (hidden by default).
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// Data directory of the server's store (with --store: a working copy
    /// of the bucket, not a running server's).
    #[arg(long)]
    pub(crate) data: PathBuf,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) keys: KeyDirArgs,
    /// Source to export.
    #[arg(long, required_unless_present = "root", conflicts_with = "root")]
    pub(crate) source: Option<String>,
    /// Export this snapshot of the source instead of its committed head.
    #[arg(long, requires = "source")]
    pub(crate) snapshot: Option<String>,
    /// Export the disk of this root (64 hex digits) instead: any root the store
    /// holds, e.g. one an agent's --ack-log names, not only heads and snapshots.
    /// Roots that are no head's, snapshot's or launch's are kept until GC
    /// collects them (servers run with `--gc-interval off` keep them all).
    #[arg(long, value_name = "HEX")]
    pub(crate) root: Option<String>,
    /// Export only this volume of a machine (a source of several disks).
    /// Without it, a machine of several volumes is exported whole into the
    /// directory --out, one image per volume (VOLUME.raw).
    #[arg(long, value_name = "NAME")]
    pub(crate) volume: Option<String>,
    /// Output image, written mode 0600 under a temporary name beside it and
    /// renamed into place: a failed export leaves no file, and an existing
    /// file is replaced only by a complete image (a symbolic link or device
    /// there is refused). For a machine of several volumes and no --volume, a
    /// directory (created if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    /// Data directory: collect offline (the server must not be running unless
    /// --dry-run, which only reads).
    #[arg(long, conflicts_with = "admin")]
    pub(crate) data: Option<PathBuf>,
    /// With --data, the keys of its encrypted sources (a collection must
    /// read every source's pages to know what they still reference).
    #[command(flatten)]
    pub(crate) keys: KeyDirArgs,
    /// A running server's admin API: collect there, while it replicates.
    #[arg(long)]
    pub(crate) admin: Option<String>,
    /// Report what would be freed; change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Data directory (read only; works while the server runs). With
    /// --store: a working copy of the bucket, not a running server's.
    #[arg(long)]
    pub(crate) data: PathBuf,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) keys: KeyDirArgs,
    /// Only this source's head, snapshots and launches.
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// Only this snapshot (needs --source).
    #[arg(long, requires = "source")]
    pub(crate) snapshot: Option<String>,
}

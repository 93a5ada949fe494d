//! `blockrep`: continuous block-level disk replication over mutual TLS.
//!
//! The binary only parses arguments, calls into the library crates and decides
//! the exit code: 0 on success, 1 on failure, 2 on a usage error.
#![forbid(unsafe_code)]

mod admin_client;
mod agent_serve;
mod bench;
mod bench_capture;
mod bench_delta;
mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use blockrep_agent::{AgentConfig, Compression, EpochReport};
use blockrep_core::SourceId;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Continuous block-level replication of whole disks over mutual TLS.
///
/// An agent beside a source disk finds changed chunks by blake3 hashing and
/// streams them to a replication server, which keeps a verified, durable replica
/// of every source.
#[derive(Debug, Parser)]
#[command(name = "blockrep", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Reach the admin API over mutual TLS (a server run with --admin-tls),
    /// with ca.crt, admin.crt and admin.key from this directory.
    #[arg(long, global = true, env = "BLOCKREP_ADMIN_TLS_DIR")]
    admin_tls_dir: Option<PathBuf>,
    /// The admin API's bearer token file. `server` reads it (default
    /// TLS_DIR/admin.token, written 0600 if missing); admin commands send it
    /// (default: tls/admin.token, else /etc/blockrep/tls/admin.token).
    #[arg(
        long,
        global = true,
        env = "BLOCKREP_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    admin_token: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
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
    /// Issue a client certificate for a source (ID.crt, ID.key) or the admin.
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
struct ClientTls {
    /// Directory with ca.crt, ID.crt and ID.key.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// CA certificate (default: TLS_DIR/ca.crt).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (default: TLS_DIR/ID.crt).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (default: TLS_DIR/ID.key).
    #[arg(long)]
    key: Option<PathBuf>,
}

impl ClientTls {
    fn resolve(&self, source: &SourceId) -> Result<(PathBuf, PathBuf, PathBuf)> {
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

#[derive(Debug, Args)]
struct ServerArgs {
    /// Address of the replication listener.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Data directory of the replica store (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Directory with ca.crt, server.crt and server.key.
    #[arg(long)]
    tls_dir: PathBuf,
    /// Most connections open at once.
    #[arg(long, default_value_t = 1024)]
    connections_max: usize,
    /// Most of those one peer address (IPv6: one /64) may hold; a connection
    /// over it is closed at once, before any TLS work. Raise it when many
    /// sources reach the server through one NAT address.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    connections_per_address: u32,
    /// Most memory all sessions together hold for their disks' chunk ids (about
    /// 160 bytes per chunk: 2.5 GiB for a 1 TiB disk at 64 KiB chunks); a session
    /// whose disk does not fit is refused (busy if it would fit later).
    #[arg(long, default_value = "9GiB", value_parser = units::parse_size)]
    session_memory_max: u64,
    /// Most of --session-memory-max one session may reserve, so that one
    /// source cannot take the memory the others need. A disk that needs more
    /// is refused: raise this, or replicate it in larger chunks.
    #[arg(long, default_value = "3GiB", value_parser = units::parse_size)]
    session_memory_per_source_max: u64,
    /// Most bytes of pages or chunks a session reads from the store before it
    /// writes them to the agent (page fetches and failback).
    #[arg(long, default_value = "4MiB", value_parser = units::parse_size)]
    session_send_buffer_max: u64,
    /// Time a connection has to finish its TLS handshake and say Hello.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    handshake_timeout: Duration,
    /// A session that receives no frame from its agent for this long is
    /// closed, freeing the source for the agent's next connection. Continuous
    /// agents send at least one frame per --interval, but nothing while they
    /// scan: keep it above the longest scan of the largest disk.
    #[arg(long, default_value = "5m", value_parser = units::parse_duration)]
    idle_timeout: Duration,
    /// A new connection of a source whose session in progress has received
    /// nothing for this long replaces that session (its agent has most likely
    /// given up on a dead path and is the one reconnecting); a session still
    /// talking keeps the source, and the newcomer is refused as busy.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    supersede_after: Duration,
    /// Refuse client certificates revoked by this list (PEM, e.g. the crl.pem
    /// that `blockrep cert revoke` writes), on every listener. The file is
    /// reloaded when it changes and on SIGHUP: new handshakes use the new list
    /// at once, and open sessions of certificates it revokes end. A list that
    /// does not load (torn, garbage, another CA's) is logged and the list in
    /// force stays in force.
    #[arg(long)]
    crl: Option<PathBuf>,
    /// How often the --crl file is checked for a change.
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    crl_poll_interval: Duration,
    /// Serve the admin API over mutual TLS instead of plain HTTP: only the admin
    /// certificate (`blockrep cert issue --admin`) is let in; source
    /// certificates get 403. Clients: `blockrep --admin-tls-dir DIR status ...`.
    #[arg(long)]
    admin_tls: bool,
    /// Address of the admin HTTP API (JSON under /v1/, /health, /metrics). Keep
    /// it on loopback unless it is otherwise protected. Everything but reading
    /// /health and /metrics needs the admin token (--admin-token) or, with
    /// --admin-tls, the admin certificate.
    #[arg(long, default_value = "127.0.0.1:7444")]
    admin_listen: SocketAddr,
    /// A name (or address) the admin API may be reached by, besides localhost,
    /// loopback addresses and the --admin-listen address (repeatable). Requests
    /// naming any other Host are refused (DNS rebinding).
    #[arg(long = "admin-host", value_name = "NAME")]
    admin_hosts: Vec<String>,
    /// A source whose replication lag exceeds this is `lagging`, and breaches
    /// its RPO. Per source: PUT /v1/sources/ID/rpo-target (kept in memory).
    #[arg(long, default_value = "15m", value_parser = units::parse_duration)]
    rpo_target: Duration,
    /// Command run with `sh -c` once when a source's lag crosses above its RPO
    /// target and once when it is back under it. Environment: BLOCKREP_EVENT
    /// (breach or recovered), BLOCKREP_SOURCE, BLOCKREP_LAG_SECONDS,
    /// BLOCKREP_RPO_TARGET_SECONDS.
    #[arg(long, value_name = "CMD")]
    on_rpo_breach: Option<String>,
    /// How often every source's lag is compared with its RPO target.
    #[arg(long, default_value = "500ms", value_parser = units::parse_duration)]
    alert_interval: Duration,
    /// How often garbage collection runs in the background (`off` for never;
    /// `blockrep gc` runs it on demand).
    #[arg(long, default_value = "10m")]
    gc_interval: String,
    /// Pack size limit in bytes (for tests of compaction; default 256 MiB).
    #[arg(long, hide = true, value_parser = units::parse_size)]
    pack_size_max: Option<u64>,
    /// A source with no agent contact for this long is `stalled`.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration)]
    stall_after: Duration,
    /// Serve launch volumes over NBD on this address (e.g. 127.0.0.1:10809).
    /// Without --nbd-tls only a loopback address is accepted, and every local
    /// user can open every launch.
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// Require TLS on the NBD listener (STARTTLS, a client certificate of the
    /// same CA): a launch opens only for its own source's certificate and the
    /// admin certificate, and a client sees only those launches.
    #[arg(long)]
    nbd_tls: bool,
    /// An NBD connection with no request for this long is closed. Raise it for
    /// a VM whose disk may stay quiet longer (or let its client reconnect).
    #[arg(long, default_value = "10m", value_parser = units::parse_duration)]
    nbd_idle_timeout: Duration,
    /// Most NBD connections open at once; further clients wait.
    #[arg(long, default_value_t = blockrep_server::NBD_CONNECTIONS_MAX_DEFAULT)]
    nbd_connections_max: usize,
    /// Most NBD connections open at once from one address (IPv6: one /64);
    /// further ones are closed at once. Keep it below --nbd-connections-max so
    /// that one address cannot hold every slot.
    #[arg(long, default_value_t = blockrep_server::NBD_CONNECTIONS_PER_ADDRESS_MAX_DEFAULT)]
    nbd_connections_per_address: usize,
    /// Automatic snapshots: EVERY:KEEP tiers, or `off`. The default follows AWS
    /// DRS: every 10 minutes kept 1 hour, hourly kept 24 hours, daily kept 7 days.
    #[arg(long)]
    retention: Option<String>,
    /// How often automatic snapshots and expiry are considered.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    retention_tick: Duration,
    /// Settings file (`key = value` lines); known key: `retention`. Command-line
    /// flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Where the admin API is, and how to print its answers.
#[derive(Debug, Args)]
struct AdminArgs {
    /// Address of the server's admin API (its --admin-listen).
    #[arg(long, default_value = "127.0.0.1:7444")]
    admin: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Snapshot a source's current committed replica (O(1): no data is copied).
    Create {
        /// Source to snapshot.
        #[arg(long)]
        source: String,
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
enum LaunchCommand {
    /// Make a writable launch volume from a snapshot; it is served over NBD under its name.
    Create {
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
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LaunchKindArg {
    /// A test launch (a drill).
    Test,
    /// The cutover launch.
    Cutover,
}

#[derive(Debug, Args)]
struct CutoverArgs {
    /// Source to cut over.
    #[arg(long)]
    source: String,
    /// Lift the fence of a cut-over source so that it may replicate again.
    #[arg(long)]
    reset: bool,
    /// Return once the request is accepted instead of waiting for the cutover.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the agent to finish the cutover.
    #[arg(long, default_value = "10m", value_parser = units::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct FailbackArgs {
    #[command(subcommand)]
    command: Option<FailbackCommand>,
    /// The original disk to bring back (raw image file or block device).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Replication server, host:port.
    #[arg(long)]
    from: Option<String>,
    /// The source id (its certificate is used, as for the agent).
    #[arg(long)]
    source: Option<String>,
    /// Launch volume whose content the disk takes (e.g. the cutover launch).
    #[arg(long)]
    launch: Option<String>,
    #[command(flatten)]
    tls: ClientTls,
    /// One pass, then finish (the source becomes failed_back).
    #[arg(long)]
    once: bool,
    /// Same as --once: a final pass that finishes the failback.
    #[arg(long)]
    finalize: bool,
    /// Replace chunks changed on the disk since cutover (otherwise failback stops
    /// and reports them before writing anything).
    #[arg(long)]
    overwrite_source_changes: bool,
    /// Time between passes of reverse replication (without --once).
    #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
    interval: Duration,
    /// Chunk size of the replica.
    #[arg(long, default_value = "64KiB", value_parser = units::parse_size)]
    chunk_size: u64,
    /// Receive whole chunks. By default the server may send a chunk as the
    /// 4 KiB blocks that differ from what the disk holds (a patch), checked
    /// against the target's id before it is written.
    #[arg(long)]
    no_patches: bool,
}

#[derive(Debug, Subcommand)]
enum FailbackCommand {
    /// Ask a running failback to make its final pass and finish (admin API).
    Complete {
        #[arg(long)]
        source: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Address of the server's admin API.
    #[arg(long, default_value = "127.0.0.1:7444")]
    admin: String,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Source disk: a raw image file or a block device.
    #[arg(long)]
    disk: PathBuf,
    /// Replication server, host:port.
    #[arg(long)]
    to: String,
    /// This source's id (must match its certificate).
    #[arg(long)]
    source: String,
    #[command(flatten)]
    tls: ClientTls,
    /// Sync until the replica equals the disk, then exit.
    #[arg(long)]
    once: bool,
    /// Chunk size of a new replica: a power of two from 4KiB to 4MiB.
    #[arg(long, default_value = "64KiB", value_parser = units::parse_size)]
    chunk_size: u64,
    /// Time from the start of one scan to the next, in continuous mode.
    #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
    interval: Duration,
    /// Compression of changed chunks.
    #[arg(long, value_enum, default_value_t = CompressArg::Auto)]
    compress: CompressArg,
    /// Cap on the sending rate, e.g. 100MiB/s, 800Mbit/s, unlimited.
    #[arg(long, default_value = "unlimited", value_parser = blockrep_agent::parse_rate)]
    max_rate: u64,
    /// Settings file re-read on SIGHUP, so the rate changes without restarting
    /// replication. Lines of `key = value`; known key: `max-rate`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A large epoch (e.g. the initial sync) commits an intermediate step after
    /// this much data, so a crash loses at most one step.
    #[arg(long, default_value = "1GiB", value_parser = units::parse_size)]
    commit_every: u64,
    /// ...or after this long, whichever comes first.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    commit_interval: Duration,
    /// A connect or TLS handshake that takes longer, or a session on which no
    /// byte moves either way for this long, drops the connection, and the
    /// agent reconnects: a silently dead path (no reset, no data) is noticed.
    /// A slow path that still moves is not dropped: the server reports its
    /// progress every second while frames arrive. At least 2s.
    #[arg(long, default_value = "60s", value_parser = parse_io_timeout)]
    io_timeout: Duration,
    /// Cut over once caught up: run --pre-cutover-cmd, a final sync, and exit
    /// with the cutover launch ready.
    #[arg(long)]
    cutover: bool,
    /// Command that stops the workload before the final sync of a cutover (run
    /// with `sh -c`); its end starts the downtime clock.
    #[arg(long)]
    pre_cutover_cmd: Option<String>,
    /// Append one line per commit the server acknowledged to FILE:
    /// `epoch=N root=HEX complete=true|false unix_ms=N scan_started_unix_ms=N`
    /// (complete=false for an intermediate step of a large epoch; an idle epoch
    /// repeats the head's epoch and root; scan_started_unix_ms is the point in
    /// time the root holds: when the disk's view was taken). Each line is written after the server made the commit
    /// durable, so every root listed stays exportable with `blockrep export
    /// --root` until GC collects it. Written and flushed, not fsynced; kept
    /// across runs.
    #[arg(long, value_name = "FILE")]
    ack_log: Option<PathBuf>,
    /// Send whole changed chunks. By default a changed chunk travels as the
    /// 4 KiB blocks that differ from the replica's chunk at its index (a
    /// patch) where that is smaller.
    #[arg(long)]
    no_patches: bool,
    #[command(flatten)]
    view: ViewArgs,
    #[command(flatten)]
    capture: agent_serve::CaptureArgs,
}

/// How the agent freezes the disk for each epoch (see docs/architecture.md,
/// "Frozen views").
#[derive(Debug, Args)]
struct ViewArgs {
    /// What each epoch scans and sends. auto: a reflink clone of the image
    /// (XFS, btrfs) where its file system can make one, else the live disk
    /// (warned once at start); reflink: a clone or an error; none: the live
    /// disk, whose recovery points are labelled live (they may be torn).
    #[arg(long, value_enum, default_value_t = SnapshotArg::Auto)]
    snapshot: SnapshotArg,
    /// Command (run with `sh -c`) that makes a frozen view of the disk, e.g. an
    /// LVM snapshot, and prints its path (a file or block device of the disk's
    /// size) as its last line of output. Gets BLOCKREP_DISK and BLOCKREP_SOURCE
    /// in its environment. Replaces --snapshot.
    #[arg(long, value_name = "CMD", conflicts_with = "snapshot")]
    snapshot_cmd: Option<String>,
    /// Command (run with `sh -c`) that removes a view once its epoch is done
    /// with it: after success, failure, or shutdown. Gets BLOCKREP_VIEW (the
    /// path the snapshot command printed) besides BLOCKREP_DISK and
    /// BLOCKREP_SOURCE.
    #[arg(long, value_name = "CMD", requires = "snapshot_cmd")]
    release_cmd: Option<String>,
    /// Command (run with `sh -c`) run just before each view is made, e.g.
    /// `fsfreeze -f /mnt`: points made while it held are labelled quiesced.
    /// Not run for live reads.
    #[arg(long, value_name = "CMD")]
    quiesce_cmd: Option<String>,
    /// Command (run with `sh -c`) run just after each view is made, also when
    /// making it failed, e.g. `fsfreeze -u /mnt`.
    #[arg(long, value_name = "CMD")]
    thaw_cmd: Option<String>,
    /// Longest run of each of the view commands above; one still running then
    /// is killed (with everything it started) and the epoch fails.
    #[arg(long, default_value = "5min", value_parser = units::parse_duration)]
    snapshot_cmd_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SnapshotArg {
    /// A reflink clone where the file system supports it, else a live read.
    Auto,
    /// A reflink clone of the image, or an error.
    Reflink,
    /// Read the live disk (recovery points labelled live).
    None,
}

impl ViewArgs {
    fn options(&self) -> Result<blockrep_agent::ViewOptions> {
        use blockrep_agent::SnapshotMode;
        let mode = match (&self.snapshot_cmd, self.snapshot) {
            (Some(command), _) => SnapshotMode::Command {
                snapshot_cmd: command.clone(),
                release_cmd: self.release_cmd.clone(),
            },
            (None, SnapshotArg::Auto) => SnapshotMode::Auto,
            (None, SnapshotArg::Reflink) => SnapshotMode::Reflink,
            (None, SnapshotArg::None) => SnapshotMode::None,
        };
        if mode == SnapshotMode::None && (self.quiesce_cmd.is_some() || self.thaw_cmd.is_some()) {
            bail!(
                "--quiesce-cmd and --thaw-cmd run around a view's creation: --snapshot none makes none"
            );
        }
        let mut options = blockrep_agent::ViewOptions::default();
        options.mode = mode;
        options.quiesce_cmd = self.quiesce_cmd.clone();
        options.thaw_cmd = self.thaw_cmd.clone();
        options.command_timeout = Some(self.snapshot_cmd_timeout);
        Ok(options)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressArg {
    /// Compress when it makes replication faster (measured: compression speed
    /// against link speed), e.g. on a WAN link but not on a LAN or loopback.
    Auto,
    /// Always zstd where a chunk shrinks.
    Zstd,
    /// Never compress.
    None,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// Data directory of the server's store.
    #[arg(long)]
    data: PathBuf,
    /// Source to export.
    #[arg(long, required_unless_present = "root", conflicts_with = "root")]
    source: Option<String>,
    /// Export this snapshot of the source instead of its committed head.
    #[arg(long, requires = "source")]
    snapshot: Option<String>,
    /// Export the disk of this root (64 hex digits) instead: any root the store
    /// holds, e.g. one an agent's --ack-log names, not only heads and snapshots.
    /// Roots that are no head's, snapshot's or launch's are kept until GC
    /// collects them (servers run with `--gc-interval off` keep them all).
    #[arg(long, value_name = "HEX")]
    root: Option<String>,
    /// Output image, written mode 0600 under a temporary name beside it and
    /// renamed into place: a failed export leaves no file, and an existing
    /// file is replaced only by a complete image (a symbolic link or device
    /// there is refused).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct GcArgs {
    /// Data directory: collect offline (the server must not be running unless
    /// --dry-run, which only reads).
    #[arg(long, conflicts_with = "admin")]
    data: Option<PathBuf>,
    /// A running server's admin API: collect there, while it replicates.
    #[arg(long)]
    admin: Option<String>,
    /// Report what would be freed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// Data directory (read only; works while the server runs).
    #[arg(long)]
    data: PathBuf,
    /// Only this source's head, snapshots and launches.
    #[arg(long)]
    source: Option<String>,
    /// Only this snapshot (needs --source).
    #[arg(long, requires = "source")]
    snapshot: Option<String>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    admin_client::set_tls_dir(cli.admin_tls_dir.clone());
    admin_client::set_token_file(cli.admin_token.clone());
    let result = match cli.command {
        Command::Cert(command) => cert(command),
        Command::Server(args) => {
            runtime().and_then(|rt| rt.block_on(server(args, cli.admin_token)))
        }
        Command::Agent(args) => runtime().and_then(|rt| rt.block_on(agent(args))),
        Command::Export(args) => export(args),
        Command::Gc(args) => runtime().and_then(|rt| rt.block_on(gc(args))),
        Command::Verify(args) => verify(args),
        Command::Status(args) => runtime().and_then(|rt| rt.block_on(status(args))),
        Command::Snapshot(command) => runtime().and_then(|rt| rt.block_on(snapshot(command))),
        Command::Launch(command) => runtime().and_then(|rt| rt.block_on(launch(command))),
        Command::Cutover(args) => runtime().and_then(|rt| rt.block_on(cutover(args))),
        Command::Failback(args) => runtime().and_then(|rt| rt.block_on(failback(args))),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(bench::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("blockrep: error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message
/// before it already carries (library errors name their cause in their message).
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal; files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn source_id(text: &str) -> Result<SourceId> {
    SourceId::new(text).map_err(Into::into)
}

fn cert(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Init {
            dir,
            server_names,
            force,
        } => {
            blockrep_pki::init_ca(&dir, &server_names, force)?;
            println!(
                "wrote {0}/ca.crt, {0}/ca.key, {0}/server.crt, {0}/server.key (server names: {1})",
                dir.display(),
                server_names.join(", ")
            );
        }
        CertCommand::Issue {
            dir,
            source,
            admin,
            tenant,
        } => {
            let (cert, key) = if admin {
                blockrep_pki::issue_admin(&dir)?
            } else {
                let source = source_id(source.as_deref().unwrap_or_default())?;
                let tenant = tenant.as_deref().map(source_id).transpose()?;
                blockrep_pki::issue_source_in_tenant(&dir, &source, tenant.as_ref())?
            };
            println!("wrote {} and {}", cert.display(), key.display());
        }
        CertCommand::Revoke {
            dir,
            source,
            admin,
            cert,
        } => {
            let cert = match (cert, admin, source) {
                (Some(path), ..) => path,
                (None, true, _) => dir.join("admin.crt"),
                (None, false, source) => {
                    let source = source_id(source.as_deref().unwrap_or_default())?;
                    dir.join(format!("{source}.crt"))
                }
            };
            let revocation = blockrep_pki::revoke_cert(&dir, &cert)?;
            println!(
                "{} {} (serial {}); {} lists {} revoked certificate(s)",
                if revocation.already_revoked {
                    "already revoked"
                } else {
                    "revoked"
                },
                cert.display(),
                revocation.serial_hex,
                revocation.crl_path.display(),
                revocation.revoked_count
            );
        }
    }
    Ok(())
}

async fn server(args: ServerArgs, admin_token: Option<PathBuf>) -> Result<()> {
    let mut config = blockrep_server::ServerConfig::new(args.listen, args.data, args.tls_dir);
    if let Some(path) = admin_token {
        config.admin_token_path = path;
    }
    config.admin_hosts = args.admin_hosts;
    config.connections_max = args.connections_max;
    config.connections_per_address_max = args.connections_per_address as usize;
    config.handshake_timeout = args.handshake_timeout;
    config.idle_timeout = args.idle_timeout;
    config.supersede_after = args.supersede_after;
    config.session_memory_max_bytes = args.session_memory_max;
    config.session_memory_per_source_max_bytes = args.session_memory_per_source_max;
    config.send_buffer_max_bytes = args.session_send_buffer_max.max(1);
    config.crl_path = args.crl;
    config.crl_poll_interval = args.crl_poll_interval;
    config.admin_tls = args.admin_tls;
    config.admin_listen = Some(args.admin_listen);
    config.rpo_target = args.rpo_target;
    config.stall_after = args.stall_after;
    config.on_rpo_breach = args.on_rpo_breach;
    config.alert_interval = args.alert_interval;
    config.gc_interval = match args.gc_interval.as_str() {
        "off" => None,
        text => Some(units::parse_duration(text).map_err(anyhow::Error::msg)?),
    };
    config.pack_size_max_bytes = args.pack_size_max;
    config.nbd_listen = args.nbd_listen;
    config.nbd_tls = args.nbd_tls;
    config.nbd_idle_timeout = args.nbd_idle_timeout;
    config.nbd_connections_max = args.nbd_connections_max;
    config.nbd_connections_per_address_max = args.nbd_connections_per_address;
    config.retention_tick = args.retention_tick;
    let mut retention = None;
    if let Some(path) = &args.config {
        retention = server_settings(path)?;
    }
    if let Some(spec) = &args.retention {
        retention = Some(spec.clone());
    }
    if let Some(spec) = retention {
        config.retention = units::parse_retention(&spec).map_err(anyhow::Error::msg)?;
    }
    let server = blockrep_server::Server::bind(config).await?;
    // Tests and scripts read this line to find ephemeral ports.
    let off = || "off".to_owned();
    let admin = server.admin_addr().map_or_else(off, |a| a.to_string());
    let nbd = server.nbd_addr().map_or_else(off, |a| a.to_string());
    println!(
        "listening on {} admin {admin} nbd {nbd}",
        server.local_addr()?
    );
    use std::io::Write as _;
    std::io::stdout().flush()?;
    server.run(shutdown_signal()).await;
    Ok(())
}

/// Reads the server's settings file; returns the retention spec if set.
fn server_settings(path: &Path) -> Result<Option<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut retention = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("{}:{}: expected key = value", path.display(), number + 1))?;
        match key.trim() {
            "retention" => {
                units::parse_retention(value.trim())
                    .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), number + 1))?;
                retention = Some(value.trim().to_owned());
            }
            other => bail!(
                "{}:{}: unknown setting {other:?} (known: retention)",
                path.display(),
                number + 1
            ),
        }
    }
    Ok(retention)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub(crate) fn print_epoch(report: &EpochReport) {
    let idle =
        report.chunks_sent + report.zero_chunks_sent + report.ref_chunks_sent + report.patches_sent
            == 0;
    if idle {
        tracing::debug!(
            epoch = report.epoch,
            scan_ms = report.scan_duration.as_millis() as u64,
            "idle epoch: disk unchanged"
        );
        return;
    }
    tracing::info!(
        epoch = report.epoch, root = %report.root, chunks_sent = report.chunks_sent,
        zero_chunks_sent = report.zero_chunks_sent, ref_chunks_sent = report.ref_chunks_sent,
        patches_sent = report.patches_sent, bytes_sent = report.bytes_sent,
        scan_ms = report.scan_duration.as_millis() as u64,
        transfer_ms = report.transfer_duration.as_millis() as u64,
        consistency = report.consistency.as_str(), "epoch committed"
    );
    println!(
        "epoch {} committed root={} chunks_sent={} zero_chunks_sent={} ref_chunks_sent={} bytes_sent={} \
         raw_bytes_sent={} patches_sent={} patch_bytes_sent={} block_values_bytes_received={} \
         server_chunks_received={} server_chunks_stored={} scan_ms={} transfer_ms={} consistency={}",
        report.epoch,
        report.root,
        report.chunks_sent,
        report.zero_chunks_sent,
        report.ref_chunks_sent,
        report.bytes_sent,
        report.raw_bytes_sent,
        report.patches_sent,
        report.patch_bytes_sent,
        report.block_values_bytes_received,
        report.server_chunks_received,
        report.server_chunks_stored,
        report.scan_duration.as_millis(),
        report.transfer_duration.as_millis(),
        report.consistency.as_str(),
    );
}

fn agent_config(args: &AgentArgs) -> Result<AgentConfig> {
    let source = source_id(&args.source)?;
    let (ca_path, cert_path, key_path) = args.tls.resolve(&source)?;
    let chunk_size_bytes = u32::try_from(args.chunk_size).context("chunk size too large")?;
    blockrep_core::Geometry::new(0, chunk_size_bytes)?;
    let mut config = AgentConfig::new(
        args.disk.clone(),
        args.to.clone(),
        source,
        ca_path,
        cert_path,
        key_path,
    );
    config.chunk_size_bytes = chunk_size_bytes;
    config.compression = match args.compress {
        CompressArg::Auto => Compression::Auto,
        CompressArg::Zstd => Compression::Zstd,
        CompressArg::None => Compression::None,
    };
    config.interval = args.interval;
    config.rate_limiter.set_rate(args.max_rate);
    config.step_bytes = args.commit_every.max(1);
    config.step_interval = args.commit_interval;
    config.io_timeout = args.io_timeout;
    config.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    config.cutover = args.cutover;
    config.pre_cutover_cmd = args.pre_cutover_cmd.clone();
    config.view = args.view.options()?;
    config.patches = !args.no_patches;
    if let Some(path) = &args.ack_log {
        let log = blockrep_agent::AckLog::open(path)
            .with_context(|| format!("cannot open the acknowledgement log {}", path.display()))?;
        config.ack_log = Some(std::sync::Arc::new(log));
    }
    if let Some(path) = &args.config {
        apply_agent_settings(path, &config)?;
    }
    Ok(config)
}

/// Reads `key = value` settings (`#` comments) and applies those that may change
/// while replication runs.
fn apply_agent_settings(path: &Path, config: &AgentConfig) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("{}:{}: expected key = value", path.display(), number + 1))?;
        match key.trim() {
            "max-rate" | "max_rate" => {
                let rate = blockrep_agent::parse_rate(value.trim()).map_err(anyhow::Error::msg)?;
                config.rate_limiter.set_rate(rate);
                tracing::info!(bytes_per_second = rate, "max rate set");
            }
            other => bail!(
                "{}:{}: unknown setting {other:?} (known: max-rate)",
                path.display(),
                number + 1
            ),
        }
    }
    Ok(())
}

async fn agent(args: AgentArgs) -> Result<()> {
    let mut config = agent_config(&args)?;
    // Capture mode serves the disk before anything else, whatever the link does.
    let served = agent_serve::start(&args.capture, &mut config).await?;
    if let Some(path) = args.config.clone() {
        let rate_config = config.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                return;
            };
            while hangups.recv().await.is_some() {
                if let Err(error) = apply_agent_settings(&path, &rate_config) {
                    tracing::warn!(error = %describe(&error), "settings not reloaded");
                }
            }
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let result = replicate(&args, &config, stop_rx).await;
    if let Some(served) = served {
        served.finish().await?;
    }
    result
}

async fn replicate(
    args: &AgentArgs,
    config: &AgentConfig,
    stop_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    if args.once {
        let outcome = blockrep_agent::run_once_until(config, stop_rx, print_epoch).await?;
        match (&outcome.cutover, outcome.epochs.last()) {
            (Some(cutover), _) => print_cutover(cutover),
            (None, Some(last)) => println!(
                "replica equals disk: epoch {} root={}",
                last.epoch, last.root
            ),
            (None, None) => println!("replica already equals disk"),
        }
        return Ok(());
    }
    if let Some(cutover) = blockrep_agent::run(config, stop_rx, print_epoch).await? {
        print_cutover(&cutover);
    }
    Ok(())
}

fn print_cutover(report: &blockrep_agent::CutoverReport) {
    let ms = |d: Duration| d.as_millis();
    println!(
        "cutover complete: epoch {} root={} launch={} snapshot={} consistency={}",
        report.epoch,
        report.root,
        report.launch,
        report.snapshot,
        report.consistency.as_str()
    );
    println!(
        "downtime_ms={} final_scan_ms={} transfer_ms={} commit_ms={} launch_ready_ms={} pre_cutover_cmd_ms={} \
         chunks_sent={} bytes_sent={}",
        ms(report.downtime),
        ms(report.scan),
        ms(report.transfer),
        ms(report.commit),
        ms(report.launch_ready),
        ms(report.hook),
        report.chunks_sent,
        report.bytes_sent
    );
}

async fn cutover(args: CutoverArgs) -> Result<()> {
    let admin = &args.admin.admin;
    if args.reset {
        let path = format!("/v1/sources/{}/reset", args.source);
        return args
            .admin
            .show("POST", &path, None, |_: serde_json::Value| {
                println!("source {} reset: replication allowed again", args.source);
            })
            .await;
    }
    admin_call(
        admin,
        "POST",
        &format!("/v1/sources/{}/cutover", args.source),
        None,
    )
    .await?;
    if args.no_wait {
        println!(
            "cutover of {} requested; the agent runs it at its next commit",
            args.source
        );
        return Ok(());
    }
    let deadline = std::time::Instant::now() + args.timeout;
    loop {
        let text = admin_call(admin, "GET", &format!("/v1/sources/{}", args.source), None).await?;
        let view: blockrep_server::SourceView = serde_json::from_str(&text)?;
        if let Some(cutover) = &view.cutover
            && !view.cutover_requested
            && view.state != blockrep_server::SourceState::CuttingOver
        {
            if args.admin.json {
                println!("{text}");
            } else {
                println!(
                    "cutover complete: epoch {} root={} launch={} snapshot={}",
                    cutover.epoch, cutover.root, cutover.launch, cutover.snapshot
                );
                println!(
                    "downtime_ms={} final_scan_ms={} transfer_ms={} commit_ms={} launch_ready_ms={}",
                    cutover.downtime_ms,
                    cutover.scan_ms,
                    cutover.transfer_ms,
                    cutover.commit_ms,
                    cutover.launch_ms
                );
            }
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "the agent of {} has not cut over within {:?} (is it connected?)",
                args.source,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn failback(args: FailbackArgs) -> Result<()> {
    if let Some(FailbackCommand::Complete { source, admin }) = &args.command {
        let path = format!("/v1/sources/{source}/failback/complete");
        return admin
            .show("POST", &path, None, |_: serde_json::Value| {
                println!("failback of {source}: final pass requested");
            })
            .await;
    }
    let need = |value: &Option<String>, flag: &str| {
        value
            .clone()
            .with_context(|| format!("failback needs {flag}"))
    };
    let disk = args.disk.clone().context("failback needs --disk")?;
    let server = need(&args.from, "--from HOST:PORT")?;
    let source = source_id(&need(&args.source, "--source")?)?;
    let launch = need(&args.launch, "--launch")?;
    let (ca_path, cert_path, key_path) = args.tls.resolve(&source)?;
    let mut config = AgentConfig::new(disk, server, source, ca_path, cert_path, key_path);
    config.chunk_size_bytes = u32::try_from(args.chunk_size).context("chunk size too large")?;
    config.interval = args.interval;
    config.patches = !args.no_patches;
    let options = blockrep_agent::FailbackOptions {
        launch,
        once: args.once || args.finalize,
        overwrite_source_changes: args.overwrite_source_changes,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let passes = blockrep_agent::failback(&config, &options, stop_rx, |pass| {
        println!(
            "failback pass: target root={} chunks_written={} bytes_received={} source_changes_overwritten={} finalized={}",
            pass.target_root, pass.chunks_written, pass.bytes_received, pass.source_changes_overwritten, pass.finalized
        );
    })
    .await?;
    if passes.last().is_some_and(|p| p.finalized) {
        println!(
            "failback complete: {} equals launch {}",
            config.disk.display(),
            options.launch
        );
    }
    Ok(())
}

async fn status(args: StatusArgs) -> Result<()> {
    let (code, body) = admin_client::request(&args.admin, "GET", "/v1/sources", None).await?;
    if code != 200 {
        bail!("admin API answered {code}: {body}");
    }
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let sources: Vec<blockrep_server::SourceView> =
        serde_json::from_str(&body).context("unexpected JSON from the admin API")?;
    println!(
        "{:<20} {:<13} {:<7} {:>6} {:<16} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "SOURCE", "STATE", "MODE", "EPOCH", "CONSISTENCY", "LAG", "RPO", "PENDING", "RATE", "AGENT"
    );
    for s in &sources {
        println!(
            "{:<20} {:<13} {:<7} {:>6} {:<16} {:>10} {:>10} {:>12} {:>12} {:>9}",
            s.source,
            s.state.as_str(),
            s.mode.as_str(),
            s.epoch,
            s.consistency.as_deref().unwrap_or("-"),
            s.lag_seconds
                .map_or_else(|| "-".to_owned(), |l| format!("{l:.1}s")),
            format!("{:.0}s", s.rpo_target_seconds),
            human_bytes(s.bytes_pending),
            format!("{}/s", human_bytes(s.throughput_bytes_per_second as u64)),
            if s.connected { "connected" } else { "away" },
        );
    }
    if sources.is_empty() {
        println!("(no sources yet)");
    }
    for s in &sources {
        if let Some(c) = &s.capture {
            println!(
                "{}: capture {} dirty, {} preserved, {} cuts, {} writes, write latency p50 {}us p99 {}us",
                s.source,
                human_bytes(c.dirty_bytes),
                human_bytes(c.preserved_bytes),
                c.cuts,
                c.writes,
                c.write_p50_us,
                c.write_p99_us
            );
        }
    }
    Ok(())
}

/// Calls the admin API; a non-2xx answer becomes an error carrying its message.
async fn admin_call(
    admin: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<String> {
    let body = body.map(|b| b.to_string());
    let (code, text) = admin_client::request(admin, method, path, body.as_deref()).await?;
    if !(200..300).contains(&code) {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(text);
        bail!("{message} (HTTP {code})");
    }
    Ok(text)
}

fn unix_ms_text(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".to_owned();
    }
    let seconds = unix_ms / 1000;
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn print_snapshots(snapshots: &[blockrep_server::SnapshotView]) {
    println!(
        "{:<16} {:<28} {:<8} {:>6} {:<16} {:<21} {:<21}",
        "SOURCE", "NAME", "KIND", "EPOCH", "CONSISTENCY", "CREATED", "EXPIRES"
    );
    for s in snapshots {
        println!(
            "{:<16} {:<28} {:<8} {:>6} {:<16} {:<21} {:<21}",
            s.source,
            s.name,
            s.kind,
            s.epoch,
            s.consistency,
            unix_ms_text(s.created_unix_ms),
            unix_ms_text(s.expires_unix_ms)
        );
    }
}

fn print_launches(launches: &[blockrep_server::LaunchView]) {
    println!(
        "{:<20} {:<16} {:<24} {:<8} {:<16} {:>4} NBD",
        "NAME", "SOURCE", "SNAPSHOT", "KIND", "CONSISTENCY", "GEN"
    );
    for l in launches {
        println!(
            "{:<20} {:<16} {:<24} {:<8} {:<16} {:>4} {}",
            l.name,
            l.source,
            l.snapshot,
            l.kind,
            l.consistency,
            l.generation,
            l.nbd_uri.as_deref().unwrap_or("-")
        );
    }
}

impl AdminArgs {
    /// Calls the admin API and prints the answer: its JSON with `--json`,
    /// otherwise what `human` makes of it.
    async fn show<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        human: impl FnOnce(T),
    ) -> Result<()> {
        let text = admin_call(&self.admin, method, path, body).await?;
        if self.json {
            println!("{text}");
        } else {
            human(serde_json::from_str(&text).context("unexpected JSON from the admin API")?);
        }
        Ok(())
    }
}

/// The admin path of a list, filtered by source when one is given.
fn list_path(base: &str, source: Option<String>) -> String {
    source.map_or_else(|| base.to_owned(), |s| format!("{base}?source={s}"))
}

async fn snapshot(command: SnapshotCommand) -> Result<()> {
    use blockrep_server::SnapshotView;
    match command {
        SnapshotCommand::Create {
            source,
            name,
            ttl,
            admin,
        } => {
            let body = serde_json::json!({ "source": source, "name": name, "ttl_seconds": ttl.map(|t| t.as_secs_f64()) });
            admin
                .show("POST", "/v1/snapshots", Some(body), |v: SnapshotView| {
                    println!(
                        "snapshot {} of {} at epoch {} (root {}, {})",
                        v.name, v.source, v.epoch, v.root, v.consistency
                    );
                })
                .await
        }
        SnapshotCommand::List { source, admin } => {
            let path = list_path("/v1/snapshots", source);
            admin
                .show("GET", &path, None, |list: Vec<SnapshotView>| {
                    print_snapshots(&list)
                })
                .await
        }
        SnapshotCommand::Delete {
            source,
            name,
            admin,
        } => {
            let path = format!("/v1/snapshots/{source}/{name}");
            admin
                .show("DELETE", &path, None, |_: serde_json::Value| {
                    println!("deleted snapshot {name} of {source}");
                })
                .await
        }
    }
}

async fn launch(command: LaunchCommand) -> Result<()> {
    use blockrep_server::LaunchView;
    match command {
        LaunchCommand::Create {
            source,
            snapshot,
            name,
            kind,
            allow_live,
            admin,
        } => {
            let kind = match kind {
                LaunchKindArg::Test => "test",
                LaunchKindArg::Cutover => "cutover",
            };
            let body = serde_json::json!({ "source": source, "snapshot": snapshot, "name": name, "kind": kind, "allow_live": allow_live });
            let text = admin_call(&admin.admin, "POST", "/v1/launches", Some(body)).await?;
            let v: LaunchView =
                serde_json::from_str(&text).context("unexpected JSON from the admin API")?;
            if admin.json {
                println!("{text}");
            } else {
                let served = v
                    .nbd_uri
                    .as_deref()
                    .unwrap_or("(the server has no NBD listener)");
                println!(
                    "launch {} of {} from snapshot {} ({}): {served}",
                    v.name, v.source, v.snapshot, v.consistency
                );
            }
            if v.consistency == "live" {
                // On stderr, so that --json output stays one JSON document.
                eprintln!(
                    "warning: launch {} is from the live snapshot {}: it holds a disk read \
                     while it changed, and its file system may be torn",
                    v.name, v.snapshot
                );
            }
            Ok(())
        }
        LaunchCommand::List { source, admin } => {
            let path = list_path("/v1/launches", source);
            admin
                .show("GET", &path, None, |list: Vec<LaunchView>| {
                    print_launches(&list)
                })
                .await
        }
        LaunchCommand::Delete { name, admin } => {
            let path = format!("/v1/launches/{name}");
            admin
                .show("DELETE", &path, None, |_: serde_json::Value| {
                    println!("deleted launch {name}")
                })
                .await
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn export(args: ExportArgs) -> Result<()> {
    let store = blockrep_store::Store::open_read_only(&args.data)?;
    if let Some(hex) = &args.root {
        return export_root(&store, hex, &args.out);
    }
    let source = source_id(args.source.as_deref().unwrap_or_default())?;
    if let Some(name) = &args.snapshot {
        let snapshot = store
            .snapshot(&source, name)?
            .with_context(|| format!("source {source} has no snapshot {name:?}"))?;
        let (size, chunks) = store.export_root(&snapshot.root, &args.out)?;
        println!(
            "exported snapshot {name} of {source} (epoch {}, {size} bytes, {chunks} non-zero chunks) to {}",
            snapshot.epoch,
            display(&args.out)
        );
        return Ok(());
    }
    let stats = store.export(&source, &args.out)?;
    println!(
        "exported source {source} epoch {} ({} bytes, {} non-zero chunks) to {}",
        stats.head.epoch,
        stats.disk_size_bytes,
        stats.chunks_written,
        display(&args.out)
    );
    Ok(())
}

/// `export --root`: the disk a root describes, whatever refers to it. Every blob
/// read is checked against its blake3 id, so a successful export is exactly the
/// disk the root names.
fn export_root(store: &blockrep_store::Store, hex: &str, out: &Path) -> Result<()> {
    let root_id =
        blockrep_core::ChunkId::from(blake3::Hash::from_hex(hex).map_err(|e| {
            anyhow::anyhow!("--root {hex:?} is not a root id (64 hex digits): {e}")
        })?);
    // Read before the output is created, so that an unknown root leaves no file.
    let root = store.read_root(&root_id).map_err(|e| match e.kind() {
        blockrep_store::ErrorKind::Missing => anyhow::anyhow!(
            "root {root_id} is not in the store (never committed here, or collected by GC)"
        ),
        _ => anyhow::Error::new(e).context(format!("cannot read root {root_id}")),
    })?;
    match store.export_root(&root_id, out) {
        Ok((size, chunks)) => {
            println!(
                "exported root {root_id} ({size} bytes, {} chunks of {} bytes, {chunks} non-zero) to {}",
                root.geometry().chunk_count(),
                root.geometry().chunk_size_bytes(),
                display(out)
            );
            Ok(())
        }
        // The store removes a partial image itself (and never touches an
        // existing file at `out` unless the export succeeds).
        Err(error) => Err(anyhow::Error::new(error).context(format!(
            "root {root_id} is in the store but cannot be exported whole"
        ))),
    }
}

async fn gc(args: GcArgs) -> Result<()> {
    let report = match (&args.data, &args.admin) {
        (Some(data), _) => {
            let options = blockrep_store::GcOptions {
                dry_run: args.dry_run,
                ..Default::default()
            };
            let store = if args.dry_run {
                blockrep_store::Store::open_read_only(data)?
            } else {
                blockrep_store::Store::open_exclusive(data)?
            };
            blockrep_server::gc_report_json(&store.gc(&options)?)
        }
        (None, admin) => {
            let admin = admin.as_deref().unwrap_or("127.0.0.1:7444");
            let path = if args.dry_run {
                "/v1/gc?dry_run=true"
            } else {
                "/v1/gc"
            };
            serde_json::from_str(&admin_call(admin, "POST", path, None).await?)?
        }
    };
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    let verb = if args.dry_run { "would free" } else { "freed" };
    println!(
        "gc {verb} {} in {} packs ({} live, {} dead before; {} live blobs copied)",
        human_bytes(n("bytes_freed")),
        n("packs_compacted"),
        human_bytes(n("bytes_live")),
        human_bytes(n("bytes_dead")),
        n("blobs_copied")
    );
    if n("packs_kept_damaged") > 0 {
        println!(
            "{} packs kept because of damage: run blockrep verify",
            n("packs_kept_damaged")
        );
    }
    Ok(())
}

fn verify(args: VerifyArgs) -> Result<()> {
    let store = blockrep_store::Store::open_read_only(&args.data)?;
    let source = args.source.as_deref().map(source_id).transpose()?;
    let report = store.verify(source.as_ref(), args.snapshot.as_deref())?;
    println!(
        "checked {} roots, {} pages, {} chunks ({} read)",
        report.roots_checked,
        report.pages_checked,
        report.chunks_checked,
        human_bytes(report.bytes_read)
    );
    for blob in &report.damaged {
        let place = blob
            .place
            .as_ref()
            .map_or_else(|| "missing".to_owned(), ToString::to_string);
        println!(
            "DAMAGED {:?} {} at {place}: {}",
            blob.kind, blob.id, blob.damage
        );
        for affected in &blob.affected {
            let offsets: Vec<String> = affected
                .chunks
                .iter()
                .map(|c| format!("chunk {} (byte {})", c.index, c.offset_bytes))
                .collect();
            println!(
                "  affects {} (root {}): {}",
                affected.referrer,
                affected.root,
                offsets.join(", ")
            );
        }
    }
    if report.is_clean() {
        println!("no damage found");
        Ok(())
    } else {
        bail!("{} damaged blobs", report.damaged.len())
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
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

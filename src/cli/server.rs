//! `blockrep server`'s flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::units;

#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// Address of the replication listener.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub(crate) listen: SocketAddr,
    /// Data directory of the replica store (created if missing); with
    /// --store, the store's working copy and cache.
    #[arg(long)]
    pub(crate) data: PathBuf,
    #[command(flatten)]
    pub(crate) store: super::StoreArgs,
    #[command(flatten)]
    pub(crate) encryption: super::EncryptionArgs,
    /// Directory with ca.crt, server.crt and server.key.
    #[arg(long)]
    pub(crate) tls_dir: PathBuf,
    /// Most connections open at once.
    #[arg(long, default_value_t = 1024)]
    pub(crate) connections_max: usize,
    /// Most of those one peer address (IPv6: one /64) may hold; a connection
    /// over it is closed at once, before any TLS work. Raise it when many
    /// sources reach the server through one NAT address.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) connections_per_address: u32,
    /// Most memory all sessions together hold for their disks' chunk ids (about
    /// 160 bytes per chunk: 2.5 GiB for a 1 TiB disk at 64 KiB chunks); a session
    /// whose disk does not fit is refused (busy if it would fit later).
    #[arg(long, default_value = "9GiB", value_parser = units::parse_size)]
    pub(crate) session_memory_max: u64,
    /// Most of --session-memory-max one session may reserve, so that one
    /// source cannot take the memory the others need. A disk that needs more
    /// is refused: raise this, or replicate it in larger chunks.
    #[arg(long, default_value = "3GiB", value_parser = units::parse_size)]
    pub(crate) session_memory_per_source_max: u64,
    /// Most bytes of pages or chunks a session reads from the store before it
    /// writes them to the agent (page fetches and failback).
    #[arg(long, default_value = "4MiB", value_parser = units::parse_size)]
    pub(crate) session_send_buffer_max: u64,
    /// Time a connection has to finish its TLS handshake and say Hello.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    pub(crate) handshake_timeout: Duration,
    /// A session that receives no frame from its agent for this long is
    /// closed, freeing the source for the agent's next connection. Continuous
    /// agents send at least one frame per --interval, but nothing while they
    /// scan: keep it above the longest scan of the largest disk.
    #[arg(long, default_value = "5m", value_parser = units::parse_duration)]
    pub(crate) idle_timeout: Duration,
    /// A new connection of a source whose session in progress has received
    /// nothing for this long replaces that session (its agent has most likely
    /// given up on a dead path and is the one reconnecting); a session still
    /// talking keeps the source, and the newcomer is refused as busy.
    #[arg(long, default_value = "10s", value_parser = units::parse_duration)]
    pub(crate) supersede_after: Duration,
    /// Refuse client certificates revoked by this list (PEM, e.g. the crl.pem
    /// that `blockrep cert revoke` writes), on every listener. The file is
    /// reloaded when it changes and on SIGHUP: new handshakes use the new list
    /// at once, and open sessions of certificates it revokes end. A list that
    /// does not load (torn, garbage, another CA's) is logged and the list in
    /// force stays in force.
    #[arg(long)]
    pub(crate) crl: Option<PathBuf>,
    /// How often the --crl file is checked for a change.
    #[arg(long, default_value = "2s", value_parser = units::parse_duration)]
    pub(crate) crl_poll_interval: Duration,
    /// Serve the admin API over mutual TLS instead of plain HTTP: only the admin
    /// certificate (`blockrep cert issue --admin`) is let in; source
    /// certificates get 403. Clients: `blockrep --admin-tls-dir DIR status ...`.
    #[arg(long)]
    pub(crate) admin_tls: bool,
    /// Address of the admin HTTP API (JSON under /v1/, /health, /metrics). Keep
    /// it on loopback unless it is otherwise protected. Everything but reading
    /// /health and /metrics needs the admin token (--admin-token) or, with
    /// --admin-tls, the admin certificate.
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub(crate) admin_listen: SocketAddr,
    /// A name (or address) the admin API may be reached by, besides localhost,
    /// loopback addresses and the --admin-listen address (repeatable). Requests
    /// naming any other Host are refused (DNS rebinding).
    #[arg(long = "admin-host", value_name = "NAME")]
    pub(crate) admin_hosts: Vec<String>,
    /// A source whose replication lag exceeds this is `lagging`, and breaches
    /// its RPO. Per source: PUT /v1/sources/ID/rpo-target (kept in memory).
    #[arg(long, default_value = "15m", value_parser = units::parse_duration)]
    pub(crate) rpo_target: Duration,
    /// Command run with `sh -c` once when a source's lag crosses above its RPO
    /// target and once when it is back under it. Environment: BLOCKREP_EVENT
    /// (breach or recovered), BLOCKREP_SOURCE, BLOCKREP_LAG_SECONDS,
    /// BLOCKREP_RPO_TARGET_SECONDS.
    #[arg(long, value_name = "CMD")]
    pub(crate) on_rpo_breach: Option<String>,
    /// How often every source's lag is compared with its RPO target.
    #[arg(long, default_value = "500ms", value_parser = units::parse_duration)]
    pub(crate) alert_interval: Duration,
    /// How often garbage collection runs in the background (`off` for never;
    /// `blockrep gc` runs it on demand).
    #[arg(long, default_value = "10m")]
    pub(crate) gc_interval: String,
    /// Pack size limit in bytes (for tests of compaction; default 256 MiB).
    #[arg(long, hide = true, value_parser = units::parse_size)]
    pub(crate) pack_size_max: Option<u64>,
    /// Memory the blob index keeps for its newest entries (about 128 bytes
    /// each); the rest lives in sorted runs in DATA/index, with about 1.4
    /// bytes per stored blob in memory, so the server's memory does not grow
    /// with what it stores. A store in a bucket keeps its whole index in
    /// memory.
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = units::parse_size)]
    pub(crate) index_memory: u64,
    /// Memory for decoded chunks that launch volumes read from the replica
    /// (shared by every launch; 0 turns the cache off). A random reader of a
    /// launch decodes each chunk once while it stays in the cache.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = units::parse_size)]
    pub(crate) launch_cache: u64,
    /// How often what clients wrote to launch volumes is folded into the
    /// store in the background, for volumes that served no request for a
    /// minute (`off`: only when a root is needed: failback,
    /// finalize, a standby's follow, `blockrep launch fold`). A flush makes
    /// writes durable either way.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = units::parse_off_or_duration)]
    pub(crate) launch_fold_interval: units::OffOrDuration,
    /// Most bytes a second that each `blockrep launch materialize` copies
    /// in the background (e.g. 100MiB; `off`: as fast as the disks go).
    /// Reads of chunks not copied yet copy them too, at no extra cost.
    #[arg(long, value_name = "SIZE", default_value = "off", value_parser = units::parse_off_or_size)]
    pub(crate) launch_materialize_rate: units::OffOrSize,
    /// The only directory `blockrep launch materialize` writes in (default
    /// DATA/materialized): a target is a new file in it. To materialize to
    /// a block device, link the device there (ln -s /dev/vdb DIR/vdb).
    #[arg(long, value_name = "DIR")]
    pub(crate) launch_materialize_dir: Option<std::path::PathBuf>,
    /// A source with no agent contact for this long is `stalled`.
    #[arg(long, default_value = "60s", value_parser = units::parse_duration)]
    pub(crate) stall_after: Duration,
    /// Serve launch volumes over NBD on this address (e.g. 127.0.0.1:10809).
    /// Without --nbd-tls only a loopback address is accepted, and every local
    /// user can open every launch.
    #[arg(long)]
    pub(crate) nbd_listen: Option<SocketAddr>,
    /// Require TLS on the NBD listener (STARTTLS, a client certificate of the
    /// same CA): a launch opens only for its own source's certificate and the
    /// admin certificate, and a client sees only those launches.
    #[arg(long)]
    pub(crate) nbd_tls: bool,
    /// An NBD connection with no request for this long is closed. Raise it for
    /// a VM whose disk may stay quiet longer (or let its client reconnect).
    #[arg(long, default_value = "10m", value_parser = units::parse_duration)]
    pub(crate) nbd_idle_timeout: Duration,
    /// Most NBD connections open at once; further clients wait.
    #[arg(long, default_value_t = blockrep_server::NBD_CONNECTIONS_MAX_DEFAULT)]
    pub(crate) nbd_connections_max: usize,
    /// Most NBD connections open at once from one address (IPv6: one /64);
    /// further ones are closed at once. Keep it below --nbd-connections-max so
    /// that one address cannot hold every slot.
    #[arg(long, default_value_t = blockrep_server::NBD_CONNECTIONS_PER_ADDRESS_MAX_DEFAULT)]
    pub(crate) nbd_connections_per_address: usize,
    /// Automatic snapshots: EVERY:KEEP tiers, or `off`. The default follows AWS
    /// DRS: every 10 minutes kept 1 hour, hourly kept 24 hours, daily kept 7 days.
    #[arg(long)]
    pub(crate) retention: Option<String>,
    /// How often automatic snapshots and expiry are considered.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    pub(crate) retention_tick: Duration,
    /// How long a test launch lives when it is made without --ttl (a drill
    /// left behind is deleted then, its NBD clients disconnected); by
    /// default test launches live until deleted.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    pub(crate) test_launch_ttl: Option<Duration>,
    /// Settings file (`key = value` lines); known key: `retention`. Command-line
    /// flags win over it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

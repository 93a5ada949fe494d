//! `blockrep server`: the flags and settings file become a `ServerConfig`; the
//! first line on stdout names the bound addresses.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::shutdown_signal;
use crate::cli::ServerArgs;
use crate::{settings, units};

/// Runs the server until SIGINT or SIGTERM; `admin_token` is the global `--admin-token`.
pub(crate) async fn server(args: ServerArgs, admin_token: Option<PathBuf>) -> Result<()> {
    let bucket = args.store.bucket()?;
    let mut config = blockrep_server::ServerConfig::new(args.listen, args.data, args.tls_dir);
    config.bucket = bucket;
    config.encryption = args.encryption.config()?;
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
    config.index_memory_bytes = usize::try_from(args.index_memory).unwrap_or(usize::MAX);
    config.nbd_listen = args.nbd_listen;
    config.nbd_tls = args.nbd_tls;
    config.nbd_idle_timeout = args.nbd_idle_timeout;
    config.nbd_connections_max = args.nbd_connections_max;
    config.nbd_connections_per_address_max = args.nbd_connections_per_address;
    config.retention_tick = args.retention_tick;
    config.test_launch_ttl = args.test_launch_ttl;
    config.launch_cache_bytes = args.launch_cache;
    config.launch_fold_interval = args.launch_fold_interval.0;
    config.launch_materialize_rate = args.launch_materialize_rate.0;
    config.launch_materialize_dir = args.launch_materialize_dir;
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
    let mut retention = None;
    settings::apply_file(path, |setting| match setting.key {
        "retention" => {
            units::parse_retention(setting.value)
                .map_err(|e| anyhow::anyhow!("{}: {e}", setting.place))?;
            retention = Some(setting.value.to_owned());
            Ok(())
        }
        _ => Err(setting.unknown("retention")),
    })?;
    Ok(retention)
}

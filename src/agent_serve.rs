//! `agent --serve`: capture mode's command line, and the export's lifetime
//! around the replication run (served before the first connection to the
//! server; stopped, flushed and its capture state saved on the way out).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use blockrep_agent::AgentConfig;
use blockrep_agent::capture::{CAPTURE_BLOCK_BYTES, Capture, CaptureOptions};
use blockrep_agent::serve::{SERVE_CONNECTIONS_DEFAULT, ServeAddr, ServeOptions, Serving};
use clap::Args;

use crate::units;

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
    /// default name opens it too). A Unix socket is made mode 0600; a TCP
    /// address must be loopback unless --serve-tls. --interval is then the
    /// time from one cut to the next.
    #[arg(
        long,
        value_name = "ADDR",
        value_parser = ServeAddr::parse,
        conflicts_with_all = ["snapshot", "snapshot_cmd", "release_cmd", "quiesce_cmd", "thaw_cmd"]
    )]
    serve: Option<ServeAddr>,
    /// Where the capture's dirty set is kept between runs: saved on a clean
    /// stop, so a restart sends only what was written (default:
    /// `.NAME.blockrep-capture` beside the disk). After an unclean stop the
    /// first epoch reads the whole disk once, consistently.
    #[arg(long, value_name = "PATH", requires = "serve")]
    capture_state: Option<PathBuf>,
    /// Old contents of blocks overwritten while their epoch is being sent are
    /// preserved, in memory up to this much, then in a file beside the disk.
    #[arg(long, value_name = "SIZE", requires = "serve", default_value = "64MiB", value_parser = units::parse_size)]
    preserve_memory: u64,
    /// Most bytes preserved for one epoch (memory and file); past it the
    /// epoch stops preserving and is labelled live instead of
    /// crash-consistent.
    #[arg(long, value_name = "SIZE", requires = "serve", default_value = "1GiB", value_parser = units::parse_size)]
    preserve_max: u64,
    /// Require TLS on the --serve TCP address: clients must present a
    /// certificate issued by this agent's --ca (the agent presents its own
    /// --cert). Needed to serve on an address that is not loopback.
    #[arg(long, requires = "serve")]
    serve_tls: bool,
    /// NBD connections served at once; more wait in the listen backlog.
    #[arg(long, value_name = "N", requires = "serve", default_value_t = SERVE_CONNECTIONS_DEFAULT)]
    serve_connections_max: usize,
}

/// The export of a capture-mode agent.
pub(crate) struct Served {
    serving: Serving,
    capture: Arc<Capture>,
}

/// In capture mode: opens the capture, starts serving, and hands the capture
/// to `config`. `None` when the agent scans instead.
pub(crate) async fn start(args: &CaptureArgs, config: &mut AgentConfig) -> Result<Option<Served>> {
    let Some(addr) = args.serve.clone() else {
        return Ok(None);
    };
    let mut options = CaptureOptions::beside(&config.disk);
    if let Some(path) = &args.capture_state {
        options.state_path = path.clone();
    }
    options.preserve_memory_bytes = args.preserve_memory;
    options.preserve_max_bytes = args.preserve_max;
    if matches!(addr, ServeAddr::Unix(_)) && args.serve_tls {
        anyhow::bail!(
            "--serve-tls is for a TCP address: a Unix socket is protected by its permissions (0600)"
        );
    }
    if options.preserve_max_bytes < CAPTURE_BLOCK_BYTES {
        anyhow::bail!("--preserve-max must be at least {CAPTURE_BLOCK_BYTES} bytes (one block)");
    }
    let tls = if args.serve_tls {
        let server =
            blockrep_pki::server_config(&config.ca_path, &config.cert_path, &config.key_path)
                .context("cannot set up TLS for --serve")?;
        Some(Arc::new(server))
    } else {
        None
    };
    // Refused before the capture marks its state in use.
    addr.check(tls.is_some())
        .await
        .context("cannot serve the disk")?;
    let disk = config.disk.clone();
    let capture = tokio::task::spawn_blocking(move || Capture::open(&disk, options))
        .await
        .context("the capture task failed")?
        .with_context(|| format!("cannot capture writes to {}", config.disk.display()))?;
    let options = ServeOptions {
        addr,
        tls,
        connections_max: args.serve_connections_max,
    };
    let serving = Serving::start(&capture, config.source.as_str(), options)
        .await
        .context("cannot serve the disk")?;
    config.capture = Some(Arc::clone(&capture));
    Ok(Some(Served { serving, capture }))
}

impl Served {
    /// Stops the export (closing its connections and flushing the disk),
    /// then saves the capture state so that the next start sends only what
    /// was written.
    pub(crate) async fn finish(self) -> Result<()> {
        self.serving.stop().await;
        let capture = self.capture;
        tokio::task::spawn_blocking(move || capture.save())
            .await
            .context("the capture task failed")?
            .context("cannot save the capture state (the next start reads the whole disk)")?;
        tracing::info!("capture state saved");
        Ok(())
    }
}

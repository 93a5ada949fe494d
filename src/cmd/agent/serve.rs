//! `agent --serve`: the export's lifetime around the replication run (served
//! before the first connection to the server; stopped, flushed and its capture
//! state saved on the way out).

use std::sync::Arc;

use anyhow::{Context, Result};
use blockrep_agent::AgentConfig;
use blockrep_agent::capture::{CAPTURE_BLOCK_BYTES, Capture, CaptureOptions};
use blockrep_agent::serve::{ServeAddr, ServeOptions, Serving};

use crate::cli::CaptureArgs;

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

//! `agent --serve`: the export's lifetime around the replication run (served
//! before the first connection to the server; stopped, flushed and its capture
//! state saved on the way out).

use std::sync::Arc;

use anyhow::{Context, Result};
use blockrep_agent::AgentConfig;
use blockrep_agent::capture::{CAPTURE_BLOCK_BYTES, Capture, CaptureOptions};
use blockrep_agent::serve::{ServeAddr, ServeOptions, Serving};

use crate::cli::CaptureArgs;

/// The exports of a capture-mode agent: its disk, or each of a machine's.
pub(crate) struct Served {
    serving: Serving,
    captures: Vec<Arc<Capture>>,
    /// Reloads --serve-crl when the file changes.
    crl_watch: Option<tokio::task::JoinHandle<()>>,
}

/// In capture mode: opens the capture, starts serving, and hands the capture
/// to `config`. `None` when the agent scans instead.
pub(crate) async fn start(args: &CaptureArgs, config: &mut AgentConfig) -> Result<Option<Served>> {
    let Some(addr) = args.serve.clone() else {
        return Ok(None);
    };
    let machine = !config.volumes.is_empty();
    if machine && args.capture_state.is_some() {
        anyhow::bail!(
            "--capture-state names one disk's state file: a machine keeps each disk's state \
             beside it (PATH.blockrep-capture)"
        );
    }
    if matches!(addr, ServeAddr::Unix(_)) && args.serve_tls {
        anyhow::bail!(
            "--serve-tls is for a TCP address: a Unix socket is protected by its permissions (0600)"
        );
    }
    if args.preserve_max < CAPTURE_BLOCK_BYTES {
        anyhow::bail!("--preserve-max must be at least {CAPTURE_BLOCK_BYTES} bytes (one block)");
    }
    let mut crl_watch = None;
    let tls = if args.serve_tls {
        // The agent's client certificate names its source and is for
        // client authentication only: serving needs a server certificate
        // for the names the workload reaches this host by.
        let tls_dir = config
            .cert_path
            .parent()
            .unwrap_or(std::path::Path::new("."));
        let (cert, key) = match (&args.serve_cert, &args.serve_key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            // The two go together (the arguments require each other).
            _ => blockrep_pki::serve_cert_paths(tls_dir, &config.source),
        };
        if !cert.exists() {
            anyhow::bail!(
                "--serve-tls: no certificate to serve with at {} (issue one with `blockrep cert \
                 issue --dir DIR --source {} --serve-name HOST` for the names clients reach \
                 this host by, or give --serve-cert and --serve-key)",
                cert.display(),
                config.source
            );
        }
        let lists = match &args.serve_crl {
            Some(path) => blockrep_pki::RevocationLists::load(path, &config.ca_path)
                .context("cannot read --serve-crl")?,
            None => blockrep_pki::RevocationLists::default(),
        };
        let (server, verifier) =
            blockrep_pki::server_config_reloadable(&config.ca_path, &cert, &key, &lists)
                .context("cannot set up TLS for --serve")?;
        if let Some(path) = args.serve_crl.clone() {
            crl_watch = Some(tokio::spawn(watch_crl(
                path,
                config.ca_path.clone(),
                verifier,
            )));
        }
        Some(Arc::new(server))
    } else {
        None
    };
    // Refused before the capture marks its state in use.
    addr.check(tls.is_some())
        .await
        .context("cannot serve the disk")?;
    // A single disk is served under the source's id, a machine's disks
    // under their volumes' names.
    let disks: Vec<(String, std::path::PathBuf)> = if machine {
        config
            .volumes
            .iter()
            .map(|(name, path)| (name.to_string(), path.clone()))
            .collect()
    } else {
        vec![(config.source.to_string(), config.disk.clone())]
    };
    let mut captures = Vec::with_capacity(disks.len());
    for (name, disk) in &disks {
        let mut options = CaptureOptions::beside(disk);
        if let Some(path) = &args.capture_state {
            options.state_path = path.clone();
        }
        options.preserve_memory_bytes = args.preserve_memory;
        options.preserve_max_bytes = args.preserve_max;
        let path = disk.clone();
        let capture = tokio::task::spawn_blocking(move || Capture::open(&path, options))
            .await
            .context("the capture task failed")?
            .with_context(|| format!("cannot capture writes to {}", disk.display()))?;
        captures.push((name.clone(), capture));
    }
    let options = ServeOptions {
        addr,
        tls,
        source: config.source.clone(),
        connections_max: args.serve_connections_max,
    };
    let serving = Serving::start_disks(&captures, options)
        .await
        .context("cannot serve the disk")?;
    let captures: Vec<Arc<Capture>> = captures.into_iter().map(|(_, c)| c).collect();
    if machine {
        config.volume_captures = captures.clone();
    } else {
        config.capture = captures.first().cloned();
    }
    Ok(Some(Served {
        serving,
        captures,
        crl_watch,
    }))
}

/// How often --serve-crl is checked for a change.
const CRL_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Puts a changed --serve-crl in force for every later handshake (as the
/// server's --crl): polled for a new length, modification time or inode
/// (`cert revoke` replaces the file). A list that does not load is logged
/// and the list in force stays in force.
async fn watch_crl(
    path: std::path::PathBuf,
    ca: std::path::PathBuf,
    verifier: Arc<blockrep_pki::ReloadableClientVerifier>,
) {
    let mut seen = blockrep_pki::CrlFingerprint::of(&path);
    loop {
        tokio::time::sleep(CRL_POLL_INTERVAL).await;
        let now = blockrep_pki::CrlFingerprint::of(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = blockrep_pki::RevocationLists::load(&path, &ca)
            .and_then(|lists| verifier.replace(&lists).map(|()| lists.revoked_count()));
        match loaded {
            Ok(revoked) => tracing::info!(path = %path.display(), revoked, "--serve-crl reloaded"),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "--serve-crl not reloaded; the list in force stays")
            }
        }
    }
}

impl Served {
    /// Stops the export (closing its connections and flushing the disk),
    /// then saves the capture state so that the next start sends only what
    /// was written.
    pub(crate) async fn finish(self) -> Result<()> {
        if let Some(watch) = &self.crl_watch {
            watch.abort();
        }
        self.serving.stop().await;
        // Every disk's state is saved, even after one failed: each that is
        // not reads its whole disk at the next start.
        let mut failed = Vec::new();
        for capture in self.captures {
            let disk = capture.path().to_owned();
            let saved = tokio::task::spawn_blocking(move || capture.save())
                .await
                .context("the capture task failed")?;
            if let Err(error) = saved {
                failed.push(format!("{}: {error}", disk.display()));
            }
        }
        if !failed.is_empty() {
            anyhow::bail!(
                "cannot save the capture state (the next start reads each such disk whole): {}",
                failed.join("; ")
            );
        }
        tracing::info!("capture state saved");
        Ok(())
    }
}

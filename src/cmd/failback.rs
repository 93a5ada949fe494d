//! `blockrep failback`: bring the original disk back to a launch volume's
//! content, or ask a running failback to finish (`failback complete`).

use anyhow::{Context, Result};
use blockrep_agent::AgentConfig;

use super::{source_id, stop_on_signal};
use crate::cli::{FailbackArgs, FailbackCommand};

/// Runs failback passes until the disk equals the launch, or asks a running failback to finish.
pub(crate) async fn failback(args: FailbackArgs) -> Result<()> {
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
    let (disk, volumes) = super::agent::disks(&args.disk)?;
    let server = need(&args.from, "--from HOST:PORT")?;
    let source = source_id(&need(&args.source, "--source")?)?;
    let launch = need(&args.launch, "--launch")?;
    let (ca_path, cert_path, key_path) = args.tls.resolve(&source)?;
    let mut config = AgentConfig::new(disk, server, source, ca_path, cert_path, key_path);
    config.volumes = volumes;
    config.chunk_size_bytes = u32::try_from(args.chunk_size).context("chunk size too large")?;
    config.interval = args.interval;
    config.patches = !args.no_patches;
    let options = blockrep_agent::FailbackOptions {
        launch,
        once: args.once || args.finalize,
        overwrite_source_changes: args.overwrite_source_changes,
    };
    let stop_rx = stop_on_signal();
    let passes = blockrep_agent::failback(&config, &options, stop_rx, |pass| {
        println!(
            "failback pass: target root={} chunks_written={} bytes_received={} source_changes_overwritten={} finalized={}",
            pass.target_root, pass.chunks_written, pass.bytes_received, pass.source_changes_overwritten, pass.finalized
        );
    })
    .await?;
    if passes.last().is_some_and(|p| p.finalized) {
        let disks = match config.volumes.as_slice() {
            [] => config.disk.display().to_string(),
            volumes => volumes
                .iter()
                .map(|(name, path)| format!("{} ({name})", path.display()))
                .collect::<Vec<_>>()
                .join(", "),
        };
        println!(
            "failback complete: {disks} equals launch {}",
            options.launch
        );
    }
    Ok(())
}

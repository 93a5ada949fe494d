//! `blockrep agent`: the flags become an `AgentConfig`; the agent replicates
//! once (`--once`) or continuously, scanning the disk or, with `--serve`,
//! capturing the writes of the workload it serves the disk to.

mod serve;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use blockrep_agent::AgentConfig;
use blockrep_core::VolumeName;

use super::{source_id, stop_on_signal};
use crate::cli::{AgentArgs, SnapshotArg, ViewArgs};
use crate::print::{self, describe};
use crate::settings;

/// Replicates the disk until it equals the replica (`--once`), a cutover, or a signal.
pub(crate) async fn agent(args: AgentArgs) -> Result<()> {
    let mut config = agent_config(&args)?;
    // Capture mode serves the disk before anything else, whatever the link does.
    let served = serve::start(&args.capture, &mut config).await?;
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
    let stop_rx = stop_on_signal();
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
        let outcome = blockrep_agent::run_once_until(config, stop_rx, print::epoch).await?;
        match (&outcome.cutover, outcome.epochs.last()) {
            (Some(cutover), _) => print::cutover(cutover),
            (None, Some(last)) => println!(
                "replica equals disk: epoch {} root={}",
                last.epoch, last.root
            ),
            (None, None) => println!("replica already equals disk"),
        }
        return Ok(());
    }
    if let Some(cutover) = blockrep_agent::run(config, stop_rx, print::epoch).await? {
        print::cutover(&cutover);
    }
    Ok(())
}

fn agent_config(args: &AgentArgs) -> Result<AgentConfig> {
    let source = source_id(&args.source)?;
    let (ca_path, cert_path, key_path) = args.tls.resolve(&source)?;
    let chunk_size_bytes = u32::try_from(args.chunk_size).context("chunk size too large")?;
    blockrep_core::Geometry::new(0, chunk_size_bytes)?;
    let (disk, volumes) = disks(&args.disk)?;
    let mut config = AgentConfig::new(disk, args.to.clone(), source, ca_path, cert_path, key_path);
    config.volumes = volumes;
    config.allow_volume_removal = args.allow_volume_removal;
    config.chunk_size_bytes = chunk_size_bytes;
    config.compression = args.compress.into();
    config.interval = args.interval;
    config.rate_limiter.set_rate(args.max_rate);
    config.step_bytes = args.commit_every.max(1);
    config.step_interval = args.commit_interval;
    config.io_timeout = args.io_timeout;
    config.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    config.cutover = args.cutover;
    config.pre_cutover_cmd = args.pre_cutover_cmd.clone();
    config.view = view_options(&args.view)?;
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

/// The disk of a single-disk agent, or a machine's volumes: one `--disk
/// PATH` is a single disk (as before machines); several, or one given as
/// `NAME=PATH`, are a machine's volumes, named by `NAME` or else by the
/// path's file name. The first path stands for the disk in messages.
pub(crate) fn disks(values: &[String]) -> Result<(PathBuf, Vec<(VolumeName, PathBuf)>)> {
    let parsed: Vec<(Option<VolumeName>, PathBuf)> = values
        .iter()
        .map(|value| match value.split_once('=') {
            Some((name, path)) if VolumeName::new(name).is_ok() && !path.is_empty() => {
                (VolumeName::new(name).ok(), PathBuf::from(path))
            }
            _ => (None, PathBuf::from(value)),
        })
        .collect();
    let first = parsed
        .first()
        .map(|(_, path)| path.clone())
        .context("--disk is required")?;
    if let [(None, path)] = parsed.as_slice() {
        return Ok((path.clone(), Vec::new()));
    }
    let mut volumes: Vec<(VolumeName, PathBuf)> = Vec::with_capacity(parsed.len());
    for (name, path) in parsed {
        let name = match name {
            Some(name) => name,
            None => VolumeName::from_path(&path)?,
        };
        if volumes.iter().any(|(other, _)| *other == name) {
            bail!("two disks are called {name}: name them apart with --disk NAME=PATH");
        }
        volumes.push((name, path));
    }
    if volumes.len() > blockrep_core::VOLUMES_MAX {
        bail!(
            "{} disks: a machine has at most {}",
            volumes.len(),
            blockrep_core::VOLUMES_MAX
        );
    }
    Ok((first, volumes))
}

/// Applies the settings of the agent's settings file that may change while
/// replication runs.
fn apply_agent_settings(path: &Path, config: &AgentConfig) -> Result<()> {
    settings::apply_file(path, |setting| match setting.key {
        "max-rate" | "max_rate" => {
            let rate = blockrep_agent::parse_rate(setting.value).map_err(anyhow::Error::msg)?;
            config.rate_limiter.set_rate(rate);
            tracing::info!(bytes_per_second = rate, "max rate set");
            Ok(())
        }
        _ => Err(setting.unknown("max-rate")),
    })
}

/// How each epoch freezes the disk, from `--snapshot` and the view commands.
fn view_options(view: &ViewArgs) -> Result<blockrep_agent::ViewOptions> {
    use blockrep_agent::SnapshotMode;
    let mode = match (&view.snapshot_cmd, view.snapshot) {
        (Some(command), _) => SnapshotMode::Command {
            snapshot_cmd: command.clone(),
            release_cmd: view.release_cmd.clone(),
        },
        (None, SnapshotArg::Auto) => SnapshotMode::Auto,
        (None, SnapshotArg::Reflink) => SnapshotMode::Reflink,
        (None, SnapshotArg::None) => SnapshotMode::None,
    };
    if mode == SnapshotMode::None && (view.quiesce_cmd.is_some() || view.thaw_cmd.is_some()) {
        bail!(
            "--quiesce-cmd and --thaw-cmd run around a view's creation: --snapshot none makes none"
        );
    }
    let mut options = blockrep_agent::ViewOptions::default();
    options.mode = mode;
    options.quiesce_cmd = view.quiesce_cmd.clone();
    options.thaw_cmd = view.thaw_cmd.clone();
    options.command_timeout = Some(view.snapshot_cmd_timeout);
    Ok(options)
}

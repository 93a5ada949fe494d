//! A machine of several disks (see `crate::machine`): `--once`, and
//! continuous replication.

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use blockrep_core::{ChunkId, Consistency, Root, VolumeName};
use tokio::sync::watch;
use tracing::warn;

use super::{ONCE_EPOCHS_MAX, RunOutcome, backoff_ceiling};
use crate::machine::{MachineSession, machine_root_of};
use crate::view::{Scan, scan_together};
use crate::{AgentConfig, EpochReport, Error};

/// Scans every volume of the machine, the views taken at one instant where
/// a quiesce command allows it (see `view::scan_together`), and what the
/// set may claim.
async fn scan_all(config: &AgentConfig) -> Result<Machine, Error> {
    let configs: Vec<AgentConfig> = config
        .volumes
        .iter()
        .map(|(_, path)| volume_config(config, path))
        .collect();
    scan_together(&configs, config.chunk_size_bytes).await
}

/// A machine's scans and the label their set may claim.
type Machine = (Vec<Scan>, Consistency);

/// The configuration of one volume: the machine's, with that volume's disk.
fn volume_config(config: &AgentConfig, path: &Path) -> AgentConfig {
    let mut config = config.clone();
    config.disk = path.to_owned();
    config
}

/// The machine root a set of scans gives.
fn scans_root(names: &[VolumeName], scans: &[Scan]) -> Option<ChunkId> {
    machine_root_of(
        names,
        scans
            .iter()
            .map(|s| Some(Root::from_chunk_ids(s.geometry, &s.ids).id())),
    )
}

/// `--once` for a machine: epochs until the replica equals a fresh scan of
/// every volume.
pub(crate) async fn once(
    config: &AgentConfig,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<RunOutcome, Error> {
    let names: Vec<VolumeName> = config.volumes.iter().map(|(n, _)| n.clone()).collect();
    let mut outcome = RunOutcome::default();
    let first = scan_all(config).await?;
    let mut session = MachineSession::open(config, &names, &first.0).await?;
    let mut next = Some(first);
    for _ in 0..ONCE_EPOCHS_MAX {
        let (scans, label) = match next.take() {
            Some(machine) => machine,
            None => scan_all(config).await?,
        };
        if session.head_root_id().is_some() && session.head_root_id() == scans_root(&names, &scans)
        {
            session.close().await;
            return Ok(outcome);
        }
        let report = session.epoch(config, scans, label).await?;
        on_epoch(&report);
        outcome.epochs.push(report);
    }
    Err(Error::DiskChanged(format!(
        "the machine's disks kept changing: {ONCE_EPOCHS_MAX} epochs committed without catching up"
    )))
}

/// Continuous replication of a machine: an epoch every `interval` (one
/// recovery point of every volume), reconnecting with capped exponential
/// back-off after a retryable failure, until `shutdown` turns true.
pub(crate) async fn continuous(
    config: &AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<(), Error> {
    let names: Vec<VolumeName> = config.volumes.iter().map(|(n, _)| n.clone()).collect();
    let mut backoff = Duration::from_millis(250);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let attempt = sessions(config, &names, &mut on_epoch, &mut backoff);
        let error: Error = tokio::select! {
            result = attempt => match result {
                Ok(never) => match never {},
                Err(error) => error,
            },
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        if !error.is_retryable() {
            return Err(error);
        }
        warn!(%error, retry_in_ms = backoff.as_millis() as u64, "machine replication interrupted; reconnecting");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        }
        backoff = (backoff * 2).min(backoff_ceiling(config, &error, false));
    }
}

/// One session of continuous replication, until it fails: an epoch every
/// `interval` unless the replica already equals the scans. A committed epoch
/// resets `backoff`.
async fn sessions(
    config: &AgentConfig,
    names: &[VolumeName],
    on_epoch: &mut impl FnMut(&EpochReport),
    backoff: &mut Duration,
) -> Result<Infallible, Error> {
    let first = scan_all(config).await?;
    let mut session = MachineSession::open(config, names, &first.0).await?;
    let mut next = Some(first);
    loop {
        let scan_start = Instant::now();
        let (scans, label) = match next.take() {
            Some(machine) => machine,
            None => scan_all(config).await?,
        };
        let caught_up =
            session.head_root_id().is_some() && session.head_root_id() == scans_root(names, &scans);
        if !caught_up {
            on_epoch(&session.epoch(config, scans, label).await?);
        }
        *backoff = Duration::from_millis(250);
        tokio::time::sleep_until((scan_start + config.interval).into()).await;
    }
}

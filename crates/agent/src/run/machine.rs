//! A machine of several disks (see `crate::machine`): `--once`, continuous
//! replication, and the cutover of every disk at one point.

use std::time::{Duration, Instant};

use blockrep_core::{ChunkId, Consistency, Root, VolumeName};
use tokio::sync::watch;

use super::cutover::{FinalEpoch, finish, stop_workload};
use super::{ONCE_EPOCHS_MAX, RunOutcome, back_off_after};
use crate::machine::{MachineSession, geometries, machine_root_of, volume_configs};
use crate::view::{Scan, scan_together};
use crate::{AgentConfig, CutoverReport, EpochReport, Error};

/// Scans every volume of the machine, the views taken at one instant where
/// a quiesce command allows it (see `view::scan_together`), and what the
/// set may claim.
async fn scan_all(volumes: &[AgentConfig]) -> Result<Machine, Error> {
    let chunk_size_bytes = volumes.first().map_or(0, |c| c.chunk_size_bytes);
    scan_together(volumes, chunk_size_bytes).await
}

/// A machine's scans and the label their set may claim.
type Machine = (Vec<Scan>, Consistency);

/// The machine root a set of scans gives.
pub(super) fn scans_root(
    names: &[VolumeName],
    scans: &[Scan],
    space: blockrep_core::IdSpace,
) -> Option<ChunkId> {
    machine_root_of(
        names,
        scans
            .iter()
            .map(|s| Some(Root::from_chunk_ids(s.geometry, &s.ids_in(space)).id())),
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
    let volumes = volume_configs(config);
    let first = scan_all(&volumes).await?;
    let mut session = MachineSession::open(config, &names, &geometries(&first.0)).await?;
    let mut next = Some(first);
    for _ in 0..ONCE_EPOCHS_MAX {
        let (scans, label) = match next.take() {
            Some(machine) => machine,
            None => scan_all(&volumes).await?,
        };
        if session.head_root_id().is_some()
            && session.head_root_id() == scans_root(&names, &scans, session.space())
        {
            // Released before the cutover takes its own views.
            drop(scans);
            if config.cutover || session.cutover_requested() {
                outcome.cutover =
                    Some(cutover(config, &volumes, &mut session, Instant::now()).await?);
            }
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

/// The cutover of a machine: the pre-cutover command stops the workload,
/// the final views of every volume are taken together and committed as one
/// last point, and the server answers with one cutover launch serving
/// every volume.
async fn cutover(
    config: &AgentConfig,
    volumes: &[AgentConfig],
    session: &mut MachineSession,
    requested_at: Instant,
) -> Result<CutoverReport, Error> {
    let stopped = stop_workload(config, requested_at).await?;
    let (scans, mut label) = scan_all(volumes).await?;
    // The workload is stopped: every volume holds one quiesced state.
    if config.pre_cutover_cmd.is_some() {
        label = Consistency::Quiesced;
    }
    let transfer_started = Instant::now();
    let report = session.final_epoch(config, scans, label).await?;
    let final_epoch = FinalEpoch {
        scan: report.scan_duration,
        report,
        transfer_started,
    };
    finish(config, session.session(), stopped, final_epoch).await
}

/// Continuous replication of a machine: an epoch every `interval` (one
/// recovery point of every volume), reconnecting with capped exponential
/// back-off after a retryable failure, until `shutdown` turns true or a
/// cutover (asked for by the operator, or by `config.cutover`) completes.
pub(crate) async fn continuous(
    config: &AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Option<CutoverReport>, Error> {
    let names: Vec<VolumeName> = config.volumes.iter().map(|(n, _)| n.clone()).collect();
    let volumes = volume_configs(config);
    let mut backoff = Duration::from_millis(250);
    // The last session ended with the server refusing a patch.
    let mut patch_refused = false;
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let attempt = sessions(
            config,
            &volumes,
            &names,
            &mut on_epoch,
            &mut backoff,
            patch_refused,
        );
        let error: Error = tokio::select! {
            result = attempt => match result {
                Ok(cutover) => return Ok(Some(cutover)),
                Err(error) => error,
            },
            _ = shutdown.wait_for(|stop| *stop) => return Ok(None),
        };
        let go_on = back_off_after(
            config,
            &mut shutdown,
            &mut backoff,
            &mut patch_refused,
            error,
            "machine replication interrupted; reconnecting",
        );
        if !go_on.await? {
            return Ok(None);
        }
    }
}

/// One session of continuous replication, until it fails or cuts over: an
/// epoch every `interval`, one that only confirms the head when the replica
/// already equals the scans (so the server knows the machine is current and
/// can ask for the cutover). A committed epoch resets `backoff`.
async fn sessions(
    config: &AgentConfig,
    volumes: &[AgentConfig],
    names: &[VolumeName],
    on_epoch: &mut impl FnMut(&EpochReport),
    backoff: &mut Duration,
    patch_refused: bool,
) -> Result<CutoverReport, Error> {
    let first = scan_all(volumes).await?;
    let mut session = MachineSession::open(config, names, &geometries(&first.0)).await?;
    // Whole chunks until an epoch is committed, after a refused patch.
    session.session().patches &= !patch_refused;
    let mut next = Some(first);
    loop {
        let scan_start = Instant::now();
        let (scans, label) = match next.take() {
            Some(machine) => machine,
            None => scan_all(volumes).await?,
        };
        on_epoch(&session.epoch(config, scans, label).await?);
        session.session().patches = config.patches;
        *backoff = Duration::from_millis(250);
        if session.cutover_requested() || config.cutover {
            let report = cutover(config, volumes, &mut session, Instant::now()).await?;
            session.close().await;
            return Ok(report);
        }
        tokio::time::sleep_until((scan_start + config.interval).into()).await;
    }
}

//! Capture mode of a machine (`agent --serve` with several `--disk`s): the
//! workload writes each disk through its own export (named by its volume),
//! and every epoch cuts all the disks at one instant
//! ([`Capture::cut_together`]), so a write to one disk that completed before
//! a write to another began is in every recovery point that holds the later
//! one. Each volume's cut is hashed over its head's ids and the machine's
//! epoch sends them as one point; nothing is scanned.
//!
//! Each disk keeps its own capture state (and continuity): a disk whose
//! saved state does not match its volume in the head is cut whole, the
//! others only where written.

use std::sync::Arc;
use std::time::Instant;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{Consistency, Geometry, VolumeName};
use tokio::sync::watch;
use tracing::info;

use super::capture::{BACKOFF_START, CUT_DROPPED, Continuity, scan_of_cut};
use super::cutover::{FinalEpoch, finish, stop_workload};
use super::machine::scans_root;
use super::{ONCE_EPOCHS_MAX, RunOutcome, back_off_after};
use crate::capture::{Capture, Cut};
use crate::machine::MachineSession;
use crate::view::Scan;
use crate::{AgentConfig, CutoverReport, EpochReport, Error};

/// A machine's captures, names and each disk's continuity.
struct Disks<'a> {
    captures: &'a [Arc<Capture>],
    names: Vec<VolumeName>,
    continuity: Vec<Continuity>,
}

impl<'a> Disks<'a> {
    fn new(config: &'a AgentConfig) -> Self {
        let captures = config.volume_captures.as_slice();
        Self {
            captures,
            names: config.volumes.iter().map(|(n, _)| n.clone()).collect(),
            continuity: captures.iter().map(|c| Continuity::new(c)).collect(),
        }
    }

    /// Opens a machine session and says which disks' first cut must be full.
    async fn open(&self, config: &AgentConfig) -> Result<(MachineSession, Vec<bool>), Error> {
        let geometries = self
            .captures
            .iter()
            .map(|c| Geometry::new(c.size_bytes(), config.chunk_size_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let session = MachineSession::open(config, &self.names, &geometries).await?;
        let full: Vec<bool> = self
            .continuity
            .iter()
            .zip(session.volume_root_ids())
            .map(|(continuity, head)| continuity.needs_full_cut(head))
            .collect();
        for (capture, full) in self.captures.iter().zip(&full) {
            if *full {
                info!(disk = %capture.path().display(),
                      "write capture: the saved state does not match the replica; the first cut reads the whole disk (consistently)");
            }
        }
        Ok((session, full))
    }

    /// Tells each disk's cut, and its continuity, that the head now holds
    /// its volume as cut (after a commit, or when the cut changed nothing).
    fn committed(&mut self, session: &MachineSession, cuts: &[Arc<Cut>]) {
        for ((cut, root), continuity) in cuts
            .iter()
            .zip(session.volume_root_ids())
            .zip(&mut self.continuity)
        {
            if let Some(root) = root {
                cut.committed(root);
                continuity.committed(root);
            }
        }
    }
}

/// Cuts every disk at one instant (`full`: which cuts take every block) and
/// hashes each cut over its volume's head: the epoch's scans, their cuts and
/// the label the set may claim (crash-consistent only if every cut is).
async fn cut_all(
    disks: &Disks<'_>,
    session: &mut MachineSession,
    full: &[bool],
) -> Result<(Vec<Scan>, Vec<Arc<Cut>>, Consistency), Error> {
    let mut heads = Vec::with_capacity(disks.captures.len());
    for index in 0..disks.captures.len() {
        heads.push(session.volume_head_ids(index).await?);
    }
    let geometries = session.geometries();
    let space = session.space();
    let captures = disks.captures.to_vec();
    let full = full.to_vec();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let started_unix_ms = now_unix_ms();
        let cuts = Capture::cut_together(&captures, &full);
        let mut scans = Vec::with_capacity(cuts.len());
        for (((cut, ids), geometry), capture) in
            cuts.iter().zip(heads).zip(geometries).zip(&captures)
        {
            scans.push(scan_of_cut(
                Arc::clone(cut),
                geometry,
                ids,
                space,
                capture.path(),
                started,
                started_unix_ms,
            )?);
        }
        let label = match scans
            .iter()
            .all(|s| s.consistency == Consistency::CrashConsistent)
        {
            true => Consistency::CrashConsistent,
            false => Consistency::Live,
        };
        Ok((scans, cuts, label))
    })
    .await
    .map_err(|e| Error::Protocol(format!("cut task failed: {e}")))?
}

/// Whether the machine's head already equals `scans`.
fn caught_up(disks: &Disks<'_>, session: &MachineSession, scans: &[Scan]) -> bool {
    session.head_root_id().is_some()
        && session.head_root_id() == scans_root(&disks.names, scans, session.space())
}

/// `--once` of a machine in capture mode: cut, send and commit until a cut
/// finds the replica equal to every disk; then the cutover if asked for.
pub(crate) async fn once(
    config: &AgentConfig,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<RunOutcome, Error> {
    let mut disks = Disks::new(config);
    let mut outcome = RunOutcome::default();
    let (mut session, mut full) = disks.open(config).await?;
    for _ in 0..ONCE_EPOCHS_MAX {
        let (scans, cuts, label) = cut_all(&disks, &mut session, &full).await?;
        full.fill(false);
        if caught_up(&disks, &session, &scans) {
            drop(scans);
            disks.committed(&session, &cuts);
            if config.cutover || session.cutover_requested() {
                outcome.cutover =
                    Some(cutover(config, &mut disks, &mut session, Instant::now()).await?);
            }
            session.close().await;
            return Ok(outcome);
        }
        let report = session.epoch(config, scans, label).await?;
        disks.committed(&session, &cuts);
        on_epoch(&report);
        outcome.epochs.push(report);
    }
    Err(Error::DiskChanged(format!(
        "the machine's disks kept changing: {ONCE_EPOCHS_MAX} epochs committed without catching up"
    )))
}

/// Continuous capture mode of a machine: a cut of every disk each
/// `interval`, reconnecting with capped exponential back-off after a
/// retryable failure, until `shutdown` or a cutover. A cut dropped with a
/// failed session leaves its blocks dirty for the next one.
pub(crate) async fn run(
    config: &AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Option<CutoverReport>, Error> {
    let mut disks = Disks::new(config);
    let mut backoff = BACKOFF_START;
    // The last session ended with the server refusing a patch.
    let mut patch_refused = false;
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let attempt = async {
            let (mut session, mut full) = disks.open(config).await?;
            // Whole chunks until an epoch is committed, after a refused patch.
            session.session().patches &= !patch_refused;
            loop {
                let cut_started = Instant::now();
                let (scans, cuts, label) = cut_all(&disks, &mut session, &full).await?;
                full.fill(false);
                // Committed even when it changed nothing: the server then
                // knows the machine is current, and can ask for the cutover.
                let report = session.epoch(config, scans, label).await?;
                on_epoch(&report);
                session.session().patches = config.patches;
                disks.committed(&session, &cuts);
                backoff = BACKOFF_START;
                if session.cutover_requested() || config.cutover {
                    let report = cutover(config, &mut disks, &mut session, Instant::now()).await?;
                    session.close().await;
                    return Ok::<_, Error>(report);
                }
                tokio::time::sleep_until((cut_started + config.interval).into()).await;
            }
        };
        let result = tokio::select! {
            result = attempt => result,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(None),
        };
        let error = match result {
            Ok(report) => return Ok(Some(report)),
            Err(error) => error,
        };
        let go_on = back_off_after(
            config,
            &mut shutdown,
            &mut backoff,
            &mut patch_refused,
            error,
            CUT_DROPPED,
        );
        if !go_on.await? {
            return Ok(None);
        }
    }
}

/// The cutover of a machine in capture mode: the pre-cutover command stops
/// the workload, writes to every export are stopped (they fail from now
/// on), and one last cut of all the disks is committed as the final point.
async fn cutover(
    config: &AgentConfig,
    disks: &mut Disks<'_>,
    session: &mut MachineSession,
    requested_at: Instant,
) -> Result<CutoverReport, Error> {
    let stopped = stop_workload(config, requested_at).await?;
    let frozen = disks.captures.to_vec();
    tokio::task::spawn_blocking(move || frozen.iter().for_each(|c| c.freeze()))
        .await
        .map_err(|e| Error::Cutover(format!("stopping writes failed: {e}")))?;
    info!(source = %config.source, "cutover: writes to every export are stopped");
    let no_full = vec![false; disks.captures.len()];
    let (scans, cuts, mut label) = cut_all(disks, session, &no_full).await?;
    if config.pre_cutover_cmd.is_some() {
        label = Consistency::Quiesced;
    }
    let transfer_started = Instant::now();
    let report = session.final_epoch(config, scans, label).await?;
    disks.committed(session, &cuts);
    let final_epoch = FinalEpoch {
        scan: report.scan_duration,
        report,
        transfer_started,
    };
    finish(config, session.session(), stopped, final_epoch).await
}

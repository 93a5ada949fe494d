//! The cutover: the workload stops, a final epoch commits, and the server
//! answers with the launch the workload moves to.

use std::time::{Duration, Instant};

use blockrep_core::Consistency;
use tracing::info;

use crate::connection::Transport;
use crate::epoch::Session;
use crate::view::scan;
use crate::{AgentConfig, CutoverReport, EpochReport, Error};

/// The cutover: run the pre-cutover command (it stops the workload), then a final
/// scan, diff and send, committed as the last epoch; the server answers with the
/// cutover launch. Downtime runs from the end of the command (or from
/// `requested_at` without one) to the server's answer. In capture mode the
/// final scan is a cut taken after the export stopped accepting writes.
pub(crate) async fn cutover(
    config: &AgentConfig,
    session: &mut Session,
    requested_at: Instant,
) -> Result<CutoverReport, Error> {
    let stopped = stop_workload(config, requested_at).await?;
    let mut final_scan = match &config.capture {
        Some(capture) => super::capture::final_cut(config, capture, session).await?,
        None => scan(config, session.geometry().chunk_size_bytes()).await?,
    };
    let cut = final_scan.disk.capture_cut().cloned();
    // The workload was stopped by the pre-cutover command: even a live read of
    // the disk then holds one quiesced state. Without the command the final
    // epoch claims only what its view gives (crash-consistent, or live).
    if config.pre_cutover_cmd.is_some() {
        final_scan.consistency = Consistency::Quiesced;
    }
    let scan_duration = final_scan.duration;
    let transfer_started = Instant::now();
    session.final_epoch = true;
    let report = session
        .epoch(config, final_scan, true)
        .await?
        .ok_or_else(|| Error::Protocol("the final epoch was not committed".into()))?;
    if let Some(cut) = cut {
        cut.committed(report.root);
    }
    let final_epoch = FinalEpoch {
        report,
        scan: scan_duration,
        transfer_started,
    };
    finish(config, session, stopped, final_epoch).await
}

/// The workload stopped: how long the pre-cutover command took, and when
/// the downtime began.
pub(super) struct Stopped {
    hook: Duration,
    downtime_started: Instant,
}

/// Runs the pre-cutover command, if any: it stops the workload. A command
/// that fails stops the cutover before anything changed.
pub(super) async fn stop_workload(
    config: &AgentConfig,
    requested_at: Instant,
) -> Result<Stopped, Error> {
    info!(source = %config.source, "cutover: stopping the workload");
    let hook_started = Instant::now();
    let downtime_started = match &config.pre_cutover_cmd {
        Some(command) => {
            let status = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .status()
                .await
                .map_err(|e| Error::Cutover(format!("cannot run the pre-cutover command: {e}")))?;
            if !status.success() {
                return Err(Error::Cutover(format!(
                    "the pre-cutover command failed ({status}); nothing was cut over and replication is unchanged"
                )));
            }
            Instant::now()
        }
        None => requested_at,
    };
    Ok(Stopped {
        hook: downtime_started.saturating_duration_since(hook_started),
        downtime_started,
    })
}

/// The committed final epoch, and what its scan and transfer took.
pub(super) struct FinalEpoch {
    pub report: EpochReport,
    pub scan: Duration,
    pub transfer_started: Instant,
}

/// After the final epoch's `CutoverReady`: the downtime breakdown, sent to
/// the server as the agent's side of it.
pub(super) async fn finish<S: Transport>(
    config: &AgentConfig,
    session: &mut Session<S>,
    stopped: Stopped,
    final_epoch: FinalEpoch,
) -> Result<CutoverReport, Error> {
    let FinalEpoch {
        report,
        scan,
        transfer_started,
    } = final_epoch;
    let downtime = stopped.downtime_started.elapsed();
    let ready = session
        .cutover_ready
        .clone()
        .ok_or_else(|| Error::Protocol("no CutoverReady after the final commit".into()))?;
    let server_ms = Duration::from_millis(ready.commit_ms.saturating_add(ready.launch_ms));
    let cutover = CutoverReport {
        epoch: report.epoch,
        root: report.root,
        snapshot: ready.snapshot,
        launch: ready.launch,
        hook: stopped.hook,
        scan,
        transfer: transfer_started.elapsed().saturating_sub(server_ms),
        commit: Duration::from_millis(ready.commit_ms),
        launch_ready: Duration::from_millis(ready.launch_ms),
        downtime,
        chunks_sent: report.chunks_sent + report.zero_chunks_sent + report.ref_chunks_sent,
        bytes_sent: report.bytes_sent,
        consistency: report.consistency,
    };
    session.report_cutover(&cutover).await?;
    info!(source = %config.source, launch = %cutover.launch, downtime_ms = downtime.as_millis() as u64, "cutover complete");
    Ok(cutover)
}

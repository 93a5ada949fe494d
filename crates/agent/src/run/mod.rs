//! The agent's loops: `--once` (until the replica equals the disk) and
//! continuous, each in scan mode (here) or capture mode (`capture`), and the
//! cutover that ends either (`cutover`).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::epoch::Session;
use crate::view::{scan, take};
use crate::{AgentConfig, CutoverReport, EpochReport, Error};

mod capture;
mod cutover;
mod machine;
mod machine_capture;

use cutover::cutover;

/// Epochs `--once` runs before giving up on a disk that keeps changing.
pub(crate) const ONCE_EPOCHS_MAX: usize = 20;
/// Longest wait between attempts while the server answers `Busy`.
const BUSY_RETRY_MAX: Duration = Duration::from_secs(2);
/// Longest wait between attempts while the disk changes size under the scan:
/// the server is not at fault, so there is nothing to back off from.
const UNSTEADY_RETRY_MAX: Duration = Duration::from_secs(1);
/// A disk found at another size than the replica's is scanned again after
/// this long before the agent stops on it as a resize: an image file being
/// truncated and rewritten, or re-extended, passes through other sizes.
const RESIZE_CONFIRM: Duration = Duration::from_secs(1);

/// What a run ended with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunOutcome {
    /// Epochs committed (`--once` only; continuous runs report through the callback).
    pub epochs: Vec<EpochReport>,
    /// The cutover, when the run ended with one.
    pub cutover: Option<CutoverReport>,
}

/// Replicates until the server's head equals a fresh scan of the disk; then, with
/// `config.cutover`, runs the cutover.
pub async fn run_once(
    config: &AgentConfig,
    on_epoch: impl FnMut(&EpochReport),
) -> Result<RunOutcome, Error> {
    // Never sent: nothing stops this run but its end.
    let (_never, shutdown) = watch::channel(false);
    run_once_until(config, shutdown, on_epoch).await
}

/// [`run_once`] that `shutdown` turning true stops, as [`run`]: the epoch in
/// flight is dropped, which releases its view, thaws and removes its clone
/// before this returns [`Error::Stopped`].
pub async fn run_once_until(
    config: &AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    on_epoch: impl FnMut(&EpochReport),
) -> Result<RunOutcome, Error> {
    tokio::select! {
        result = once(config, on_epoch) => result,
        _ = shutdown.wait_for(|stop| *stop) => Err(Error::Stopped(
            "stopped by a signal before the replica caught up".into(),
        )),
    }
}

async fn once(
    config: &AgentConfig,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<RunOutcome, Error> {
    if let Some(capture) = &config.capture {
        return capture::once(config, capture, on_epoch).await;
    }
    if !config.volume_captures.is_empty() {
        return machine_capture::once(config, on_epoch).await;
    }
    if !config.volumes.is_empty() {
        return machine::once(config, on_epoch).await;
    }
    let mut outcome = RunOutcome::default();
    // Hashed by the first epoch: as it sends on a first sync, before it
    // compares with the head otherwise.
    let first = take(config, config.chunk_size_bytes).await?;
    let mut session = Session::open(config, first.geometry).await?;
    let mut next = Some(first);
    for _ in 0..ONCE_EPOCHS_MAX {
        // Named in the session's id space once, for the root and the epoch.
        let current = match next.take() {
            Some(scan) => scan,
            None => scan(config, session.geometry().chunk_size_bytes()).await?,
        }
        .into_space(session.space())?;
        // A pending scan (the first) is compared with the head by its epoch.
        let caught_up = !current.pending
            && session.head_root_id()
                == Some(blockrep_core::Root::from_chunk_ids(current.geometry, &current.ids).id());
        if caught_up {
            // This scan's view is done with: released before the cutover makes
            // its own, as a fixed-name snapshot (one LVM or ZFS name) needs.
            drop(current);
        } else if let Some(report) = session.epoch(config, current, false).await? {
            on_epoch(&report);
            outcome.epochs.push(report);
            continue;
        }
        return finish_caught_up(config, session, outcome).await;
    }
    Err(kept_changing(config))
}

/// The end of a `--once` run whose replica caught up with the disk: the
/// cutover when asked for (by the flag or the server), then a clean close.
pub(crate) async fn finish_caught_up(
    config: &AgentConfig,
    mut session: Session,
    mut outcome: RunOutcome,
) -> Result<RunOutcome, Error> {
    if config.cutover || session.cutover_requested {
        outcome.cutover = Some(cutover(config, &mut session, Instant::now()).await?);
    }
    session.close().await;
    Ok(outcome)
}

/// A `--once` run that never caught up within [`ONCE_EPOCHS_MAX`] epochs.
pub(crate) fn kept_changing(config: &AgentConfig) -> Error {
    Error::DiskChanged(format!(
        "{} kept changing: {ONCE_EPOCHS_MAX} epochs committed without catching up",
        config.disk.display()
    ))
}

/// Longest back-off before the next attempt after `error`: short while the
/// server answers `Busy` (most often this agent's own previous session
/// draining) or while the disk is unsteady, else `--backoff-max`.
pub(crate) fn backoff_ceiling(config: &AgentConfig, error: &Error, unsteady: bool) -> Duration {
    // A busy source, or one another server serves for now (its lease runs
    // out within seconds when that server is gone): both clear up soon.
    let busy = matches!(
        error,
        Error::Refused {
            code: blockrep_proto::ErrorCode::Busy | blockrep_proto::ErrorCode::ServedElsewhere,
            ..
        }
    );
    if busy {
        BUSY_RETRY_MAX.min(config.backoff_max)
    } else if unsteady {
        UNSTEADY_RETRY_MAX.min(config.backoff_max)
    } else {
        config.backoff_max
    }
}

/// Replicates continuously: an epoch every `interval` (from the start of one scan
/// to the start of the next), reconnecting with capped exponential back-off after
/// any retryable failure, until `shutdown` turns true or a cutover (asked for by
/// the operator, or by `config.cutover` once caught up) completes. An epoch in
/// flight at shutdown is abandoned: it was never acknowledged, so nothing is lost.
pub async fn run(
    config: &AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Option<CutoverReport>, Error> {
    if let Some(capture) = &config.capture {
        return capture::run(config, capture, shutdown, on_epoch).await;
    }
    if !config.volume_captures.is_empty() {
        return machine_capture::run(config, shutdown, on_epoch).await;
    }
    if !config.volumes.is_empty() {
        return machine::continuous(config, shutdown, on_epoch).await;
    }
    let mut backoff = Duration::from_millis(250);
    let mut chunk_size = config.chunk_size_bytes;
    // The last attempt ended because the disk changed size under it.
    let mut disk_unsteady = false;
    // The last attempt ended with the server refusing a patch: the next
    // session sends whole chunks until it has committed an epoch.
    let mut patch_refused = false;
    // A session of this run found a head: the replica is no first sync, so
    // a reconnect scans before it connects, as the server waits for no
    // whole-disk hash then (its `--idle-timeout`).
    let mut head_seen = false;
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let attempt = async {
            let first = if head_seen {
                scan(config, chunk_size).await?
            } else {
                take(config, chunk_size).await?
            };
            let mut session = Session::open(config, first.geometry).await?;
            head_seen |= session.head_root_id().is_some();
            session.patches &= !patch_refused;
            chunk_size = session.geometry().chunk_size_bytes();
            let mut current = Some(first);
            let mut resize_seen = false;
            loop {
                let scan_start = Instant::now();
                let this = match current.take() {
                    Some(scan) => scan,
                    None => scan(config, chunk_size).await?,
                };
                if this.geometry != session.geometry() && !resize_seen {
                    resize_seen = true;
                    warn!(
                        disk = %config.disk.display(),
                        size_bytes = this.geometry.disk_size_bytes(),
                        replica_size_bytes = session.geometry().disk_size_bytes(),
                        "the disk is not of the replica's size; scanning again in {RESIZE_CONFIRM:?} before stopping on a resize"
                    );
                    tokio::time::sleep(RESIZE_CONFIRM).await;
                    continue;
                }
                if let Some(report) = session.epoch(config, this, true).await? {
                    on_epoch(&report);
                }
                head_seen = true;
                session.patches = config.patches;
                resize_seen = false;
                backoff = Duration::from_millis(250);
                if session.cutover_requested || config.cutover {
                    let report = cutover(config, &mut session, Instant::now()).await?;
                    session.close().await;
                    return Ok::<_, Error>(report);
                }
                let next_scan = scan_start + config.interval;
                tokio::time::sleep_until(next_scan.into()).await;
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
        // A disk that just changed size under a scan may be met at another
        // size by the next one (a file truncated and re-extended): not yet a
        // resize. A second such attempt in a row is believed.
        let resized = matches!(
            &error,
            Error::DiskChanged(_)
                | Error::Refused {
                    code: blockrep_proto::ErrorCode::GeometryMismatch,
                    ..
                }
        );
        let was_unsteady =
            std::mem::replace(&mut disk_unsteady, matches!(error, Error::DiskUnsteady(_)));
        let retry_resize = resized && was_unsteady;
        // A refused patch is retried once, with whole chunks: a server that
        // then refuses those too has a reason that retrying cannot fix.
        let retry_whole = retry_whole(&mut patch_refused, &error);
        let retry = error.is_retryable() || retry_resize || retry_whole;
        // Busy is most often this agent's own previous session, still taking in
        // what the old connection had buffered after the agent gave up on it: it
        // ends within seconds, so retries stay frequent instead of backing off
        // towards --backoff-max as for a server that is down.
        let ceiling = backoff_ceiling(config, &error, disk_unsteady || retry_resize);
        let interrupted = "replication interrupted; reconnecting";
        if !back_off(
            &mut shutdown,
            &mut backoff,
            error,
            retry,
            ceiling,
            interrupted,
        )
        .await?
        {
            return Ok(None);
        }
        info!("reconnecting");
    }
}

/// Whether a failed session is retried with whole chunks: it ended with
/// the server refusing a patch, and the one before it did not (a server
/// that then refuses whole chunks too has a reason that retrying cannot
/// fix). Sets `patch_refused` for the next session, which sends whole
/// chunks until it has committed an epoch.
pub(crate) fn retry_whole(patch_refused: &mut bool, error: &Error) -> bool {
    let retry = !*patch_refused && crate::patch::refused_patch(error);
    *patch_refused = retry;
    retry
}

/// [`back_off`] after a failed attempt of a run with no disk-size changes to
/// weigh (a capture run, a machine's): retried when the error is, or once
/// with whole chunks after a refused patch ([`retry_whole`]).
pub(crate) async fn back_off_after(
    config: &AgentConfig,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
    patch_refused: &mut bool,
    error: Error,
    interrupted: &str,
) -> Result<bool, Error> {
    let retry = error.is_retryable() || retry_whole(patch_refused, &error);
    let ceiling = backoff_ceiling(config, &error, false);
    back_off(shutdown, backoff, error, retry, ceiling, interrupted).await
}

/// After a failed attempt of a continuous run: an error not worth retrying
/// (`retry` false) ends the run; otherwise the back-off is waited, unless
/// `shutdown` comes first (`Ok(false)`: stop), and then doubled up to
/// `ceiling` (`Ok(true)`: try again).
pub(crate) async fn back_off(
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
    error: Error,
    retry: bool,
    ceiling: Duration,
    interrupted: &str,
) -> Result<bool, Error> {
    if !retry {
        return Err(error);
    }
    warn!(%error, retry_in_ms = backoff.as_millis() as u64, "{interrupted}");
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        _ = shutdown.wait_for(|stop| *stop) => return Ok(false),
    }
    *backoff = (*backoff * 2).min(ceiling);
    Ok(true)
}

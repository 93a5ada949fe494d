//! Capture mode's epochs (`agent --serve`): no scan of the disk. Each epoch
//! is a [`Cut`] of what the workload wrote through the export; its chunks are
//! re-hashed as of the cut's instant and laid over the ids of the server's
//! head, and the usual epoch sends what differs.
//!
//! The first cut of a run is full (every chunk hashed, consistently, through
//! the cut) when the capture's saved state does not say what the disk holds
//! relative to the server's head: a first run, an unclean stop, or a head the
//! capture did not commit. Otherwise only the dirty blocks are read.
//!
//! The export is served by the caller (see [`crate::serve`]) and never waits
//! on anything here: a lost connection drops the cut (its blocks stay dirty
//! and the next cut includes them) and the session reconnects with back-off.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{ChunkId, DiskImage, Geometry, IdSpace, hash_chunk};
use tokio::sync::watch;
use tracing::info;

use super::cutover::cutover;
use super::{ONCE_EPOCHS_MAX, back_off_after, finish_caught_up, kept_changing};
use crate::capture::{Capture, Cut};
use crate::epoch::Session;
use crate::view::{Scan, View};
use crate::{AgentConfig, CutoverReport, EpochReport, Error, RunOutcome};

/// First wait before reconnecting; doubles up to `--backoff-max`.
pub(super) const BACKOFF_START: Duration = Duration::from_millis(250);

/// Which roots the capture's dirty set is relative to: the disk equals any
/// of them plus (at most) the dirty blocks.
pub(super) struct Continuity {
    /// The last complete commit (or the saved state's root).
    committed: Option<ChunkId>,
    /// Intermediate commits made since: each is `committed` with part of a
    /// cut's dirty chunks, which are still dirty.
    steps: HashSet<ChunkId>,
}

impl Continuity {
    pub(super) fn new(capture: &Capture) -> Self {
        Self {
            committed: capture.saved_root(),
            steps: HashSet::new(),
        }
    }

    /// Whether the first cut against a head of `head` must be full.
    pub(super) fn needs_full_cut(&self, head: Option<ChunkId>) -> bool {
        match (self.committed, head) {
            (Some(committed), Some(head)) => head != committed && !self.steps.contains(&head),
            // No known state, or a replica that has lost its head.
            _ => true,
        }
    }

    pub(super) fn committed(&mut self, root: ChunkId) {
        self.committed = Some(root);
        self.steps.clear();
    }
}

/// Cuts an epoch (`full`: every chunk) and hashes what it sealed, as of the
/// cut, over the head's ids: the epoch's [`Scan`], whose reads go through
/// the cut. Chunks that hash to the head's id are released at once.
pub(crate) async fn cut_scan(
    config: &AgentConfig,
    capture: &Arc<Capture>,
    session: &mut Session,
    full: bool,
) -> Result<Scan, Error> {
    let ids = session.head_ids().await?;
    let geometry = session.geometry();
    let space = session.space();
    let capture = Arc::clone(capture);
    let path = config.disk.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let started_unix_ms = now_unix_ms();
        let cut = capture.cut(full);
        scan_of_cut(cut, geometry, ids, space, &path, started, started_unix_ms)
    })
    .await
    .map_err(|e| Error::Protocol(format!("cut task failed: {e}")))?
}

/// The epoch's [`Scan`] of `cut` (taken at `started`) of the disk at `path`:
/// the chunks it sealed hashed as of the cut over the head's `ids` (in the
/// session's id `space`), and released at once where they still hash to the
/// head's id. Blocking.
pub(super) fn scan_of_cut(
    cut: Arc<Cut>,
    geometry: Geometry,
    mut ids: Vec<ChunkId>,
    space: IdSpace,
    path: &std::path::Path,
    started: Instant,
    started_unix_ms: u64,
) -> Result<Scan, Error> {
    let indices: Vec<u64> = if cut.full() {
        (0..geometry.chunk_count()).collect()
    } else {
        cut.chunks(geometry)
    };
    let mut hashed = hash_cut(&cut, geometry, &indices)?;
    space.map_all(&mut hashed);
    for (index, id) in indices.iter().zip(hashed) {
        let slot = &mut ids[*index as usize];
        if *slot == id {
            // Unchanged since the head: the epoch will not read it again.
            cut.release(geometry, *index);
        }
        *slot = id;
    }
    let consistency = cut.consistency();
    let disk = DiskImage::open(path)?;
    Ok(Scan {
        disk: Arc::new(View::cut(disk, cut)),
        geometry,
        ids,
        started_unix_ms,
        duration: started.elapsed(),
        consistency,
        space,
        pending: false,
    })
}

/// Hashes chunks `indices` as of `cut`, on every core.
fn hash_cut(cut: &Cut, geometry: Geometry, indices: &[u64]) -> Result<Vec<ChunkId>, Error> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(indices.len().max(1));
    let next = AtomicUsize::new(0);
    let mut ids = vec![ChunkId::ZERO; indices.len()];
    let results: Vec<Result<Vec<(usize, ChunkId)>, Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut buffer = vec![0u8; geometry.chunk_size_bytes() as usize];
                    let mut out = Vec::new();
                    loop {
                        let at = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&index) = indices.get(at) else {
                            return Ok(out);
                        };
                        let len = geometry.chunk_len(index).ok_or_else(|| {
                            Error::CutRead(format!("chunk {index} is not on the disk"))
                        })? as usize;
                        let data = &mut buffer[..len];
                        cut.read_at(geometry.chunk_offset(index), data)
                            .map_err(|e| {
                                Error::CutRead(format!("cannot read chunk {index} of the cut: {e}"))
                            })?;
                        out.push((at, hash_chunk(data)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(Error::CutRead("a hashing thread panicked".into())))
            })
            .collect()
    });
    for result in results {
        for (at, id) in result? {
            ids[at] = id;
        }
    }
    Ok(ids)
}

/// Runs one epoch of `scan` and, once committed, tells its cut.
async fn epoch(
    config: &AgentConfig,
    session: &mut Session,
    continuity: &mut Continuity,
    scan: Scan,
    commit_unchanged: bool,
) -> Result<Option<EpochReport>, Error> {
    let cut = scan.disk.capture_cut().cloned();
    let result = session.epoch(config, scan, commit_unchanged).await;
    continuity.steps.extend(session.step_roots.drain(..));
    let report = result?;
    let root = match &report {
        Some(report) => Some(report.root),
        // Nothing to send: the replica already equals the disk at the cut.
        None => session.head_root_id(),
    };
    if let (Some(cut), Some(root)) = (cut, root) {
        cut.committed(root);
        continuity.committed(root);
    }
    Ok(report)
}

/// Opens a session for the capture's disk and says whether its first cut
/// must be full.
async fn open(
    config: &AgentConfig,
    capture: &Capture,
    continuity: &Continuity,
) -> Result<(Session, bool), Error> {
    let geometry = Geometry::new(capture.size_bytes(), config.chunk_size_bytes)?;
    let session = Session::open(config, geometry).await?;
    let full = continuity.needs_full_cut(session.head_root_id());
    if full {
        info!(
            disk = %config.disk.display(),
            "write capture: the saved state does not match the replica; the first cut reads the whole disk (consistently)"
        );
    }
    Ok((session, full))
}

/// `--once` in capture mode: cut, send and commit until a cut finds the
/// replica equal to the disk; then the cutover if asked for.
pub(crate) async fn once(
    config: &AgentConfig,
    capture: &Arc<Capture>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<RunOutcome, Error> {
    let mut outcome = RunOutcome::default();
    let mut continuity = Continuity::new(capture);
    let (mut session, mut full) = open(config, capture, &continuity).await?;
    for _ in 0..ONCE_EPOCHS_MAX {
        let scan = cut_scan(config, capture, &mut session, full).await?;
        full = false;
        if let Some(report) = epoch(config, &mut session, &mut continuity, scan, false).await? {
            on_epoch(&report);
            outcome.epochs.push(report);
            continue;
        }
        return finish_caught_up(config, session, outcome).await;
    }
    Err(kept_changing(config))
}

/// Continuous capture mode: a cut every `interval` (from one cut to the
/// next), reconnecting with capped exponential back-off after a retryable
/// failure, until `shutdown` or a cutover.
pub(crate) async fn run(
    config: &AgentConfig,
    capture: &Arc<Capture>,
    mut shutdown: watch::Receiver<bool>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Option<CutoverReport>, Error> {
    let mut backoff = BACKOFF_START;
    let mut continuity = Continuity::new(capture);
    // The last attempt ended with the server refusing a patch: the next
    // session sends whole chunks until it has committed an epoch.
    let mut patch_refused = false;
    loop {
        if *shutdown.borrow() {
            return Ok(None);
        }
        let attempt = async {
            let (mut session, mut full) = open(config, capture, &continuity).await?;
            session.patches &= !patch_refused;
            loop {
                let cut_started = Instant::now();
                let scan = cut_scan(config, capture, &mut session, full).await?;
                full = false;
                if let Some(report) =
                    epoch(config, &mut session, &mut continuity, scan, true).await?
                {
                    on_epoch(&report);
                }
                session.patches = config.patches;
                patch_refused = false;
                backoff = BACKOFF_START;
                if session.cutover_requested || config.cutover {
                    let report = cutover(config, &mut session, Instant::now()).await?;
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
        // The cut is dropped with the attempt: its blocks stay dirty, and the
        // export goes on serving the workload meanwhile.
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

/// What a capture-mode run logs when its session fails.
pub(super) const CUT_DROPPED: &str =
    "replication interrupted; the cut is dropped and its writes stay pending; reconnecting";

/// The cutover's final epoch in capture mode: writes are stopped (they fail
/// from now on), then one last cut; no scan of the disk.
pub(crate) async fn final_cut(
    config: &AgentConfig,
    capture: &Arc<Capture>,
    session: &mut Session,
) -> Result<Scan, Error> {
    let frozen = Arc::clone(capture);
    tokio::task::spawn_blocking(move || frozen.freeze())
        .await
        .map_err(|e| Error::Cutover(format!("stopping writes failed: {e}")))?;
    info!(source = %config.source, "cutover: writes to the export are stopped");
    cut_scan(config, capture, session, false).await
}

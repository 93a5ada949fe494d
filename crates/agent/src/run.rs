//! The agent's loops: `--once` (until the replica equals the disk) and continuous.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::epoch::{Session, scan};
use crate::{AgentConfig, EpochReport, Error};

/// Epochs `--once` runs before giving up on a disk that keeps changing.
const ONCE_EPOCHS_MAX: usize = 20;

/// Replicates until the server's head equals a fresh scan of the disk, then
/// returns the reports of the epochs committed (empty when nothing differed).
pub async fn run_once(
    config: &AgentConfig,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Vec<EpochReport>, Error> {
    let mut reports = Vec::new();
    let first = scan(config, config.chunk_size_bytes).await?;
    let mut session = Session::open(config, first.geometry).await?;
    let mut next = Some(first);
    for _ in 0..ONCE_EPOCHS_MAX {
        let current = match next.take() {
            Some(scan) => scan,
            None => scan(config, session.geometry().chunk_size_bytes()).await?,
        };
        let root = blockrep_core::Root::from_chunk_ids(current.geometry, &current.ids).id();
        if session.head_root_id() == Some(root) {
            session.close().await;
            return Ok(reports);
        }
        match session.epoch(config, current, false).await? {
            Some(report) => {
                on_epoch(&report);
                reports.push(report);
            }
            None => {
                session.close().await;
                return Ok(reports);
            }
        }
    }
    Err(Error::DiskChanged(format!(
        "{} kept changing: {ONCE_EPOCHS_MAX} epochs committed without catching up",
        config.disk.display()
    )))
}

/// Replicates continuously: an epoch every `interval` (from the start of one scan
/// to the start of the next), reconnecting with capped exponential back-off after
/// any retryable failure, until `shutdown` turns true. An epoch in flight at
/// shutdown is abandoned: it was never acknowledged, so nothing is lost.
pub async fn run(
    config: &AgentConfig,
    mut shutdown: watch::Receiver<bool>,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<(), Error> {
    let mut backoff = Duration::from_millis(250);
    let mut chunk_size = config.chunk_size_bytes;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let attempt = async {
            let first = scan(config, chunk_size).await?;
            let mut session = Session::open(config, first.geometry).await?;
            chunk_size = session.geometry().chunk_size_bytes();
            let mut current = Some(first);
            loop {
                let scan_start = Instant::now();
                let this = match current.take() {
                    Some(scan) => scan,
                    None => scan(config, chunk_size).await?,
                };
                if let Some(report) = session.epoch(config, this, true).await? {
                    on_epoch(&report);
                }
                backoff = Duration::from_millis(250);
                let next_scan = scan_start + config.interval;
                tokio::time::sleep_until(next_scan.into()).await;
            }
        };
        let result: Result<(), Error> = tokio::select! {
            result = attempt => result,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let Err(error) = result else { continue };
        if !error.is_retryable() {
            return Err(error);
        }
        warn!(%error, retry_in_ms = backoff.as_millis() as u64, "replication interrupted; reconnecting");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        }
        backoff = (backoff * 2).min(config.backoff_max);
        info!("reconnecting");
    }
}

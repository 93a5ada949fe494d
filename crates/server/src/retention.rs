//! The snapshot schedule: automatic snapshots when the retention policy says one
//! is due, and expiry of snapshots past their time, for every source.

use std::sync::Arc;

use blockrep_core::clock::now_unix_ms;
use tracing::{info, warn};

use crate::shared::Shared;

/// Ticks forever (the task is aborted when the server stops).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(shared.config.retention_tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let shared = Arc::clone(&shared);
        let outcome = tokio::task::spawn_blocking(move || tick(&shared)).await;
        if let Err(e) = outcome {
            warn!(error = %e, "snapshot schedule task failed");
        }
    }
}

fn tick(shared: &Shared) {
    let store = &shared.store;
    let now = now_unix_ms();
    if shared.config.retention.is_some() {
        let sources = match store.sources() {
            Ok(sources) => sources,
            Err(e) => {
                warn!(error = %e, "cannot list sources for automatic snapshots");
                return;
            }
        };
        // In a bucket, each server snapshots the sources it serves.
        let served: Option<Vec<_>> = shared.config.bucket.as_ref().map(|_| {
            store
                .leases()
                .into_iter()
                .map(|(source, _)| source)
                .collect()
        });
        for source in sources {
            if served
                .as_ref()
                .is_some_and(|served| !served.contains(&source))
            {
                continue;
            }
            match store.create_auto_snapshot_if_due(&source, now) {
                Ok(Some(snapshot)) => {
                    info!(source = %source, snapshot = %snapshot.name, epoch = snapshot.epoch, "automatic snapshot taken");
                }
                Ok(None) => {}
                Err(e) => warn!(source = %source, error = %e, "automatic snapshot failed"),
            }
        }
    }
    // In a bucket, each server expires the snapshots of the sources it
    // serves, or that nobody serves: the others it knows as it last read
    // them. And it decides from the snapshots as the bucket has them: a copy
    // that still holds automatic snapshots deleted elsewhere could make the
    // policy keep one of those and delete a real survivor.
    if shared.config.bucket.is_some()
        && let Err(e) = store.refresh_snapshots(None, now)
    {
        warn!(error = %e, "snapshot expiry skipped: cannot read the bucket's snapshots");
        return;
    }
    match store.expire_snapshots_except(now, &shared.served_elsewhere(now)) {
        Ok(expired) => {
            for snapshot in expired {
                info!(source = %snapshot.source, snapshot = %snapshot.name, "snapshot expired");
            }
        }
        Err(e) => warn!(error = %e, "snapshot expiry failed"),
    }
}

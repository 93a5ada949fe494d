//! Background folding: what clients wrote to launch volumes (their overlays)
//! is moved into the store every [`ServerConfig::launch_fold_interval`], so
//! that a launch's head stays close to its volume and its overlay small,
//! once the volume has been idle for [`FOLD_IDLE`].
//! Roots needed at once (failback, finalize, a standby's follow) fold on
//! their own; this only keeps the work spread out.
//!
//! [`ServerConfig::launch_fold_interval`]: crate::ServerConfig::launch_fold_interval

use std::sync::Arc;
use std::time::Duration;

use blockrep_core::clock::now_unix_ms;
use tracing::{debug, warn};

use crate::shared::Shared;

/// Default of [`crate::ServerConfig::launch_fold_interval`].
pub const FOLD_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// A volume is folded in the background only once it has served no request
/// for this long: a fold hashes, compresses and stores what was written,
/// and on a busy volume it would take the CPU and disk the workload is
/// using; after it, the folded blocks are read through the chunk cache and
/// their space in the overlay is given back, so a workload that pauses and
/// goes on pays for the fold again in its next reads and writes. A minute
/// lets bursts with pauses between them run on the overlay. (A volume
/// written without such a pause is folded when a root is needed.)
pub const FOLD_IDLE: Duration = Duration::from_secs(60);

/// Folds every launch with an overlay, each interval, forever (the task is
/// aborted when the server stops).
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(interval) = shared.config.launch_fold_interval else {
        return;
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: overlays left by a previous run are
    // folded at start.
    loop {
        ticker.tick().await;
        let store = Arc::clone(&shared.store);
        let closers = Arc::clone(&shared.closers);
        let folded = tokio::task::spawn_blocking(move || {
            let mut folded = 0u64;
            for (launch, volume) in store.launches_with_overlays().map_err(|e| e.to_string())? {
                // A launch being released is deleted, not folded.
                if closers.is_closing(&launch) {
                    continue;
                }
                let opened = match store.open_launch_volume(&launch, volume.as_deref()) {
                    Ok(opened) => opened,
                    Err(e) if e.kind() == blockrep_store::ErrorKind::NotFound => continue,
                    Err(e) => return Err(format!("launch {launch}: {e}")),
                };
                let bytes = opened.overlay_bytes();
                if bytes == 0 || opened.idle_for() < FOLD_IDLE {
                    continue;
                }
                // Stops, publishing what it folded, once clients are back.
                let idle = || opened.idle_for() >= FOLD_IDLE;
                opened
                    .fold_while(now_unix_ms(), &idle)
                    .map_err(|e| format!("launch {launch}: {e}"))?;
                folded += bytes;
            }
            Ok::<_, String>(folded)
        })
        .await;
        match folded {
            Ok(Ok(0)) => {}
            Ok(Ok(bytes)) => debug!(bytes, "folded launch overlays into the store"),
            Ok(Err(e)) => warn!(error = %e, "cannot fold launch overlays"),
            Err(e) => warn!(error = %e, "launch folding failed"),
        }
    }
}

//! Launches that go away: drills that expire, and launches released by
//! `finalize`. Their NBD exports are closed first (each connection answers
//! what it has in flight and closes, as at server shutdown), then the launch
//! is deleted, and its blocks are garbage for the next collection.
//!
//! The close signals are in `closers.rs`: the NBD registry refuses a launch
//! being closed, so no client attaches between the close and the deletion.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockrep_core::clock::now_unix_ms;
use blockrep_store::ErrorKind;
use tracing::{info, warn};

use crate::shared::Shared;

/// How often launches are checked for expiry.
pub(crate) const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// How long a release waits for the NBD connections of a launch to close.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Closes the NBD exports of `launch` and deletes it; waits up to
/// [`CLOSE_WAIT`] for its connections to finish. `Ok(false)` when it was
/// already gone.
pub(crate) async fn release(shared: &Arc<Shared>, launch: &str) -> Result<bool, String> {
    shared.closers.close(launch);
    let deadline = Instant::now() + CLOSE_WAIT;
    let outcome = loop {
        let store = Arc::clone(&shared.store);
        let name = launch.to_owned();
        let deleted = tokio::task::spawn_blocking(move || store.delete_launch(&name))
            .await
            .map_err(|e| e.to_string())?;
        match deleted {
            Ok(()) => break Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => break Ok(false),
            // Connections still answering what they had in flight.
            Err(e) if e.kind() == ErrorKind::Busy && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    shared.closers.forget(launch);
    outcome
}

/// Deletes expired launches, every [`EXPIRY_TICK`], forever (the task is
/// aborted when the server stops).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(EXPIRY_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let store = Arc::clone(&shared.store);
        let now = now_unix_ms();
        let expired = tokio::task::spawn_blocking(move || expired_launches(&store, now)).await;
        let expired = match expired {
            Ok(Ok(expired)) => expired,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot list launches for expiry");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "launch expiry task failed");
                continue;
            }
        };
        for (name, source, expires_unix_ms) in expired {
            match release(&shared, &name).await {
                Ok(true) => {
                    shared
                        .workflow
                        .launches_expired
                        .fetch_add(1, Ordering::Relaxed);
                    info!(launch = %name, source = %source, expires_unix_ms,
                          "test launch expired: exports closed, launch deleted");
                }
                Ok(false) => {}
                Err(e) => warn!(launch = %name, error = %e, "cannot delete the expired launch"),
            }
        }
    }
}

/// Launches whose expiry has passed: name, source, expiry.
fn expired_launches(
    store: &blockrep_store::Store,
    now_unix_ms: u64,
) -> Result<Vec<(String, String, u64)>, blockrep_store::Error> {
    let mut out = Vec::new();
    for launch in store.list_launches(None)? {
        let expires = match store.launch_workflow(&launch.name) {
            Ok(workflow) => workflow.expires_unix_ms,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(expires) = expires
            && expires <= now_unix_ms
        {
            out.push((launch.name, launch.source.to_string(), expires));
        }
    }
    Ok(out)
}

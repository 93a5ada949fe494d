//! Launches that go away, and launches that follow: drills that expire,
//! launches released by `finalize`, warm standbys moved to each new
//! committed point of their source. Their NBD exports are closed first (each connection answers
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
        // In a bucket, the server of a launch's source expires it: it closes
        // the exports it serves first.
        let elsewhere = shared.served_elsewhere(now);
        let expired =
            tokio::task::spawn_blocking(move || expired_launches(&store, now, &elsewhere)).await;
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

/// Launches whose expiry has passed: name, source, expiry. Those of the
/// sources in `elsewhere` are left to the server that serves them.
fn expired_launches(
    store: &blockrep_store::Store,
    now_unix_ms: u64,
    elsewhere: &std::collections::HashSet<blockrep_core::SourceId>,
) -> Result<Vec<(String, String, u64)>, blockrep_store::Error> {
    let mut out = Vec::new();
    for launch in store.list_launches(None)? {
        if elsewhere.contains(&launch.source) {
            continue;
        }
        let expires = match store.launch_workflow(&launch.name) {
            Ok(workflow) => workflow.expires_unix_ms,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            // One damaged record must not stop every other launch's expiry.
            Err(e) => {
                warn!(launch = %launch.name, error = %e, "cannot read the launch's workflow record");
                continue;
            }
        };
        if let Some(expires) = expires
            && expires <= now_unix_ms
        {
            out.push((launch.name, launch.source.to_string(), expires));
        }
    }
    Ok(out)
}

/// After a commit of a complete pass of `source`: moves its following
/// standbys to its head (off the session's path; the store reads the head
/// itself, so a late task never moves one back). A standby found written
/// stops following, and says so.
pub(crate) fn source_committed(shared: &Arc<Shared>, source: &blockrep_core::SourceId) {
    let Some(generation) = shared.followed.generation(source) else {
        return;
    };
    let (shared, source) = (Arc::clone(shared), source.clone());
    tokio::spawn(async move {
        let store = Arc::clone(&shared.store);
        let id = source.clone();
        let moved = tokio::task::spawn_blocking(move || follow(&store, &id)).await;
        match moved {
            Ok(Ok(outcome)) => {
                for (launch, rebased) in &outcome.launches {
                    match rebased {
                        blockrep_store::Rebased::Moved => {
                            shared
                                .workflow
                                .standby_moves
                                .fetch_add(1, Ordering::Relaxed);
                            info!(launch = %launch, source = %source,
                                  "standby launch moved to the newest committed point");
                        }
                        blockrep_store::Rebased::Written => {
                            warn!(launch = %launch, source = %source,
                                  "standby launch was written: it stops following and keeps its data");
                        }
                        _ => {}
                    }
                }
                if !outcome.any_following {
                    shared.followed.remove_if_unchanged(&source, generation);
                }
            }
            Ok(Err(e)) => warn!(source = %source, error = %e, "cannot move standby launches"),
            Err(e) => warn!(source = %source, error = %e, "standby task failed"),
        }
    });
}

/// What one pass over a source's standbys did.
struct FollowPass {
    launches: Vec<(String, blockrep_store::Rebased)>,
    /// Whether any launch of the source still follows.
    any_following: bool,
}

fn follow(
    store: &blockrep_store::Store,
    source: &blockrep_core::SourceId,
) -> Result<FollowPass, blockrep_store::Error> {
    use blockrep_store::{LaunchKind, Rebased};
    let mut pass = FollowPass {
        launches: Vec::new(),
        any_following: false,
    };
    let now = now_unix_ms();
    for launch in store.list_launches(Some(source))? {
        if launch.kind != LaunchKind::Standby {
            continue;
        }
        match store.follow_standby(&launch.name, now) {
            Ok(rebased) => {
                pass.any_following |=
                    matches!(rebased, Rebased::Moved | Rebased::Unchanged | Rebased::Open);
                pass.launches.push((launch.name, rebased));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            // One launch's damaged record must not stop the others.
            Err(e) => {
                warn!(launch = %launch.name, error = %e, "cannot move the standby launch");
                pass.any_following = true;
            }
        }
    }
    Ok(pass)
}

/// The sources with a following standby, for the start of the server.
pub(crate) fn followed_sources(
    store: &blockrep_store::Store,
) -> Result<Vec<blockrep_core::SourceId>, blockrep_store::Error> {
    let mut out = Vec::new();
    for launch in store.list_launches(None)? {
        if launch.kind != blockrep_store::LaunchKind::Standby || out.contains(&launch.source) {
            continue;
        }
        // A record that cannot be read is taken as following: the pass
        // after a commit says what is wrong with it, and the server starts.
        let follows = store.launch_workflow(&launch.name).map_or_else(
            |e| {
                warn!(launch = %launch.name, error = %e, "cannot read the standby's workflow record");
                true
            },
            |w| w.follow,
        );
        if follows {
            out.push(launch.source);
        }
    }
    Ok(out)
}

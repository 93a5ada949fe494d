//! The close signal of every launch served over NBD, the sources that have
//! warm standbys to move, and the workflow's counters: state the NBD
//! registry, the sessions, the expiry task and the admin API share.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use tokio::sync::watch;

/// Counters of the workflow, for metrics.
#[derive(Debug, Default)]
pub(crate) struct WorkflowCounters {
    /// Migration steps recorded.
    pub transitions: AtomicU64,
    /// Test launches deleted at their expiry.
    pub launches_expired: AtomicU64,
    /// Launch check results recorded.
    pub checks_recorded: AtomicU64,
    /// Launch check results recorded that failed.
    pub checks_failed: AtomicU64,
    /// Standby launches moved to a new committed point.
    pub standby_moves: AtomicU64,
}

/// The close signal of every launch served over NBD, by launch name.
#[derive(Debug, Default)]
pub(crate) struct Closers {
    by_launch: Mutex<HashMap<String, watch::Sender<bool>>>,
}

impl Closers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        self.by_launch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The close signal an export of `launch` watches; `None` while the
    /// launch is being closed (the export must not open).
    pub(crate) fn watch(&self, launch: &str) -> Option<watch::Receiver<bool>> {
        let mut by_launch = self.lock();
        let sender = by_launch
            .entry(launch.to_owned())
            .or_insert_with(|| watch::channel(false).0);
        (!*sender.borrow()).then(|| sender.subscribe())
    }

    /// Tells every export of `launch` to close, and refuses new ones.
    pub(crate) fn close(&self, launch: &str) {
        let mut by_launch = self.lock();
        let sender = by_launch
            .entry(launch.to_owned())
            .or_insert_with(|| watch::channel(false).0);
        sender.send_replace(true);
    }

    /// Whether `launch` is being closed (to be deleted).
    pub(crate) fn is_closing(&self, launch: &str) -> bool {
        self.lock()
            .get(launch)
            .is_some_and(|sender| *sender.borrow())
    }

    /// Forgets `launch` (deleted, or its release gave up): a launch made
    /// again under the name starts open.
    pub(crate) fn forget(&self, launch: &str) {
        self.lock().remove(launch);
    }
}

/// Sources with standby launches that follow them: their commits move
/// those launches (`drills::source_committed`). Filled at start and when a
/// following standby is made; a source is dropped once a pass finds none of
/// its launches following, unless a standby was made meanwhile (each
/// insertion bumps the source's generation).
#[derive(Debug, Default)]
pub(crate) struct Followed {
    sources: Mutex<(u64, BTreeMap<blockrep_core::SourceId, u64>)>,
}

impl Followed {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<blockrep_core::SourceId, u64>)> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source's generation, if it has standbys to move.
    pub(crate) fn generation(&self, source: &blockrep_core::SourceId) -> Option<u64> {
        self.lock().1.get(source).copied()
    }

    /// Adds the source under a generation no insertion ever had before (one
    /// counter for all, never reset), so an older pass cannot remove it.
    pub(crate) fn insert(&self, source: blockrep_core::SourceId) {
        let mut guard = self.lock();
        let (next, sources) = &mut *guard;
        *next += 1;
        sources.insert(source, *next);
    }

    /// Drops the source unless a standby was made since `generation`.
    pub(crate) fn remove_if_unchanged(&self, source: &blockrep_core::SourceId, generation: u64) {
        let mut guard = self.lock();
        if guard.1.get(source) == Some(&generation) {
            guard.1.remove(source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closing_launch_refuses_new_exports_until_forgotten() {
        let closers = Closers::default();
        let mut first = closers.watch("t1").unwrap();
        assert!(!*first.borrow_and_update());
        closers.close("t1");
        assert!(*first.borrow_and_update());
        assert!(closers.watch("t1").is_none());
        assert!(closers.watch("t2").is_some());
        closers.forget("t1");
        assert!(!*closers.watch("t1").unwrap().borrow());
    }
}

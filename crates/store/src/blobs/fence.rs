//! The garbage collector's fence and touched set, kept by the blob layer
//! (see `gc.rs` for the protocol): sessions and flushes hold the fence for
//! reading while they check and publish; the collector holds it for writing
//! only to list references and to sweep. Every id found or stored while a
//! collection runs is recorded, so the collection keeps it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use blockrep_core::ChunkId;

use crate::mutex::lock;

use super::GcReport;

/// The collector's shared state inside the blob layer.
#[derive(Debug, Default)]
pub(crate) struct GcState {
    /// The GC fence (see the module docs).
    fence: RwLock<()>,
    /// Whether the touched set exists; checked before taking its lock, so that
    /// recording costs one atomic load when no collection runs.
    tracking: AtomicBool,
    /// Ids touched since the running collection started.
    touched: Mutex<Option<HashSet<ChunkId>>>,
    /// One collection (or dry run) at a time.
    pub(crate) run: Mutex<()>,
    /// The last report, for metrics.
    pub(crate) last_report: Mutex<Option<GcReport>>,
}

impl GcState {
    /// Holds off the collector's listing and sweeping; see the module docs.
    pub(crate) fn read_fence(&self) -> RwLockReadGuard<'_, ()> {
        // The fence guards no data; a panic elsewhere leaves nothing to repair.
        self.fence
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops every holder of the read fence; see `gc.rs`.
    pub(crate) fn write_fence(&self) -> RwLockWriteGuard<'_, ()> {
        self.fence
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `id` as touched if a collection runs.
    pub(crate) fn note(&self, id: &ChunkId) {
        self.note_all(std::slice::from_ref(id));
    }

    /// Records every non-zero id as touched if a collection runs.
    pub(crate) fn note_all<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) {
        if !self.tracking.load(Ordering::SeqCst) {
            return;
        }
        if let Some(touched) = lock(&self.touched).as_mut() {
            touched.extend(ids.into_iter().filter(|id| !id.is_zero()));
        }
    }

    /// Whether a collection is running (and [`GcState::note`] records).
    pub(crate) fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Whether someone holds the fence, so that a collection could not list
    /// the referenced roots now: for tests that stage an interleaving.
    #[cfg(test)]
    pub(crate) fn fence_is_held(&self) -> bool {
        self.fence.try_write().is_err()
    }

    /// Whether `id` was touched since the running collection started.
    pub(crate) fn is_touched(&self, id: &ChunkId) -> bool {
        lock(&self.touched)
            .as_ref()
            .is_some_and(|touched| touched.contains(id))
    }

    /// The ids touched so far.
    pub(crate) fn touched_snapshot(&self) -> HashSet<ChunkId> {
        lock(&self.touched).clone().unwrap_or_default()
    }

    /// Starts recording touches until the returned guard is dropped.
    pub(crate) fn start_tracking(&self) -> Tracking<'_> {
        *lock(&self.touched) = Some(HashSet::new());
        self.tracking.store(true, Ordering::SeqCst);
        Tracking(self)
    }
}

/// Ends the touched set when the collection ends, however it ends.
pub(crate) struct Tracking<'a>(&'a GcState);

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        self.0.tracking.store(false, Ordering::SeqCst);
        *lock(&self.0.touched) = None;
    }
}

//! Lifecycle changes (cutover finished, failback started or done, the
//! operator's reset), one at a time.
//!
//! A change is two writes: the durable record in the store and its mirror in
//! the status table, which sessions read for the fence and the admin API shows.
//! A reset running between a session's two writes would leave them disagreeing:
//! the store fenced while the table lets replication in (or the reverse, until
//! the next restart reads the store). Every change therefore takes
//! [`Shared::lifecycle_lock`] around both writes. One lock for the whole server
//! is enough: lifecycle changes are rare operator-paced events.

use std::sync::Arc;

use blockrep_core::SourceId;
use blockrep_store::Lifecycle;

use crate::shared::Shared;

/// What a reset found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reset {
    /// The source's fence (if any) is lifted.
    Done,
    /// The store has no replica of this source: nothing was written anywhere.
    UnknownSource,
}

/// Why a reset failed.
#[derive(Debug)]
pub(crate) enum ResetFailed {
    /// The store refused or failed.
    Store(blockrep_store::Error),
    /// The blocking task did not finish (it panicked).
    Task(String),
}

/// Durably writes `record` as the source's lifecycle and mirrors it in the
/// status table (a new lifecycle also answers any pending cutover request).
pub(crate) async fn write(
    shared: &Arc<Shared>,
    source: &SourceId,
    record: &Lifecycle,
) -> Result<(), String> {
    let serial = shared.lifecycle_lock.lock().await;
    write_locked(shared, source, record, serial).await
}

/// Both halves of a lifecycle write, under the lock the caller holds.
async fn write_locked(
    shared: &Arc<Shared>,
    source: &SourceId,
    record: &Lifecycle,
    _serial: tokio::sync::MutexGuard<'_, ()>,
) -> Result<(), String> {
    let store = Arc::clone(&shared.store);
    let (id, stored) = (source.clone(), record.clone());
    tokio::task::spawn_blocking(move || store.set_lifecycle(&id, &stored))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    #[cfg(test)]
    tests::between_writes(source).await;
    let record = record.clone();
    shared.ledger.sources.update(source, |r| {
        r.lifecycle = Some(record);
        r.cutover_requested = false;
    });
    Ok(())
}

/// Like [`write`], but only if the source's lifecycle is still `expected` (as
/// the status table mirrors it): a change that was decided from a record read
/// earlier (a failback's next stage) must not undo an operator's reset, or
/// any other change, made in between. Returns `false`, writing nothing, when
/// the record has moved.
pub(crate) async fn write_if(
    shared: &Arc<Shared>,
    source: &SourceId,
    expected: Option<&Lifecycle>,
    record: &Lifecycle,
) -> Result<bool, String> {
    let serial = shared.lifecycle_lock.lock().await;
    let current = shared
        .ledger
        .sources
        .update(source, |r| r.lifecycle.clone());
    if current.as_ref() != expected {
        return Ok(false);
    }
    // `write` takes the lock itself; holding it across the check and the
    // write is what makes this a compare-and-set, so the write is inlined.
    write_locked(shared, source, record, serial).await?;
    Ok(true)
}

/// The operator's reset: removes the lifecycle record, so replication may
/// start again. A source the store has no replica of is left alone (no
/// directory, no status entry is made for it).
pub(crate) async fn reset(shared: &Arc<Shared>, source: &SourceId) -> Result<Reset, ResetFailed> {
    let _serial = shared.lifecycle_lock.lock().await;
    let store = Arc::clone(&shared.store);
    let id = source.clone();
    let found = tokio::task::spawn_blocking(move || {
        if store.head(&id)?.is_none() {
            return Ok(Reset::UnknownSource);
        }
        store.clear_lifecycle(&id).map(|()| Reset::Done)
    })
    .await
    .map_err(|e| ResetFailed::Task(e.to_string()))?
    .map_err(ResetFailed::Store)?;
    if found == Reset::Done {
        shared.ledger.sources.update_known(source, |r| {
            r.lifecycle = None;
            r.cutover_requested = false;
            r.failback_finalize_requested = false;
        });
    }
    Ok(found)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use blockrep_core::{ChunkId, Geometry, Root};
    use blockrep_store::{Downtime, LifecycleStage, Store};
    use tokio::sync::Notify;

    use super::*;
    use crate::status::SourceTable;

    /// A test's hold on a source's lifecycle write between its two halves.
    #[derive(Default)]
    struct Gate {
        /// Told when the store write is done.
        reached: Notify,
        /// Waited for before the status table is written.
        resume: Notify,
    }

    /// Gates by source: only the sources a test names are held.
    static GATES: Mutex<Option<HashMap<SourceId, Arc<Gate>>>> = Mutex::new(None);

    /// The test-only pause between the store write and the table write.
    pub(crate) async fn between_writes(source: &SourceId) {
        let gate = GATES
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|gates| gates.get(source).cloned());
        if let Some(gate) = gate {
            gate.reached.notify_one();
            gate.resume.notified().await;
        }
    }

    fn hold(source: &SourceId) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        GATES
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(source.clone(), Arc::clone(&gate));
        gate
    }

    fn release(source: &SourceId) {
        if let Some(gates) = GATES.lock().unwrap().as_mut() {
            gates.remove(source);
        }
    }

    /// A server's shared state over a store holding one committed source.
    fn shared_with_source(dir: &std::path::Path, source: &SourceId) -> Arc<Shared> {
        let store = Store::open_exclusive(&dir.join("data")).unwrap();
        let geometry = Geometry::new(1 << 20, 64 * 1024).unwrap();
        let ids = vec![ChunkId::ZERO; geometry.chunk_count() as usize];
        let (root, pages) = Root::build(geometry, &ids);
        store
            .commit(
                source,
                1,
                &root,
                &pages,
                0,
                blockrep_core::clock::now_unix_ms(),
            )
            .unwrap();
        let config = crate::ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.join("data"),
            dir.join("tls"),
        );
        let sources = SourceTable::default();
        sources.update(source, |_| ());
        Arc::new(Shared::new(Arc::new(store), config, sources, None))
    }

    fn failed_back(launch: &str) -> Lifecycle {
        Lifecycle {
            stage: LifecycleStage::FailedBack,
            epoch: 1,
            root: ChunkId::ZERO,
            snapshot: "snap".into(),
            launch: launch.into(),
            cutover_unix_ms: 1,
            downtime: Downtime::default(),
        }
    }

    /// The stored record and the table's mirror; they must agree.
    fn both(shared: &Shared, source: &SourceId) -> (Option<Lifecycle>, Option<Lifecycle>) {
        let stored = shared.store.lifecycle(source).unwrap();
        let mirrored = shared
            .ledger
            .sources
            .update(source, |r| r.lifecycle.clone());
        (stored, mirrored)
    }

    /// A reset arriving while a failback's lifecycle write is between its
    /// store write and its table write must wait for the whole write: the
    /// outcome is "write, then reset" (no fence anywhere), never a store
    /// without a fence and a table with one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reset_waits_for_a_lifecycle_write_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let source = SourceId::new("race-gated").unwrap();
        let shared = shared_with_source(dir.path(), &source);
        let gate = hold(&source);
        let writer = tokio::spawn({
            let (shared, source) = (Arc::clone(&shared), source.clone());
            async move { write(&shared, &source, &failed_back("l")).await }
        });
        gate.reached.notified().await;
        let resetter = tokio::spawn({
            let (shared, source) = (Arc::clone(&shared), source.clone());
            async move { reset(&shared, &source).await }
        });
        // Without the lock the reset finishes here, inside the write.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reset_finished_inside_the_write = resetter.is_finished();
        gate.resume.notify_one();
        writer.await.unwrap().unwrap();
        assert_eq!(resetter.await.unwrap().unwrap(), Reset::Done);
        release(&source);
        assert!(
            !reset_finished_inside_the_write,
            "the reset ran between the two halves of a lifecycle write"
        );
        let (stored, mirrored) = both(&shared, &source);
        assert_eq!(stored, None);
        assert_eq!(
            mirrored, None,
            "the table still shows a fence the store lost"
        );
    }

    /// A failback decides its next stage from the record it read when it
    /// started; a reset made since must win, not be undone by that write.
    #[tokio::test]
    async fn a_write_decided_before_a_reset_does_not_undo_it() {
        let dir = tempfile::tempdir().unwrap();
        let source = SourceId::new("cas").unwrap();
        let shared = shared_with_source(dir.path(), &source);
        let failing_back = Lifecycle {
            stage: LifecycleStage::FailingBack,
            ..failed_back("l")
        };
        assert!(
            write_if(&shared, &source, None, &failing_back)
                .await
                .unwrap()
        );
        assert_eq!(reset(&shared, &source).await.unwrap(), Reset::Done);
        // The failback, unaware of the reset, moves on from what it wrote.
        let wrote = write_if(&shared, &source, Some(&failing_back), &failed_back("l"))
            .await
            .unwrap();
        assert!(!wrote, "a stale failback write undid the reset");
        assert_eq!(both(&shared, &source), (None, None));
        // With the record it expects, it goes through.
        assert!(
            write_if(&shared, &source, None, &failing_back)
                .await
                .unwrap()
        );
        assert_eq!(
            both(&shared, &source),
            (Some(failing_back.clone()), Some(failing_back))
        );
    }

    /// Many concurrent writes and resets: afterwards the store and the table
    /// always agree, on one of the two serial outcomes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_resets_and_writes_end_in_a_serial_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let source = SourceId::new("race-many").unwrap();
        let shared = shared_with_source(dir.path(), &source);
        for round in 0..100 {
            let record = failed_back(&format!("l{round}"));
            let writer = tokio::spawn({
                let (shared, source, record) =
                    (Arc::clone(&shared), source.clone(), record.clone());
                async move { write(&shared, &source, &record).await }
            });
            let resetter = tokio::spawn({
                let (shared, source) = (Arc::clone(&shared), source.clone());
                async move { reset(&shared, &source).await }
            });
            writer.await.unwrap().unwrap();
            resetter.await.unwrap().unwrap();
            let (stored, mirrored) = both(&shared, &source);
            assert_eq!(stored, mirrored, "round {round}: store and table disagree");
            assert!(
                stored.is_none() || stored == Some(record),
                "round {round}: {stored:?}"
            );
        }
    }

    /// A reset of a source the store does not know writes nothing anywhere.
    #[tokio::test]
    async fn reset_of_an_unknown_source_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared_with_source(dir.path(), &SourceId::new("known").unwrap());
        let ghost = SourceId::new("ghost-1").unwrap();
        assert_eq!(reset(&shared, &ghost).await.unwrap(), Reset::UnknownSource);
        assert!(!dir.path().join("data/sources/ghost-1").exists());
        assert!(shared.ledger.sources.update_known(&ghost, |_| ()).is_none());
    }
}

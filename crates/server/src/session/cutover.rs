//! Cutover: the final epoch (`Commit` with `last`) is committed, then the
//! server takes a `cutover` snapshot and makes the cutover launch from it,
//! records the lifecycle (which fences the source) and answers
//! `CutoverReady`; the agent reports its side of the downtime and leaves.
//! From then on every epoch of the source is refused with `Fenced` until an
//! operator resets it.

use std::sync::Arc;
use std::time::Instant;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{ChunkId, SourceId};
use blockrep_proto::{ErrorCode, Message};
use blockrep_store::{Downtime, LaunchKind, Lifecycle, LifecycleStage, SnapshotKind};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::epoch::EpochCounters;
use super::{End, Outcome, Reject, Session, internal};

/// Longest part of a source id a cutover launch's name keeps, so that the
/// name with its suffix stays a valid launch name.
const LAUNCH_NAME_SOURCE_CHARS_MAX: usize = 48;

/// The name of a source's cutover launch: `SOURCE-cutover`, or the first of
/// `SOURCE-cutover-2`, `-3`, ... that `taken` says is free.
fn cutover_launch_name<E>(
    source: &SourceId,
    mut taken: impl FnMut(&str) -> Result<bool, E>,
) -> Result<String, E> {
    let id = source.as_str();
    let base = format!(
        "{}-cutover",
        &id[..id.len().min(LAUNCH_NAME_SOURCE_CHARS_MAX)]
    );
    let mut name = base.clone();
    let mut n = 2;
    while taken(&name)? {
        name = format!("{base}-{n}");
        n += 1;
    }
    Ok(name)
}

/// The final epoch as the cutover's downtime breakdown needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct CutoverTimes {
    /// When the agent's backlog report arrived: the end of its final scan.
    pub backlog_unix_ms: u64,
    pub scan_started_unix_ms: u64,
    pub transfer_ms: u64,
    pub commit_ms: u64,
    /// The final epoch and the root (of the disk, or the machine) it committed.
    pub epoch: u64,
    pub root: ChunkId,
}

impl Default for CutoverTimes {
    fn default() -> Self {
        Self {
            backlog_unix_ms: 0,
            scan_started_unix_ms: 0,
            transfer_ms: 0,
            commit_ms: 0,
            epoch: 0,
            root: ChunkId::ZERO,
        }
    }
}

impl CutoverTimes {
    /// Records the final epoch's commit of `root`, which began at `started`.
    pub(super) fn final_commit(
        &mut self,
        started: Instant,
        counters: &EpochCounters,
        scan_started_unix_ms: u64,
        epoch: u64,
        root: ChunkId,
    ) {
        self.commit_ms = started.elapsed().as_millis() as u64;
        self.transfer_ms = counters
            .started
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        self.scan_started_unix_ms = scan_started_unix_ms;
        self.epoch = epoch;
        self.root = root;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Refuses replication of a source that has been cut over.
    pub(super) fn check_fence(&self) -> Result<(), Outcome> {
        let fenced = self
            .shared
            .ledger
            .sources
            .update(&self.source, |r| r.lifecycle.clone());
        let state = crate::migration::current(&self.shared, &self.source);
        if matches!(
            state,
            blockrep_store::MigrationState::Finalized | blockrep_store::MigrationState::Archived
        ) {
            return Err(Reject::new(
                ErrorCode::Fenced,
                format!(
                    "source {} is {state}: its migration is finished and its replication \
                     released; stop this agent",
                    self.source
                ),
            )
            .into());
        }
        match fenced {
            None => Ok(()),
            Some(lifecycle) => Err(Reject::new(
                ErrorCode::Fenced,
                format!(
                    "cut over at epoch {} (launch {}); replication is fenced until the operator \
                     resets it with `blockrep cutover --reset --source {}`",
                    lifecycle.epoch, lifecycle.launch, self.source
                ),
            )
            .into()),
        }
    }

    /// After the final commit (of a disk, or of every volume of a machine):
    /// cutover snapshot, cutover launch (one export per volume for a
    /// machine), fence, answer.
    pub(super) async fn finish_cutover(&mut self) -> Result<(), Outcome> {
        let started = Instant::now();
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let times = self.cutover_times;
        let (epoch, root_id) = (times.epoch, times.root);
        let now = now_unix_ms();
        let preparing = tokio::task::spawn_blocking(move || -> Result<_, blockrep_store::Error> {
            let snapshot =
                store.create_snapshot_of_kind(&source, SnapshotKind::Cutover, None, None, now)?;
            let name = cutover_launch_name(&source, |name| Ok(store.launch(name)?.is_some()))?;
            let launch =
                store.create_launch(&source, &snapshot.name, &name, LaunchKind::Cutover, now)?;
            Ok((snapshot, launch))
        });
        let (snapshot, launch) = self
            .connection
            .working(preparing)
            .await
            .map_err(internal)?
            .map_err(|e| {
                internal(format!(
                    "cutover snapshot or launch failed (the final epoch is committed): {e}"
                ))
            })?;
        let launch_ms = started.elapsed().as_millis() as u64;
        let scan_ms = times
            .backlog_unix_ms
            .saturating_sub(times.scan_started_unix_ms);
        let mut lifecycle = Lifecycle {
            stage: LifecycleStage::CutOver,
            epoch,
            root: root_id,
            snapshot: snapshot.name.clone(),
            launch: launch.name.clone(),
            cutover_unix_ms: now,
            downtime: Downtime {
                scan_ms,
                transfer_ms: times.transfer_ms,
                commit_ms: times.commit_ms,
                launch_ms,
                ..Downtime::default()
            },
        };
        self.persist_lifecycle(&lifecycle).await?;
        info!(source = %self.source, epoch, root = %root_id, snapshot = %snapshot.name, launch = %launch.name,
              commit_ms = times.commit_ms, launch_ms, "cutover ready; source fenced");
        self.connection
            .send(&Message::CutoverReady {
                epoch,
                root: root_id,
                snapshot: snapshot.name,
                launch: launch.name,
                commit_ms: times.commit_ms,
                launch_ms,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        // The agent reports its side of the downtime, then leaves.
        if let Ok(Message::CutoverReport {
            hook_ms,
            scan_ms,
            transfer_ms,
            total_ms,
        }) = self.read(self.shared.config.handshake_timeout).await
        {
            let written = lifecycle.clone();
            lifecycle.downtime.hook_ms = hook_ms;
            lifecycle.downtime.scan_ms = scan_ms;
            lifecycle.downtime.transfer_ms = transfer_ms;
            lifecycle.downtime.total_ms = total_ms;
            // Only onto the record written above: an operator's reset made
            // since (the agent may have left already) is not undone.
            crate::lifecycle::write_if(&self.shared, &self.source, Some(&written), &lifecycle)
                .await
                .map_err(internal)?;
            info!(source = %self.source, hook_ms, scan_ms, transfer_ms, commit_ms = lifecycle.downtime.commit_ms,
                  launch_ms, downtime_ms = total_ms, "cutover downtime");
        }
        Err(Outcome::End(End::Closed))
    }

    /// Writes the lifecycle record durably and mirrors it in the status table,
    /// serialized with the operator's reset.
    pub(super) async fn persist_lifecycle(&self, lifecycle: &Lifecycle) -> Result<(), Outcome> {
        crate::lifecycle::write(&self.shared, &self.source, lifecycle)
            .await
            .map_err(internal)?;
        if lifecycle.stage == blockrep_store::LifecycleStage::CutOver {
            let step = crate::migration::Step::CutoverDone {
                epoch: lifecycle.epoch,
                launch: lifecycle.launch.clone(),
            };
            // Off the downtime's path: the fence above is what stops
            // replication; the history records it a moment later.
            let (shared, source) = (Arc::clone(&self.shared), self.source.clone());
            tokio::spawn(async move {
                crate::migration::apply_by_server(&shared, &source, step).await;
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutover_launch_takes_the_first_free_name() {
        let source = SourceId::new("web").unwrap();
        let free = cutover_launch_name::<()>(&source, |_| Ok(false));
        assert_eq!(free.unwrap(), "web-cutover");
        let taken = ["web-cutover", "web-cutover-2"];
        let next = cutover_launch_name::<()>(&source, |name| Ok(taken.contains(&name)));
        assert_eq!(next.unwrap(), "web-cutover-3");
        let failed = cutover_launch_name(&source, |_| Err("store"));
        assert_eq!(failed.unwrap_err(), "store");
    }

    #[test]
    fn a_long_source_id_is_shortened_in_the_launch_name() {
        let long = "s".repeat(60);
        let source = SourceId::new(&long).unwrap();
        let name = cutover_launch_name::<()>(&source, |_| Ok(false)).unwrap();
        assert_eq!(
            name,
            format!("{}-cutover", &long[..LAUNCH_NAME_SOURCE_CHARS_MAX])
        );
    }
}

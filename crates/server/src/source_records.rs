//! What a source's records in the store say of it (its head, cutover fence,
//! last migration step and RPO target), and how they are taken into its
//! figures here: for every source when the server starts, and for one whose
//! records another server of a shared bucket may have changed.

use std::time::Duration;

use blockrep_core::SourceId;
use blockrep_store::{Head, Lifecycle, MigrationEvent, MigrationState, Store};

use crate::status::SourceRecord;

/// A source's records as the store has them now.
pub(crate) struct SourceRecords {
    head: Option<Head>,
    lifecycle: Option<Lifecycle>,
    /// The workflow's last step.
    migration: Option<MigrationEvent>,
    rpo_target: Option<Duration>,
}

impl SourceRecords {
    /// Reads the records of `source` from `store`.
    pub(crate) fn read(store: &Store, source: &SourceId) -> Result<Self, blockrep_store::Error> {
        Ok(Self {
            head: store.head(source)?,
            lifecycle: store.lifecycle(source)?,
            migration: store.migration_history(source)?.last().cloned(),
            rpo_target: store.rpo_target(source)?,
        })
    }

    /// The figures of a source as a starting server knows it, `None` for one
    /// without a head (nothing committed). With no workflow step recorded,
    /// its state is the one its head and fence imply.
    pub(crate) fn into_record(self, now_unix_ms: u64) -> Option<SourceRecord> {
        let head = self.head.as_ref()?;
        let mut record = SourceRecord::from_head(head, now_unix_ms);
        record.migration = Some(MigrationState::implied(
            head.synced_scan_started_unix_ms != 0,
            self.lifecycle.is_some(),
        ));
        self.apply(&mut record, now_unix_ms);
        Some(record)
    }

    /// Takes what the records say into `record`: the head's epoch, root and
    /// times (when the epoch moved), the cutover fence, the workflow's state
    /// (when a step is recorded) and the RPO target.
    pub(crate) fn apply(self, record: &mut SourceRecord, now_unix_ms: u64) {
        if let Some(head) = &self.head
            && head.epoch != record.epoch
        {
            let fresh = SourceRecord::from_head(head, now_unix_ms);
            record.epoch = fresh.epoch;
            record.root = fresh.root;
            record.consistency = fresh.consistency;
            record.synced_scan_started_unix_ms = fresh.synced_scan_started_unix_ms;
            record.last_commit_unix_ms = fresh.last_commit_unix_ms;
        }
        record.lifecycle = self.lifecycle;
        record.rpo_target_override = self.rpo_target;
        if let Some(last) = self.migration {
            record.migration = Some(last.to);
            record.migration_since_unix_ms = last.unix_ms;
            // A cutover requested (here before a restart, or through another
            // server) is still requested, so the agent is told at its next
            // commit; one the fence or a reset ended is not.
            record.cutover_requested =
                last.to == MigrationState::CuttingOver && record.lifecycle.is_none();
        }
    }
}

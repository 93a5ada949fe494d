//! What the server knows about each source: lag, backlog, counters and state, as
//! MGN and S3 Replication Time Control name them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{Consistency, SourceId};
use blockrep_store::{Head, Lifecycle, LifecycleStage};
use serde::{Deserialize, Serialize};

use crate::capture::{CaptureRecord, CaptureView, SourceMode};

/// Replication state of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// No complete pass over the disk has been committed yet.
    InitialSync,
    /// Lag within the RPO target.
    Healthy,
    /// Lag over the RPO target.
    Lagging,
    /// No agent contact for longer than the stall threshold.
    Stalled,
    /// The final epoch of a cutover is in progress.
    CuttingOver,
    /// Cut over: replication is fenced, the cutover launch is ready.
    CutOver,
    /// The original disk is being brought back to a launch volume.
    FailingBack,
    /// The original disk equals the launch volume.
    FailedBack,
    /// Another server of the shared bucket serves it (holds its lease): its
    /// lag and state are reported there.
    ServedElsewhere,
}

impl SourceState {
    /// Every state, in a fixed order (for metrics with one series per state).
    pub const ALL: [SourceState; 9] = [
        SourceState::InitialSync,
        SourceState::Healthy,
        SourceState::Lagging,
        SourceState::Stalled,
        SourceState::CuttingOver,
        SourceState::CutOver,
        SourceState::FailingBack,
        SourceState::FailedBack,
        SourceState::ServedElsewhere,
    ];

    /// The state's name as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::InitialSync => "initial_sync",
            SourceState::Healthy => "healthy",
            SourceState::Lagging => "lagging",
            SourceState::Stalled => "stalled",
            SourceState::CuttingOver => "cutting_over",
            SourceState::CutOver => "cut_over",
            SourceState::FailingBack => "failing_back",
            SourceState::FailedBack => "failed_back",
            SourceState::ServedElsewhere => "served_elsewhere",
        }
    }
}

/// One volume of a machine, as the admin API reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub disk_size_bytes: u64,
    /// The machine's lag: every volume is in each of its recovery points,
    /// so no volume's point is older or newer than the machine's.
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    /// What the agent found to send for this volume in the epoch under way
    /// (0 once it committed).
    #[serde(default)]
    pub bytes_pending: u64,
    #[serde(default)]
    pub chunks_pending: u64,
}

/// One volume of a machine in the status table: its size as the agent last
/// said, and its backlog in the epoch under way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeRecord {
    pub name: String,
    pub disk_size_bytes: u64,
    pub bytes_pending: u64,
    pub chunks_pending: u64,
}

/// A source as the admin API reports it (`GET /v1/sources`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceView {
    pub source: String,
    pub state: SourceState,
    pub connected: bool,
    pub epoch: u64,
    pub root: Option<String>,
    /// How the head's root was taken: `crash-consistent`, `quiesced` or
    /// `live`; `None` before the first commit.
    #[serde(default)]
    pub consistency: Option<String>,
    /// The sum of a machine's volumes.
    pub disk_size_bytes: u64,
    pub chunk_size_bytes: u32,
    /// A machine's volumes, by name with their sizes; empty for a source of
    /// one disk.
    #[serde(default)]
    pub volumes: Vec<VolumeView>,
    /// Now minus the scan start of the last complete commit (the RPO now);
    /// `None` during the initial sync.
    pub lag_seconds: Option<f64>,
    pub rpo_target_seconds: f64,
    pub max_replication_time_seconds: f64,
    pub bytes_pending: u64,
    pub chunks_pending: u64,
    pub throughput_bytes_per_second: f64,
    pub bytes_received_total: u64,
    pub chunks_received_total: u64,
    pub chunks_deduplicated_total: u64,
    pub bytes_deduplicated_total: u64,
    pub epochs_committed_total: u64,
    /// Chunks received zstd-compressed since the server started.
    #[serde(default)]
    pub chunks_compressed_total: u64,
    /// Share of the data chunks of the last epoch that had any that came
    /// compressed: the agent's compression choice as the server sees it.
    #[serde(default)]
    pub compressed_chunk_share: Option<f64>,
    pub seconds_since_contact: Option<f64>,
    pub last_commit_unix_ms: u64,
    /// Whether the operator asked for a cutover that the agent has not run yet.
    pub cutover_requested: bool,
    /// The cutover, once done (kept through failback).
    pub cutover: Option<CutoverView>,
    /// Chunks and bytes sent to failback agents (frames, since the server started).
    pub failback_chunks_sent_total: u64,
    pub failback_bytes_sent_total: u64,
    /// `capture` while the source's agent reports write capture, else `scan`.
    #[serde(default)]
    pub mode: SourceMode,
    /// The agent's last write-capture report; `None` in scan mode.
    #[serde(default)]
    pub capture: Option<CaptureView>,
    /// Where the source stands in the migration workflow (`not_ready`,
    /// `ready_for_test`, `testing`, `ready_for_cutover`, `cutting_over`,
    /// `cut_over`, `finalized`, `archived`), or `disconnected` while the
    /// agent of a source not yet cut over has been silent past the stall
    /// threshold.
    #[serde(default)]
    pub migration_state: String,
    /// The recorded state (what `disconnected` stands in front of).
    #[serde(default)]
    pub migration_recorded: String,
    /// When the recorded state was entered, Unix ms (0: never recorded).
    #[serde(default)]
    pub migration_since_unix_ms: u64,
    /// With the store in a shared bucket: the source's lease, this server's
    /// while it holds it, else as last read from the bucket (every third of
    /// a lease time; it may have expired since). `None` for a local store.
    #[serde(default)]
    pub lease: Option<LeaseView>,
    /// For a source encrypted at rest: the data key sealing its new data and
    /// the KEK wrapping it. `None` for a source stored in clear (or one
    /// whose keys this server was not given).
    #[serde(default)]
    pub encryption: Option<EncryptionView>,
}

/// How a source is encrypted at rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncryptionView {
    /// The reference of the data key that seals its new data.
    pub key: String,
    /// The id of the KEK that wraps its data keys.
    pub kek_id: String,
}

/// Who holds a source's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseView {
    /// The server holding it (its replication address unless named).
    pub holder: String,
    pub expires_unix_ms: u64,
    /// Grows with every change of holder.
    pub generation: u64,
}

/// A finished cutover: what was launched and how long the downtime was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CutoverView {
    pub epoch: u64,
    pub root: String,
    pub snapshot: String,
    pub launch: String,
    pub cutover_unix_ms: u64,
    pub hook_ms: u64,
    pub scan_ms: u64,
    pub transfer_ms: u64,
    pub commit_ms: u64,
    pub launch_ms: u64,
    /// Downtime: from the end of the pre-cutover hook (or the request) to ready.
    pub downtime_ms: u64,
}

impl From<&Lifecycle> for CutoverView {
    fn from(l: &Lifecycle) -> Self {
        Self {
            epoch: l.epoch,
            root: l.root.to_hex(),
            snapshot: l.snapshot.clone(),
            launch: l.launch.clone(),
            cutover_unix_ms: l.cutover_unix_ms,
            hook_ms: l.downtime.hook_ms,
            scan_ms: l.downtime.scan_ms,
            transfer_ms: l.downtime.transfer_ms,
            commit_ms: l.downtime.commit_ms,
            launch_ms: l.downtime.launch_ms,
            downtime_ms: l.downtime.total_ms,
        }
    }
}

/// Mutable per-source record.
#[derive(Debug, Clone, Default)]
pub(crate) struct SourceRecord {
    pub connected: bool,
    pub last_contact_unix_ms: u64,
    pub epoch: u64,
    pub root: Option<String>,
    /// The label of the head's root; `None` before the first commit.
    pub consistency: Option<Consistency>,
    pub disk_size_bytes: u64,
    pub chunk_size_bytes: u32,
    /// A machine's volumes, as its agent last said; empty for a single disk.
    pub volumes: Vec<VolumeRecord>,
    pub synced_scan_started_unix_ms: u64,
    pub last_commit_unix_ms: u64,
    pub max_replication_time_ms: u64,
    pub bytes_pending: u64,
    pub chunks_pending: u64,
    pub throughput_bytes_per_second: f64,
    pub bytes_received_total: u64,
    pub chunks_received_total: u64,
    pub chunks_deduplicated_total: u64,
    pub bytes_deduplicated_total: u64,
    pub epochs_committed_total: u64,
    /// Chunks received compressed since the server started.
    pub chunks_compressed_total: u64,
    /// Share of the last epoch's data chunks that came compressed: the
    /// agent's compression choice as the server sees it (`None` before an
    /// epoch with data).
    pub compressed_chunk_share: Option<f64>,
    /// Cutover, failback: the persisted record (fences replication).
    pub lifecycle: Option<Lifecycle>,
    /// The operator asked for a cutover; told to the agent at its next commit.
    pub cutover_requested: bool,
    /// The final epoch of a cutover is running.
    pub cutting_over: bool,
    /// The operator asked to finish a running failback.
    pub failback_finalize_requested: bool,
    pub failback_chunks_sent_total: u64,
    pub failback_bytes_sent_total: u64,
    /// RPO target set for this source through the admin API, as its record
    /// in the store says (read at start and when the source's records are
    /// taken from the bucket).
    pub rpo_target_override: Option<Duration>,
    /// Write capture's reports (`None`: the source is scanned).
    pub capture: Option<CaptureRecord>,
    /// The migration state as last recorded (`None`: no step yet, so
    /// `not_ready`), and since when.
    pub migration: Option<blockrep_store::MigrationState>,
    pub migration_since_unix_ms: u64,
}

/// Thresholds that decide a source's state.
#[derive(Debug, Clone, Copy)]
pub struct StateThresholds {
    /// Lag above this makes a source `lagging`.
    pub rpo_target: Duration,
    /// No contact for this long makes a source `stalled`.
    pub stall_after: Duration,
}

impl SourceRecord {
    pub(crate) fn from_head(head: &Head, now_unix_ms: u64) -> Self {
        Self {
            epoch: head.epoch,
            root: Some(head.root.to_hex()),
            consistency: Some(head.consistency),
            synced_scan_started_unix_ms: head.synced_scan_started_unix_ms,
            last_commit_unix_ms: head.committed_unix_ms,
            // A source found in the store has not been heard from since start.
            last_contact_unix_ms: now_unix_ms,
            ..Self::default()
        }
    }

    /// The RPO target that applies to this source: its override, or the server's.
    pub(crate) fn rpo_target(&self, thresholds: StateThresholds) -> Duration {
        self.rpo_target_override.unwrap_or(thresholds.rpo_target)
    }

    /// Records the backlog an agent reported: the source's, or in a
    /// machine that of volume `volume`, the machine's being the sum of its
    /// volumes'.
    pub(crate) fn set_backlog(
        &mut self,
        volume: Option<usize>,
        chunks_pending: u64,
        bytes_pending: u64,
    ) {
        match volume.and_then(|index| self.volumes.get_mut(index)) {
            Some(volume) => {
                volume.chunks_pending = chunks_pending;
                volume.bytes_pending = bytes_pending;
                // Saturating: each volume's figure is an agent's word.
                let total = |of: fn(&VolumeRecord) -> u64| {
                    self.volumes.iter().map(of).fold(0, u64::saturating_add)
                };
                self.chunks_pending = total(|v| v.chunks_pending);
                self.bytes_pending = total(|v| v.bytes_pending);
            }
            None => {
                self.chunks_pending = chunks_pending;
                self.bytes_pending = bytes_pending;
            }
        }
    }

    pub(crate) fn lag_ms(&self, now_unix_ms: u64) -> Option<u64> {
        (self.synced_scan_started_unix_ms != 0)
            .then(|| now_unix_ms.saturating_sub(self.synced_scan_started_unix_ms))
    }

    pub(crate) fn state(&self, thresholds: StateThresholds, now_unix_ms: u64) -> SourceState {
        if self.cutting_over {
            return SourceState::CuttingOver;
        }
        if let Some(lifecycle) = &self.lifecycle {
            return match lifecycle.stage {
                LifecycleStage::CutOver => SourceState::CutOver,
                LifecycleStage::FailingBack => SourceState::FailingBack,
                LifecycleStage::FailedBack => SourceState::FailedBack,
            };
        }
        let silent_ms = now_unix_ms.saturating_sub(self.last_contact_unix_ms);
        if silent_ms > thresholds.stall_after.as_millis() as u64 {
            return SourceState::Stalled;
        }
        match self.lag_ms(now_unix_ms) {
            None => SourceState::InitialSync,
            Some(lag) if lag > self.rpo_target(thresholds).as_millis() as u64 => {
                SourceState::Lagging
            }
            Some(_) => SourceState::Healthy,
        }
    }

    /// The recorded migration state (`not_ready` before any step).
    pub(crate) fn migration_recorded(&self) -> blockrep_store::MigrationState {
        self.migration
            .unwrap_or(blockrep_store::MigrationState::NotReady)
    }

    /// The migration state shown: the recorded one, or `disconnected` for a
    /// source not yet cut over whose agent is silent past the threshold.
    pub(crate) fn migration_shown(
        &self,
        thresholds: StateThresholds,
        now_unix_ms: u64,
    ) -> &'static str {
        use blockrep_store::MigrationState::*;
        let recorded = self.migration_recorded();
        let before_cutover = matches!(
            recorded,
            NotReady | ReadyForTest | Testing | ReadyForCutover | CuttingOver
        );
        let silent_ms = now_unix_ms.saturating_sub(self.last_contact_unix_ms);
        if before_cutover
            && !self.connected
            && silent_ms > thresholds.stall_after.as_millis() as u64
        {
            "disconnected"
        } else {
            recorded.as_str()
        }
    }

    pub(crate) fn view(
        &self,
        source: &SourceId,
        thresholds: StateThresholds,
        now: u64,
    ) -> SourceView {
        SourceView {
            source: source.to_string(),
            state: self.state(thresholds, now),
            connected: self.connected,
            epoch: self.epoch,
            root: self.root.clone(),
            consistency: self.consistency.map(|c| c.as_str().to_owned()),
            disk_size_bytes: self.disk_size_bytes,
            chunk_size_bytes: self.chunk_size_bytes,
            volumes: self
                .volumes
                .iter()
                .map(|v| VolumeView {
                    name: v.name.clone(),
                    disk_size_bytes: v.disk_size_bytes,
                    lag_seconds: self.lag_ms(now).map(|ms| ms as f64 / 1000.0),
                    bytes_pending: v.bytes_pending,
                    chunks_pending: v.chunks_pending,
                })
                .collect(),
            lag_seconds: self.lag_ms(now).map(|ms| ms as f64 / 1000.0),
            rpo_target_seconds: self.rpo_target(thresholds).as_secs_f64(),
            max_replication_time_seconds: self.max_replication_time_ms as f64 / 1000.0,
            bytes_pending: self.bytes_pending,
            chunks_pending: self.chunks_pending,
            throughput_bytes_per_second: self.throughput_bytes_per_second,
            bytes_received_total: self.bytes_received_total,
            chunks_received_total: self.chunks_received_total,
            chunks_deduplicated_total: self.chunks_deduplicated_total,
            bytes_deduplicated_total: self.bytes_deduplicated_total,
            chunks_compressed_total: self.chunks_compressed_total,
            compressed_chunk_share: self.compressed_chunk_share,
            epochs_committed_total: self.epochs_committed_total,
            seconds_since_contact: (self.last_contact_unix_ms != 0)
                .then(|| now.saturating_sub(self.last_contact_unix_ms) as f64 / 1000.0),
            last_commit_unix_ms: self.last_commit_unix_ms,
            cutover_requested: self.cutover_requested,
            cutover: self.lifecycle.as_ref().map(CutoverView::from),
            failback_chunks_sent_total: self.failback_chunks_sent_total,
            failback_bytes_sent_total: self.failback_bytes_sent_total,
            mode: SourceMode::of(self.capture.as_ref()),
            capture: self.capture.map(|c| c.last),
            migration_state: self.migration_shown(thresholds, now).to_owned(),
            migration_recorded: self.migration_recorded().as_str().to_owned(),
            migration_since_unix_ms: self.migration_since_unix_ms,
            lease: None,
            encryption: None,
        }
    }
}

/// The server-wide totals of the per-source counters that [`ServerStats`]
/// reports, kept beside the records so that reading them copies no record.
///
/// [`ServerStats`]: crate::ServerStats
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SourceTotals {
    /// Epochs committed, all sources.
    pub epochs_committed_total: u64,
    /// Data chunks received and verified, all sources.
    pub chunks_received_total: u64,
}

impl SourceTotals {
    /// The counters of one record, as the totals count them.
    fn of(record: &SourceRecord) -> Self {
        Self {
            epochs_committed_total: record.epochs_committed_total,
            chunks_received_total: record.chunks_received_total,
        }
    }

    /// Adds what a record's counters grew by, from `before` to `after`.
    /// Counters only ever grow; a record that went backwards (a bug) would
    /// make a total fall, which a Prometheus counter must not do, so only
    /// growth counts.
    fn add_growth(&mut self, before: Self, after: Self) {
        debug_assert!(
            after.epochs_committed_total >= before.epochs_committed_total
                && after.chunks_received_total >= before.chunks_received_total,
            "per-source counters only grow: {before:?} -> {after:?}"
        );
        self.epochs_committed_total += after
            .epochs_committed_total
            .saturating_sub(before.epochs_committed_total);
        self.chunks_received_total += after
            .chunks_received_total
            .saturating_sub(before.chunks_received_total);
    }
}

/// Every source's record, behind one lock (held only to copy or update fields),
/// and the server-wide totals of their counters.
///
/// The totals change under the same lock as the records, by every change to a
/// record (`update`, `update_known`, `insert`): whoever bumps a source's
/// counter bumps the total with it, so the two cannot disagree. Records are
/// never removed, so each total is the sum over the records; were one ever
/// dropped, its counts would stay in the totals, which count events since the
/// server started and only grow.
#[derive(Debug, Default)]
pub(crate) struct SourceTable {
    inner: Mutex<Records>,
}

/// What [`SourceTable`]'s lock guards.
#[derive(Debug, Default)]
struct Records {
    by_source: BTreeMap<SourceId, SourceRecord>,
    totals: SourceTotals,
}

impl Records {
    /// Runs `f` on a record and counts what its counters grew by.
    fn change<T>(
        totals: &mut SourceTotals,
        record: &mut SourceRecord,
        f: impl FnOnce(&mut SourceRecord) -> T,
    ) -> T {
        let before = SourceTotals::of(record);
        let result = f(record);
        totals.add_growth(before, SourceTotals::of(record));
        result
    }
}

impl SourceTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates a source's record, creating it if the source is new.
    pub(crate) fn update<T>(&self, source: &SourceId, f: impl FnOnce(&mut SourceRecord) -> T) -> T {
        let mut inner = self.lock();
        let Records { by_source, totals } = &mut *inner;
        Records::change(totals, by_source.entry(source.clone()).or_default(), f)
    }

    /// Sets a source's record (a source found in the store at start); its
    /// counters count in the totals as if it had been updated to them.
    pub(crate) fn insert(&self, source: SourceId, record: SourceRecord) {
        self.update(&source, |old| *old = record);
    }

    /// Updates a source only if it is known; `None` otherwise.
    pub(crate) fn update_known<T>(
        &self,
        source: &SourceId,
        f: impl FnOnce(&mut SourceRecord) -> T,
    ) -> Option<T> {
        let mut inner = self.lock();
        let Records { by_source, totals } = &mut *inner;
        by_source
            .get_mut(source)
            .map(|record| Records::change(totals, record, f))
    }

    /// The totals of the per-source counters, all sources, without copying
    /// any record.
    pub(crate) fn totals(&self) -> SourceTotals {
        self.lock().totals
    }

    /// A copy of every record (for metrics and alerts, which must not hold the
    /// lock while they format or run hooks).
    pub(crate) fn records(&self) -> Vec<(SourceId, SourceRecord)> {
        self.lock()
            .by_source
            .iter()
            .map(|(source, record)| (source.clone(), record.clone()))
            .collect()
    }

    /// Every source as the admin API shows it.
    pub(crate) fn views(&self, thresholds: StateThresholds) -> Vec<SourceView> {
        let now = now_unix_ms();
        self.lock()
            .by_source
            .iter()
            .map(|(source, record)| record.view(source, thresholds, now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> StateThresholds {
        StateThresholds {
            rpo_target: Duration::from_secs(10),
            stall_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn states_follow_lag_and_contact() {
        let now = 1_000_000;
        let mut record = SourceRecord {
            last_contact_unix_ms: now,
            ..SourceRecord::default()
        };
        assert_eq!(record.state(thresholds(), now), SourceState::InitialSync);
        record.synced_scan_started_unix_ms = now - 5_000;
        assert_eq!(record.state(thresholds(), now), SourceState::Healthy);
        record.synced_scan_started_unix_ms = now - 11_000;
        assert_eq!(record.state(thresholds(), now), SourceState::Lagging);
        record.last_contact_unix_ms = now - 61_000;
        assert_eq!(record.state(thresholds(), now), SourceState::Stalled);
    }

    #[test]
    fn a_machines_backlog_is_the_sum_of_its_volumes_and_each_volume_shows_its_own() {
        let now = 1_000_000;
        let volume = |name: &str| VolumeRecord {
            name: name.into(),
            disk_size_bytes: 1 << 20,
            ..VolumeRecord::default()
        };
        let mut record = SourceRecord {
            volumes: vec![volume("boot"), volume("data")],
            synced_scan_started_unix_ms: now - 2_000,
            ..SourceRecord::default()
        };
        record.set_backlog(Some(0), 3, 3 * 65_536);
        record.set_backlog(Some(1), 1, 4096);
        // A volume's report again replaces its own figure, not the sum.
        record.set_backlog(Some(0), 2, 2 * 65_536);
        let view = record.view(&SourceId::new("web").unwrap(), thresholds(), now);
        assert_eq!(
            (view.chunks_pending, view.bytes_pending),
            (3, 2 * 65_536 + 4096)
        );
        let backlogs: Vec<(u64, u64)> = view
            .volumes
            .iter()
            .map(|v| (v.chunks_pending, v.bytes_pending))
            .collect();
        assert_eq!(backlogs, [(2, 2 * 65_536), (1, 4096)]);
        assert!(view.volumes.iter().all(|v| v.lag_seconds == Some(2.0)));
        // Volumes whose reports add up past u64 give the largest figure,
        // not a panic or a wrapped small one.
        record.set_backlog(Some(0), u64::MAX, u64::MAX);
        record.set_backlog(Some(1), 7, 7);
        assert_eq!(
            (record.chunks_pending, record.bytes_pending),
            (u64::MAX, u64::MAX)
        );
        // A single disk's report is the source's.
        let mut disk = SourceRecord::default();
        disk.set_backlog(None, 5, 500);
        assert_eq!((disk.chunks_pending, disk.bytes_pending), (5, 500));
    }

    #[test]
    fn a_source_override_of_the_rpo_target_decides_lagging() {
        let now = 1_000_000;
        let mut record = SourceRecord {
            last_contact_unix_ms: now,
            synced_scan_started_unix_ms: now - 11_000,
            ..SourceRecord::default()
        };
        assert_eq!(record.state(thresholds(), now), SourceState::Lagging);
        record.rpo_target_override = Some(Duration::from_secs(60));
        assert_eq!(record.state(thresholds(), now), SourceState::Healthy);
        let view = record.view(&SourceId::new("web").unwrap(), thresholds(), now);
        assert_eq!(view.rpo_target_seconds, 60.0);
    }
}

//! JSON shapes of the admin API's snapshots and launches.

use blockrep_core::VolumeName;
use blockrep_store::{LaunchCheck, LaunchInfo, LaunchWorkflow, Snapshot, SnapshotKind};
use serde::{Deserialize, Serialize};

/// A snapshot as the admin API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotView {
    pub source: String,
    pub name: String,
    /// `manual`, `auto` or `cutover`.
    pub kind: String,
    pub epoch: u64,
    pub root: String,
    pub created_unix_ms: u64,
    /// 0 when it never expires.
    pub expires_unix_ms: u64,
    /// `crash-consistent`, `quiesced` or `live`: how its root was taken.
    pub consistency: String,
}

impl From<&Snapshot> for SnapshotView {
    fn from(s: &Snapshot) -> Self {
        Self {
            source: s.source.to_string(),
            name: s.name.clone(),
            kind: match s.kind {
                SnapshotKind::Manual => "manual",
                SnapshotKind::Auto => "auto",
                SnapshotKind::Cutover => "cutover",
                SnapshotKind::Launch => "launch",
            }
            .to_owned(),
            epoch: s.epoch,
            root: s.root.to_hex(),
            created_unix_ms: s.created_unix_ms,
            expires_unix_ms: s.expires_unix_ms,
            consistency: s.consistency.as_str().to_owned(),
        }
    }
}

/// A launch volume as the admin API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchView {
    pub name: String,
    pub source: String,
    pub snapshot: String,
    /// `test`, `cutover` or `standby`.
    pub kind: String,
    pub base_root: String,
    pub base_epoch: u64,
    /// Root of the last flushed state.
    pub root: String,
    pub generation: u64,
    pub created_unix_ms: u64,
    pub flushed_unix_ms: u64,
    /// `crash-consistent`, `quiesced` or `live`: how the root it started
    /// from was taken (its base snapshot's label).
    pub consistency: String,
    /// NBD URI of the export, when the NBD listener is enabled: `nbds://`
    /// when it requires TLS (the client then presents the launch's source
    /// certificate or the admin certificate).
    pub nbd_uri: Option<String>,
    /// The launch's volumes, by name: one (`disk`) for a single-disk
    /// source, each of a machine's disks otherwise. A launch of several
    /// volumes is served as one export per volume, `LAUNCH/VOLUME`, and has
    /// no `nbd_uri` of its own.
    pub volumes: Vec<LaunchVolumeView>,
    /// When the launch expires and is deleted, Unix ms (`None`: never).
    #[serde(default)]
    pub expires_unix_ms: Option<u64>,
    /// Whether its checks must pass before the source may be marked ready
    /// or cut over.
    #[serde(default)]
    pub must_succeed: bool,
    /// Checks announced at creation whose results are awaited.
    #[serde(default)]
    pub expected_checks: Vec<String>,
    /// Results of the checks run on it, newest run of each.
    #[serde(default)]
    pub checks: Vec<CheckView>,
    /// A standby that still follows its source's newest committed point
    /// (it stops at its first write).
    #[serde(default)]
    pub following: bool,
    /// The source's epoch a standby was last moved to.
    #[serde(default)]
    pub followed_epoch: Option<u64>,
    /// Its volumes' materializations (`blockrep launch materialize`).
    #[serde(default)]
    pub materialize: Vec<MaterializeView>,
}

/// A launch volume's materialization: its copy to a local file or block
/// device, from which it is served once complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaterializeView {
    /// The volume of a machine's launch; `None` for a single disk's.
    pub volume: Option<String>,
    /// The file or block device on the server.
    pub target: String,
    pub size_bytes: u64,
    /// Bytes the target holds.
    pub copied_bytes: u64,
    /// Bytes still read from the store.
    pub remote_bytes: u64,
    /// Whether the copy is complete and the volume served from the target.
    pub done: bool,
}

impl From<&blockrep_store::Materialization> for MaterializeView {
    fn from(m: &blockrep_store::Materialization) -> Self {
        Self {
            volume: m.volume.clone(),
            target: m.progress.target.display().to_string(),
            size_bytes: m.progress.size_bytes,
            copied_bytes: m.progress.copied_bytes,
            remote_bytes: m.progress.remote_bytes,
            done: m.progress.done,
        }
    }
}

/// A launch check's result, as shown, and as a check runner reports it to
/// `POST /v1/launches/NAME/checks` (where `finished_unix_ms` is the
/// server's time of the report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    /// `fs`, `boot`, or the command's own name.
    pub name: String,
    pub command: String,
    pub passed: bool,
    /// `None` when it was killed or timed out.
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    #[serde(default)]
    pub finished_unix_ms: u64,
    /// The end of its output (at most 4 KiB are kept).
    #[serde(default)]
    pub output_tail: String,
}

impl From<&LaunchCheck> for CheckView {
    fn from(c: &LaunchCheck) -> Self {
        Self {
            name: c.name.clone(),
            command: c.command.clone(),
            passed: c.passed,
            exit_code: c.exit_code,
            duration_ms: c.duration_ms,
            finished_unix_ms: c.finished_unix_ms,
            output_tail: c.output_tail.clone(),
        }
    }
}

/// One volume of a launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchVolumeView {
    pub name: String,
    /// NBD URI of the volume's export (`LAUNCH/VOLUME`), when the NBD
    /// listener is enabled.
    pub nbd_uri: Option<String>,
}

impl LaunchView {
    /// The view of launch `info`, whose volumes are `volumes`; `overlaid`:
    /// a client wrote to it since its last fold.
    pub(crate) fn new(
        info: &LaunchInfo,
        volumes: &[VolumeName],
        workflow: &LaunchWorkflow,
        nbd: Option<crate::nbd_export::NbdEndpoint>,
        overlaid: bool,
    ) -> Self {
        let single = volumes.len() == 1;
        Self {
            expires_unix_ms: workflow.expires_unix_ms,
            must_succeed: workflow.must_succeed,
            expected_checks: workflow.expected_checks.clone(),
            checks: workflow.checks.iter().map(CheckView::from).collect(),
            following: workflow.follow && !overlaid && unwritten(info, workflow),
            followed_epoch: workflow.followed.map(|(_, epoch)| epoch),
            materialize: Vec::new(),
            volumes: volumes
                .iter()
                .map(|v| LaunchVolumeView {
                    name: v.to_string(),
                    nbd_uri: nbd.map(|endpoint| endpoint.uri(&format!("{}/{v}", info.name))),
                })
                .collect(),
            name: info.name.clone(),
            source: info.source.to_string(),
            snapshot: info.snapshot.clone(),
            kind: info.kind.as_str().to_owned(),
            base_root: info.base_root.to_hex(),
            base_epoch: info.base_epoch,
            root: info.root.to_hex(),
            generation: info.generation,
            created_unix_ms: info.created_unix_ms,
            flushed_unix_ms: info.flushed_unix_ms,
            consistency: info.consistency.as_str().to_owned(),
            nbd_uri: nbd
                .filter(|_| single)
                .map(|endpoint| endpoint.uri(&info.name)),
        }
    }
}

/// Whether a standby's head is still where the server last put it: a fold
/// of a client's writes moved it, and from then on (from the first write,
/// which makes an overlay) it no longer follows (its record says so at the
/// source's next commit).
fn unwritten(info: &LaunchInfo, workflow: &LaunchWorkflow) -> bool {
    let followed = workflow.followed.map_or(info.base_root, |(root, _)| root);
    info.root == followed || Some(info.root) == workflow.following_to
}

/// Body of `POST /v1/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSnapshot {
    /// The source (with `launch`, it may be left out: the launch's).
    #[serde(default)]
    pub source: String,
    /// Snapshot this launch (what clients wrote to it, frozen at one
    /// instant) instead of the source's head.
    #[serde(default)]
    pub launch: Option<String>,
    pub name: Option<String>,
    pub ttl_seconds: Option<f64>,
}

/// Body of `POST /v1/launches`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateLaunch {
    pub source: String,
    pub snapshot: String,
    pub name: String,
    /// `test` (default), `cutover` or `standby`.
    pub kind: Option<String>,
    /// Launch from a `live` snapshot (which may hold a torn file system);
    /// without it such a launch is refused.
    #[serde(default)]
    pub allow_live: bool,
    /// Seconds until the launch expires and is deleted (a drill); a test
    /// launch without it gets the server's `--test-launch-ttl`, if set.
    #[serde(default)]
    pub ttl_seconds: Option<f64>,
    /// Checks whose results will be reported (`fs`, `boot`, a command's name).
    #[serde(default)]
    pub checks: Vec<String>,
    /// The checks must pass before the source may be marked ready or cut over.
    #[serde(default)]
    pub must_succeed: bool,
    /// A standby that follows its source's newest committed point until it
    /// is written (`kind` must be `standby`).
    #[serde(default)]
    pub follow: bool,
}

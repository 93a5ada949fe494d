//! JSON shapes of the admin API's snapshots and launches.

use blockrep_core::VolumeName;
use blockrep_store::{LaunchInfo, LaunchKind, Snapshot, SnapshotKind};
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
    /// `test` or `cutover`.
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
    /// The view of launch `info`, whose volumes are `volumes`.
    pub(crate) fn new(
        info: &LaunchInfo,
        volumes: &[VolumeName],
        nbd: Option<crate::nbd_export::NbdEndpoint>,
    ) -> Self {
        let single = volumes.len() == 1;
        Self {
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
            kind: match info.kind {
                LaunchKind::Test => "test",
                LaunchKind::Cutover => "cutover",
            }
            .to_owned(),
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

/// Body of `POST /v1/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSnapshot {
    pub source: String,
    pub name: Option<String>,
    pub ttl_seconds: Option<f64>,
}

/// Body of `POST /v1/launches`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateLaunch {
    pub source: String,
    pub snapshot: String,
    pub name: String,
    /// `test` (default) or `cutover`.
    pub kind: Option<String>,
    /// Launch from a `live` snapshot (which may hold a torn file system);
    /// without it such a launch is refused.
    #[serde(default)]
    pub allow_live: bool,
}

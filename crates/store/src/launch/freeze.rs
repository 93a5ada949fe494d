//! Snapshots of launches: what clients wrote to a launch, at one instant of
//! all its volumes, kept as a snapshot of its source (kind `launch`) that
//! can be launched, exported and failed back from like any other.
//!
//! Each volume is folded once while clients go on writing (so that the
//! pause is short), then every volume's writes are held (the volumes'
//! gates, taken in name order), what was written since is folded, the
//! snapshot names the launch's head, and the writes go on. Writes held
//! wait; reads go on throughout.

use std::sync::Arc;
use std::time::Duration;

use blockrep_core::{Consistency, SourceId};

use crate::error::{Error, ErrorKind};
use crate::snapshot::{Snapshot, SnapshotKind, SnapshotOf};
use crate::store::Store;

impl Store {
    /// Snapshots launch `launch` as it is now, named `name` (default
    /// `launch-EPOCH-UNIXMS`), expiring after `ttl`. Its consistency is
    /// crash-consistent (every volume at one instant, as a power loss
    /// would leave them), or live for a launch of a live snapshot.
    /// `Invalid` when `source` is given and is not the launch's.
    pub fn snapshot_launch(
        self: &Arc<Self>,
        launch: &str,
        source: Option<&SourceId>,
        name: Option<&str>,
        ttl: Option<Duration>,
        now_unix_ms: u64,
    ) -> Result<Snapshot, Error> {
        self.check_writable()?;
        let info = self
            .launch(launch)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no launch named {launch}")))?;
        if source.is_some_and(|source| *source != info.source) {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("launch {launch} is of source {}", info.source),
            ));
        }
        let mut volumes = Vec::new();
        for volume in self.launch_volumes(&info)? {
            volumes.push(self.open_launch_volume(launch, Some(volume.as_str()))?);
        }
        let fold_error = |e: std::io::Error| Error::io(format!("cannot fold launch {launch}"), e);
        for volume in &volumes {
            volume.fold(now_unix_ms).map_err(fold_error)?;
        }
        let _gates: Vec<_> = volumes
            .iter()
            .map(|volume| volume.io_gate.write().unwrap_or_else(|p| p.into_inner()))
            .collect();
        for volume in &volumes {
            volume.fold(now_unix_ms).map_err(fold_error)?;
        }
        let info = self
            .launch(launch)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("launch {launch} is gone")))?;
        let consistency = match info.consistency {
            Consistency::Live => Consistency::Live,
            _ => Consistency::CrashConsistent,
        };
        self.create_snapshot_of_root(
            &info.source,
            SnapshotKind::Launch,
            name,
            ttl,
            now_unix_ms,
            SnapshotOf {
                epoch: info.base_epoch,
                root: info.root,
                consistency,
            },
        )
    }
}

#[cfg(test)]
#[path = "freeze_tests.rs"]
mod tests;

//! Machines in the store: several volumes committed as one recovery point, and
//! any root a head, snapshot or launch names read back as a machine.
//!
//! A head names either a disk root (a single-disk source, and every head
//! written before machines existed) or a machine root that names each
//! volume's disk root. Both are stored as root records; the blob's magic
//! tells them apart. A commit of a machine stores every volume's pages and
//! disk root, then the machine root, makes them durable, and only then moves
//! the head: a crash leaves the previous machine whole or the new one whole,
//! never some volumes of each.

use blockrep_core::{Consistency, Page, Root, SourceId, VolumeName};

use crate::error::Error;
use crate::store::{CommitStats, CommitTree, Store};

/// One volume of a machine commit: its name, its new disk root and the index
/// pages the store may lack (as for [`Store::commit`]).
#[derive(Debug, Clone, Copy)]
pub struct VolumeCommit<'a> {
    /// The volume's name in the machine root.
    pub name: &'a VolumeName,
    /// The volume's new disk root.
    pub root: &'a Root,
    /// Pages of `root` to store.
    pub pages: &'a [Page],
}

impl Store {
    /// Commits a new epoch of `source` as a machine: every volume's pages and
    /// disk root, then the machine root, all made durable before the head
    /// moves to name the machine root, so that a crash leaves all volumes at
    /// the old point or all at the new. Labels and epochs follow
    /// [`Store::commit_labelled`]: an incomplete epoch is stored as `live`.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_machine(
        &self,
        source: &SourceId,
        epoch: u64,
        volumes: &[VolumeCommit<'_>],
        scan_started_unix_ms: u64,
        complete: bool,
        consistency: Consistency,
        now_unix_ms: u64,
    ) -> Result<CommitStats, Error> {
        let tree = CommitTree {
            volumes: volumes.iter().map(|v| (v.root, v.pages)).collect(),
            names: Some(volumes.iter().map(|v| v.name.clone()).collect()),
        };
        self.commit_inner(
            source,
            epoch,
            tree,
            scan_started_unix_ms,
            complete,
            consistency,
            now_unix_ms,
        )
    }
}

#[cfg(test)]
mod tests;

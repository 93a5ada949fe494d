//! Warm standbys: launches that follow their source's newest committed point
//! while nobody has written them, so a failover to one needs no copy.
//!
//! A move rewrites the launch's head only (its meta keeps the snapshot it
//! was made from): the head's root becomes the source's head root, and its
//! generation grows, as every flush's does. The workflow record names the
//! root of the last move (`followed`), and the root of a move under way
//! (`following_to`, written before the head): a head at either is the
//! server's doing, a head anywhere else was written by a client, and the
//! launch stops following for good (it keeps its data). A launch is moved
//! only while no volume of it is open, so its content never changes under a
//! reader.

use crate::catalog::validate_name;
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::store::Store;

use super::{LaunchKind, LaunchWorkflow};

/// What [`Store::follow_standby`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebased {
    /// The launch now shows the new root.
    Moved,
    /// It showed that root already.
    Unchanged,
    /// A client wrote it: it stopped following (now and for good).
    Written,
    /// A volume of it is open: left as it is until it closes.
    Open,
    /// It does not follow (written earlier, or not a standby).
    NotFollowing,
}

impl Store {
    /// Moves standby launch `name` to its source's head, if the head holds
    /// a complete pass newer than the launch's last move and the launch is
    /// unwritten and closed; stops its following if it was written.
    /// `NotFound` when it does not exist.
    ///
    /// The head is read here, under the GC fence held until the launch's
    /// head is published (as a snapshot does): a collection lists the roots
    /// either before (and then a commit after it noted what it names) or
    /// after the move. A move never goes back to an older epoch.
    pub fn follow_standby(&self, name: &str, now_unix_ms: u64) -> Result<Rebased, Error> {
        self.check_writable()?;
        validate_name("launch", name)?;
        let _guard = lock(&self.catalog.lock);
        let _fence = self.publishing_fence(now_unix_ms)?;
        let prefix = format!("{name}/");
        let open = lock(&self.catalog.open_launches)
            .iter()
            .any(|(key, volume)| {
                (key == name || key.starts_with(&prefix)) && volume.strong_count() > 0
            });
        let info = self
            .launch(name)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no launch named {name}")))?;
        let mut workflow = self.launch_workflow(name)?;
        if info.kind != LaunchKind::Standby || !workflow.follow {
            return Ok(Rebased::NotFollowing);
        }
        let followed = workflow.followed.map_or(info.base_root, |(root, _)| root);
        // A client's write makes an overlay before anything reaches the head.
        let overlaid = self
            .launches_with_overlays()?
            .iter()
            .any(|(launch, _)| launch == name);
        if overlaid || (info.root != followed && Some(info.root) != workflow.following_to) {
            workflow.follow = false;
            workflow.following_to = None;
            self.write_workflow(name, &workflow)?;
            return Ok(Rebased::Written);
        }
        let Some(head) = self.head(&info.source)? else {
            return Ok(Rebased::Unchanged);
        };
        let (root, epoch) = (head.root, head.epoch);
        let newer = workflow
            .followed
            .is_none_or(|(_, followed)| epoch > followed)
            && epoch > info.base_epoch;
        // Only a head that is itself a complete pass: an intermediate step
        // of a large epoch mixes the last pass with part of a scan.
        let complete = head.initial_sync_done()
            && head.synced_scan_started_unix_ms == head.scan_started_unix_ms;
        if info.root == root || !complete || !newer {
            return Ok(Rebased::Unchanged);
        }
        if open {
            return Ok(Rebased::Open);
        }
        // In a bucket, only the server serving the source moves its standby
        // launches: another one's copy of the head may be old.
        if self.remote.is_some() && self.check_lease(&info.source, now_unix_ms).is_err() {
            return Ok(Rebased::Unchanged);
        }
        self.note_snapshot_root(&root);
        self.blobs.require_present("the standby launch", [&root])?;
        workflow.following_to = Some(root);
        self.write_workflow(name, &workflow)?;
        let moved = super::LaunchInfo {
            root,
            generation: info.generation + 1,
            flushed_unix_ms: now_unix_ms,
            ..info
        };
        self.publish_launch_head(&self.launches_dir().join(name), &moved)?;
        workflow.followed = Some((root, epoch));
        workflow.following_to = None;
        self.write_workflow(name, &workflow)?;
        Ok(Rebased::Moved)
    }

    fn write_workflow(&self, name: &str, workflow: &LaunchWorkflow) -> Result<(), Error> {
        self.publish_launch_workflow(&self.launches_dir().join(name), workflow)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testutil::{commit_disk, sample_disk, source};
    use blockrep_core::Geometry;

    const LEN: u64 = 8 * 4096;

    #[test]
    fn a_standby_moves_while_unwritten_and_closed_and_stops_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let geometry = Geometry::new(LEN, 4096).unwrap();
        commit_disk(
            &store,
            &source(),
            &sample_disk(LEN as usize, 1),
            geometry,
            1,
        );
        store
            .create_snapshot(&source(), Some("base"), None, 1)
            .unwrap();
        let follow = LaunchWorkflow {
            follow: true,
            ..LaunchWorkflow::default()
        };
        store
            .create_launch_with(&source(), "base", "sb", LaunchKind::Standby, 1, &follow)
            .unwrap();
        let second = commit_disk(
            &store,
            &source(),
            &sample_disk(LEN as usize, 2),
            geometry,
            2,
        );
        assert_eq!(store.follow_standby("sb", 5).unwrap(), Rebased::Moved);
        assert_eq!(store.launch("sb").unwrap().unwrap().root, second.root);
        assert_eq!(
            store.launch_workflow("sb").unwrap().followed,
            Some((second.root, 2))
        );
        assert_eq!(store.follow_standby("sb", 6).unwrap(), Rebased::Unchanged);
        // A crash between the record of a move and its head: the head is at
        // the root the record names as under way, not taken for written.
        let third = commit_disk(
            &store,
            &source(),
            &sample_disk(LEN as usize, 3),
            geometry,
            3,
        );
        let mut pending = store.launch_workflow("sb").unwrap();
        pending.following_to = Some(second.root);
        pending.followed = Some((blockrep_core::ChunkId([9; 32]), 1));
        store.write_workflow("sb", &pending).unwrap();
        assert_eq!(store.follow_standby("sb", 7).unwrap(), Rebased::Moved);
        assert_eq!(store.launch("sb").unwrap().unwrap().root, third.root);
        // Open: left alone.
        let volume = store.open_launch("sb").unwrap();
        let fourth = commit_disk(
            &store,
            &source(),
            &sample_disk(LEN as usize, 4),
            geometry,
            4,
        );
        assert_eq!(store.follow_standby("sb", 8).unwrap(), Rebased::Open);
        // Written: it stops following for good and keeps its data.
        volume.write(0, &[0x77; 4096]).unwrap();
        volume.flush(9).unwrap();
        drop(volume);
        assert_eq!(store.follow_standby("sb", 10).unwrap(), Rebased::Written);
        assert!(!store.launch_workflow("sb").unwrap().follow);
        assert_ne!(store.launch("sb").unwrap().unwrap().root, fourth.root);
        assert_eq!(
            store.follow_standby("sb", 11).unwrap(),
            Rebased::NotFollowing
        );
    }
}

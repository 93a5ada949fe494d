//! The consistency label of stored records, and committing with one.
//!
//! Every record that names a root (the head, a snapshot, a launch's meta) keeps
//! the [`Consistency`] of that root in one byte (`Consistency::to_byte`). The
//! byte sits where older records held a zero (reserved bytes of snapshots and
//! launches, version 1 heads have none at all), and 0 is `live`: a record
//! written before labels existed reads as `live`, which claims nothing.

use blockrep_core::{ChunkId, Consistency, Page, Root, SourceId};

use crate::error::{Error, ErrorKind};
use crate::fsutil::publish_atomic;
use crate::head::Head;
use crate::mutex::lock;
use crate::store::{CommitStats, CommitTree, Store};

/// How much a label claims: `live` < `crash-consistent` < `quiesced`.
fn strength(consistency: Consistency) -> u8 {
    match consistency {
        Consistency::Live => 0,
        Consistency::CrashConsistent => 1,
        Consistency::Quiesced => 2,
    }
}

impl Store {
    /// [`Store::commit_with`] with the consistency the root was taken with.
    /// An incomplete epoch (an intermediate step of a large sync) mixes the
    /// previous head with part of a scan: it is stored as `live`, whatever
    /// `consistency` says, so that no torn root is ever labelled a point in time.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_labelled(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &Root,
        pages: &[Page],
        scan_started_unix_ms: u64,
        complete: bool,
        consistency: Consistency,
        now_unix_ms: u64,
    ) -> Result<CommitStats, Error> {
        let tree = CommitTree {
            volumes: vec![(root, pages)],
            names: None,
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

    /// Records that a complete scan labelled `consistency` found the disk
    /// equal to the head (`epoch`, `root`): the head's root is then also that
    /// point, so its label rises to `consistency` when that claims more. A
    /// weaker label changes nothing (the root stays what it was proven to be).
    /// Returns the head as it now is; `EpochMismatch` when the head has moved.
    pub fn confirm_head(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &ChunkId,
        consistency: Consistency,
    ) -> Result<Head, Error> {
        self.check_writable()?;
        // The head read back may be one whose publication failed to sync:
        // confirming it would acknowledge what a power loss can take back.
        self.check_synced()?;
        let source_lock = self.commit_lock(source);
        let _guard = lock(&source_lock);
        let head = self
            .head(source)?
            .filter(|h| h.epoch == epoch && h.root == *root);
        let Some(mut head) = head else {
            return Err(Error::new(
                ErrorKind::EpochMismatch,
                format!("source {source}: head is not epoch {epoch} root {root}"),
            ));
        };
        if strength(consistency) <= strength(head.consistency) {
            return Ok(head);
        }
        head.consistency = consistency;
        publish_atomic(
            self.vfs(),
            &self.source_dir(source).join("head"),
            &head.encode(),
        )?;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use blockrep_core::{Geometry, scan_buffer};

    use super::*;
    use crate::{BlobKind, LaunchKind, SnapshotKind, StoredCodec};

    fn commit(store: &Store, epoch: u64, byte: u8, complete: bool, label: Consistency) -> Root {
        let geometry = Geometry::new(8192, 4096).unwrap();
        let disk = vec![byte; 8192];
        let ids = scan_buffer(&disk, geometry);
        store
            .insert(
                BlobKind::Chunk,
                ids[0],
                StoredCodec::Raw,
                4096,
                &disk[..4096],
            )
            .unwrap();
        let (root, pages) = Root::build(geometry, &ids);
        let source = SourceId::new("web-1").unwrap();
        store
            .commit_labelled(
                &source,
                epoch,
                &root,
                &pages,
                1,
                complete,
                label,
                blockrep_core::clock::now_unix_ms(),
            )
            .unwrap();
        root
    }

    /// The label of the head, of snapshots taken from it (manual, auto and
    /// cutover) and of a launch made from a snapshot survive a reopen.
    #[test]
    fn labels_are_kept_by_every_record_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let source = SourceId::new("web-1").unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            commit(&store, 1, 7, true, Consistency::CrashConsistent);
            store
                .create_snapshot(&source, Some("manual"), None, 1_000)
                .unwrap();
            store
                .create_snapshot_of_kind(&source, SnapshotKind::Auto, Some("auto"), None, 1_000)
                .unwrap();
            commit(&store, 2, 8, true, Consistency::Quiesced);
            store
                .create_snapshot_of_kind(&source, SnapshotKind::Cutover, Some("cut"), None, 1_000)
                .unwrap();
            store
                .create_launch(
                    &source,
                    "cut",
                    "cutover-1",
                    LaunchKind::Cutover,
                    blockrep_core::clock::now_unix_ms(),
                )
                .unwrap();
            store
                .create_launch(
                    &source,
                    "manual",
                    "drill",
                    LaunchKind::Test,
                    blockrep_core::clock::now_unix_ms(),
                )
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.head(&source).unwrap().unwrap().consistency,
            Consistency::Quiesced
        );
        let label = |name: &str| store.snapshot(&source, name).unwrap().unwrap().consistency;
        assert_eq!(label("manual"), Consistency::CrashConsistent);
        assert_eq!(label("auto"), Consistency::CrashConsistent);
        assert_eq!(label("cut"), Consistency::Quiesced);
        let launch = |name: &str| store.launch(name).unwrap().unwrap().consistency;
        assert_eq!(launch("cutover-1"), Consistency::Quiesced);
        assert_eq!(launch("drill"), Consistency::CrashConsistent);
    }

    /// An intermediate step is stored as live even when its scan was frozen;
    /// plain `commit` (no label) stores live.
    #[test]
    fn an_incomplete_epoch_and_an_unlabelled_commit_are_live() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let source = SourceId::new("web-1").unwrap();
        commit(&store, 1, 7, false, Consistency::CrashConsistent);
        assert_eq!(
            store.head(&source).unwrap().unwrap().consistency,
            Consistency::Live
        );
        let geometry = Geometry::new(8192, 4096).unwrap();
        let (root, pages) = Root::build(geometry, &[ChunkId::ZERO, ChunkId::ZERO]);
        store
            .commit(
                &source,
                2,
                &root,
                &pages,
                5,
                blockrep_core::clock::now_unix_ms(),
            )
            .unwrap();
        assert_eq!(
            store.head(&source).unwrap().unwrap().consistency,
            Consistency::Live
        );
    }

    /// A frozen scan equal to a live head raises its label; a live scan
    /// equal to a crash-consistent head leaves it; a moved head is refused.
    #[test]
    fn confirming_the_head_only_raises_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let source = SourceId::new("web-1").unwrap();
        let root = commit(&store, 1, 7, true, Consistency::Live).id();
        let head = store
            .confirm_head(&source, 1, &root, Consistency::CrashConsistent)
            .unwrap();
        assert_eq!(head.consistency, Consistency::CrashConsistent);
        let head = store
            .confirm_head(&source, 1, &root, Consistency::Live)
            .unwrap();
        assert_eq!(head.consistency, Consistency::CrashConsistent);
        assert_eq!(store.head(&source).unwrap().unwrap(), head);
        let error = store
            .confirm_head(&source, 2, &root, Consistency::Quiesced)
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::EpochMismatch);
    }
}

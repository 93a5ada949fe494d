//! Deleting a source: its launches, snapshots and records go; what its
//! blobs held becomes garbage for the next collection. For a source
//! encrypted at rest, destroying its keys as well (`KeyDir::shred`, done by
//! the caller that holds the key directory) makes those blobs unreadable at
//! once, in this store and in every copy of it.

use blockrep_core::SourceId;

use crate::catalog::list_names;
use crate::error::{Error, ErrorKind};
use crate::fsutil::remove_dir_durable;
use crate::store::Store;

/// What [`Store::delete_source`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceDeleted {
    /// Launches of the source deleted with it.
    pub launches: Vec<String>,
    /// Its snapshots.
    pub snapshots: usize,
}

impl Store {
    /// Deletes `source`: every launch made from it (refused, with nothing
    /// deleted, while one is open), then its directory (head, snapshots,
    /// lifecycle and tenant records) at once, by a rename that a crash
    /// either did or did not make. `NotFound` when nothing of it is stored.
    pub fn delete_source(&self, source: &SourceId) -> Result<SourceDeleted, Error> {
        self.check_writable()?;
        let dir = self.source_dir(source);
        // Read without their MACs: a source whose keys are gone, or whose
        // records were tampered with, can still be deleted.
        let launches = self.read_launches(Some(source), false)?;
        if !self.vfs().is_dir(&dir) && launches.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no source {source} in this store"),
            ));
        }
        let snapshots = list_names(self.vfs(), &self.snapshots_dir(source))?.len();
        let mut deleted = SourceDeleted {
            launches: Vec::new(),
            snapshots,
        };
        for launch in launches {
            self.delete_launch(&launch.name)?;
            deleted.launches.push(launch.name);
        }
        if self.vfs().is_dir(&dir) {
            let parent = dir.parent().expect("a source directory has a parent");
            remove_dir_durable(self.vfs(), parent, source.as_str())?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use blockrep_core::Geometry;

    use super::*;
    use crate::testutil::commit_disk;
    use crate::{GcOptions, LaunchKind};

    #[test]
    fn a_source_goes_with_its_launches_and_snapshots_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let geometry = Geometry::new(8192, 4096).unwrap();
        for (name, byte) in [("web-1", 1u8), ("db-1", 2)] {
            let source = SourceId::new(name).unwrap();
            commit_disk(&store, &source, &vec![byte; 8192], geometry, 1);
            store.create_snapshot(&source, Some("s"), None, 2).unwrap();
            store
                .create_launch(&source, "s", &format!("{name}-drill"), LaunchKind::Test, 3)
                .unwrap();
        }
        let web = SourceId::new("web-1").unwrap();

        // Refused, with nothing deleted, while a launch of it is open.
        let volume = store.open_launch("web-1-drill").unwrap();
        let error = store.delete_source(&web).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Busy);
        assert!(store.head(&web).unwrap().is_some());
        drop(volume);

        let deleted = store.delete_source(&web).unwrap();
        assert_eq!(deleted.launches, vec!["web-1-drill".to_owned()]);
        assert_eq!(deleted.snapshots, 1);
        assert_eq!(store.head(&web).unwrap(), None);
        assert_eq!(
            store.sources().unwrap(),
            vec![SourceId::new("db-1").unwrap()]
        );
        assert!(store.launch("web-1-drill").unwrap().is_none());
        assert!(store.launch("db-1-drill").unwrap().is_some());
        let error = store.delete_source(&web).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::NotFound);

        // Its blobs are garbage; the other source's stay and verify.
        let report = store.gc(&GcOptions::default()).unwrap();
        assert!(report.blobs_dead > 0, "{report:?}");
        assert!(store.verify(None, None).unwrap().is_clean());
    }
}

//! A source's small text records beside its head, `DATA/sources/ID/NAME`:
//! its migration history (`migration.rs`), its failed must-succeed checks
//! and its RPO target (`rpo_target.rs`). Each is one text record
//! (`textrec.rs`), read whole under a size cap and replaced whole, durably
//! and atomically, so that in a bucket each travels as one object with the
//! source's other records.

use blockrep_core::SourceId;

use crate::error::Error;
use crate::fsutil::{create_dir_durable, publish_atomic, read_small_file, remove_file_durable};
use crate::store::Store;
use crate::textrec;

/// One kind of a source's text record.
pub(crate) struct SourceRecord {
    /// The file's name in the source's directory.
    pub name: &'static str,
    /// Its first line: the format and its version.
    pub magic: &'static str,
    /// What it holds, for errors ("RPO target").
    pub title: &'static str,
    /// Larger is damage, not a record.
    pub max_bytes: usize,
}

impl SourceRecord {
    /// The record of `source`, its lines given to `parse` with the words an
    /// error should name it by; `None` when the source has no such record.
    /// A damaged record is an error (`Corrupt`), never an empty one.
    pub(crate) fn read<T>(
        &self,
        store: &Store,
        source: &SourceId,
        parse: impl FnOnce(&str, Vec<&str>) -> Result<T, Error>,
    ) -> Result<Option<T>, Error> {
        let path = store.source_dir(source).join(self.name);
        let Some(bytes) = read_small_file(store.vfs(), &path, self.max_bytes)? else {
            return Ok(None);
        };
        let what = format!("{} of {source} ({})", self.title, path.display());
        let lines = textrec::open(&what, self.magic, &bytes)?;
        parse(&what, lines).map(Some)
    }

    /// Replaces the record of `source` with `lines`, durably.
    pub(crate) fn write(
        &self,
        store: &Store,
        source: &SourceId,
        lines: &[String],
    ) -> Result<(), Error> {
        let dir = store.source_dir(source);
        create_dir_durable(store.vfs(), &dir)?;
        publish_atomic(
            store.vfs(),
            &dir.join(self.name),
            &textrec::seal(self.magic, lines),
        )
    }

    /// Removes the record of `source`, durably; none there is no error.
    pub(crate) fn remove(&self, store: &Store, source: &SourceId) -> Result<(), Error> {
        remove_file_durable(store.vfs(), &store.source_dir(source), self.name)
    }
}

//! Records published to the bucket at the rename that makes them durable
//! (see `mod.rs`): a [`Vfs`] layer over the data directory's file system.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use blockrep_objects::{Listed, Version};
use bytes::Bytes;

use super::{Remote, SharedRemote, bucket_error, bucket_io_error};
use crate::error::{Error, ErrorKind};
use crate::fsutil::{create_dir_durable, publish_atomic};
use crate::vfs::{OpenMode, PendingSync, Vfs, VfsFile};

/// The directories of a data directory whose files are records in the bucket.
const RECORD_DIRS: [&str; 2] = ["sources", "launches"];

/// Largest record object restored (a record is a few KiB at most; a launch's
/// page list is the largest).
const RECORD_LEN_MAX: u64 = 64 << 20;

/// What [`BucketRecords::refresh_level`] is to change in one directory.
#[derive(Debug)]
pub(crate) struct LevelPlan<'a> {
    dir: String,
    local_dir: PathBuf,
    fetch: Vec<&'a Listed>,
    remove: Vec<String>,
}

impl LevelPlan<'_> {
    /// Whether the directory is the bucket's already.
    pub(crate) fn is_empty(&self) -> bool {
        self.fetch.is_empty() && self.remove.is_empty()
    }
}

/// What [`BucketRecords::apply_level`] did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Records read or removed.
    pub(crate) changed: usize,
    /// Some record read was a version newer than the listing's: what it
    /// names may be in packs published after the listing.
    pub(crate) newer_than_listed: bool,
    /// The keys of the records read.
    pub(crate) read: Vec<String>,
}

/// The data directory's file system, publishing records to the bucket.
#[derive(Debug)]
pub(crate) struct BucketRecords {
    inner: Arc<dyn Vfs>,
    root: PathBuf,
    remote: SharedRemote,
}

impl BucketRecords {
    /// Records of the data directory `root` (absolute) of `inner`.
    pub(crate) fn new(inner: Arc<dyn Vfs>, root: PathBuf, remote: SharedRemote) -> Self {
        Self {
            inner,
            root,
            remote,
        }
    }

    /// The object key of `path` if it is a record: under a record directory,
    /// with no hidden (temporary) component.
    fn key(&self, path: &Path) -> Option<String> {
        let relative = path.strip_prefix(&self.root).ok()?;
        let mut parts = Vec::new();
        for component in relative.components() {
            let Component::Normal(name) = component else {
                return None;
            };
            let name = name.to_str()?;
            if name.starts_with('.') {
                return None;
            }
            parts.push(name);
        }
        RECORD_DIRS
            .contains(parts.first()?)
            .then(|| parts.join("/"))
    }

    /// Writes `record` as `key`, on the condition that the object is still
    /// the version this server last saw (or absent, if it saw none).
    fn publish(&self, key: &str, record: &[u8]) -> io::Result<()> {
        let data = Bytes::from(self.remote.envelope(record));
        let written = match self.remote.version(key) {
            Some(version) => self.remote.bucket.put_if(key, data, &version),
            None => self.remote.bucket.put_new(key, data),
        };
        match written {
            Ok(version) => {
                self.remote.set_version(key, Some(version));
                Ok(())
            }
            Err(
                e @ (blockrep_objects::Error::Conflict(_) | blockrep_objects::Error::Exists(_)),
            ) => {
                self.remote.note_error();
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "refused to publish {key}: another server wrote it since this one \
                         read it ({e}); the source is served elsewhere now"
                    ),
                ))
            }
            Err(e) => {
                self.remote.note_error();
                Err(bucket_io_error(format!("cannot publish {key}"), e))
            }
        }
    }

    /// Publishes the file `from` (or every file under the directory `from`)
    /// as `key`.
    fn publish_tree(&self, from: &Path, key: &str) -> io::Result<()> {
        if self.inner.is_dir(from) {
            for name in self.inner.list_dir(from)? {
                let Some(text) = name.to_str() else {
                    continue;
                };
                self.publish_tree(&from.join(&name), &format!("{key}/{text}"))?;
            }
            return Ok(());
        }
        let file = self.inner.open(from, OpenMode::Read)?;
        let mut bytes = vec![0u8; file.len()? as usize];
        file.read_exact_at(&mut bytes, 0)?;
        self.publish(key, &bytes)
    }

    /// Deletes `key` and every object under `key/`.
    fn unpublish_tree(&self, key: &str) -> io::Result<()> {
        let bucket = &self.remote.bucket;
        let mut keys: Vec<String> = bucket
            .list_all(key)
            .map_err(|e| bucket_io_error(format!("cannot list {key}"), e))?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.push(key.to_owned());
        for key in keys {
            bucket
                .delete(&key)
                .map_err(|e| bucket_io_error(format!("cannot delete {key}"), e))?;
            self.remote.set_version(&key, None);
        }
        Ok(())
    }

    /// Replaces the records of the data directory with the bucket's: what a
    /// server opens is what the servers sharing the bucket published, never
    /// a stale local copy. Records are written with `inner`, not published
    /// again.
    pub(crate) fn restore(&self) -> Result<usize, Error> {
        let mut restored = 0;
        for dir in RECORD_DIRS {
            restored += self.restore_under(dir)?;
        }
        Ok(restored)
    }

    /// [`BucketRecords::restore`] of the records under `dir` (a record
    /// directory or one below, such as a source's).
    pub(crate) fn restore_under(&self, dir: &str) -> Result<usize, Error> {
        let mut restored = 0;
        {
            let local = self.local_path(dir)?;
            match self.inner.remove_dir_all(&local) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("cannot clear {}", local.display()), e));
                }
                _ => {}
            }
            create_dir_durable(self.inner.as_ref(), &local)?;
            self.remote.forget_versions_under(dir);
            let listed = self
                .remote
                .bucket
                .list_all(dir)
                .map_err(|e| bucket_error(format!("cannot list {dir}/ in the bucket"), e))?;
            for (key, len) in listed {
                // None: deleted since the listing.
                if self.read_record(&key, len)?.is_some() {
                    restored += 1;
                }
            }
        }
        Ok(restored)
    }

    /// Brings the records directly in `dir` (one level, such as a source's
    /// snapshots) up to the bucket's, given the bucket's `listed` objects of
    /// that level: [`BucketRecords::plan_level`], then
    /// [`BucketRecords::apply_level`]. Returns how many records changed.
    pub(crate) fn refresh_level(&self, dir: &str, listed: &[Listed]) -> Result<usize, Error> {
        let plan = self.plan_level(dir, listed)?;
        Ok(self.apply_level(plan)?.changed)
    }

    /// What [`BucketRecords::refresh_level`] would change: a record whose
    /// ETag differs from the version this server last saw (or that it does
    /// not have) is to be read again, one this server has that the bucket
    /// no longer lists is to go, and the rest are left unread.
    pub(crate) fn plan_level<'a>(
        &self,
        dir: &str,
        listed: &'a [Listed],
    ) -> Result<LevelPlan<'a>, Error> {
        let local_dir = self.local_path(dir)?;
        let mut fetch = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for object in listed {
            let Some(name) = object
                .key
                .strip_prefix(dir)
                .and_then(|rest| rest.strip_prefix('/'))
                .filter(|name| !name.contains('/'))
            else {
                continue;
            };
            let path = self.local_path(&object.key)?;
            names.insert(name.to_owned());
            let seen = self.remote.version(&object.key);
            let unchanged = object.e_tag.is_some()
                && seen.as_ref().and_then(|v| v.e_tag()) == object.e_tag.as_deref();
            if !unchanged || self.inner.file_len(&path).is_err() {
                fetch.push(object);
            }
        }
        let local = match self.inner.list_dir(&local_dir) {
            Ok(local) => local,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(format!("cannot list {}", local_dir.display()), e)),
        };
        let mut remove = Vec::new();
        for name in local {
            let Some(name) = name.to_str() else { continue };
            // Hidden files are temporary, and directories not of this level.
            if name.starts_with('.')
                || names.contains(name)
                || self.inner.is_dir(&local_dir.join(name))
            {
                continue;
            }
            remove.push(name.to_owned());
        }
        Ok(LevelPlan {
            dir: dir.to_owned(),
            local_dir,
            fetch,
            remove,
        })
    }

    /// Carries out `plan`: each record read is replaced atomically, so a
    /// reader sees the old one or the new one.
    pub(crate) fn apply_level(&self, plan: LevelPlan<'_>) -> Result<Applied, Error> {
        let mut applied = Applied::default();
        for object in plan.fetch {
            // Deleted since the listing: the next refresh removes it.
            let Some(version) = self.read_record(&object.key, object.size)? else {
                continue;
            };
            applied.newer_than_listed |= version.e_tag() != object.e_tag.as_deref();
            applied.read.push(object.key.clone());
            applied.changed += 1;
        }
        for name in plan.remove {
            let path = plan.local_dir.join(&name);
            match self.inner.remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("cannot remove {}", path.display()), e));
                }
                _ => {}
            }
            self.remote
                .set_version(&format!("{}/{name}", plan.dir), None);
            applied.changed += 1;
        }
        if applied.changed > 0 {
            crate::fsutil::sync_dir(self.inner.as_ref(), &plan.local_dir)?;
        }
        Ok(applied)
    }

    /// Reads the record `key` (listed `len` bytes long) from the bucket into
    /// the data directory, atomically, and notes the version read. Returns
    /// that version, or `None` when it was deleted since the listing.
    fn read_record(&self, key: &str, len: u64) -> Result<Option<Version>, Error> {
        if len > RECORD_LEN_MAX {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{key} in the bucket is {len} bytes, longer than any record"),
            ));
        }
        let Some((object, version)) = self
            .remote
            .bucket
            .get(key)
            .map_err(|e| bucket_error(format!("cannot read {key}"), e))?
        else {
            return Ok(None);
        };
        let record = Remote::open_envelope(key, &object)?;
        let path = self.local_path(key)?;
        if let Some(parent) = path.parent() {
            create_dir_durable(self.inner.as_ref(), parent)?;
        }
        publish_atomic(self.inner.as_ref(), &path, record)?;
        self.remote.set_version(key, Some(version.clone()));
        Ok(Some(version))
    }

    /// Removes the data directory's copy of `dir`, which the bucket no
    /// longer has (a launch another server deleted). Not published: the
    /// bucket is where it went first.
    pub(crate) fn remove_level(&self, dir: &str) -> Result<(), Error> {
        let local = self.local_path(dir)?;
        match self.inner.remove_dir_all(&local) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io(format!("cannot remove {}", local.display()), e))
            }
            _ => match local.parent() {
                Some(parent) => crate::fsutil::sync_dir(self.inner.as_ref(), parent),
                None => Ok(()),
            },
        }
    }

    /// Writes the record at `key` to the bucket again, unchanged: a new
    /// version of it, so that a server still holding the old version can no
    /// longer replace it.
    pub(crate) fn republish(&self, key: &str) -> io::Result<()> {
        let path = self
            .local_path(key)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.publish_tree(&path, key)
    }

    /// Where the record `key` lives in the data directory; a key with any
    /// part a path could misread is refused.
    fn local_path(&self, key: &str) -> Result<PathBuf, Error> {
        let mut path = self.root.clone();
        for part in key.split('/') {
            if part.is_empty() || part.starts_with('.') || part.contains('\0') {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("{key:?} in the bucket is not a record's name"),
                ));
            }
            path.push(part);
        }
        Ok(path)
    }
}

impl Vfs for BucketRecords {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VfsFile>> {
        self.inner.open(path, mode)
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.inner.file_len(path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.inner.is_dir(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        self.inner.list_dir(path)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from_key, to_key) = (self.key(from), self.key(to));
        if let Some(to_key) = &to_key {
            // The object first: a record the bucket refused is not made
            // durable here either.
            self.publish_tree(from, to_key)?;
        }
        if let Some(from_key) = &from_key {
            // A record renamed away (a launch being deleted) leaves the
            // bucket before it leaves the data directory.
            self.unpublish_tree(from_key)?;
        }
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        if let Some(key) = self.key(path) {
            self.unpublish_tree(&key)?;
        }
        self.inner.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        if let Some(key) = self.key(path) {
            self.unpublish_tree(&key)?;
        }
        self.inner.remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.sync_dir(path)
    }

    fn start_sync_data(&self, file: Arc<dyn VfsFile>) -> PendingSync {
        self.inner.start_sync_data(file)
    }
}

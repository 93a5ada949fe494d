//! Durable file operations, over the store's [`Vfs`].

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, ErrorKind};
use crate::vfs::{OpenMode, Vfs};

/// fsyncs a directory, making creates and renames inside it durable.
pub(crate) fn sync_dir(vfs: &dyn Vfs, dir: &Path) -> Result<(), Error> {
    vfs.sync_dir(dir)
        .map_err(|e| Error::io(format!("cannot fsync directory {}", dir.display()), e))
}

/// Replaces `path` with `bytes` atomically and durably: write a temporary file in
/// the same directory, fsync it, rename it over `path`, fsync the directory.
pub(crate) fn publish_atomic(vfs: &dyn Vfs, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "cannot publish {}: not a file in a directory",
                path.display()
            ),
        ));
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let write = || -> std::io::Result<()> {
        let file = vfs.open(&tmp, OpenMode::CreateTruncate)?;
        file.write_all_at(bytes, 0)?;
        file.sync_all()
    };
    write().map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))?;
    vfs.rename(&tmp, path)
        .map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))?;
    sync_dir(vfs, dir)
}

/// Creates `dir` and its parents, fsyncing each parent that gained an entry.
pub(crate) fn create_dir_durable(vfs: &dyn Vfs, dir: &Path) -> Result<(), Error> {
    if vfs.is_dir(dir) {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(vfs, parent)?;
    }
    match vfs.create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("cannot create {}", dir.display()), e)),
    }
    if let Some(parent) = dir.parent() {
        sync_dir(vfs, parent)?;
    }
    Ok(())
}

/// Reads a small file whole; `None` when it does not exist. Files longer than
/// `len_max_bytes` are reported as corrupt without being read.
pub(crate) fn read_small_file(
    vfs: &dyn Vfs,
    path: &Path,
    len_max_bytes: usize,
) -> Result<Option<Vec<u8>>, Error> {
    let file = match vfs.open(path, OpenMode::Read) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot open {}", path.display()), e)),
    };
    let read = || -> std::io::Result<Option<Vec<u8>>> {
        let len = file.len()?;
        if len > len_max_bytes as u64 {
            return Ok(None);
        }
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0)?;
        Ok(Some(bytes))
    };
    match read().map_err(|e| Error::io(format!("cannot read {}", path.display()), e))? {
        Some(bytes) => Ok(Some(bytes)),
        None => Err(Error::new(
            ErrorKind::Corrupt,
            format!("{} is longer than any valid record", path.display()),
        )),
    }
}

/// Takes the exclusive lock of the data directory `dir`: one writer per data
/// directory, since a second server (or a GC run from the command line)
/// appending to the same packs would corrupt them.
pub(crate) fn lock_data_dir(dir: &Path) -> Result<File, Error> {
    let lock_path = dir.join("lock");
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(crate::vfs::FILE_MODE)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
    match lock_file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "{} is in use by another blockrep process (a running server?); \
                     read-only commands (export, verify, gc --dry-run) still work",
                    dir.display()
                ),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io(format!("cannot lock {}", lock_path.display()), e));
        }
    }
    Ok(lock_file)
}

/// A bucket's working copy is not a store of its own: opened as one, it
/// would diverge from the bucket it caches.
pub(crate) fn refuse_working_copy(vfs: &dyn Vfs, dir: &Path) -> Result<(), Error> {
    let marker = dir.join("bucket");
    match read_small_file(vfs, &marker, 4096) {
        Ok(Some(name)) => Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "{} is the working copy of {}: open it with --store {}",
                dir.display(),
                String::from_utf8_lossy(&name).trim(),
                String::from_utf8_lossy(&name).trim()
            ),
        )),
        _ => Ok(()),
    }
}

/// `dir` made absolute and created (with its parents) if missing.
pub(crate) fn make_data_dir(dir: &Path) -> Result<std::path::PathBuf, Error> {
    let dir = std::path::absolute(dir)
        .map_err(|e| Error::io(format!("cannot resolve {}", dir.display()), e))?;
    create_dir_durable(&crate::vfs::RealFs, &dir)?;
    Ok(dir)
}

/// [`crate::vfs::restrict_data_dir`], with the error saying what failed.
pub(crate) fn restrict_data_dir(dir: &Path) -> Result<(), Error> {
    crate::vfs::restrict_data_dir(dir).map_err(|e| {
        Error::io(
            format!("cannot restrict {} to its owner (mode 0700)", dir.display()),
            e,
        )
    })
}

/// Removes a directory left by an interrupted create or delete, if any.
pub(crate) fn remove_leftover(vfs: &dyn Vfs, dir: &Path) -> Result<(), Error> {
    match vfs.remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot remove {}", dir.display()), e)),
    }
}

/// Removes file `name` of `dir` durably: returns only once the directory no
/// longer names it after a power loss, also when the file is already gone
/// (an earlier attempt may have removed it and then failed to fsync the
/// directory, and the file would come back). A missing `dir` is nothing to do.
pub(crate) fn remove_file_durable(vfs: &dyn Vfs, dir: &Path, name: &str) -> Result<(), Error> {
    let path = dir.join(name);
    match vfs.remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !vfs.is_dir(dir) {
                return Ok(());
            }
        }
        Err(e) => return Err(Error::io(format!("cannot remove {}", path.display()), e)),
    }
    sync_dir(vfs, dir)
}

/// Deletes directory `name` of `parent` as one step a crash either did or
/// did not make: renamed to a hidden `.NAME.deleting` (a leftover of an
/// earlier try removed first), the rename made durable, then removed.
pub(crate) fn remove_dir_durable(vfs: &dyn Vfs, parent: &Path, name: &str) -> Result<(), Error> {
    let path = parent.join(name);
    let doomed = parent.join(format!(".{name}.deleting"));
    remove_leftover(vfs, &doomed)?;
    vfs.rename(&path, &doomed)
        .map_err(|e| Error::io(format!("cannot rename {}", path.display()), e))?;
    sync_dir(vfs, parent)?;
    remove_leftover(vfs, &doomed)
}

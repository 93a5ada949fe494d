//! Durable file operations.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::Error;

/// fsyncs a directory, making creates and renames inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot fsync directory {}", dir.display()), e))
}

/// Replaces `path` with `bytes` atomically and durably: write a temporary file in
/// the same directory, fsync it, rename it over `path`, fsync the directory.
pub(crate) fn publish_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path.parent().expect("published files live in a directory");
    let name = path.file_name().expect("published files have a name");
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))?;
    fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))?;
    sync_dir(dir)
}

/// Creates `dir` and its parents, fsyncing each parent that gained an entry.
pub(crate) fn create_dir_durable(dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("cannot create {}", dir.display()), e)),
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

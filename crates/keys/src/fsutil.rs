//! Durability helpers of the key files: fsyncs of directories.

use std::path::Path;

use crate::error::Error;

/// Fsyncs the directory `dir`.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot fsync {}", dir.display()), e))
}

/// Fsyncs the directory holding `path`.
pub(crate) fn sync_parent(path: &Path) -> Result<(), Error> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

//! Durability helpers of the key files: fsyncs of directories, bounded
//! reads, and files published whole.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, ErrorKind};

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

/// The bytes of the small file `path`; an error when it holds more than
/// `max`.
pub(crate) fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if bytes.len() > max {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("key record {} is longer than {max} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path` (0600), fsyncs it and
/// puts it at `path`: renamed over it when `replace`, else linked there,
/// which fails if `path` exists (two writers of one serial: one wins, the
/// other is told). Then fsyncs the directory.
pub(crate) fn publish(path: &Path, bytes: &[u8], replace: bool) -> Result<(), Error> {
    let io = |what: &str, e| Error::io(format!("cannot {what} {}", path.display()), e);
    // Unique per process and call: two launches' witnesses published at
    // once must not share a temporary file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}.{n}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("write", e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write", e))?;
    let placed = if replace {
        std::fs::rename(&tmp, path)
    } else {
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        linked
    };
    placed.map_err(|e| io("publish", e))?;
    sync_parent(path)
}

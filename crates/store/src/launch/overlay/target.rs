//! Where a materialized overlay keeps its data: `target` in the overlay's
//! directory names the file (or block device) that a materialization copies
//! the volume to and that serves as the overlay's data file from then on.

use std::fs::File;
use std::io;
use std::io::Seek;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind};

use crate::fsutil::publish_atomic;
use crate::vfs::RealFs;

use super::{io_error, sync_dir};

/// The target named in overlay directory `dir`; `None` when the overlay
/// is not materialized.
pub(crate) fn read_target(dir: &Path) -> Result<Option<PathBuf>, Error> {
    let path = dir.join("target");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("cannot read", &path, e)),
    };
    // A path and a newline; written whole by a rename, so never torn.
    let Some(name) = bytes
        .strip_suffix(b"\n")
        .filter(|name| name.starts_with(b"/"))
    else {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{} does not name an absolute path", path.display()),
        ));
    };
    Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))))
}

/// Opens a materialization's target again (a block device exclusively, as
/// at the start), checking that it still holds the volume: a link to a
/// device that now names a smaller one is refused.
pub(crate) fn open_target_again(target: &Path, size_bytes: u64) -> Result<File, Error> {
    let device = std::fs::metadata(target)
        .map_err(|e| io_error("cannot stat the materialization target", target, e))?
        .file_type()
        .is_block_device();
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    if device {
        options.custom_flags(rustix::fs::OFlags::EXCL.bits() as i32);
    }
    let mut file = options
        .open(target)
        .map_err(|e| io_error("cannot open the materialization target", target, e))?;
    let len = file
        .seek(io::SeekFrom::End(0))
        .map_err(|e| io_error("cannot size the materialization target", target, e))?;
    if len < size_bytes {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "materialization target {} holds {len} bytes, less than the volume's \
                 {size_bytes}: not the file or device it was",
                target.display()
            ),
        ));
    }
    Ok(file)
}

/// Names `target` in overlay directory `dir`, durably and atomically.
pub(crate) fn write_target(dir: &Path, target: &Path) -> Result<(), Error> {
    let mut bytes = target.as_os_str().as_bytes().to_vec();
    bytes.push(b'\n');
    publish_atomic(&RealFs, &dir.join("target"), &bytes)
}

/// Makes `len` bytes at `offset` of `file` read as zeroes: a hole where the
/// file system (or device) can punch one, else written zeroes.
pub(crate) fn punch_or_zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let punched = rustix::fs::fallocate(
        file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    );
    if punched.is_ok() {
        return Ok(());
    }
    const STEP: u64 = 1 << 20;
    let zeroes = vec![0u8; STEP.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = STEP.min(len - done);
        file.write_all_at(&zeroes[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Records, before a replay cuts them off, the blocks that the records past
/// the last sync marker named (after a power loss): in a materialized
/// overlay the target may hold their unflushed bytes where the volume now
/// reads the base, so their chunks are copied again (`materialize.rs`).
pub(crate) fn write_cut(dir: &Path, ranges: &[(u64, u64)]) -> Result<(), Error> {
    let mut text = String::new();
    for (first, count) in ranges {
        text.push_str(&format!("{first} {count}\n"));
    }
    publish_atomic(&RealFs, &dir.join("cut"), text.as_bytes())
}

/// The block ranges [`write_cut`] recorded in `dir` (none when it did not).
pub(crate) fn read_cut(dir: &Path) -> Result<Vec<(u64, u64)>, Error> {
    let path = dir.join("cut");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("cannot read", &path, e)),
    };
    text.lines()
        .map(|line| {
            let parsed = line
                .split_once(' ')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            parsed.ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("{}: cannot read {line:?}", path.display()),
                )
            })
        })
        .collect()
}

/// Removes what [`write_cut`] recorded, once its chunks are marked to copy
/// again durably.
pub(crate) fn remove_cut(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_file(dir.join("cut")) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove the cut list of", dir, e)),
    }
}

//! Writing a disk image out of the store: all or nothing, readable by its owner
//! only.
//!
//! An image is a whole replicated disk, so it gets the data directory's care:
//! it is written to a temporary file beside the target (`.NAME.export-PID.tmp`,
//! created with mode 0600, [`FILE_MODE`]), fsynced, renamed over the target,
//! and the directory fsynced. An export that fails part-way removes its
//! temporary file and leaves the target as it was (absent, or the old file);
//! a partial image never passes for the disk. An existing regular file at the
//! target is replaced by the new image (with the new image's mode 0600); any
//! other existing target (a symbolic link, a device, a directory) is refused,
//! since a rename would replace the link or device node itself rather than
//! write through it. Only a killed process leaves a temporary file behind.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind};
use crate::vfs::FILE_MODE;

/// Writes an image of `size_bytes` to `out` all or nothing: `fill` writes the
/// data into the (already sized) temporary file; its result is returned once
/// the image is durable under its name.
pub(crate) fn write_image<T>(
    out: &Path,
    size_bytes: u64,
    fill: impl FnOnce(&File) -> Result<T, Error>,
) -> Result<T, Error> {
    check_target(out)?;
    let (dir, tmp) = temporary_beside(out)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    let written = (|| {
        file.set_len(size_bytes)
            .map_err(|e| Error::io(format!("cannot size {}", tmp.display()), e))?;
        let value = fill(&file)?;
        file.sync_all()
            .map_err(|e| Error::io(format!("cannot fsync {}", tmp.display()), e))?;
        fs::rename(&tmp, out)
            .map_err(|e| Error::io(format!("cannot rename to {}", out.display()), e))?;
        Ok(value)
    })();
    let value = match written {
        Ok(value) => value,
        Err(error) => {
            // Nothing partial stays behind; the target is untouched.
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }
    };
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot fsync directory {}", dir.display()), e))?;
    Ok(value)
}

/// Refuses a target that exists and is not a regular file.
fn check_target(out: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(out) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(_) => Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "{} exists and is not a regular file: export writes a new image file \
                 and renames it into place; name a file",
                out.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("cannot inspect {}", out.display()), e)),
    }
}

/// The directory of `out` and a temporary name in it.
fn temporary_beside(out: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let name = out.file_name().ok_or_else(|| {
        Error::new(
            ErrorKind::Invalid,
            format!("{} does not name a file", out.display()),
        )
    })?;
    let dir = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.export-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    Ok((dir, tmp))
}

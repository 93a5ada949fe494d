//! An overlay's directory as a whole, without its volume: how much it
//! maps, and removing it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::records::{HEADER_LEN, header_blocks};
use super::{OVERLAY_BLOCK_BYTES, Overlay, io_error, sync_dir};
use crate::error::{Error, ErrorKind};

/// Blocks mapped by the overlay in `dir` (0 when there is none), read
/// without knowing its volume's size.
pub(crate) fn mapped_blocks_in(dir: &Path) -> Result<u64, Error> {
    let map_path = dir.join("map");
    let mut header = [0u8; HEADER_LEN as usize];
    match File::open(&map_path) {
        Ok(file) => file
            .read_exact_at(&mut header, 0)
            .map_err(|e| io_error("cannot read", &map_path, e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error("cannot open", &map_path, e)),
    }
    let blocks = header_blocks(&header).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            format!("overlay map {} has a damaged header", map_path.display()),
        )
    })?;
    let size = blocks.saturating_mul(OVERLAY_BLOCK_BYTES);
    Ok(Overlay::open(dir, size)?.map_or(0, |overlay| overlay.mapped_blocks()))
}

/// Left in an overlay's directory by a sync that failed: the kernel may have
/// dropped pages it could not write, so a restart in the same boot must not
/// trust records past the last marker as the page cache's.
const SYNC_FAILED_FILE: &str = "sync-failed";

/// Notes durably, as far as the failing disk still allows, that a sync of
/// the overlay in `dir` failed. Best effort: if even this cannot be
/// written, the process still refuses every later write and flush.
pub(super) fn note_sync_failure(dir: &Path) {
    let noted = File::create(dir.join(SYNC_FAILED_FILE))
        .and_then(|file| file.sync_all())
        .map_err(|e| io_error("cannot note a failed sync in", dir, e))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = noted {
        // The store has no logger of its own; the server's stderr is kept.
        eprintln!("blockrep-store: a failed overlay sync could not be noted: {e}");
    }
}

/// Whether a sync of the overlay in `dir` failed since its map last ended
/// at a marker.
pub(super) fn sync_failed_before(dir: &Path) -> bool {
    dir.join(SYNC_FAILED_FILE).exists()
}

/// Removes the note once the map ends at a marker again.
pub(super) fn clear_sync_failure(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_file(dir.join(SYNC_FAILED_FILE)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove the failed-sync note in", dir, e)),
    }
}

/// Removes the overlay in `dir`, if any (its launch was deleted, or a
/// bucket store's overlay holds nothing acknowledged).
pub(crate) fn remove(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove", dir, e)),
    }
}

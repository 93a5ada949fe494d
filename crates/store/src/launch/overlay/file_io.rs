//! The overlay's data file, read and written outside the volume's lock:
//! the map is the volume's to change, under its lock, around these calls.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{OVERLAY_BLOCK_BYTES, io_error, punch_or_zero};
use crate::error::Error;

/// The overlay's file, for reads and writes outside the volume's lock.
pub(crate) struct OverlayIo {
    pub(super) data: Arc<File>,
    pub(super) dir: Arc<Path>,
    pub(super) data_sync: Arc<DataSync>,
}

/// Every sync of an overlay's data file goes through this, one at a time,
/// with or without the volume's lock: the kernel reports a failed
/// write-back to one `fdatasync` of the open file only, and the others
/// must know of it before any of them writes a sync marker over pages
/// that may be lost.
#[derive(Debug, Default)]
pub(crate) struct DataSync {
    one_at_a_time: Mutex<()>,
    pub(super) failed: AtomicBool,
}

impl DataSync {
    /// `fdatasync` of `file` (the data of the overlay in `dir`), unless one
    /// failed before. A failure is noted in `dir` for a restart
    /// (`dir::note_sync_failure`), whichever caller heard it.
    pub(super) fn sync(&self, file: &File, dir: &Path) -> io::Result<()> {
        let _one = self
            .one_at_a_time
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "an earlier sync of the overlay's data failed",
            ));
        }
        file.sync_data().inspect_err(|_| self.record_failure(dir))
    }

    /// What a failed `fdatasync` leaves: every later sync fails, and the
    /// overlay in `dir` is noted as failed for a restart in this boot.
    pub(super) fn record_failure(&self, dir: &Path) {
        self.failed.store(true, Ordering::SeqCst);
        super::dir::note_sync_failure(dir);
    }
}

impl OverlayIo {
    /// Reads `buf.len()` bytes at byte `offset`.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.data
            .read_exact_at(buf, offset)
            .map_err(|e| io_error("cannot read", &self.dir, e))
    }

    /// Makes the file's data durable (a materialization's target, before a
    /// fold publishes what it read from it, or before copied chunks are
    /// recorded).
    pub(crate) fn sync_data(&self) -> Result<(), Error> {
        self.data_sync
            .sync(&self.data, &self.dir)
            .map_err(|e| io_error("cannot sync", &self.dir, e))
    }

    /// Makes `len` bytes at `offset` read as zeroes in the file.
    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<(), Error> {
        punch_or_zero(&self.data, offset, len).map_err(|e| io_error("cannot zero", &self.dir, e))
    }

    /// Writes whole blocks from `first`, as [`Overlay::write_blocks`] does,
    /// leaving the map to [`Overlay::wrote_blocks`].
    pub(crate) fn write_blocks(&self, first: u64, data: &[u8]) -> Result<(), Error> {
        write_data(&self.data, &self.dir, first, data)
    }
}

pub(super) fn write_data(file: &File, dir: &Path, first: u64, data: &[u8]) -> Result<(), Error> {
    file.write_all_at(data, first * OVERLAY_BLOCK_BYTES)
        .map_err(|e| io_error("cannot write", dir, e))
}

//! The NBD export of a captured disk: reads straight from the disk, writes
//! through [`Capture::write_with`] (gate, preserve, mark dirty, write).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::Capture;

/// Largest piece of zeroes written at once when the disk cannot zero a
/// range itself: a static buffer, so `write_zeroes` allocates nothing.
const ZEROES_PIECE_BYTES: usize = 64 * 1024;
static ZEROES: [u8; ZEROES_PIECE_BYTES] = [0; ZEROES_PIECE_BYTES];

pub(super) struct CaptureExport {
    capture: Arc<Capture>,
}

impl CaptureExport {
    pub(super) fn new(capture: Arc<Capture>) -> Self {
        Self { capture }
    }
}

/// Zeroes `len` bytes at `offset`: `FALLOC_FL_ZERO_RANGE` where the file
/// system or device supports it (no data written, nothing allocated here),
/// else zeroes written a piece at a time.
fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if rustix::fs::fallocate(file, rustix::fs::FallocateFlags::ZERO_RANGE, offset, len).is_ok() {
        return Ok(());
    }
    let mut done = 0;
    while done < len {
        let piece = (len - done).min(ZEROES_PIECE_BYTES as u64) as usize;
        file.write_all_at(&ZEROES[..piece], offset + done)?;
        done += piece as u64;
    }
    Ok(())
}

impl blockrep_nbd::Export for CaptureExport {
    fn size_bytes(&self) -> u64 {
        self.capture.size_bytes
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let in_disk = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.capture.size_bytes);
        if !in_disk {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of the disk",
            ));
        }
        // Reads are not captured: they change nothing.
        self.capture.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.capture.write_with(offset, data.len() as u64, |file| {
            file.write_all_at(data, offset)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.capture
            .write_with(offset, len, |file| zero_range(file, offset, len))
    }

    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        // A hint: doing nothing is correct, and leaves the disk (and so the
        // dirty set) unchanged.
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.capture.flush_disk()
    }

    fn multi_conn_safe(&self) -> bool {
        // One file, no per-connection cache: a flush covers every connection.
        true
    }
}

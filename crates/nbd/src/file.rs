//! A raw file as an export: the plainest one a file allows, and the one
//! `qemu-nbd -f raw --cache=writeback` amounts to. Positioned reads and writes
//! through the page cache (no shared cursor, so concurrent requests need no
//! lock), `fdatasync` for a flush, zeroes written as zeroes, trim ignored.
//! The example server and the crate's tests serve it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::Export;

/// Zeroes written per call by `write_zeroes`, so a huge request costs bounded memory.
const ZERO_BUFFER_BYTES: usize = 1 << 20;

/// A raw file served as an export.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size_bytes: u64,
    read_only: bool,
}

impl FileExport {
    /// Opens the file at `path` (for writing too unless `read_only`); the
    /// export's size is the file's size now.
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size_bytes = file.metadata()?.len();
        Ok(Self {
            file,
            size_bytes,
            read_only,
        })
    }
}

impl Export for FileExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let zeroes = vec![0; ZERO_BUFFER_BYTES.min(usize::try_from(len).unwrap_or(usize::MAX))];
        let mut done = 0;
        while done < len {
            let step = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..step], offset + done)?;
            done += step as u64;
        }
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn multi_conn_safe(&self) -> bool {
        // One File shared by every connection, no cache of its own.
        true
    }
}

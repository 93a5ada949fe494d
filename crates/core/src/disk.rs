//! Read-only memory mapping of a source disk (regular file or block device).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};

use crate::error::Error;

/// A disk opened read-only and mapped into memory for scanning.
///
/// The mapping is of a file that other processes may write while we read it (that is
/// the point of continuous replication). Such bytes are only ever hashed or copied,
/// never trusted: whatever is sent is hashed again from the copy that is sent.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    file: File,
    map: Option<Mmap>,
    size_bytes: u64,
}

impl DiskImage {
    /// Opens and maps `path`. The size of a block device is found by seeking to its end.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let mut file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open disk {}", path.display()), e))?;
        let size_bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("cannot size disk {}", path.display()), e))?;
        let map = if size_bytes == 0 {
            None // mmap of length 0 is an error; an empty disk has nothing to map.
        } else {
            let len = usize::try_from(size_bytes).map_err(|_| {
                Error::io(
                    format!("disk {} is larger than the address space", path.display()),
                    std::io::Error::other("too large"),
                )
            })?;
            // SAFETY: the map is read-only and private to this process. Another process
            // may change the file's bytes while mapped; we treat those bytes as
            // untrusted data (only hashed or copied, never used to uphold a Rust
            // invariant), and the file is never truncated by us. A truncation by
            // someone else is detected by `check_size` before each scan.
            #[allow(unsafe_code)]
            let map = unsafe { MmapOptions::new().len(len).map(&file) }
                .map_err(|e| Error::io(format!("cannot map disk {}", path.display()), e))?;
            // Scans read front to back: ask for aggressive read-ahead. Only a hint.
            let _ = map.advise(Advice::Sequential);
            Some(map)
        };
        Ok(Self {
            path: path.to_owned(),
            file,
            map,
            size_bytes,
        })
    }

    /// Size of the disk in bytes at open time.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The path the disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops this process's mapping of `range` (the file and the page cache are
    /// untouched), so that resident memory stays bounded by what is in use rather
    /// than growing to the size of the disk. Touching the range again simply
    /// reads it back from the file. Out-of-range or failed requests are ignored:
    /// this is an optimization only.
    pub fn release(&self, range: std::ops::Range<usize>) {
        let Some(map) = &self.map else { return };
        // Page-align inwards: never release a page that is partly outside `range`.
        const PAGE: usize = 4096;
        let start = range.start.div_ceil(PAGE) * PAGE;
        let end = (range.end.min(map.len()) / PAGE) * PAGE;
        if start >= end {
            return;
        }
        // SAFETY: the mapping is private and read-only, so MADV_DONTNEED discards
        // no data: later reads of the range fault the file's current contents
        // back in. Callers release a range only when they hold no slice into it
        // that they will read again (scan batches after hashing, chunks after
        // copying them into a frame), and those bytes are untrusted data anyway
        // (see the type's docs).
        #[allow(unsafe_code)]
        let _ =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
    }

    /// Scans the whole disk on every core (see [`crate::scan_buffer`]), releasing
    /// each batch's pages once hashed.
    pub fn scan(&self, geometry: crate::Geometry) -> Vec<crate::ChunkId> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        crate::scan::scan_with(self.bytes(), geometry, threads, |range| self.release(range))
    }

    /// Reads `buf.len()` bytes at `offset` with pread (not through the mapping).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    /// Current size of the underlying file or device, to detect a resize since open.
    pub fn current_size_bytes(&self) -> Result<u64, Error> {
        let mut file = &self.file;
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("cannot size disk {}", self.path.display()), e))
    }
}

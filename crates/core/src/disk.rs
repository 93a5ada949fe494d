//! A source disk (regular file or block device) opened for scanning.
//!
//! The disk is read with `pread` into a small buffer per scan thread, never
//! through a memory mapping. A mapping of a file that someone truncates while it
//! is mapped turns every access past the new end into SIGBUS, which kills the
//! process; checking the size first does not help, since the file can shrink
//! between the check and the access. With `pread` a shrink is a short read: the
//! scan ends with an error that names both sizes ([`ErrorKind::DiskShrank`])
//! and the caller scans again later. Each read lands in a buffer of a few
//! hundred KiB that is hashed at once, while it is still in the CPU's cache, so
//! the extra copy costs little (`cargo bench -p blockrep-core --bench
//! scan_file` compares a file scan with hashing the same bytes in memory).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorKind};
use crate::geometry::Geometry;
use crate::id::ChunkId;
use crate::scan::{for_each_batch, hash_chunk};

/// Bytes a scan thread reads at a time (whole chunks, at least one): large
/// enough that the system call costs nothing, small enough that the buffer
/// stays in the CPU's cache between the copy and the hash.
const SCAN_READ_BYTES: usize = 256 * 1024;

/// A disk opened read-only for scanning and for reading chunks to send.
///
/// Other processes may write the disk while we read it (that is the point of
/// continuous replication). Its bytes are only ever hashed or copied, never
/// trusted: whatever is sent is hashed from the copy that is sent.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    /// Bytes read through this image so far: what a sync cost the disk.
    bytes_read: AtomicU64,
    /// The file had a hole when it was opened: only then is asking for
    /// holes worth a system call per read (a hole punched since is read as
    /// the zeros it holds).
    sparse: bool,
}

impl DiskImage {
    /// Opens `path`. The size of a block device is found by seeking to its end.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let mut file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open disk {}", path.display()), e))?;
        let size_bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("cannot size disk {}", path.display()), e))?;
        Ok(Self {
            path: path.to_owned(),
            sparse: rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(0))
                .is_ok_and(|hole| hole < size_bytes),
            file,
            size_bytes,
            bytes_read: AtomicU64::new(0),
        })
    }

    /// Bytes read through this image since it was opened (scans and
    /// chunk reads alike).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Size of the disk in bytes at open time.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The path the disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scans the whole disk on every core into one id per chunk (see
    /// [`crate::scan_buffer`] for what an id is).
    ///
    /// Fails with [`ErrorKind::DiskShrank`] when the disk turns out shorter than
    /// at open time, with [`ErrorKind::Io`] when a read fails, and with
    /// [`ErrorKind::InvalidGeometry`] when `geometry` is not of this disk's size.
    pub fn scan(&self, geometry: Geometry) -> Result<Vec<ChunkId>, Error> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.scan_with_threads(geometry, threads)
    }

    /// [`DiskImage::scan`] with an explicit thread count (at least one is used).
    pub fn scan_with_threads(
        &self,
        geometry: Geometry,
        threads: usize,
    ) -> Result<Vec<ChunkId>, Error> {
        if geometry.disk_size_bytes() != self.size_bytes {
            return Err(Error::new(
                ErrorKind::InvalidGeometry,
                format!(
                    "cannot scan {} ({} bytes) with a geometry of {} bytes",
                    self.path.display(),
                    self.size_bytes,
                    geometry.disk_size_bytes()
                ),
            ));
        }
        let chunk_size = geometry.chunk_size_bytes() as usize;
        let read_len = SCAN_READ_BYTES.max(chunk_size) / chunk_size * chunk_size;
        for_each_batch(
            geometry,
            threads,
            || vec![0u8; read_len],
            |buffer, first_chunk, out| {
                // Read the batch a buffer at a time, and hash each buffer at once.
                for (step, ids) in out.chunks_mut(read_len / chunk_size).enumerate() {
                    let first = first_chunk + step * (read_len / chunk_size);
                    let start = geometry.chunk_offset(first as u64);
                    let end = (start + (ids.len() * chunk_size) as u64).min(self.size_bytes);
                    if self.is_hole(start, end) {
                        ids.fill(ChunkId::ZERO); // unread: a hole reads as zeros
                        continue;
                    }
                    let bytes = &mut buffer[..(end - start) as usize];
                    self.read_scan(start, bytes)?;
                    for (slot, data) in ids.iter_mut().zip(bytes.chunks(chunk_size)) {
                        *slot = hash_chunk(data);
                    }
                }
                Ok(())
            },
        )
    }

    /// Fills `buf` from `offset` for the scan; a read that ends early means the
    /// disk shrank since it was opened.
    fn read_scan(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let mut filled = 0;
        while filled < buf.len() {
            let at = offset + filled as u64;
            match self.file.read_at(&mut buf[filled..], at) {
                Ok(0) => return Err(self.shrank()),
                Ok(read) => {
                    filled += read;
                    self.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("cannot read disk {} at byte {at}", self.path.display()),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The error for a disk found shorter than at open time.
    fn shrank(&self) -> Error {
        let now = match self.current_size_bytes() {
            Ok(size) => format!("{size} bytes"),
            Err(e) => format!("an unknown size ({e})"),
        };
        Error::new(
            ErrorKind::DiskShrank,
            format!(
                "disk {} shrank from {} bytes to {now} during the scan",
                self.path.display(),
                self.size_bytes
            ),
        )
    }

    /// Reads `buf.len()` bytes at `offset` with pread. A disk that shrank below
    /// `offset + buf.len()` fails with [`std::io::ErrorKind::UnexpectedEof`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Whether bytes `start..end` of the disk lie wholly in a hole of a
    /// sparse file: they read as zeros, and need not be read. `false` where
    /// that cannot be told (a block device, a file system without
    /// `SEEK_DATA`), for a file that had no hole when opened, and past the
    /// file's end (a disk that shrank is found by the read that fails), so
    /// that the caller reads.
    pub fn is_hole(&self, start: u64, end: u64) -> bool {
        if !self.sparse {
            return false;
        }
        // Positional reads never use the file offset this moves.
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(start)) {
            Ok(next_data) => next_data >= end,
            // No data from `start` to the end of the file: a hole if the
            // file still reaches `end`.
            Err(rustix::io::Errno::NXIO) => self.current_size_bytes().is_ok_and(|size| size >= end),
            Err(_) => false,
        }
    }

    /// Current size of the underlying file or device, to detect a resize since open.
    pub fn current_size_bytes(&self) -> Result<u64, Error> {
        let mut file = &self.file;
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("cannot size disk {}", self.path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::scan_buffer_with_threads;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    /// The holes of a sparse image scan as zero chunks without a read: only
    /// the reads that hold data are made, and the ids equal those of the
    /// same bytes in memory.
    #[test]
    fn a_sparse_image_is_scanned_without_reading_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let len = 8 * 1024 * 1024;
        let mut data = vec![0u8; len];
        data[1 << 20..(3 << 19)].copy_from_slice(&pattern(1 << 19));
        data[(5 << 20) + 100..(5 << 20) + 200].copy_from_slice(&pattern(100));
        let file = File::create(&path).unwrap();
        file.set_len(len as u64).unwrap();
        file.write_all_at(&data[1 << 20..(3 << 19)], 1 << 20)
            .unwrap();
        file.write_all_at(&data[(5 << 20) + 100..(5 << 20) + 200], (5 << 20) + 100)
            .unwrap();
        drop(file);
        let geometry = Geometry::new(len as u64, 64 * 1024).unwrap();
        let disk = DiskImage::open(&path).unwrap();
        assert!(disk.is_hole(0, 1 << 20));
        assert!(!disk.is_hole(0, (1 << 20) + 1), "a range reaching data");
        assert!(!disk.is_hole(len as u64, len as u64 + 4096), "past the end");
        assert_eq!(
            disk.scan_with_threads(geometry, 2).unwrap(),
            scan_buffer_with_threads(&data, geometry, 2)
        );
        // Three reads of 256 KiB: two over the first extent, one over the
        // second (its file-system block lies in the first 256 KiB at 5 MiB).
        assert_eq!(disk.bytes_read(), 3 * SCAN_READ_BYTES as u64);
    }

    #[test]
    fn file_scan_equals_memory_scan() {
        let dir = tempfile::tempdir().unwrap();
        // Chunk sizes below, at and above the read size, and a short last chunk.
        for (chunk_size, len) in [
            (4096u32, 300 * 4096 + 5),
            (64 * 1024, 5 * 1024 * 1024 + 17),
            (1024 * 1024, 3 * 1024 * 1024 + 1),
        ] {
            let data = pattern(len);
            let path = dir.path().join(format!("{chunk_size}.raw"));
            std::fs::write(&path, &data).unwrap();
            let geometry = Geometry::new(len as u64, chunk_size).unwrap();
            let disk = DiskImage::open(&path).unwrap();
            for threads in [1, 3] {
                assert_eq!(
                    disk.scan_with_threads(geometry, threads).unwrap(),
                    scan_buffer_with_threads(&data, geometry, threads)
                );
            }
        }
    }

    #[test]
    fn a_disk_truncated_after_open_fails_the_scan_with_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let len = 4 * 1024 * 1024;
        std::fs::write(&path, pattern(len)).unwrap();
        let disk = DiskImage::open(&path).unwrap();
        let geometry = Geometry::new(len as u64, 64 * 1024).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1024 * 1024)
            .unwrap();
        let error = disk.scan_with_threads(geometry, 2).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::DiskShrank);
        let text = error.to_string();
        assert!(
            text.contains(&format!("shrank from {len} bytes to 1048576 bytes")),
            "{text}"
        );
    }

    #[test]
    fn a_geometry_of_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, pattern(8192)).unwrap();
        let disk = DiskImage::open(&path).unwrap();
        let geometry = Geometry::new(4096, 4096).unwrap();
        assert_eq!(
            disk.scan(geometry).unwrap_err().kind(),
            ErrorKind::InvalidGeometry
        );
    }
}

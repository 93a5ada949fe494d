//! The shape of a disk: its size, the chunk size it is split into, and how
//! its chunk ids group into index pages, with the limits of each.

use crate::error::{Error, ErrorKind};

/// Smallest supported chunk size.
pub const CHUNK_SIZE_MIN_BYTES: u32 = 4 * 1024;
/// Largest supported chunk size.
pub const CHUNK_SIZE_MAX_BYTES: u32 = 4 * 1024 * 1024;
/// Default chunk size: 64 KiB.
pub const CHUNK_SIZE_DEFAULT_BYTES: u32 = 64 * 1024;
/// Chunk ids per index page.
pub const CHUNKS_PER_PAGE: usize = 1024;
/// Most index pages a root may name: bounds a root's encoding to 8 MiB + 24 bytes.
pub const PAGE_COUNT_MAX: usize = 256 * 1024;
/// Largest supported disk, 64 TiB. Independently, the number of index pages of a
/// root is capped by [`PAGE_COUNT_MAX`], which bounds disks of small chunk sizes.
pub const DISK_SIZE_MAX_BYTES: u64 = 64 << 40;

/// The shape of a disk: its size and the chunk size it is split into.
///
/// Invariants (checked by [`Geometry::new`]): the chunk size is a power of two in
/// `[CHUNK_SIZE_MIN_BYTES, CHUNK_SIZE_MAX_BYTES]`, the disk size is at most
/// [`DISK_SIZE_MAX_BYTES`] and needs at most [`PAGE_COUNT_MAX`] index pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    disk_size_bytes: u64,
    chunk_size_bytes: u32,
}

impl Geometry {
    /// Validates and builds a geometry.
    pub fn new(disk_size_bytes: u64, chunk_size_bytes: u32) -> Result<Self, Error> {
        if !chunk_size_bytes.is_power_of_two()
            || !(CHUNK_SIZE_MIN_BYTES..=CHUNK_SIZE_MAX_BYTES).contains(&chunk_size_bytes)
        {
            return Err(Error::new(
                ErrorKind::InvalidGeometry,
                format!(
                    "chunk size {chunk_size_bytes} is not a power of two between \
                     {CHUNK_SIZE_MIN_BYTES} and {CHUNK_SIZE_MAX_BYTES} bytes"
                ),
            ));
        }
        if disk_size_bytes > DISK_SIZE_MAX_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidGeometry,
                format!(
                    "disk size {disk_size_bytes} exceeds the limit of {DISK_SIZE_MAX_BYTES} bytes"
                ),
            ));
        }
        let geometry = Self {
            disk_size_bytes,
            chunk_size_bytes,
        };
        if geometry.page_count() > PAGE_COUNT_MAX as u64 {
            return Err(Error::new(
                ErrorKind::InvalidGeometry,
                format!(
                    "disk size {disk_size_bytes} at chunk size {chunk_size_bytes} needs more \
                     than {PAGE_COUNT_MAX} index pages; use a larger chunk size"
                ),
            ));
        }
        Ok(geometry)
    }

    /// Size of the disk in bytes.
    pub fn disk_size_bytes(self) -> u64 {
        self.disk_size_bytes
    }

    /// Chunk size in bytes (the last chunk may be shorter).
    pub fn chunk_size_bytes(self) -> u32 {
        self.chunk_size_bytes
    }

    /// Number of chunks, counting a short last chunk.
    pub fn chunk_count(self) -> u64 {
        self.disk_size_bytes
            .div_ceil(u64::from(self.chunk_size_bytes))
    }

    /// Number of index pages.
    pub fn page_count(self) -> u64 {
        self.chunk_count().div_ceil(CHUNKS_PER_PAGE as u64)
    }

    /// Byte offset of chunk `index`.
    pub fn chunk_offset(self, index: u64) -> u64 {
        index * u64::from(self.chunk_size_bytes)
    }

    /// Length of chunk `index` in bytes, or `None` past the end of the disk.
    pub fn chunk_len(self, index: u64) -> Option<u32> {
        // Bounds first: the index may come from a peer, and the offset of an
        // index far past the end overflows.
        if index >= self.chunk_count() {
            return None;
        }
        let remaining = self.disk_size_bytes - self.chunk_offset(index);
        // Fits: remaining is capped by the chunk size, which is a u32.
        Some(remaining.min(u64::from(self.chunk_size_bytes)) as u32)
    }

    /// Byte range of chunk `index` as `usize`, for slicing a mapped disk.
    pub fn chunk_range(self, index: u64) -> Option<std::ops::Range<usize>> {
        let len = self.chunk_len(index)?;
        let start = usize::try_from(self.chunk_offset(index)).ok()?;
        Some(start..start + len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_last_chunk() {
        let g = Geometry::new(65_536 * 2 + 1, 65_536).unwrap();
        assert_eq!(g.chunk_count(), 3);
        assert_eq!(g.chunk_len(2), Some(1));
        assert_eq!(g.chunk_len(3), None);
        // Indices whose offset would overflow are simply past the end.
        assert_eq!(g.chunk_len(u64::MAX), None);
        assert_eq!(g.chunk_range(u64::MAX / 2), None);
        assert_eq!(g.chunk_range(1), Some(65_536..131_072));
        assert_eq!(g.page_count(), 1);
    }

    #[test]
    fn empty_disk_has_no_chunks() {
        let g = Geometry::new(0, 4096).unwrap();
        assert_eq!(g.chunk_count(), 0);
        assert_eq!(g.page_count(), 0);
    }

    #[test]
    fn rejects_bad_chunk_sizes() {
        for bad in [0, 1000, 2048, 65_535, 8 << 20] {
            assert_eq!(
                Geometry::new(1 << 20, bad).unwrap_err().kind(),
                ErrorKind::InvalidGeometry
            );
        }
        assert!(Geometry::new(DISK_SIZE_MAX_BYTES + 1, 1 << 20).is_err());
    }
}

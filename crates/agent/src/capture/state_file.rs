//! The saved dirty set (`--capture-state`), so that a clean restart needs no
//! rescan. All integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BRCAPST1` (the 1 is the format version; do not change) |
//! | 8 | 4 | flags: `IN_USE` (1): the capture is running or stopped uncleanly; `HAS_ROOT` (2) |
//! | 12 | 4 | block size in bytes (4096) |
//! | 16 | 8 | disk size in bytes |
//! | 24 | 32 | the last committed root (zeros without `HAS_ROOT`) |
//! | 56 | 8 | the disk's modification time at the save, ns since the epoch |
//! | 64 | 8 | n: bitmap words (0 with `IN_USE`, else one bit per block, rounded up to 64) |
//! | 72 | 8n | the dirty bitmap (bit `b % 64` of word `b / 64` is block `b`) |
//! | 72+8n | 4 | crc32 of every byte before it |
//!
//! Like QEMU's persistent dirty bitmaps (`in-use` flag), the file is marked
//! in use, durably, before the first write is accepted, and cleared only by a
//! clean save: a file found in use means writes may be missing from it. The
//! disk's modification time is kept too: an image file written by something
//! else while the capture was stopped no longer matches, and is rescanned.
//! Every write is a new file renamed over the old one, with the file and its
//! directory fsynced.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use blockrep_core::ChunkId;

use super::CAPTURE_BLOCK_BYTES;
use super::bitmap;

const MAGIC: &[u8; 8] = b"BRCAPST1";
const FLAG_IN_USE: u32 = 1;
const FLAG_HAS_ROOT: u32 = 2;
const HEADER_BYTES: usize = 72;
const CRC_BYTES: usize = 4;

/// A dirty set saved by a clean stop.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Saved {
    pub(super) bits: Vec<u64>,
    pub(super) root: Option<ChunkId>,
    pub(super) disk_modified_ns: u64,
}

/// Encodes a state file.
pub(super) fn encode(
    in_use: bool,
    disk_size_bytes: u64,
    root: Option<ChunkId>,
    disk_modified_ns: u64,
    bits: &[u64],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + bits.len() * 8 + CRC_BYTES);
    out.extend_from_slice(MAGIC);
    let flags =
        if in_use { FLAG_IN_USE } else { 0 } | if root.is_some() { FLAG_HAS_ROOT } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(CAPTURE_BLOCK_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&disk_size_bytes.to_le_bytes());
    out.extend_from_slice(&root.unwrap_or(ChunkId::ZERO).0);
    out.extend_from_slice(&disk_modified_ns.to_le_bytes());
    out.extend_from_slice(&(bits.len() as u64).to_le_bytes());
    for word in bits {
        out.extend_from_slice(&word.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Reads the state file at `path` for a disk of `disk_size_bytes`. `Err`
/// says why it cannot be used (missing, in use, another disk, corrupt).
pub(super) fn load(path: &Path, disk_size_bytes: u64) -> Result<Saved, String> {
    let words = bitmap::words_for(disk_size_bytes.div_ceil(CAPTURE_BLOCK_BYTES));
    let expected = HEADER_BYTES + words * 8 + CRC_BYTES;
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("no saved state".into()),
        Err(e) => return Err(format!("cannot open: {e}")),
    };
    // Read at most one byte more than a valid file: the length is checked
    // before it is trusted.
    let mut bytes = Vec::with_capacity(expected.min(HEADER_BYTES + CRC_BYTES));
    (&mut file)
        .take(expected as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() < HEADER_BYTES + CRC_BYTES || &bytes[..8] != MAGIC {
        return Err("not a capture state file of this version".into());
    }
    let body = bytes.len() - CRC_BYTES;
    if crc32fast::hash(&bytes[..body]) != u32_at(&bytes, body) {
        return Err("checksum mismatch (corrupt)".into());
    }
    let flags = u32_at(&bytes, 8);
    if flags & FLAG_IN_USE != 0 {
        return Err("marked in use: the last run did not stop cleanly".into());
    }
    if u32_at(&bytes, 12) as u64 != CAPTURE_BLOCK_BYTES {
        return Err("another block size".into());
    }
    let saved_size = u64_at(&bytes, 16);
    if saved_size != disk_size_bytes {
        return Err(format!(
            "saved for a disk of {saved_size} bytes, the disk has {disk_size_bytes}"
        ));
    }
    if u64_at(&bytes, 64) != words as u64 || bytes.len() != expected {
        return Err("bitmap length does not match the disk (corrupt)".into());
    }
    let bits: Vec<u64> = (0..words)
        .map(|i| u64_at(&bytes, HEADER_BYTES + i * 8))
        .collect();
    let blocks = disk_size_bytes.div_ceil(CAPTURE_BLOCK_BYTES);
    if bitmap::next_set(&bits, blocks, words as u64 * 64).is_some() {
        return Err("bits set past the end of the disk (corrupt)".into());
    }
    let root = (flags & FLAG_HAS_ROOT != 0).then(|| {
        let mut id = [0; 32];
        id.copy_from_slice(&bytes[24..56]);
        ChunkId(id)
    });
    Ok(Saved {
        bits,
        root,
        disk_modified_ns: u64_at(&bytes, 56),
    })
}

/// The modification time of `file` in ns since the Unix epoch (0 when the
/// file system does not say).
pub(super) fn modified_ns(file: &File) -> u64 {
    file.metadata()
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// Replaces the file at `path` with `bytes` durably: a temporary file beside
/// it, fsynced, renamed over it, then the directory fsynced.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let size = 130 * CAPTURE_BLOCK_BYTES + 1;
        let mut bits = vec![0u64; 3];
        bitmap::set(&mut bits, 0);
        bitmap::set(&mut bits, 130);
        let root = Some(ChunkId([7; 32]));
        write_durably(&path, &encode(false, size, root, 5, &bits)).unwrap();
        let saved = Saved {
            bits: bits.clone(),
            root,
            disk_modified_ns: 5,
        };
        assert_eq!(load(&path, size), Ok(saved));
        assert!(
            load(&path, size + 4096)
                .unwrap_err()
                .contains("saved for a disk")
        );

        write_durably(&path, &encode(true, size, root, 5, &[])).unwrap();
        assert!(load(&path, size).unwrap_err().contains("in use"));

        let mut corrupt = encode(false, size, None, 5, &bits);
        corrupt[HEADER_BYTES] ^= 1;
        write_durably(&path, &corrupt).unwrap();
        assert!(load(&path, size).unwrap_err().contains("checksum"));

        let mut past_end = bits.clone();
        bitmap::set(&mut past_end, 140);
        write_durably(&path, &encode(false, size, None, 5, &past_end)).unwrap();
        assert!(load(&path, size).unwrap_err().contains("past the end"));

        write_durably(&path, &encode(false, size, None, 5, &bits[..2])).unwrap();
        assert!(load(&path, size).unwrap_err().contains("length"));
        write_durably(&path, b"short").unwrap();
        assert!(load(&path, size).is_err());
        assert!(load(&dir.path().join("missing"), size).is_err());
    }
}

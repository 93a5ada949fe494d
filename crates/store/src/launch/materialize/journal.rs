//! The journal of a materialization's copied chunks (`copied` in the
//! overlay's directory; the layout is in the parent's docs).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind};
use crate::format::seal_with_crc;
use crate::fsutil::publish_atomic;
use crate::vfs::RealFs;

use super::super::overlay::{OVERLAY_BLOCK_BYTES as BLOCK, read_cut, read_target, remove_cut};
use super::{Copied, MaterializeProgress};

const JOURNAL_MAGIC: [u8; 8] = *b"BRMATJ01";
const HEADER_LEN: usize = 28;
const RECORD_MAGIC: [u8; 4] = *b"MCPY";
/// A record of chunks to copy again (see [`load`]).
const AGAIN_MAGIC: [u8; 4] = *b"MAGN";
const RECORD_LEN: usize = 24;

/// The journal of copied chunks (`copied` in the overlay's directory).
#[derive(Debug)]
pub(in crate::launch) struct Journal {
    file: File,
    path: PathBuf,
    len: u64,
}

fn header(size_bytes: u64, chunk_size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&JOURNAL_MAGIC);
    out.extend_from_slice(&size_bytes.to_le_bytes());
    out.extend_from_slice(&chunk_size.to_le_bytes());
    seal_with_crc(&mut out);
    out
}

/// Appends a record of `magic` for chunks `first..first + count` to `out`.
fn record(out: &mut Vec<u8>, magic: [u8; 4], first: u64, count: u64) {
    let mut rec = Vec::with_capacity(RECORD_LEN);
    rec.extend_from_slice(&magic);
    rec.extend_from_slice(&first.to_le_bytes());
    rec.extend_from_slice(&count.to_le_bytes());
    seal_with_crc(&mut rec);
    out.extend_from_slice(&rec);
}

fn journal_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(
        format!("materialization journal: {what} {}", path.display()),
        e,
    )
}

impl Journal {
    /// Creates an empty journal in `dir`, durably (before the target is
    /// named: a named target always has its journal).
    pub(super) fn create(dir: &Path, size_bytes: u64, chunk_size: u64) -> Result<Self, Error> {
        let path = dir.join("copied");
        publish_atomic(&RealFs, &path, &header(size_bytes, chunk_size))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| journal_error("cannot open", &path, e))?;
        Ok(Self {
            file,
            path,
            len: HEADER_LEN as u64,
        })
    }

    /// Opens the journal in `dir` and replays it into `copied`; a torn or
    /// damaged tail is cut off.
    fn open(dir: &Path, copied: &mut Copied) -> Result<Self, Error> {
        let path = dir.join("copied");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| journal_error("cannot open", &path, e))?;
        let bytes = std::fs::read(&path).map_err(|e| journal_error("cannot read", &path, e))?;
        let at = replay(&path, &bytes, copied)?;
        if at < bytes.len() {
            file.set_len(at as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| journal_error("cannot cut the torn tail of", &path, e))?;
        }
        Ok(Self {
            file,
            path,
            len: at as u64,
        })
    }
}

/// Replays journal `bytes` (read from `path`) into `copied`; returns where
/// its whole records end.
fn replay(path: &Path, bytes: &[u8], copied: &mut Copied) -> Result<usize, Error> {
    if bytes.get(..HEADER_LEN) != Some(&header(copied.size_bytes, copied.chunk_size)[..]) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{} does not belong to a volume of {} bytes in chunks of {} (or is damaged)",
                path.display(),
                copied.size_bytes,
                copied.chunk_size
            ),
        ));
    }
    let mut at = HEADER_LEN;
    while let Some(rec) = bytes.get(at..at + RECORD_LEN) {
        let crc = u32::from_le_bytes(rec[20..].try_into().expect("4 bytes"));
        let again = rec[..4] == AGAIN_MAGIC;
        if (rec[..4] != RECORD_MAGIC && !again) || crc32fast::hash(&rec[..20]) != crc {
            break;
        }
        let first = u64::from_le_bytes(rec[4..12].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(rec[12..20].try_into().expect("8 bytes"));
        if first
            .checked_add(count)
            .is_none_or(|end| end > copied.chunks)
        {
            break;
        }
        for chunk in first..first + count {
            match again {
                false => copied.mark(chunk),
                true => copied.unmark(chunk),
            }
        }
        at += RECORD_LEN;
    }
    Ok(at)
}

impl Journal {
    /// Records `chunks` (whose bytes the target holds durably) as copied.
    pub(super) fn record(&mut self, chunks: &mut [u64]) -> Result<(), Error> {
        self.append(RECORD_MAGIC, chunks)
    }

    /// Appends records of `magic` for `chunks`, durably.
    fn append(&mut self, magic: [u8; 4], chunks: &mut [u64]) -> Result<(), Error> {
        chunks.sort_unstable();
        let mut bytes = Vec::new();
        let mut index = 0;
        while index < chunks.len() {
            let first = chunks[index];
            let mut end = first + 1;
            index += 1;
            while index < chunks.len() && chunks[index] <= end {
                end = end.max(chunks[index] + 1);
                index += 1;
            }
            record(&mut bytes, magic, first, end - first);
        }
        self.file
            .write_all_at(&bytes, self.len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| journal_error("cannot append to", &self.path, e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// Loads the materialization of the overlay in `dir` (whose data file is
/// its target) for a volume of `size_bytes` in chunks of `chunk_size`.
pub(in crate::launch) fn load(
    dir: &Path,
    size_bytes: u64,
    chunk_size: u64,
) -> Result<Option<(Copied, Journal)>, Error> {
    let Some(target) = read_target(dir)? else {
        return Ok(None);
    };
    let mut copied = Copied::new(target, size_bytes, chunk_size);
    let mut journal = Journal::open(dir, &mut copied)?;
    let cut = read_cut(dir)?;
    if !cut.is_empty() {
        let per_chunk = chunk_size / BLOCK;
        let mut again: Vec<u64> = cut
            .iter()
            .filter(|(_, count)| *count > 0)
            .flat_map(|(first, count)| {
                let last = (first.saturating_add(count - 1) / per_chunk)
                    .min(copied.chunks.saturating_sub(1));
                first / per_chunk..=last
            })
            .collect();
        again.sort_unstable();
        again.dedup();
        journal.append(AGAIN_MAGIC, &mut again)?;
        for chunk in again {
            copied.unmark(chunk);
        }
        remove_cut(dir)?;
    }
    Ok(Some((copied, journal)))
}

/// The progress recorded in overlay directory `dir` (of a volume not open).
pub(super) fn read_progress(dir: &Path) -> Result<Option<MaterializeProgress>, Error> {
    let Some(target) = read_target(dir)? else {
        return Ok(None);
    };
    let path = dir.join("copied");
    let bytes = std::fs::read(&path).map_err(|e| journal_error("cannot read", &path, e))?;
    let field = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let (Some(size_bytes), Some(chunk_size)) = (field(8), field(16)) else {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{} has no header", path.display()),
        ));
    };
    if chunk_size == 0 || bytes.get(..HEADER_LEN) != Some(&header(size_bytes, chunk_size)[..]) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{} has a damaged header", path.display()),
        ));
    }
    let mut copied = Copied::new(target, size_bytes, chunk_size);
    // Read only: the volume may be opened (and its journal written) meanwhile.
    replay(&path, &bytes, &mut copied)?;
    Ok(Some(copied.progress()))
}

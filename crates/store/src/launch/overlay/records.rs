//! The byte layout of the overlay's `map`: header, operation records and
//! sync markers (see `overlay.rs`), and the boot id markers carry.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::io_error;
use crate::error::Error;

pub(super) const HEADER_MAGIC: [u8; 4] = *b"BROV";
pub(super) const RECORD_MAGIC: [u8; 4] = *b"BROJ";
pub(super) const MARKER_MAGIC: [u8; 4] = *b"BROS";
pub(super) const MARKER_LEN: u64 = 4 + 16 + 4;
pub(super) const VERSION: u32 = 1;
pub(super) const HEADER_LEN: u64 = 4 + 4 + 8 + 4;
pub(super) const OP_LEN: usize = 1 + 8 + 8;
/// The blocks a map header names, when `header` is a whole, undamaged one
/// (magic, version and crc): a damaged count must not size anything.
pub(super) fn header_blocks(header: &[u8; HEADER_LEN as usize]) -> Option<u64> {
    let (body, crc) = header.split_at(HEADER_LEN as usize - 4);
    let whole = body[..4] == HEADER_MAGIC
        && body[4..8] == VERSION.to_le_bytes()
        && crc32fast::hash(body).to_le_bytes() == crc;
    if !whole {
        return None;
    }
    Some(u64::from_le_bytes(body[8..16].try_into().ok()?))
}

/// Operations in one record at most, so a record's length is bounded and a
/// corrupt count cannot make recovery allocate without limit.
pub(super) const OPS_PER_RECORD_MAX: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpKind {
    Data = 1,
    Zero = 2,
    Unmap = 3,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Op {
    pub(super) kind: OpKind,
    pub(super) first: u64,
    pub(super) count: u64,
}

/// A record of `map`.
pub(super) enum Record {
    Ops(Vec<Op>),
    /// A sync marker, with the boot it was written in.
    Marker([u8; 16]),
}

#[cfg(test)]
thread_local! {
    /// The boot id overlays opened on this thread see: a test's "reboot".
    pub(crate) static TEST_BOOT: std::cell::Cell<Option<[u8; 16]>> =
        const { std::cell::Cell::new(None) };
}

/// This boot's id, from the kernel; `None` where it cannot be read.
pub(super) fn boot_id() -> Option<[u8; 16]> {
    #[cfg(test)]
    if let Some(boot) = TEST_BOOT.with(std::cell::Cell::get) {
        return Some(boot);
    }
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    let value = u128::from_str_radix(&hex, 16).ok()?;
    Some(value.to_le_bytes())
}

pub(super) fn encode_record(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + ops.len() * OP_LEN + 4);
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        out.push(op.kind as u8);
        out.extend_from_slice(&op.first.to_le_bytes());
        out.extend_from_slice(&op.count.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads `map` in windows of [`WINDOW`] bytes: a replay asks for every
/// record in order, and one read per window instead of two per record keeps
/// opening a volume whose map holds tens of thousands of records to a few
/// milliseconds (every NBD connection opens its volume).
pub(super) struct MapReader<'a> {
    map: &'a File,
    dir: &'a Path,
    len: u64,
    window: Vec<u8>,
    window_at: u64,
}

/// Bytes read from `map` at once; a record longer than this (up to
/// [`OPS_PER_RECORD_MAX`] operations) is read whole.
const WINDOW: usize = 1 << 20;

impl<'a> MapReader<'a> {
    /// A reader of the first `len` bytes of `map`.
    pub(super) fn new(map: &'a File, dir: &'a Path, len: u64) -> Self {
        MapReader {
            map,
            dir,
            len,
            window: Vec::new(),
            window_at: 0,
        }
    }

    /// The `n` bytes at `at`, which the caller has checked lie within `len`.
    fn bytes(&mut self, at: u64, n: usize) -> Result<&[u8], Error> {
        let end = self.window_at + self.window.len() as u64;
        if at < self.window_at || at + n as u64 > end {
            let want = (self.len - at).min(WINDOW.max(n) as u64) as usize;
            self.window.resize(want, 0);
            self.map
                .read_exact_at(&mut self.window, at)
                .map_err(|e| io_error("cannot read the map of", self.dir, e))?;
            self.window_at = at;
        }
        let from = (at - self.window_at) as usize;
        Ok(&self.window[from..from + n])
    }

    /// The record at byte `at`, and its length; `None` at the end, or where
    /// the record is torn or damaged.
    pub(super) fn record(&mut self, at: u64) -> Result<Option<(Record, u64)>, Error> {
        let len = self.len;
        if len - at < 8 + 4 {
            return Ok(None);
        }
        let head: [u8; 8] = self.bytes(at, 8)?.try_into().expect("8 bytes");
        if head[..4] == MARKER_MAGIC {
            if len - at < MARKER_LEN {
                return Ok(None);
            }
            let marker = self.bytes(at, MARKER_LEN as usize)?;
            let (body, crc) = marker.split_at(marker.len() - 4);
            if crc32fast::hash(body).to_le_bytes() != crc {
                return Ok(None);
            }
            let boot = body[4..20].try_into().expect("16 bytes");
            return Ok(Some((Record::Marker(boot), MARKER_LEN)));
        }
        let count = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
        if head[..4] != RECORD_MAGIC || count > OPS_PER_RECORD_MAX {
            return Ok(None);
        }
        let record_len = (8 + count * OP_LEN + 4) as u64;
        if len - at < record_len {
            return Ok(None);
        }
        let record = self.bytes(at, record_len as usize)?;
        let (body, crc) = record.split_at(record.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Ok(None);
        }
        let mut ops = Vec::with_capacity(count);
        for op in body[8..].chunks_exact(OP_LEN) {
            let kind = match op[0] {
                1 => OpKind::Data,
                2 => OpKind::Zero,
                3 => OpKind::Unmap,
                _ => return Ok(None),
            };
            let first = u64::from_le_bytes(op[1..9].try_into().expect("8 bytes"));
            let count = u64::from_le_bytes(op[9..17].try_into().expect("8 bytes"));
            ops.push(Op { kind, first, count });
        }
        Ok(Some((Record::Ops(ops), record_len)))
    }
}

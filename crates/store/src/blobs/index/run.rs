//! One immutable, sorted run of blob index entries on disk
//! (`DATA/index/run-GGGGGGGGGGGGGGGG`), and what of it stays in memory.
//!
//! A run holds entries sorted by id, 64 bytes each, in blocks of 64 (4 KiB).
//! Memory keeps only what a lookup needs before it reads: a Bloom filter (10
//! bits per entry, 7 probes: about 1% of misses read a block), the first id
//! prefix of every block and every block's crc32. That is about 1.4 bytes per
//! entry, so 16 million entries cost some 23 MiB, where the entries are 1 GiB.
//! A lookup that the filter passes reads one block with `pread` (through the
//! page cache, which is not the server's memory) and checks its crc32.
//!
//! Layout (`RUN_MAGIC` version 1): a 4096-byte header page (magic 8 | entries
//! 8 | filter words 8 | crc32 of the metadata 4, zero padded), the entries
//! from offset 4096, then the metadata: the filter's words, each block's
//! first id prefix (8 bytes, big-endian) and each block's crc32 (4 bytes).
//!
//! Entry: id 32 | pack 4 | offset 8 | stored length 4 | raw length 4 |
//! record crc32 4 | kind 1 | codec and sealed bit 1 | flags 1 (1: the
//! record's crc held, 2: removed) | 5 zero bytes.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use blockrep_core::ChunkId;

use super::super::pack::RecordHeader;
use crate::blobs::Location;
use crate::error::{Error, ErrorKind};
use crate::format::{RECORD_HEADER_LEN, RECORD_MAGIC};

const RUN_MAGIC: [u8; 8] = *b"BRIXRUN\x01";
/// Bytes of one entry.
pub(crate) const ENTRY_LEN: usize = 64;
/// Entries per block; a block is what a lookup reads.
const BLOCK_ENTRIES: usize = 64;
const BLOCK_LEN: usize = ENTRY_LEN * BLOCK_ENTRIES;
/// Where the entries start: after the header page.
const ENTRIES_AT: u64 = 4096;
const FILTER_BITS_PER_ENTRY: u64 = 10;
const FILTER_PROBES: u64 = 7;
/// The most entries a run may claim (2^40: 64 TiB of entries), so a damaged
/// header cannot make an open allocate without bound.
const ENTRIES_MAX: u64 = 1 << 40;

const FLAG_CRC_OK: u8 = 1;
const FLAG_REMOVED: u8 = 2;

/// An entry's value: where the blob is, or that it was removed (a
/// tombstone hiding the entries of older runs).
pub(crate) type Value = Option<Location>;

/// A run's file name for generation `generation`.
pub(crate) fn run_file_name(generation: u64) -> String {
    format!("run-{generation:016}")
}

/// The generation of a run file name.
pub(crate) fn parse_run_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("run-")?;
    (digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn encode_entry(id: &ChunkId, value: &Value) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    out[0..32].copy_from_slice(id.as_bytes());
    match value {
        None => out[58] = FLAG_REMOVED,
        Some(at) => {
            let header = at.header.to_bytes();
            out[32..36].copy_from_slice(&at.pack.to_le_bytes());
            out[36..44].copy_from_slice(&at.offset.to_le_bytes());
            // stored length, raw length
            out[44..52].copy_from_slice(&header[8..16]);
            out[52..56].copy_from_slice(&header[48..52]);
            out[56] = header[4];
            out[57] = header[5];
            out[58] = if at.crc_ok { FLAG_CRC_OK } else { 0 };
        }
    }
    out
}

/// The entry's id and value; `None` when the bytes cannot be an entry.
fn decode_entry(bytes: &[u8]) -> Option<(ChunkId, Value)> {
    let id = ChunkId(bytes.get(0..32)?.try_into().ok()?);
    let flags = *bytes.get(58)?;
    if flags & FLAG_REMOVED != 0 {
        return Some((id, None));
    }
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&RECORD_MAGIC);
    header[4] = bytes[56];
    header[5] = bytes[57];
    header[8..16].copy_from_slice(&bytes[44..52]);
    header[16..48].copy_from_slice(id.as_bytes());
    header[48..52].copy_from_slice(&bytes[52..56]);
    let header = RecordHeader::decode(&header)?;
    Some((
        id,
        Some(Location {
            pack: u32::from_le_bytes(bytes[32..36].try_into().ok()?),
            offset: u64::from_le_bytes(bytes[36..44].try_into().ok()?),
            header,
            crc_ok: flags & FLAG_CRC_OK != 0,
        }),
    ))
}

fn prefix(id: &ChunkId) -> u64 {
    u64::from_be_bytes(id.0[0..8].try_into().unwrap_or_default())
}

/// The filter's bit positions for `id` (ids are blake3 outputs, or keyed
/// ids of the same quality: their bytes are the hash).
fn probes(id: &ChunkId, bits: u64) -> impl Iterator<Item = u64> {
    let h1 = u64::from_le_bytes(id.0[8..16].try_into().unwrap_or_default());
    let h2 = u64::from_le_bytes(id.0[16..24].try_into().unwrap_or_default()) | 1;
    (0..FILTER_PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
}

/// A run open for lookups.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) generation: u64,
    path: PathBuf,
    file: File,
    entries: u64,
    filter: Vec<u64>,
    /// The first id prefix of each block.
    firsts: Vec<u64>,
    block_crcs: Vec<u32>,
}

impl Run {
    /// Writes the entries of `sorted` (ascending ids, each once, at most
    /// `count_max` of them) as run `generation` in `dir`, durably, and opens
    /// it.
    pub(crate) fn write(
        dir: &Path,
        generation: u64,
        count_max: u64,
        sorted: impl Iterator<Item = (ChunkId, Value)>,
    ) -> Result<Self, Error> {
        let path = dir.join(run_file_name(generation));
        let tmp = dir.join(format!(".{}.tmp", run_file_name(generation)));
        let fail = |what: &str, e: std::io::Error| {
            Error::io(format!("cannot {what} index run {}", tmp.display()), e)
        };
        // Owner-only, as every file of the data directory.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::vfs::FILE_MODE)
            .open(&tmp)
            .map_err(|e| fail("create", e))?;
        let bits = (count_max.max(1) * FILTER_BITS_PER_ENTRY).div_ceil(64) * 64;
        let mut filter = vec![0u64; (bits / 64) as usize];
        let mut firsts = Vec::with_capacity(count_max.div_ceil(BLOCK_ENTRIES as u64) as usize);
        let mut block_crcs = Vec::with_capacity(firsts.capacity());
        let mut out = BufWriter::with_capacity(1 << 20, &file);
        out.write_all(&[0u8; ENTRIES_AT as usize])
            .map_err(|e| fail("write", e))?;
        let mut block = Vec::with_capacity(BLOCK_LEN);
        let mut written = 0u64;
        let mut last: Option<ChunkId> = None;
        for (id, value) in sorted {
            if last.is_some_and(|last| last >= id) {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    "index run entries out of order",
                ));
            }
            last = Some(id);
            if block.is_empty() {
                firsts.push(prefix(&id));
            }
            for bit in probes(&id, bits) {
                filter[(bit / 64) as usize] |= 1 << (bit % 64);
            }
            block.extend_from_slice(&encode_entry(&id, &value));
            written += 1;
            if block.len() == BLOCK_LEN {
                block_crcs.push(crc32fast::hash(&block));
                out.write_all(&block).map_err(|e| fail("write", e))?;
                block.clear();
            }
        }
        if !block.is_empty() {
            block_crcs.push(crc32fast::hash(&block));
            out.write_all(&block).map_err(|e| fail("write", e))?;
        }
        if written > count_max {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("index run of at most {count_max} entries given {written}"),
            ));
        }
        let count = written;
        let meta = encode_meta(&filter, &firsts, &block_crcs);
        out.write_all(&meta).map_err(|e| fail("write", e))?;
        out.flush().map_err(|e| fail("write", e))?;
        drop(out);
        let mut header = [0u8; ENTRIES_AT as usize];
        header[0..8].copy_from_slice(&RUN_MAGIC);
        header[8..16].copy_from_slice(&count.to_le_bytes());
        header[16..24].copy_from_slice(&(filter.len() as u64).to_le_bytes());
        header[24..28].copy_from_slice(&crc32fast::hash(&meta).to_le_bytes());
        file.write_all_at(&header, 0)
            .map_err(|e| fail("write", e))?;
        file.sync_all().map_err(|e| fail("fsync", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| fail("rename", e))?;
        Ok(Self {
            generation,
            path,
            file,
            entries: count,
            filter,
            firsts,
            block_crcs,
        })
    }

    /// Opens run `generation` in `dir`, reading its header and metadata
    /// (not its entries).
    pub(crate) fn open(dir: &Path, generation: u64) -> Result<Self, Error> {
        let path = dir.join(run_file_name(generation));
        let corrupt = |why: &str| {
            Error::new(
                ErrorKind::Corrupt,
                format!("index run {}: {why}", path.display()),
            )
        };
        let mut file = File::open(&path)
            .map_err(|e| Error::io(format!("cannot open index run {}", path.display()), e))?;
        let mut header = [0u8; 28];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(format!("cannot read index run {}", path.display()), e))?;
        if header[0..8] != RUN_MAGIC {
            return Err(corrupt("not an index run"));
        }
        let entries = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let words = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        let meta_crc = u32::from_le_bytes(header[24..28].try_into().unwrap_or_default());
        if entries > ENTRIES_MAX || words == 0 || words > ENTRIES_MAX {
            return Err(corrupt("impossible sizes"));
        }
        let blocks = entries.div_ceil(BLOCK_ENTRIES as u64);
        let meta_at = ENTRIES_AT + entries * ENTRY_LEN as u64;
        let meta_len = words * 8 + blocks * 12;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat index run {}", path.display()), e))?
            .len();
        if file_len != meta_at + meta_len {
            return Err(corrupt("length does not match its header"));
        }
        let mut meta = vec![0u8; meta_len as usize];
        file.read_exact_at(&mut meta, meta_at)
            .map_err(|e| Error::io(format!("cannot read index run {}", path.display()), e))?;
        if crc32fast::hash(&meta) != meta_crc {
            return Err(corrupt("metadata fails its checksum"));
        }
        let (filter, rest) = meta.split_at(words as usize * 8);
        let (firsts, crcs) = rest.split_at(blocks as usize * 8);
        Ok(Self {
            generation,
            path,
            file,
            entries,
            filter: filter
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
                .collect(),
            firsts: firsts
                .chunks_exact(8)
                .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()))
                .collect(),
            block_crcs: crcs
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes(w.try_into().unwrap_or_default()))
                .collect(),
        })
    }

    /// Entries in the run (removals included).
    pub(crate) fn len(&self) -> u64 {
        self.entries
    }

    /// Bytes of memory the run keeps.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.filter.len() * 8 + self.firsts.len() * 8 + self.block_crcs.len() * 4
    }

    /// The path of the run's file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn may_hold(&self, id: &ChunkId) -> bool {
        let bits = self.filter.len() as u64 * 64;
        probes(id, bits).all(|bit| self.filter[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Block `block`'s bytes, checked against its crc32.
    fn read_block(&self, block: usize) -> Result<Vec<u8>, Error> {
        let first = block as u64 * BLOCK_ENTRIES as u64;
        let count = (self.entries - first).min(BLOCK_ENTRIES as u64) as usize;
        let mut bytes = vec![0u8; count * ENTRY_LEN];
        self.file
            .read_exact_at(&mut bytes, ENTRIES_AT + first * ENTRY_LEN as u64)
            .map_err(|e| Error::io(format!("cannot read index run {}", self.path.display()), e))?;
        if self.block_crcs.get(block) != Some(&crc32fast::hash(&bytes)) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "block {block} of index run {} fails its checksum",
                    self.path.display()
                ),
            ));
        }
        Ok(bytes)
    }

    /// The run's entry for `id`: `Ok(None)` when it has none, `Ok(Some(None))`
    /// when it records a removal.
    pub(crate) fn get(&self, id: &ChunkId) -> Result<Option<Value>, Error> {
        if self.entries == 0 || !self.may_hold(id) {
            return Ok(None);
        }
        let target = prefix(id);
        // Blocks whose first prefix is <= the target's; usually one holds it,
        // two only when 64-bit prefixes collide across a block boundary.
        let end = self.firsts.partition_point(|&p| p <= target);
        let start = self
            .firsts
            .partition_point(|&p| p < target)
            .saturating_sub(1);
        for block in start..end {
            let bytes = self.read_block(block)?;
            if let Some(at) = search_block(&bytes, id) {
                let entry = &bytes[at * ENTRY_LEN..(at + 1) * ENTRY_LEN];
                return match decode_entry(entry) {
                    Some((_, value)) => Ok(Some(value)),
                    None => Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("index run {} holds a malformed entry", self.path.display()),
                    )),
                };
            }
        }
        Ok(None)
    }

    /// Every entry in id order, read sequentially.
    pub(crate) fn iter(&self) -> RunIter<'_> {
        RunIter {
            run: self,
            block: 0,
            bytes: Vec::new(),
            at: 0,
        }
    }
}

/// The position of `id`'s entry in a block's bytes, by binary search.
fn search_block(bytes: &[u8], id: &ChunkId) -> Option<usize> {
    let (mut lo, mut hi) = (0, bytes.len() / ENTRY_LEN);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match bytes[mid * ENTRY_LEN..mid * ENTRY_LEN + 32].cmp(id.as_bytes()) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(mid),
        }
    }
    None
}

fn encode_meta(filter: &[u64], firsts: &[u64], crcs: &[u32]) -> Vec<u8> {
    let mut meta = Vec::with_capacity(filter.len() * 8 + firsts.len() * 12);
    for word in filter {
        meta.extend_from_slice(&word.to_le_bytes());
    }
    for first in firsts {
        meta.extend_from_slice(&first.to_be_bytes());
    }
    for crc in crcs {
        meta.extend_from_slice(&crc.to_le_bytes());
    }
    meta
}

/// The entries of a run in id order; a block that fails its checksum ends
/// the iteration with an error.
pub(crate) struct RunIter<'a> {
    run: &'a Run,
    block: usize,
    bytes: Vec<u8>,
    at: usize,
}

impl Iterator for RunIter<'_> {
    type Item = Result<(ChunkId, Value), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.bytes.len() {
            if self.block >= self.run.firsts.len() {
                return None;
            }
            match self.run.read_block(self.block) {
                Ok(bytes) => self.bytes = bytes,
                Err(e) => {
                    self.block = self.run.firsts.len();
                    return Some(Err(e));
                }
            }
            self.block += 1;
            self.at = 0;
        }
        let entry = &self.bytes[self.at..self.at + ENTRY_LEN];
        self.at += ENTRY_LEN;
        Some(decode_entry(entry).ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "index run {} holds a malformed entry",
                    self.run.path.display()
                ),
            )
        }))
    }
}

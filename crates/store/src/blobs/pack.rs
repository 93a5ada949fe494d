//! Pack files: append-only sequences of checksummed blob records (their
//! layout is in `format.rs`, `RECORD_MAGIC`).

use std::path::Path;

use blockrep_core::{CHUNK_SIZE_MAX_BYTES, ChunkId};

use crate::error::Error;
use crate::vfs::{OpenMode, Vfs, VfsFile};

/// A pack is sealed (no more appends) once it reaches this size.
pub const PACK_SIZE_MAX_BYTES: u64 = 256 * 1024 * 1024;

pub(crate) use crate::format::RECORD_HEADER_LEN;
use crate::format::{RECORD_CRC_AT, RECORD_MAGIC, RECORD_STORED_MAX};

/// What a blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of disk data.
    Chunk = 1,
    /// An index page.
    Page = 2,
    /// A root.
    Root = 3,
}

impl BlobKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => BlobKind::Chunk,
            2 => BlobKind::Page,
            3 => BlobKind::Root,
            _ => return None,
        })
    }
}

/// How a blob's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StoredCodec {
    /// As they are.
    Raw = 1,
    /// zstd-compressed.
    Zstd = 2,
}

impl StoredCodec {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => StoredCodec::Raw,
            2 => StoredCodec::Zstd,
            _ => return None,
        })
    }
}

/// The bit of a record's codec byte that marks it sealed.
const SEALED_BIT: u8 = 0x80;

/// Parsed header of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub kind: BlobKind,
    pub codec: StoredCodec,
    /// Whether the stored bytes are sealed under a data key (`seal.rs`).
    pub sealed: bool,
    pub stored_len: u32,
    pub raw_len: u32,
    pub id: ChunkId,
    pub crc: u32,
}

impl RecordHeader {
    /// The header's bytes with the crc of the record whose data is `data`.
    /// `data_crc`, when given, is the crc32 of `data` already computed (a
    /// chunk's, as its frame arrived): it is combined with the header's
    /// instead of reading the data again.
    pub(crate) fn encode_with_crc(
        &self,
        data: &[u8],
        data_crc: Option<u32>,
    ) -> [u8; RECORD_HEADER_LEN] {
        let mut out = self.to_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&out[..RECORD_CRC_AT]);
        match data_crc {
            Some(crc) => {
                debug_assert_eq!(crc, crc32fast::hash(data), "a crc of other bytes");
                hasher.combine(&crc32fast::Hasher::new_with_initial_len(
                    crc,
                    data.len() as u64,
                ));
            }
            None => hasher.update(data),
        }
        out[RECORD_CRC_AT..].copy_from_slice(&hasher.finalize().to_le_bytes());
        out
    }

    /// The header's bytes as they are in the pack (with the crc it carries).
    pub(crate) fn to_bytes(self) -> [u8; RECORD_HEADER_LEN] {
        let mut out = [0u8; RECORD_HEADER_LEN];
        out[0..4].copy_from_slice(&RECORD_MAGIC);
        out[4] = self.kind as u8;
        out[5] = self.codec as u8 | if self.sealed { SEALED_BIT } else { 0 };
        out[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        out[16..48].copy_from_slice(self.id.as_bytes());
        out[48..52].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// Parses a header; `None` when it cannot be a valid record header.
    pub(crate) fn decode(bytes: &[u8; RECORD_HEADER_LEN]) -> Option<Self> {
        if bytes[0..4] != RECORD_MAGIC || bytes[6..8] != [0, 0] {
            return None;
        }
        let stored_len = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
        let raw_len = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
        if stored_len > RECORD_STORED_MAX || raw_len > RECORD_STORED_MAX.max(CHUNK_SIZE_MAX_BYTES) {
            return None;
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes[16..48]);
        Some(Self {
            kind: BlobKind::from_u8(bytes[4])?,
            codec: StoredCodec::from_u8(bytes[5] & !SEALED_BIT)?,
            sealed: bytes[5] & SEALED_BIT != 0,
            stored_len,
            raw_len,
            id: ChunkId(id),
            crc: u32::from_le_bytes(bytes[48..52].try_into().ok()?),
        })
    }

    pub(crate) fn crc_matches(&self, header_bytes: &[u8; RECORD_HEADER_LEN], data: &[u8]) -> bool {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header_bytes[..RECORD_CRC_AT]);
        hasher.update(data);
        hasher.finalize() == self.crc
    }
}

/// One valid record found by [`scan_pack`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScannedRecord {
    pub offset: u64,
    pub header: RecordHeader,
    /// Whether the record's crc32 holds (a sound header over damaged or
    /// unwritten data fails it).
    pub crc_ok: bool,
}

/// Result of scanning a pack: its valid records and where validity ends.
#[derive(Debug)]
pub(crate) struct PackScan {
    pub records: Vec<ScannedRecord>,
    /// Offset just past the last valid record.
    pub valid_len: u64,
    /// Length of the file.
    pub file_len: u64,
}

/// Reads every record of a pack and finds where its valid content ends.
///
/// A crash can leave a torn tail: a partial record, or records whose header was
/// written but whose data was not (a checksum mismatch). Damage can also sit in
/// the middle of a pack (bit rot). The two must not be confused, or a damaged
/// byte would make recovery cut off every committed record after it. So:
/// - a record with a sound header but a bad checksum is kept in the scan (reads
///   of it fail their hash check, and `verify` reports it) and scanning goes on;
/// - at an unreadable header, scanning resynchronizes on the next record that
///   is whole and whose checksum holds, if there is one;
/// - `valid_len` is the end of the last record whose checksum holds; records
///   after it are the torn tail and are left out.
pub(crate) fn scan_pack(vfs: &dyn Vfs, path: &Path) -> Result<PackScan, Error> {
    scan_pack_from(vfs, path, 0)
}

/// [`scan_pack`] of the records at or past `from`, a record boundary below
/// which the caller knows the pack (the blob index's runs cover it).
pub(crate) fn scan_pack_from(vfs: &dyn Vfs, path: &Path, from: u64) -> Result<PackScan, Error> {
    let file = vfs
        .open(path, OpenMode::Read)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let file = file.as_ref();
    let file_len = file
        .len()
        .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
    let io = |e| Error::io(format!("cannot read {}", path.display()), e);
    let mut records = Vec::new();
    let mut offset = from;
    let mut valid_len = from.min(file_len);
    let mut data = Vec::new();
    while offset + RECORD_HEADER_LEN as u64 <= file_len {
        match read_record(file, offset, file_len, &mut data).map_err(io)? {
            Some((header, crc_ok)) => {
                let end = offset + RECORD_HEADER_LEN as u64 + u64::from(header.stored_len);
                records.push(ScannedRecord {
                    offset,
                    header,
                    crc_ok,
                });
                if crc_ok {
                    valid_len = end;
                }
                offset = end;
            }
            None => match next_valid_record(file, offset + 1, file_len, &mut data).map_err(io)? {
                Some(next) => offset = next,
                None => break,
            },
        }
    }
    let records = records
        .into_iter()
        .filter(|record| record.offset < valid_len)
        .collect();
    Ok(PackScan {
        records,
        valid_len,
        file_len,
    })
}

/// The record at `offset`: `None` if its header is unsound or it does not fit
/// in the file; otherwise the header and whether its checksum holds.
fn read_record(
    file: &dyn VfsFile,
    offset: u64,
    file_len: u64,
    data: &mut Vec<u8>,
) -> std::io::Result<Option<(RecordHeader, bool)>> {
    // A resynchronizing scan may find a magic in the last bytes of a torn
    // tail, with no room for a whole header after it.
    if offset + RECORD_HEADER_LEN as u64 > file_len {
        return Ok(None);
    }
    let mut header_bytes = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut header_bytes, offset)?;
    let Some(header) = RecordHeader::decode(&header_bytes) else {
        return Ok(None);
    };
    let end = offset + RECORD_HEADER_LEN as u64 + u64::from(header.stored_len);
    if end > file_len {
        return Ok(None);
    }
    data.resize(header.stored_len as usize, 0);
    file.read_exact_at(data, offset + RECORD_HEADER_LEN as u64)?;
    let crc_ok = header.crc_matches(&header_bytes, data);
    Ok(Some((header, crc_ok)))
}

/// The offset of the next whole record with a good checksum at or after `from`.
fn next_valid_record(
    file: &dyn VfsFile,
    mut from: u64,
    file_len: u64,
    data: &mut Vec<u8>,
) -> std::io::Result<Option<u64>> {
    const WINDOW: usize = 4 << 20;
    let mut window = vec![0u8; WINDOW];
    while from + RECORD_HEADER_LEN as u64 <= file_len {
        let len = ((file_len - from) as usize).min(WINDOW);
        file.read_exact_at(&mut window[..len], from)?;
        let mut at = 0;
        while let Some(found) = window[at..len].windows(4).position(|w| w == RECORD_MAGIC) {
            let candidate = from + (at + found) as u64;
            if let Some((_, true)) = read_record(file, candidate, file_len, data)? {
                return Ok(Some(candidate));
            }
            at += found + 1;
        }
        // Overlap by 3 bytes so a magic split across windows is still seen.
        from += (len.saturating_sub(3)).max(1) as u64;
    }
    Ok(None)
}

/// Name of pack number `number`.
pub(crate) fn pack_file_name(number: u32) -> String {
    format!("{number:08}.pack")
}

/// Parses a pack file name back to its number.
pub(crate) fn parse_pack_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".pack")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

//! A sealed pack's records, saved beside it (`NNNNNNNN.idx`), so that opening
//! the store reads 61 bytes per record instead of every byte of every pack.
//!
//! Without it a server's start-up time grows with everything it stores: the
//! blob index is rebuilt by reading and checksumming every record. A pack below
//! the newest is sealed: nothing ever appends to it again. So the first
//! writable open that scans a sealed pack saves the scan's result, after it
//! has fsynced the pack (what it saves describes durable bytes), and later
//! opens load that instead. The newest pack is always scanned: it is
//! the one that may have a torn tail to cut.
//!
//! An index is a cache, never the truth: it is used only if its checksum holds,
//! it names the pack's current length, and its last record's header is still
//! the bytes at that offset of the pack (so an index left behind by a pack
//! deleted and later created again under the same number is not believed).
//! Otherwise the pack is scanned as before. A collection deletes a pack's index
//! before the pack.
//!
//! Its layout is in `format.rs` (`PACK_INDEX_MAGIC`).

use std::path::{Path, PathBuf};

use super::pack::{PackScan, RecordHeader, ScannedRecord};
use crate::error::Error;
use crate::format::{
    PACK_INDEX_ENTRY_LEN as ENTRY_LEN, PACK_INDEX_MAGIC as MAGIC,
    PACK_INDEX_PREFIX_LEN as PREFIX_LEN, RECORD_HEADER_LEN, check_record, seal_with_crc, u64_at,
};
use crate::fsutil::read_small_file;
use crate::vfs::{OpenMode, Vfs};

/// The most records a pack of `pack_len` bytes can hold (each has a header):
/// bounds what a damaged index could make us read.
fn records_max(pack_len: u64) -> usize {
    usize::try_from(pack_len / RECORD_HEADER_LEN as u64).unwrap_or(usize::MAX)
}

/// The index file of pack `number`.
pub(crate) fn index_path(packs_dir: &Path, number: u32) -> PathBuf {
    packs_dir.join(format!("{number:08}.idx"))
}

/// The pack number of an index file name.
pub(crate) fn parse_index_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".idx")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn encode(scan: &PackScan) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX_LEN + scan.records.len() * ENTRY_LEN + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&scan.file_len.to_le_bytes());
    out.extend_from_slice(&scan.valid_len.to_le_bytes());
    out.extend_from_slice(&(scan.records.len() as u32).to_le_bytes());
    for record in &scan.records {
        out.extend_from_slice(&record.offset.to_le_bytes());
        out.push(u8::from(record.crc_ok));
        out.extend_from_slice(&record.header.to_bytes());
    }
    seal_with_crc(&mut out);
    out
}

/// The scan an index holds, if it is sound and describes a pack of `pack_len`.
pub(crate) fn decode(bytes: &[u8], pack_len: u64) -> Option<PackScan> {
    if bytes.len() < PREFIX_LEN + 4 {
        return None;
    }
    let count = u32::from_le_bytes(bytes[24..28].try_into().ok()?) as usize;
    if count > records_max(pack_len) {
        return None;
    }
    check_record(
        "pack index",
        bytes,
        &MAGIC,
        PREFIX_LEN + count * ENTRY_LEN + 4,
    )
    .ok()?;
    let file_len = u64_at(bytes, 8);
    let valid_len = u64_at(bytes, 16);
    if file_len != pack_len || valid_len > file_len {
        return None;
    }
    let mut records = Vec::with_capacity(count);
    for entry in bytes[PREFIX_LEN..PREFIX_LEN + count * ENTRY_LEN].chunks_exact(ENTRY_LEN) {
        let offset = u64_at(entry, 0);
        let crc_ok = match entry[8] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let header_bytes: &[u8; RECORD_HEADER_LEN] = entry[9..].try_into().ok()?;
        let header = RecordHeader::decode(header_bytes)?;
        let end = offset
            .checked_add(RECORD_HEADER_LEN as u64)?
            .checked_add(u64::from(header.stored_len))?;
        if end > valid_len {
            return None;
        }
        records.push(ScannedRecord {
            offset,
            header,
            crc_ok,
        });
    }
    Some(PackScan {
        records,
        valid_len,
        file_len,
    })
}

/// The saved scan of pack `number`, if there is one and it still describes the
/// pack. Any doubt gives `None`, and the caller scans the pack.
pub(crate) fn load(vfs: &dyn Vfs, packs_dir: &Path, number: u32, pack: &Path) -> Option<PackScan> {
    let pack_len = vfs.file_len(pack).ok()?;
    let limit = records_max(pack_len)
        .saturating_mul(ENTRY_LEN)
        .saturating_add(PREFIX_LEN + 4);
    let bytes = read_small_file(vfs, &index_path(packs_dir, number), limit).ok()??;
    let scan = decode(&bytes, pack_len)?;
    if let Some(last) = scan.records.last() {
        let mut found = [0u8; RECORD_HEADER_LEN];
        let file = vfs.open(pack, OpenMode::Read).ok()?;
        file.read_exact_at(&mut found, last.offset).ok()?;
        if found != last.header.to_bytes() {
            return None;
        }
    }
    Some(scan)
}

/// Saves the scan of sealed pack `number`: a temporary file renamed into
/// place, with no fsync. It is a cache checked on every load, so a copy torn
/// or lost by a crash costs a scan, never a wrong index; and the pack it
/// describes was fsynced before it was scanned.
pub(crate) fn save(
    vfs: &dyn Vfs,
    packs_dir: &Path,
    number: u32,
    scan: &PackScan,
) -> Result<(), Error> {
    let path = index_path(packs_dir, number);
    let tmp = packs_dir.join(format!(".{number:08}.idx.tmp"));
    vfs.open(&tmp, OpenMode::CreateTruncate)
        .and_then(|file| file.write_all_at(&encode(scan), 0))
        .and_then(|()| vfs.rename(&tmp, &path))
        .map_err(|e| Error::io(format!("cannot save {}", path.display()), e))
}

/// Removes the index of pack `number`, if any (the caller fsyncs the directory).
pub(crate) fn remove(vfs: &dyn Vfs, packs_dir: &Path, number: u32) -> std::io::Result<()> {
    match vfs.remove_file(&index_path(packs_dir, number)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep_core::ChunkId;

    use super::super::{BlobKind, StoredCodec};

    fn sample() -> PackScan {
        let records = (0..5u8)
            .map(|i| {
                let header = RecordHeader {
                    kind: BlobKind::Chunk,
                    codec: StoredCodec::Raw,
                    sealed: i % 2 == 1,
                    stored_len: 100,
                    raw_len: 100,
                    id: ChunkId([i; 32]),
                    crc: u32::from(i) * 7,
                };
                ScannedRecord {
                    offset: u64::from(i) * 152,
                    header,
                    crc_ok: i != 3,
                }
            })
            .collect();
        PackScan {
            records,
            valid_len: 5 * 152,
            file_len: 5 * 152 + 10,
        }
    }

    #[test]
    fn decode_inverts_encode_for_the_same_pack_length_only() {
        let scan = sample();
        let bytes = encode(&scan);
        let back = decode(&bytes, scan.file_len).unwrap();
        assert_eq!(back.valid_len, scan.valid_len);
        assert_eq!(back.records.len(), 5);
        for (a, b) in back.records.iter().zip(&scan.records) {
            assert_eq!((a.offset, a.crc_ok), (b.offset, b.crc_ok));
            assert_eq!(a.header.to_bytes(), b.header.to_bytes());
        }
        assert!(decode(&bytes, scan.file_len + 1).is_none());
    }

    #[test]
    fn any_damage_or_truncation_is_refused() {
        let scan = sample();
        let bytes = encode(&scan);
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(decode(&damaged, scan.file_len).is_none(), "flip at {at}");
        }
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len], scan.file_len).is_none(),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn index_names_parse_back() {
        let path = index_path(Path::new("/p"), 42);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_index_file_name(name), Some(42));
        assert_eq!(parse_index_file_name("00000042.pack"), None);
        assert_eq!(parse_index_file_name("42.idx"), None);
    }
}

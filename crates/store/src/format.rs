//! Every on-disk format of the store in one place: the magic (which carries
//! the version) and the layout of each record the data directory holds, in the
//! manner of proxmox-backup's `file_formats.rs`, plus the few field codecs the
//! records share. The codecs of each record live with the record's type
//! (`Head::encode`, `Snapshot::encode`, ...) and take their constants from here.
//!
//! **Do not change a magic or a layout below**: stores written by earlier
//! versions must keep opening. A new layout gets a new magic (a new version
//! byte), and readers accept every older one they know.
//!
//! All integers are little-endian. Every record ends in (or, for the lifecycle
//! record, holds) a crc32 of the bytes before it, so nothing torn is read as
//! valid.

use blockrep_core::{ChunkId, Consistency, SourceId};

use crate::error::{Error, ErrorKind};

// ---------------------------------------------------------------------------
// Pack records (`DATA/packs/NNNNNNNN.pack`)
// ---------------------------------------------------------------------------

/// Magic of a blob record in a pack, version 1; do not change.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | magic `BRB1` |
/// | 4 | 1 | kind: 1 chunk, 2 index page, 3 root (a disk root `BRROOT`, or a machine root `BRMACH`: the stored bytes' magic tells which) |
/// | 5 | 1 | codec: 1 raw, 2 zstd; high bit set: sealed (an encrypted source's blob, see below) |
/// | 6 | 2 | reserved, zero |
/// | 8 | 4 | stored length |
/// | 12 | 4 | raw (decoded) length |
/// | 16 | 32 | id: blake3 of the decoded bytes |
/// | 48 | 4 | crc32 of bytes 0..48 and the stored bytes |
/// | 52 | stored length | stored bytes |
///
/// The stored bytes of a sealed record are the 16-byte reference of the data
/// key that sealed them, then AES-256-GCM's 12-byte nonce, the cipher text of
/// the raw or zstd bytes and its 16-byte tag, with the associated data kind
/// (1 byte), codec (1 byte, without the sealed bit), raw length (4 bytes)
/// and id (32 bytes). The id of a sealed record is not the blake3 of its
/// bytes but a keyed hash of it under the source's id key (`blockrep_core::IdSpace`).
/// An encrypted source's pages are sealed too (named by the blake3 of their
/// bytes, which hold stored ids only); its roots are not sealed: they hold
/// the geometry and page ids only, and a blank disk's root is every source's.
pub(crate) const RECORD_MAGIC: [u8; 4] = *b"BRB1";
/// Length of a pack record's header (everything before the stored bytes).
pub(crate) const RECORD_HEADER_LEN: usize = 52;
/// Offset of the crc32 in a pack record's header; it covers the bytes before
/// it and the stored bytes.
pub(crate) const RECORD_CRC_AT: usize = 48;
/// Largest stored length of any record: a root of the largest size, or a chunk.
pub(crate) const RECORD_STORED_MAX: u32 = 9 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Saved pack scans (`DATA/packs/NNNNNNNN.idx`, see `blobs/pack_index.rs`)
// ---------------------------------------------------------------------------

/// Magic of a sealed pack's saved scan, version 1; do not change.
///
/// Layout: magic `BRPIDX01` | pack length u64 | valid length u64 | record
/// count u32 | per record: offset u64, crc-ok u8 (0 or 1), the 52 header bytes
/// | crc32 of all that precedes.
pub(crate) const PACK_INDEX_MAGIC: [u8; 8] = *b"BRPIDX01";
/// Bytes of a saved scan before its first record: magic, pack length, valid
/// length, record count.
pub(crate) const PACK_INDEX_PREFIX_LEN: usize = 8 + 8 + 8 + 4;
/// Bytes of one record of a saved scan: offset, crc-ok flag, header.
pub(crate) const PACK_INDEX_ENTRY_LEN: usize = 8 + 1 + RECORD_HEADER_LEN;

// ---------------------------------------------------------------------------
// Heads (`DATA/sources/ID/head`)
// ---------------------------------------------------------------------------

/// Magic of heads written before consistency labels (version 1, 76 bytes,
/// crc32 at 72, no label: reads as `live`); do not change.
pub(crate) const HEAD_MAGIC_V1: [u8; 8] = *b"BRHEAD\x00\x01";
/// Length of a version 1 head.
pub(crate) const HEAD_LEN_V1: usize = 76;
/// Magic of heads with a consistency label (version 2); do not change.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `BRHEAD` + version `0x00 0x02` |
/// | 8 | 8 | epoch |
/// | 16 | 32 | root id: a disk root (one volume) or a machine root (see `blockrep_core::MachineRoot`) |
/// | 48 | 8 | scan start of the committed epoch, Unix ms |
/// | 56 | 8 | commit time, Unix ms |
/// | 64 | 8 | scan start of the last complete epoch, Unix ms; 0 = none yet |
/// | 72 | 1 | consistency of the root: 0 live, 1 crash-consistent, 2 quiesced |
/// | 73 | 3 | reserved, zero |
/// | 76 | 4 | crc32 of bytes 0..76 |
pub(crate) const HEAD_MAGIC: [u8; 8] = *b"BRHEAD\x00\x02";
/// The longest head record of any version (what a read admits).
pub(crate) const HEAD_LEN: usize = 80;

// ---------------------------------------------------------------------------
// Snapshots (`DATA/sources/SOURCE/snapshots/NAME`)
// ---------------------------------------------------------------------------

/// Magic of a snapshot record, version 1; do not change.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `BRSNAP` + version `0x00 0x01` |
/// | 8 | 1 | kind: 1 manual, 2 auto, 3 cutover |
/// | 9 | 1 | name length |
/// | 10 | 1 | source id length |
/// | 11 | 1 | consistency of the root (0 live; zero before labels existed) |
/// | 12 | 4 | reserved, zero |
/// | 16 | 64 | name, zero-padded (must equal the file name) |
/// | 80 | 64 | source id, zero-padded (must equal the directory) |
/// | 144 | 8 | epoch of the head the snapshot was taken from |
/// | 152 | 32 | root id |
/// | 184 | 8 | creation time, Unix ms |
/// | 192 | 8 | expiry time, Unix ms; 0 = never |
/// | 200 | 4 | crc32 of bytes 0..200 |
pub(crate) const SNAPSHOT_MAGIC: [u8; 8] = *b"BRSNAP\x00\x01";
/// Length of a snapshot record.
pub(crate) const SNAPSHOT_LEN: usize = 204;

// ---------------------------------------------------------------------------
// Launch volumes (`DATA/launches/NAME/{meta,head}`)
// ---------------------------------------------------------------------------

/// Magic of a launch's `meta`, written once at creation, version 1; do not
/// change.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `BRLNCH` + version `0x00 0x01` |
/// | 8 | 1 | kind: 1 test, 2 cutover |
/// | 9 | 1 | launch name length |
/// | 10 | 1 | source id length |
/// | 11 | 1 | snapshot name length |
/// | 12 | 1 | consistency of the base root (0 live; zero before labels existed) |
/// | 13 | 3 | reserved, zero |
/// | 16 | 64 | launch name, zero-padded (must equal the directory) |
/// | 80 | 64 | source id, zero-padded |
/// | 144 | 64 | base snapshot name, zero-padded |
/// | 208 | 32 | base root id (the snapshot's root) |
/// | 240 | 8 | base epoch (the snapshot's epoch) |
/// | 248 | 8 | creation time, Unix ms |
/// | 256 | 4 | crc32 of bytes 0..256 |
pub(crate) const LAUNCH_META_MAGIC: [u8; 8] = *b"BRLNCH\x00\x01";
/// Length of a launch's `meta`.
pub(crate) const LAUNCH_META_LEN: usize = 260;
/// Magic of a launch's `head`, published at creation and by every flush that
/// changed something, version 1; do not change.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `BRLHED` + version `0x00 0x01` |
/// | 8 | 8 | write generation: 0 at creation, +1 per flush that moved the root |
/// | 16 | 32 | root id of the launch's flushed state |
/// | 48 | 8 | time of that flush (of creation for generation 0), Unix ms |
/// | 56 | 4 | crc32 of bytes 0..56 |
pub(crate) const LAUNCH_HEAD_MAGIC: [u8; 8] = *b"BRLHED\x00\x01";
/// Length of a launch's `head`.
pub(crate) const LAUNCH_HEAD_LEN: usize = 60;

// ---------------------------------------------------------------------------
// Lifecycle records (`DATA/sources/ID/lifecycle`)
// ---------------------------------------------------------------------------

/// Magic of a source's lifecycle record, version 1; do not change.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `BRLIFE` + version `0x00 0x01` |
/// | 8 | 1 | stage: 1 cut over, 2 failing back, 3 failed back |
/// | 9 | 8 | epoch of the cutover commit |
/// | 17 | 32 | root of the cutover commit |
/// | 49 | 1 + 64 | cutover snapshot name (length, bytes, zero padding) |
/// | 114 | 1 + 64 | cutover launch name |
/// | 179 | 8 | cutover time, Unix ms |
/// | 187 | 6 × 8 | downtime: hook, final scan, transfer, commit, launch ready, total (ms) |
/// | 235 | 4 | crc32 of bytes 0..235 |
/// | 239 | 4 | reserved, zero |
pub(crate) const LIFECYCLE_MAGIC: [u8; 8] = *b"BRLIFE\x00\x01";
/// Length of a lifecycle record.
pub(crate) const LIFECYCLE_LEN: usize = 243;
/// Offset of the lifecycle record's crc32 (it is followed by reserved bytes).
pub(crate) const LIFECYCLE_CRC_AT: usize = 235;

// ---------------------------------------------------------------------------
// Tenants (`DATA/sources/ID/tenant`)
// ---------------------------------------------------------------------------

/// Magic of a source's tenant record, version 1; do not change.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `BRTENA` + version `0x00 0x01` |
/// | 8 | 1 + 64 | tenant name (length, bytes, zero padding); length 0: its own |
/// | 73 | 4 | crc32 of bytes 0..73 |
pub(crate) const TENANT_MAGIC: [u8; 8] = *b"BRTENA\x00\x01";
/// Length of a tenant record.
pub(crate) const TENANT_LEN: usize = 8 + 1 + NAME_FIELD_LEN + 4;

// ---------------------------------------------------------------------------
// Fields shared by the records
// ---------------------------------------------------------------------------

/// Bytes reserved for a name (snapshot, launch, source, tenant) in a record:
/// names are at most 64 bytes.
pub(crate) const NAME_FIELD_LEN: usize = 64;

/// Appends `name` zero-padded to [`NAME_FIELD_LEN`] bytes. Names are validated,
/// so they fit.
pub(crate) fn put_name(out: &mut Vec<u8>, name: &str) {
    debug_assert!(name.len() <= NAME_FIELD_LEN, "validated names fit");
    let start = out.len();
    out.extend_from_slice(name.as_bytes());
    out.resize(start + NAME_FIELD_LEN, 0);
}

/// Reads a name of `len` bytes from a zero-padded field; `None` unless it is a
/// valid name with zero padding.
pub(crate) fn get_name(field: &[u8], len: u8) -> Option<String> {
    let len = usize::from(len);
    if field.len() != NAME_FIELD_LEN || len > NAME_FIELD_LEN {
        return None;
    }
    if field[len..].iter().any(|&b| b != 0) {
        return None;
    }
    let name = std::str::from_utf8(&field[..len]).ok()?;
    SourceId::new(name).ok()?;
    Some(name.to_owned())
}

/// Little-endian u64 at `at` (the caller has checked the length).
pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

/// A 32-byte id at `at` (the caller has checked the length).
pub(crate) fn id_at(bytes: &[u8], at: usize) -> ChunkId {
    let mut id = [0u8; 32];
    id.copy_from_slice(&bytes[at..at + 32]);
    ChunkId(id)
}

/// Appends the crc32 of everything in `out` so far.
pub(crate) fn seal_with_crc(out: &mut Vec<u8>) {
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Checks length, magic and the trailing crc32 of a record.
pub(crate) fn check_record(
    what: &str,
    bytes: &[u8],
    magic: &[u8; 8],
    len: usize,
) -> Result<(), Error> {
    let corrupt = |problem: &str| Error::new(ErrorKind::Corrupt, format!("{what}: {problem}"));
    if bytes.len() != len {
        return Err(corrupt("wrong length"));
    }
    if bytes[..8] != magic[..] {
        return Err(corrupt("bad magic or unsupported version"));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[len - 4..]);
    if u32::from_le_bytes(crc) != crc32fast::hash(&bytes[..len - 4]) {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(())
}

/// Decodes the consistency label byte of a `what` record (heads, snapshots,
/// launch metas: `Consistency::to_byte`). The byte sits where older records
/// held a zero, and 0 is `live`, so a record written before labels existed
/// reads as `live`, which claims nothing. An unknown byte is corruption (or a
/// record written by a later version), never guessed at.
pub(crate) fn label_from_byte(what: &str, byte: u8) -> Result<Consistency, Error> {
    Consistency::from_byte(byte).ok_or_else(|| {
        Error::new(
            ErrorKind::Corrupt,
            format!("{what}: unknown consistency label {byte:#04x}"),
        )
    })
}

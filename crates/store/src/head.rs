//! The head of a source: its last committed epoch.
//!
//! A fixed-size, checksummed record (80 bytes; version 1, 76 bytes, still
//! reads, as `live`); its layout is in `format.rs` (`HEAD_MAGIC`).

use blockrep_core::{ChunkId, Consistency};

use crate::error::{Error, ErrorKind};
pub(crate) use crate::format::HEAD_LEN;
use crate::format::{HEAD_LEN_V1, HEAD_MAGIC, HEAD_MAGIC_V1, label_from_byte};

/// A source's last committed epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Epoch number, 1 for the first commit.
    pub epoch: u64,
    /// Root of the committed disk state.
    pub root: ChunkId,
    /// When the scan that this epoch captured started (the replica's age).
    pub scan_started_unix_ms: u64,
    /// When the epoch was committed.
    pub committed_unix_ms: u64,
    /// Scan start of the last epoch that held every change of its scan: the
    /// replica equals the disk as it was then. 0 while the initial sync is still
    /// committing intermediate steps.
    pub synced_scan_started_unix_ms: u64,
    /// How the root was taken: what it may be trusted to be.
    pub consistency: Consistency,
}

impl Head {
    /// Whether a complete pass over the disk has been committed.
    pub fn initial_sync_done(&self) -> bool {
        self.synced_scan_started_unix_ms != 0
    }
}

impl Head {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_LEN);
        out.extend_from_slice(&HEAD_MAGIC);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(self.root.as_bytes());
        out.extend_from_slice(&self.scan_started_unix_ms.to_le_bytes());
        out.extend_from_slice(&self.committed_unix_ms.to_le_bytes());
        out.extend_from_slice(&self.synced_scan_started_unix_ms.to_le_bytes());
        out.push(self.consistency.to_byte());
        out.extend_from_slice(&[0; 3]);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), HEAD_LEN);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let corrupt = |what: &str| Error::new(ErrorKind::Corrupt, format!("head file: {what}"));
        let len = match bytes.get(..8) {
            Some(magic) if magic == HEAD_MAGIC => HEAD_LEN,
            Some(magic) if magic == HEAD_MAGIC_V1 => HEAD_LEN_V1,
            _ => return Err(corrupt("bad magic or unsupported version")),
        };
        if bytes.len() != len {
            return Err(corrupt("wrong length"));
        }
        let crc = u32::from_le_bytes(bytes[len - 4..].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&bytes[..len - 4]) {
            return Err(corrupt("checksum mismatch"));
        }
        let consistency = if len == HEAD_LEN_V1 {
            Consistency::Live
        } else {
            if bytes[73..76].iter().any(|&b| b != 0) {
                return Err(corrupt("reserved bytes are not zero"));
            }
            label_from_byte("head file", bytes[72])?
        };
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let mut root = [0u8; 32];
        root.copy_from_slice(&bytes[16..48]);
        Ok(Head {
            epoch: u64_at(8),
            root: ChunkId(root),
            scan_started_unix_ms: u64_at(48),
            committed_unix_ms: u64_at(56),
            synced_scan_started_unix_ms: u64_at(64),
            consistency,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trips_and_detects_damage() {
        let head = Head {
            epoch: 7,
            root: ChunkId([4; 32]),
            scan_started_unix_ms: 1,
            committed_unix_ms: 2,
            synced_scan_started_unix_ms: 3,
            consistency: Consistency::CrashConsistent,
        };
        let bytes = head.encode();
        assert_eq!(Head::decode(&bytes).unwrap(), head);
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x10;
            assert!(Head::decode(&damaged).is_err(), "flip at {i}");
        }
        assert!(Head::decode(&bytes[..60]).is_err());
    }

    /// A head written before labels existed (version 1) reads as `live`; an
    /// unknown label byte is corruption, not a guess.
    #[test]
    fn a_version_1_head_reads_as_live_and_an_unknown_label_is_refused() {
        let mut v1 = Vec::new();
        v1.extend_from_slice(&HEAD_MAGIC_V1);
        v1.extend_from_slice(&9u64.to_le_bytes());
        v1.extend_from_slice(&[5; 32]);
        for time in [10u64, 11, 12] {
            v1.extend_from_slice(&time.to_le_bytes());
        }
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let head = Head::decode(&v1).unwrap();
        assert_eq!((head.epoch, head.root), (9, ChunkId([5; 32])));
        assert_eq!(head.synced_scan_started_unix_ms, 12);
        assert_eq!(head.consistency, Consistency::Live);

        let mut unknown = Head {
            consistency: Consistency::Quiesced,
            ..head
        }
        .encode();
        unknown[72] = 7;
        let crc = crc32fast::hash(&unknown[..76]);
        unknown[76..].copy_from_slice(&crc.to_le_bytes());
        let error = Head::decode(&unknown).unwrap_err();
        assert!(
            error.to_string().contains("unknown consistency label"),
            "{error}"
        );
    }
}

//! The head of a source: its last committed epoch.
//!
//! Encoding (little-endian, 76 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BRHEAD` + version `0x00 0x01` |
//! | 8 | 8 | epoch |
//! | 16 | 32 | root id |
//! | 48 | 8 | scan start of the committed epoch, Unix ms |
//! | 56 | 8 | commit time, Unix ms |
//! | 64 | 8 | scan start of the last complete epoch, Unix ms; 0 = none yet |
//! | 72 | 4 | crc32 of bytes 0..72 |

use blockrep_core::ChunkId;

use crate::error::{Error, ErrorKind};

const HEAD_MAGIC: [u8; 8] = *b"BRHEAD\x00\x01";
pub(crate) const HEAD_LEN: usize = 76;

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
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let corrupt = |what: &str| Error::new(ErrorKind::Corrupt, format!("head file: {what}"));
        if bytes.len() != HEAD_LEN {
            return Err(corrupt("wrong length"));
        }
        if bytes[..8] != HEAD_MAGIC {
            return Err(corrupt("bad magic or unsupported version"));
        }
        let crc = u32::from_le_bytes(bytes[72..76].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&bytes[..72]) {
            return Err(corrupt("checksum mismatch"));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let mut root = [0u8; 32];
        root.copy_from_slice(&bytes[16..48]);
        Ok(Head {
            epoch: u64_at(8),
            root: ChunkId(root),
            scan_started_unix_ms: u64_at(48),
            committed_unix_ms: u64_at(56),
            synced_scan_started_unix_ms: u64_at(64),
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
}

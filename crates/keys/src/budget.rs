//! Seals counted against `SEALS_PER_KEY_MAX`: with random 96-bit nonces a
//! data key may seal at most that many times, across every process that
//! ever used it, so the count must outlive a process.
//!
//! The count is kept the way a sequence allocator keeps its ceiling: the key
//! directory holds, beside the key's record, how many seals have been
//! *reserved* (`KEYS/SOURCE/NNNNNNNN.seals`), written durably before any of
//! them is made, [`RESERVE_STEP`] at a time. A process that loads the key
//! counts every reserved seal as made, so a crash can only waste seals, never
//! reuse the count. Two processes using one key at once (which blockrep
//! avoids: a source is served by one server) could each count the same
//! reservation; the count is then low by at most one step per process.
//!
//! Layout (`BRSEAL` version 1, 20 bytes): magic (8) | seals reserved u64 |
//! crc32 of both.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, ErrorKind};
use crate::fsutil::{publish, read_bounded};

const MAGIC: [u8; 8] = *b"BRSEAL\x00\x01";
const LEN: usize = 20;
/// Seals reserved at each durable write: one small fsynced write per 2^20
/// seals (64 GiB of 64 KiB chunks).
pub(crate) const RESERVE_STEP: u64 = 1 << 20;

/// The seals one data key has made (at least) and may still make.
#[derive(Debug)]
pub(crate) struct SealBudget {
    max: u64,
    step: u64,
    used: AtomicU64,
    /// Seals reserved durably (all of them, for a count kept in memory).
    reserved: AtomicU64,
    file: Option<PathBuf>,
    /// Serializes the reservations.
    reserving: Mutex<()>,
}

impl SealBudget {
    /// A count kept in memory only, from 0 (a key not in a key directory).
    pub(crate) fn in_memory(max: u64) -> Self {
        Self::new(max, max, 0, None)
    }

    /// The count kept in `file`, at what it has reserved (0 without one).
    pub(crate) fn load(file: PathBuf, max: u64, step: u64) -> Result<Self, Error> {
        let reserved = if file.exists() {
            let bytes = read_bounded(&file, LEN)?;
            let corrupt = |why: &str| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("seal count {}: {why}", file.display()),
                )
            };
            if bytes.len() != LEN || bytes[..8] != MAGIC {
                return Err(corrupt("wrong length or magic"));
            }
            if crc32fast::hash(&bytes[..16]).to_le_bytes() != bytes[16..] {
                return Err(corrupt("checksum mismatch"));
            }
            u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"))
        } else {
            0
        };
        Ok(Self::new(max, step, reserved, Some(file)))
    }

    fn new(max: u64, step: u64, reserved: u64, file: Option<PathBuf>) -> Self {
        Self {
            max,
            step: step.max(1),
            used: AtomicU64::new(reserved),
            reserved: AtomicU64::new(if file.is_some() { reserved } else { max }),
            file,
            reserving: Mutex::new(()),
        }
    }

    /// Seals made (or reserved by an earlier process) so far.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed).min(self.max)
    }

    /// Seals the key may still make.
    pub(crate) fn left(&self) -> u64 {
        self.max - self.used()
    }

    /// Counts one seal, reserving more durably first when the reservation
    /// is spent; refused once the key has sealed all it may.
    pub(crate) fn take(&self) -> Result<(), Error> {
        let n = self.used.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.max {
            return Err(Error::new(
                ErrorKind::Exhausted,
                format!(
                    "the data key has made the {} seals it may (random nonces): start the \
                     source's next key (blockrep key rotate --source)",
                    self.max
                ),
            ));
        }
        if n <= self.reserved.load(Ordering::Acquire) {
            return Ok(());
        }
        let _reserving = self.reserving.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = self.reserved.load(Ordering::Acquire);
        if n <= reserved {
            return Ok(());
        }
        let ceiling = n.saturating_add(self.step).min(self.max);
        if let Some(file) = &self.file {
            let mut out = Vec::with_capacity(LEN);
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&ceiling.to_le_bytes());
            let crc = crc32fast::hash(&out);
            out.extend_from_slice(&crc.to_le_bytes());
            publish(file, &out, true)?;
        }
        self.reserved.store(ceiling, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count of at most 10, reserved 4 at a time: the 11th seal is
    /// refused, and a new process counts every reserved seal as made.
    #[test]
    fn seals_are_counted_across_processes_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("00000001.seals");
        let budget = SealBudget::load(file.clone(), 10, 4).unwrap();
        assert_eq!((budget.used(), budget.left()), (0, 10));
        for _ in 0..3 {
            budget.take().unwrap();
        }
        // Reserved up to 5 (1 + 4) before the first seal was made.
        drop(budget);
        let budget = SealBudget::load(file.clone(), 10, 4).unwrap();
        assert_eq!(budget.used(), 5);
        for _ in 0..5 {
            budget.take().unwrap();
        }
        let error = budget.take().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Exhausted);
        assert!(error.to_string().contains("key rotate --source"), "{error}");
        assert_eq!(budget.left(), 0);
        let budget = SealBudget::load(file.clone(), 10, 4).unwrap();
        assert!(budget.take().is_err());

        std::fs::write(&file, b"garbage").unwrap();
        assert!(SealBudget::load(file, 10, 4).is_err());
        let memory = SealBudget::in_memory(2);
        memory.take().unwrap();
        memory.take().unwrap();
        assert!(memory.take().is_err());
    }
}

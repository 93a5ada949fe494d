//! The index's manifest (`DATA/index/manifest`): which runs make up the
//! index on disk, how many ids they hold, and what of the packs they cover.
//!
//! Coverage is what lets an open trust the runs without reading the packs:
//! for every pack it names, the runs reflect every record below the length
//! given (or what became of it: moved, removed, found damaged). An open
//! indexes only what lies beyond: packs not named, and the rest of a pack
//! named with a shorter length. Runs are written only of records that were
//! durable when written, so a crash never leaves a run naming a torn record.
//!
//! Layout (`MANIFEST_MAGIC` version 1): magic 8 | next generation 8 | live
//! ids 8 | runs 4 | each run's generation 8 (newest first) | packs 4 | each
//! pack's number 4 and covered length 8 | crc32 4.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, ErrorKind};
use crate::fsutil::{publish_atomic, read_small_file};
use crate::vfs::RealFs;

const MANIFEST_MAGIC: [u8; 8] = *b"BRIXMAN\x01";
/// The manifest's name in the index directory.
pub(crate) const MANIFEST_NAME: &str = "manifest";
/// Bounds what a damaged manifest can make an open read: 2^24 packs (1 PiB
/// of 64 MiB packs) and 64 runs.
const PACKS_MAX: usize = 1 << 24;
const RUNS_MAX: usize = 64;

/// What the manifest says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Manifest {
    /// The generation the next run gets.
    pub(crate) next_generation: u64,
    /// Ids the runs together hold (removals subtracted).
    pub(crate) live: u64,
    /// Generations of the runs, newest first.
    pub(crate) runs: Vec<u64>,
    /// Pack number -> length of it the runs cover.
    pub(crate) coverage: BTreeMap<u32, u64>,
}

impl Manifest {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(36 + self.runs.len() * 8 + self.coverage.len() * 12);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&self.next_generation.to_le_bytes());
        out.extend_from_slice(&self.live.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for run in &self.runs {
            out.extend_from_slice(&run.to_le_bytes());
        }
        out.extend_from_slice(&(self.coverage.len() as u32).to_le_bytes());
        for (pack, len) in &self.coverage {
            out.extend_from_slice(&pack.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let (body, crc) = bytes.split_at(bytes.len().checked_sub(4)?);
        if crc32fast::hash(body).to_le_bytes() != crc || body.get(0..8)? != MANIFEST_MAGIC {
            return None;
        }
        let mut at = 8;
        let mut take = |n: usize| -> Option<&[u8]> {
            let field = body.get(at..at + n)?;
            at += n;
            Some(field)
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
        let next_generation = u64_of(take(8)?);
        let live = u64_of(take(8)?);
        let runs_len = u32_of(take(4)?) as usize;
        if runs_len > RUNS_MAX {
            return None;
        }
        let mut runs = Vec::with_capacity(runs_len);
        for _ in 0..runs_len {
            runs.push(u64_of(take(8)?));
        }
        let packs_len = u32_of(take(4)?) as usize;
        if packs_len > PACKS_MAX {
            return None;
        }
        let mut coverage = BTreeMap::new();
        for _ in 0..packs_len {
            let pack = u32_of(take(4)?);
            coverage.insert(pack, u64_of(take(8)?));
        }
        (at == body.len()).then_some(Self {
            next_generation,
            live,
            runs,
            coverage,
        })
    }

    /// The manifest in `dir`; `Ok(None)` when there is none, and an error
    /// when it is damaged (the caller rebuilds the index from the packs).
    pub(crate) fn load(dir: &Path) -> Result<Option<Self>, Error> {
        let path = dir.join(MANIFEST_NAME);
        let len_max = 64 + RUNS_MAX * 8 + PACKS_MAX * 12;
        let Some(bytes) = read_small_file(&RealFs, &path, len_max)? else {
            return Ok(None);
        };
        Self::decode(&bytes).map(Some).ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("index manifest {} is damaged", path.display()),
            )
        })
    }

    /// Replaces the manifest in `dir`, durably.
    pub(crate) fn publish(&self, dir: &Path) -> Result<(), Error> {
        publish_atomic(&RealFs, &dir.join(MANIFEST_NAME), &self.encode())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let manifest = Manifest {
            next_generation: 9,
            live: 1234,
            runs: vec![8, 5, 2],
            coverage: [(1, 64 << 20), (2, 100)].into_iter().collect(),
        };
        let bytes = manifest.encode();
        assert_eq!(Manifest::decode(&bytes), Some(manifest));
        for at in [0, 10, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert_eq!(Manifest::decode(&bad), None, "flip at {at}");
        }
        assert_eq!(Manifest::decode(&bytes[..bytes.len() - 5]), None);
    }
}

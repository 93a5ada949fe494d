//! What the bench writes: the seeded synthetic disk, the change before the
//! delta sync, and the churn writer of the continuous phase. Every byte comes
//! from `SplitMix64`, so a seed repeats a disk exactly.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use blockrep_core::rng::SplitMix64;

/// Fills `out` with the generator's next words, little-endian, the last one
/// cut to fit.
pub(crate) fn fill(rng: &mut SplitMix64, out: &mut [u8]) {
    for chunk in out.chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Kinds of content in the synthetic disk and their share, in percent.
const LAYOUT: [(&str, u64); 5] = [
    ("zero", 30),
    ("text", 25),
    ("structured", 15),
    ("random", 20),
    ("duplicate", 10),
];

const WORDS: [&str; 16] = [
    "block", "replica", "epoch", "kernel", "inode", "journal", "the", "of", "disk", "write",
    "sector", "commit", "server", "agent", "root", "page",
];

/// Writes a seeded, filesystem-like disk image of 1 MiB extents, each zero,
/// text-like, structured records, random, or a copy of an earlier extent;
/// with `dense`, no extent is zero (the other kinds keep their proportions).
/// Returns the bytes of each kind written.
pub(crate) fn make_synthetic_disk(
    path: &Path,
    size: u64,
    seed: u64,
    dense: bool,
) -> Result<Vec<(&'static str, u64)>> {
    const EXTENT: usize = 1 << 20;
    let mut rng = SplitMix64::new(seed);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size)?;
    let mut written_extents: Vec<u64> = Vec::new();
    let mut shares: Vec<(&'static str, u64)> = LAYOUT.iter().map(|(name, _)| (*name, 0)).collect();
    let mut buf = vec![0u8; EXTENT];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(EXTENT as u64) as usize;
        // The zero kind is the layout's first band: a dense disk rolls past it.
        let roll = if dense {
            LAYOUT[0].1 + rng.below(100 - LAYOUT[0].1)
        } else {
            rng.below(100)
        };
        let mut acc = 0;
        let mut kind = LAYOUT
            .iter()
            .find(|(_, share)| {
                acc += share;
                roll < acc
            })
            .map_or("random", |(name, _)| *name);
        if kind == "duplicate" && written_extents.is_empty() {
            kind = "random";
        }
        let data = &mut buf[..len];
        match kind {
            "zero" => data.fill(0),
            "text" => {
                let mut i = 0;
                while i < len {
                    let word = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                    for &b in word.iter().chain(b" ") {
                        if i < len {
                            data[i] = b;
                            i += 1;
                        }
                    }
                }
            }
            "structured" => {
                for (n, record) in data.chunks_mut(64).enumerate() {
                    let header = (offset / 64 + n as u64).to_le_bytes();
                    for (i, b) in record.iter_mut().enumerate() {
                        *b = if i < 8 { header[i] } else { (i as u8) ^ 0x5a };
                    }
                    if rng.below(4) == 0 {
                        record[8] = rng.next_u64() as u8;
                    }
                }
            }
            "duplicate" => {
                let source = written_extents[rng.below(written_extents.len() as u64) as usize];
                file.read_exact_at(data, source)?;
            }
            _ => fill(&mut rng, data),
        }
        if kind != "zero" {
            file.write_all_at(data, offset)?;
        }
        if let Some(entry) = shares.iter_mut().find(|(name, _)| *name == kind) {
            entry.1 += len as u64;
        }
        if len == EXTENT && kind != "zero" {
            written_extents.push(offset);
        }
        offset += len as u64;
    }
    file.sync_all()?;
    Ok(shares)
}

/// Rewrites `share` of the disk's 4 KiB blocks at random positions. Returns the
/// number of blocks written.
pub(crate) fn churn_blocks(path: &Path, share: f64, seed: u64) -> Result<u64> {
    let file = OpenOptions::new().write(true).open(path)?;
    let size = file.metadata()?.len();
    let blocks = size / 4096;
    let count = ((blocks as f64) * share).round() as u64;
    let mut rng = SplitMix64::new(seed ^ 0xC0FF_EE00);
    let mut block = [0u8; 4096];
    for _ in 0..count {
        fill(&mut rng, &mut block);
        file.write_all_at(&block, rng.below(blocks) * 4096)?;
    }
    file.sync_all()?;
    Ok(count)
}

/// The churn writer: random 4 KiB writes at `rate` bytes per second, one in eight
/// of them appending sequentially to the last tenth of a disk, until the stop
/// file appears (the pre-cutover command); then it fsyncs every disk and says
/// so. With several disks the writes go to each in turn (round-robin), each
/// disk with its own append position; with one, every write goes to it.
pub(crate) fn spawn_churn(
    disks: Vec<PathBuf>,
    rate: u64,
    seed: u64,
    stop: PathBuf,
    stopped: PathBuf,
) -> std::thread::JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        let mut targets = disks
            .iter()
            .map(|disk| ChurnTarget::open(disk))
            .collect::<Result<Vec<_>>>()?;
        let mut rng = SplitMix64::new(seed ^ 0x5EED);
        let mut block = [0u8; 4096];
        let started = Instant::now();
        let mut written = 0u64;
        let mut turn = 0;
        while !stop.exists() {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if written + 4096 > due {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let target = &mut targets[turn % disks.len()];
            turn += 1;
            fill(&mut rng, &mut block);
            let index = if rng.below(8) == 0 {
                target.next_append()
            } else {
                rng.below(target.blocks)
            };
            target.file.write_all_at(&block, index * 4096)?;
            written += 4096;
        }
        for target in &targets {
            target.file.sync_all()?;
        }
        fs::write(&stopped, b"")?;
        Ok(written)
    })
}

/// One disk of the churn writer and where its sequential appends are.
struct ChurnTarget {
    file: fs::File,
    blocks: u64,
    append_start: u64,
    append_next: u64,
}

impl ChurnTarget {
    fn open(disk: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .open(disk)
            .with_context(|| format!("cannot open {}", disk.display()))?;
        let blocks = file.metadata()?.len() / 4096;
        let append_start = blocks - blocks / 10;
        Ok(Self {
            file,
            blocks,
            append_start,
            append_next: append_start,
        })
    }

    /// The next block of the append region, wrapping to its start.
    fn next_append(&mut self) -> u64 {
        let index = self.append_next;
        self.append_next = if self.append_next + 1 >= self.blocks {
            self.append_start
        } else {
            self.append_next + 1
        };
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dense_disk_has_no_zero_extent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dense");
        let layout = make_synthetic_disk(&path, 16 << 20, 1, true).unwrap();
        assert_eq!(layout[0], ("zero", 0));
        let bytes = std::fs::read(&path).unwrap();
        for (n, extent) in bytes.chunks(1 << 20).enumerate() {
            assert!(extent.iter().any(|&b| b != 0), "extent {n} is zero");
        }
    }

    #[test]
    fn a_seed_repeats_its_disk_and_the_kinds_add_up_to_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let disk = |name: &str, seed: u64| {
            let path = dir.path().join(name);
            let layout = make_synthetic_disk(&path, 8 << 20, seed, false).unwrap();
            assert_eq!(layout.iter().map(|(_, bytes)| bytes).sum::<u64>(), 8 << 20);
            std::fs::read(&path).unwrap()
        };
        let first = disk("a", 1);
        assert_eq!(first, disk("b", 1));
        assert_ne!(first, disk("c", 2));
        // Seed 1's first 8 MiB, as in every disk of docs/performance.md's
        // figures: a change here changes what the bench measures.
        assert_eq!(
            blake3::hash(&first).to_hex().as_str(),
            "48e12de5eb1bd9a7a06dc4dfb90c3b016cc4c5010e6e69e099d1a5c0b77d0d74"
        );
    }

    #[test]
    fn the_churn_writer_writes_to_every_disk_and_fsyncs_them_when_told_to_stop() {
        let dir = tempfile::tempdir().unwrap();
        let disks: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("d{i}"))).collect();
        for disk in &disks {
            std::fs::File::create(disk)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
        let (stop, stopped) = (dir.path().join("stop"), dir.path().join("stopped"));
        let writer = spawn_churn(disks.clone(), 64 << 20, 3, stop.clone(), stopped.clone());
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(&stop, b"").unwrap();
        let written = writer.join().unwrap().unwrap();
        assert!(stopped.exists());
        assert!(written >= 3 * 4096, "{written}");
        for disk in &disks {
            let bytes = std::fs::read(disk).unwrap();
            assert!(
                bytes.iter().any(|&b| b != 0),
                "{} unwritten",
                disk.display()
            );
        }
    }

    #[test]
    fn fill_takes_whole_words_little_endian_and_cuts_the_last() {
        let mut expected = SplitMix64::new(5);
        let (one, two) = (expected.next_u64(), expected.next_u64());
        let mut out = [0u8; 12];
        fill(&mut SplitMix64::new(5), &mut out);
        assert_eq!(out[..8], one.to_le_bytes());
        assert_eq!(out[8..], two.to_le_bytes()[..4]);
    }
}

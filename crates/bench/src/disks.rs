//! The bench's disks: one disk (`--disks 1`, the agent's single-disk path),
//! or a machine of several replicated as one source with one recovery point.
//!
//! Every disk of a machine is `--size` but the last, which is half of it
//! plus 4 KiB: a disk of another size whose tail is not a whole chunk, as
//! real machines have. Each disk has its own seed, so no two are alike; the
//! first keeps the bench's seed, so it is the disk `--disks 1` makes.

use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};
use blockrep_core::{VOLUMES_MAX, VolumeName};

use crate::DiskKind;
use crate::fsdisk::make_fs_disk;
use crate::synthetic::make_synthetic_disk;

/// The smallest disk the bench makes.
pub(crate) const DISK_SIZE_MIN_BYTES: u64 = 1 << 20;

/// One disk of the bench.
#[derive(Debug, Clone)]
pub(crate) struct BenchDisk {
    /// Its volume name in the machine (`disk` for a single disk).
    pub(crate) name: VolumeName,
    /// Its image file in the working directory.
    pub(crate) path: PathBuf,
    pub(crate) size_bytes: u64,
    /// The seed of its content, its change before the delta sync.
    pub(crate) seed: u64,
}

/// The disks of a bench of `count` disks of `size` bytes each (the last of a
/// machine smaller, see the module's doc), in `workdir`.
pub(crate) fn plan(workdir: &Path, count: usize, size: u64, seed: u64) -> Result<Vec<BenchDisk>> {
    ensure!(
        (1..=VOLUMES_MAX).contains(&count),
        "--disks must be within 1..={VOLUMES_MAX}"
    );
    if count == 1 {
        return Ok(vec![BenchDisk {
            name: VolumeName::new(blockrep_core::SINGLE_VOLUME_NAME)?,
            path: workdir.join("disk.raw"),
            size_bytes: size,
            seed,
        }]);
    }
    (0..count)
        .map(|index| {
            let name = format!("disk{index}");
            Ok(BenchDisk {
                path: workdir.join(format!("{name}.raw")),
                name: VolumeName::new(&name)?,
                size_bytes: if index + 1 == count {
                    size / 2 + 4096
                } else {
                    size
                },
                seed: disk_seed(seed, index),
            })
        })
        .collect()
}

/// The seed of disk `index`: the bench's own for the first, another for each
/// of the others.
fn disk_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Writes every disk as `kind`; returns the bytes of each kind of content,
/// summed over the disks, in the layout's order.
pub(crate) fn make(disks: &[BenchDisk], kind: DiskKind) -> Result<Vec<(&'static str, u64)>> {
    let mut total: Vec<(&'static str, u64)> = Vec::new();
    for disk in disks {
        ensure!(
            disk.size_bytes >= DISK_SIZE_MIN_BYTES,
            "every disk must be at least 1MiB (disk {} would be {} bytes)",
            disk.name,
            disk.size_bytes
        );
        let layout = match kind {
            DiskKind::Synthetic => {
                make_synthetic_disk(&disk.path, disk.size_bytes, disk.seed, false)?
            }
            DiskKind::Dense => make_synthetic_disk(&disk.path, disk.size_bytes, disk.seed, true)?,
            DiskKind::Fs => {
                let staging = disk.path.with_extension("files");
                make_fs_disk(&disk.path, disk.size_bytes, &staging)?
            }
        };
        if total.is_empty() {
            total = layout;
        } else {
            for ((_, sum), (_, bytes)) in total.iter_mut().zip(layout) {
                *sum += bytes;
            }
        }
    }
    Ok(total)
}

/// The disks' sizes as the table and the plot print them, e.g.
/// `1 disk of 1024 MiB` or `3 disks: 1024 + 1024 + 512 MiB`.
pub(crate) fn describe(sizes_bytes: &[u64]) -> String {
    // Two decimals at most: a 4 KiB tail shows, without a long fraction.
    let mib = |bytes: &u64| {
        let text = format!("{:.2}", *bytes as f64 / 1048576.0);
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    };
    match sizes_bytes {
        [one] => format!("1 disk of {} MiB", mib(one)),
        many => format!(
            "{} disks: {} MiB",
            many.len(),
            many.iter().map(mib).collect::<Vec<_>>().join(" + ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_disk_is_the_single_disk_of_today() {
        let disks = plan(Path::new("/w"), 1, 8 << 20, 7).unwrap();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].name.as_str(), "disk");
        assert_eq!(disks[0].path, Path::new("/w/disk.raw"));
        assert_eq!((disks[0].size_bytes, disks[0].seed), (8 << 20, 7));
    }

    #[test]
    fn a_machine_has_named_disks_of_their_own_seeds_and_a_smaller_last_one() {
        let disks = plan(Path::new("/w"), 3, 8 << 20, 7).unwrap();
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["disk0", "disk1", "disk2"]);
        assert_eq!(disks[2].path, Path::new("/w/disk2.raw"));
        let sizes: Vec<u64> = disks.iter().map(|d| d.size_bytes).collect();
        assert_eq!(sizes, [8 << 20, 8 << 20, (4 << 20) + 4096]);
        // The last disk's tail is not a whole 64 KiB chunk.
        assert_ne!(sizes[2] % (64 << 10), 0);
        assert_eq!(disks[0].seed, 7, "the first disk is --disks 1's");
        assert!(disks[1].seed != disks[0].seed && disks[2].seed != disks[1].seed);
        assert!(plan(Path::new("/w"), 0, 8 << 20, 7).is_err());
        assert!(plan(Path::new("/w"), VOLUMES_MAX + 1, 8 << 20, 7).is_err());
    }

    #[test]
    fn a_machine_of_disks_too_small_is_refused_and_the_layout_sums_every_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            make(
                &plan(dir.path(), 2, 1 << 20, 1).unwrap(),
                DiskKind::Synthetic
            )
            .is_err()
        );
        let disks = plan(dir.path(), 2, 4 << 20, 1).unwrap();
        let layout = make(&disks, DiskKind::Synthetic).unwrap();
        let total: u64 = layout.iter().map(|(_, bytes)| bytes).sum();
        assert_eq!(total, (4 << 20) + (2 << 20) + 4096);
        let contents: Vec<Vec<u8>> = disks
            .iter()
            .map(|d| std::fs::read(&d.path).unwrap())
            .collect();
        assert_ne!(contents[0][..2 << 20], contents[1][..2 << 20]);
    }

    #[test]
    fn sizes_are_described_in_mib() {
        assert_eq!(describe(&[1 << 30]), "1 disk of 1024 MiB");
        assert_eq!(
            describe(&[32 << 20, 32 << 20, (16 << 20) + 4096]),
            "3 disks: 32 + 32 + 16 MiB"
        );
    }
}

//! A disk as real machines have them: an ext4 file system filled from this
//! machine's own files (libraries, documentation, locales under `/usr`),
//! made with `mke2fs -d`. Its figures are the ones a user sees on a real
//! disk, where the synthetic mix may flatter or wrong a tool.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Where the files come from.
const SOURCE_DIR: &str = "/usr";
/// Share of the disk the files' blocks fill (the rest holds the file
/// system's own metadata and journal, and free space as on any disk in use).
const FILL_PERCENT: u64 = 70;
const BLOCK: u64 = 4096;

/// Writes an ext4 image of `size` bytes at `path` holding files of
/// [`SOURCE_DIR`] whose blocks take up to [`FILL_PERCENT`] of it, in path order (the same
/// machine gives the same disk). Returns the bytes of file data and the
/// rest. `staging` (created and removed) holds links to the files meanwhile.
pub(crate) fn make_fs_disk(
    path: &Path,
    size: u64,
    staging: &Path,
) -> Result<Vec<(&'static str, u64)>> {
    ensure!(
        size >= 8 << 20,
        "a file-system disk must be at least 8MiB (asked {size} bytes)"
    );
    let budget = size / 100 * FILL_PERCENT;
    if staging.exists() {
        fs::remove_dir_all(staging)?;
    }
    fs::create_dir_all(staging)?;
    let mut files = Vec::new();
    collect(Path::new(SOURCE_DIR), &mut files, budget / 8)?;
    let mut used = 0u64;
    // What the files take on the file system: whole blocks, and a block for
    // each directory.
    let mut blocks_bytes = 0u64;
    for (file, len) in files {
        let rel = file.strip_prefix(SOURCE_DIR).unwrap_or(&file);
        let target = staging.join(rel);
        let new_dir = target.parent().is_some_and(|parent| !parent.exists());
        let takes = len.div_ceil(BLOCK) * BLOCK + if new_dir { BLOCK } else { 0 };
        if blocks_bytes + takes > budget {
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        // A hard link costs nothing when the work directory shares /usr's
        // file system; a copy otherwise. A file that cannot be read is left out.
        if fs::hard_link(&file, &target).is_err() && fs::copy(&file, &target).is_err() {
            continue;
        }
        used += len;
        blocks_bytes += takes;
    }
    let image = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    image.set_len(size)?;
    drop(image);
    let output = Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(staging)
        .arg(path)
        .output()
        .context("cannot run mke2fs (package e2fsprogs)")?;
    fs::remove_dir_all(staging)?;
    ensure!(
        output.status.success(),
        "mke2fs -d {} {} failed: {}",
        staging.display(),
        path.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    fs::File::open(path)?.sync_all()?;
    Ok(vec![
        ("file data", used),
        ("metadata and free", size - used),
    ])
}

/// Regular files under `dir` of at most `len_max` bytes, in path order,
/// with their lengths; symbolic links and special files are left out.
fn collect(dir: &Path, out: &mut Vec<(PathBuf, u64)>, len_max: u64) -> Result<()> {
    let Ok(listing) = fs::read_dir(dir) else {
        return Ok(());
    };
    let mut entries: Vec<_> = listing.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            collect(&entry.path(), out, len_max)?;
        } else if kind.is_file()
            && let Ok(meta) = entry.metadata()
            && meta.len() <= len_max
        {
            out.push((entry.path(), meta.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The image is a sound ext4 (e2fsck finds nothing) holding the share
    /// of files asked for.
    #[test]
    fn makes_a_sound_file_system_filled_from_the_machine() {
        if Command::new("mke2fs").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("BLOCKREP_REQUIRE_TOOLS").is_none(),
                "mke2fs is missing"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.raw");
        let layout = make_fs_disk(&image, 32 << 20, &dir.path().join("staging")).unwrap();
        assert_eq!(fs::metadata(&image).unwrap().len(), 32 << 20);
        let used = layout[0].1;
        assert!(
            used > (32 << 20) / 3 && used <= (32 << 20) / 100 * FILL_PERCENT,
            "{used} bytes of files"
        );
        assert!(!dir.path().join("staging").exists());
        let check = Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}

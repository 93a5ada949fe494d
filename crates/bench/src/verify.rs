//! The bench's last check: the cutover volume is the disk, by root and byte
//! for byte. A damaged replica makes the bench fail.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use blockrep_core::{ChunkId, DiskImage, Geometry, Root, SourceId};

/// A cutover's volume, and the disk it must equal.
#[derive(Debug, Clone)]
pub struct CutoverVolume {
    /// The server's data directory (opened read only: the server may be stopped).
    pub data: PathBuf,
    /// The source disk.
    pub disk: PathBuf,
    /// The source that was cut over.
    pub source: SourceId,
    /// The replica's chunk size.
    pub chunk_size_bytes: u32,
    /// The root the cutover committed, as the agent reported it.
    pub root: ChunkId,
    /// The cutover launch's name.
    pub launch: String,
    /// Where the replica is exported for the byte comparison (removed after).
    pub scratch: PathBuf,
}

/// What [`verify_cutover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verification {
    /// The disk's root, the cutover's and the launch's are one.
    pub roots_equal: bool,
    /// The source's committed replica, exported, is the disk byte for byte
    /// (false too when the export fails, e.g. on a damaged blob).
    pub bytes_equal: bool,
}

impl Verification {
    /// Both checks held.
    pub fn equal(&self) -> bool {
        self.roots_equal && self.bytes_equal
    }

    /// An error naming what differs unless both checks held.
    pub fn ensure_equal(&self) -> Result<()> {
        if !self.equal() {
            bail!(
                "the cutover volume differs from the disk (roots equal: {}, bytes equal: {})",
                self.roots_equal,
                self.bytes_equal
            );
        }
        Ok(())
    }
}

/// Compares the cutover volume with the disk: the disk's root (scanned now)
/// with the cutover's and the launch's, and the exported replica with the
/// disk byte for byte. Every blob the export reads is checked against its id,
/// so a damaged chunk fails the export and makes the bytes unequal.
pub fn verify_cutover(volume: &CutoverVolume) -> Result<Verification> {
    let disk_root = {
        let image = DiskImage::open(&volume.disk)?;
        let geometry = Geometry::new(image.size_bytes(), volume.chunk_size_bytes)?;
        Root::from_chunk_ids(geometry, &image.scan(geometry)?).id()
    };
    let store = blockrep_store::Store::open_read_only(&volume.data)?;
    let launch = store
        .launch(&volume.launch)?
        .with_context(|| format!("cutover launch {} missing", volume.launch))?;
    let bytes_equal = match store.export(&volume.source, &volume.scratch) {
        Ok(_) => files_equal(&volume.disk, &volume.scratch)?,
        Err(e) => {
            eprintln!("replica export failed: {e}");
            false
        }
    };
    let _ = std::fs::remove_file(&volume.scratch);
    Ok(Verification {
        roots_equal: disk_root == volume.root && launch.root == volume.root,
        bytes_equal,
    })
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0;
    loop {
        let (ra, rb) = (fa.read_at(&mut ba, offset)?, fb.read_at(&mut bb, offset)?);
        if ra != rb || ba[..ra] != bb[..rb] {
            return Ok(false);
        }
        if ra == 0 {
            return Ok(true);
        }
        offset += ra as u64;
    }
}

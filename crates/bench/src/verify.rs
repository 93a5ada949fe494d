//! The bench's last check: the cutover volume is the disk, by root and byte
//! for byte; for a machine, every volume of the cutover launch is its disk.
//! A damaged replica makes the bench fail.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use blockrep_core::{
    ChunkId, DiskImage, Geometry, IdSpace, MachineRoot, Root, SourceId, VolumeName,
};

/// The key directory and KEK file of a server that encrypts at rest.
#[derive(Debug, Clone)]
pub struct Keys {
    pub key_dir: PathBuf,
    pub kek_file: PathBuf,
}

/// The store in `data`, opened read only, with the keys that open its
/// encrypted sources; and the id space of `source` in it.
fn open_store(
    data: &Path,
    keys: Option<&Keys>,
    source: &SourceId,
) -> Result<(blockrep_store::Store, IdSpace)> {
    let store = blockrep_store::Store::open_cached_read_only(data)?;
    if let Some(keys) = keys {
        let kek = blockrep_keys::Kek::from_file(&keys.kek_file)?;
        let dir = blockrep_keys::KeyDir::open(&keys.key_dir)?;
        store.keyring().extend_from(&dir, &kek)?;
    }
    let space = store.id_space_of(source);
    Ok((store, space))
}

/// A cutover's volume, and the disk it must equal.
#[derive(Debug, Clone)]
pub struct CutoverVolume {
    /// The server's data directory (opened read only: the server may be stopped).
    pub data: PathBuf,
    /// Its keys, if it encrypts at rest.
    pub keys: Option<Keys>,
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
    let (store, space) = open_store(&volume.data, volume.keys.as_ref(), &volume.source)?;
    let disk_root = disk_root(&volume.disk, volume.chunk_size_bytes, space)?;
    let launch = store
        .launch(&volume.launch)?
        .with_context(|| format!("cutover launch {} missing", volume.launch))?;
    let exported = store.export(&volume.source, &volume.scratch).map(drop);
    let bytes_equal = exported_equal(exported, &volume.disk, &volume.scratch)?;
    Ok(Verification {
        roots_equal: disk_root == volume.root && launch.root == volume.root,
        bytes_equal,
    })
}

/// A machine's cutover: its one launch of every volume, and the disk each
/// volume must equal.
#[derive(Debug, Clone)]
pub struct CutoverMachine {
    /// The server's data directory (opened read only: the server may be stopped).
    pub data: PathBuf,
    /// Its keys, if it encrypts at rest.
    pub keys: Option<Keys>,
    /// The source that was cut over.
    pub source: SourceId,
    /// Each volume's name and the source disk it must equal.
    pub disks: Vec<(VolumeName, PathBuf)>,
    /// The replica's chunk size.
    pub chunk_size_bytes: u32,
    /// The machine root the cutover committed, as the agent reported it.
    pub root: ChunkId,
    /// The cutover launch's name (its volumes are served as `LAUNCH/VOLUME`).
    pub launch: String,
    /// Where each volume is exported for the byte comparison (removed after).
    pub scratch: PathBuf,
}

/// What [`verify_machine_cutover`] found for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeVerification {
    /// The volume's name.
    pub name: VolumeName,
    /// Its disk's size.
    pub size_bytes: u64,
    /// The disk's root against the launch's volume root, and the launch's
    /// volume, exported, against the disk byte for byte.
    pub verification: Verification,
}

/// Compares every volume of a machine's cutover launch with its disk, as
/// [`verify_cutover`] does for one disk: the disk's root (scanned now) with
/// the launch's volume root, and the volume exported from the launch's root
/// with the disk byte for byte. The whole holds only if, besides, the machine
/// root of the disks is the cutover's and the launch's, and the launch has
/// exactly the disks' volumes. Returns the whole and each disk's volume.
pub fn verify_machine_cutover(
    machine: &CutoverMachine,
) -> Result<(Verification, Vec<VolumeVerification>)> {
    let (store, space) = open_store(&machine.data, machine.keys.as_ref(), &machine.source)?;
    let launch = store
        .launch(&machine.launch)?
        .with_context(|| format!("cutover launch {} missing", machine.launch))?;
    let launch_volumes = store.volume_roots(&launch.root)?;
    let mut volumes = Vec::with_capacity(machine.disks.len());
    let mut disk_roots = Vec::with_capacity(machine.disks.len());
    for (name, disk) in &machine.disks {
        let disk_root = disk_root(disk, machine.chunk_size_bytes, space)?;
        disk_roots.push((name.clone(), disk_root));
        let volume_root = launch_volumes
            .iter()
            .find(|(volume, _)| volume == name)
            .map(|(_, root)| *root);
        let verification = match volume_root {
            Some(volume_root) => {
                let exported = store.export_root(&volume_root, &machine.scratch).map(drop);
                Verification {
                    roots_equal: disk_root == volume_root,
                    bytes_equal: exported_equal(exported, disk, &machine.scratch)?,
                }
            }
            None => {
                eprintln!("the cutover launch has no volume {name}");
                Verification {
                    roots_equal: false,
                    bytes_equal: false,
                }
            }
        };
        volumes.push(VolumeVerification {
            name: name.clone(),
            size_bytes: std::fs::metadata(disk)?.len(),
            verification,
        });
    }
    let same_volumes = launch_volumes.len() == machine.disks.len();
    let disks_root = MachineRoot::new(disk_roots)?.id();
    let whole = Verification {
        roots_equal: same_volumes
            && disks_root == machine.root
            && launch.root == machine.root
            && volumes.iter().all(|v| v.verification.roots_equal),
        bytes_equal: same_volumes && volumes.iter().all(|v| v.verification.bytes_equal),
    };
    Ok((whole, volumes))
}

/// The root of a disk as a fresh scan finds it.
fn disk_root(disk: &Path, chunk_size_bytes: u32, space: IdSpace) -> Result<ChunkId> {
    let image = DiskImage::open(disk)?;
    let geometry = Geometry::new(image.size_bytes(), chunk_size_bytes)?;
    let mut ids = image.scan(geometry)?;
    space.map_all(&mut ids);
    Ok(Root::from_chunk_ids(geometry, &ids).id())
}

/// Whether the export to `scratch` succeeded and is `disk` byte for byte;
/// removes `scratch`.
fn exported_equal(
    exported: Result<(), blockrep_store::Error>,
    disk: &Path,
    scratch: &Path,
) -> Result<bool> {
    let equal = match exported {
        Ok(()) => files_equal(disk, scratch)?,
        Err(e) => {
            eprintln!("replica export failed: {e}");
            false
        }
    };
    let _ = std::fs::remove_file(scratch);
    Ok(equal)
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

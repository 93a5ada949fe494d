//! Machines: a source is a machine of one or more named volumes (disks), and
//! one recovery point of it is a *machine root*, the names of its volumes and
//! each volume's [`Root`](crate::Root), itself content-addressed. A head that
//! names a machine root commits every volume at once, or none.
//!
//! Encoding (little-endian): `BRMACH\0\x01`, volume count (u32), then per
//! volume, sorted by name: name length (u8), name bytes, root id (32 bytes).
//! Its id is the blake3 of that encoding, as for pages and roots.

use std::fmt;
use std::path::Path;

use crate::error::{Error, ErrorKind};
use crate::id::ChunkId;
use crate::index::RootId;
use crate::source::valid_name;

const MACHINE_MAGIC: [u8; 8] = *b"BRMACH\x00\x01";
const MACHINE_HEADER_LEN: usize = 12;

/// Longest allowed volume name.
pub const VOLUME_NAME_MAX_LEN: usize = 64;

/// Most volumes one machine may have: an explicit limit on what a peer can
/// make the server hold per source (each volume has its own replica index).
pub const VOLUMES_MAX: usize = 64;

/// The name of the one volume of a source whose head names a disk root
/// directly (a data directory written before machines existed, or a
/// single-disk source): such a head opens as a one-volume machine.
pub const SINGLE_VOLUME_NAME: &str = "disk";

/// A validated volume name: `[a-z0-9][a-z0-9._-]{0,63}` without `..`, the
/// rule of source ids, because volume names also name files and NBD exports
/// (`LAUNCH/VOLUME`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

impl VolumeName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, Error> {
        if valid_name(name, VOLUME_NAME_MAX_LEN) {
            Ok(Self(name.to_owned()))
        } else {
            Err(Error::new(
                ErrorKind::InvalidEncoding,
                format!(
                    "invalid volume name {name:?}: must match [a-z0-9][a-z0-9._-]{{0,63}} \
                     without '..'"
                ),
            ))
        }
    }

    /// The default name of a disk given by path: its file name, lower-cased,
    /// with every character a name may not hold replaced by `-` (so
    /// `/dev/sda` is `sda`, `/images/Boot Disk.raw` is `boot-disk.raw`).
    /// Fails only when nothing usable is left (a path of dots).
    pub fn from_path(path: &Path) -> Result<Self, Error> {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut name: String = file_name
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        while name.contains("..") {
            name = name.replace("..", ".");
        }
        let name = name.trim_start_matches(['.', '_', '-']);
        let name: String = name.chars().take(VOLUME_NAME_MAX_LEN).collect();
        Self::new(&name).map_err(|_| {
            Error::new(
                ErrorKind::InvalidEncoding,
                format!(
                    "no volume name can be made from {}: name it (NAME=PATH)",
                    path.display()
                ),
            )
        })
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for VolumeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

/// One recovery point of a machine: each volume's name and root id, sorted by
/// name, names unique, between 1 and [`VOLUMES_MAX`] volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRoot {
    volumes: Vec<(VolumeName, RootId)>,
}

impl MachineRoot {
    /// A machine root of these volumes, in any order; fails on none, too many
    /// or a name given twice.
    pub fn new(mut volumes: Vec<(VolumeName, RootId)>) -> Result<Self, Error> {
        volumes.sort_by(|a, b| a.0.cmp(&b.0));
        check_volumes(&volumes).map_err(|what| {
            Error::new(ErrorKind::InvalidEncoding, format!("machine root: {what}"))
        })?;
        Ok(Self { volumes })
    }

    /// The volumes, sorted by name.
    pub fn volumes(&self) -> &[(VolumeName, RootId)] {
        &self.volumes
    }

    /// The root of the volume called `name`, if the machine has one.
    pub fn volume(&self, name: &str) -> Option<RootId> {
        self.volumes
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.volumes[i].1)
    }

    /// The machine root's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MACHINE_HEADER_LEN + self.volumes.len() * 64);
        out.extend_from_slice(&MACHINE_MAGIC);
        out.extend_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        for (name, root) in &self.volumes {
            // Names are at most 64 bytes (checked), so the length fits a u8.
            out.push(name.as_str().len() as u8);
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(root.as_bytes());
        }
        out
    }

    /// The machine root's id: blake3 of its encoding.
    pub fn id(&self) -> ChunkId {
        ChunkId::from(blake3::hash(&self.encode()))
    }

    /// Whether `bytes` start as a machine root does (rather than as a disk
    /// root): what a stored root blob is, before it is decoded.
    pub fn is_encoding(bytes: &[u8]) -> bool {
        bytes.starts_with(&MACHINE_MAGIC)
    }

    /// Parses a machine root, strictly: magic, count within the limit, valid
    /// names sorted without repeats, nothing left over.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let invalid =
            |what: &str| Error::new(ErrorKind::InvalidEncoding, format!("machine root: {what}"));
        if bytes.len() < MACHINE_HEADER_LEN {
            return Err(invalid("shorter than its header"));
        }
        if bytes[..8] != MACHINE_MAGIC {
            return Err(invalid("bad magic or unsupported version"));
        }
        let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if count == 0 || count > VOLUMES_MAX {
            return Err(invalid(&format!(
                "{count} volumes (a machine has 1 to {VOLUMES_MAX})"
            )));
        }
        let mut rest = &bytes[MACHINE_HEADER_LEN..];
        let mut volumes = Vec::with_capacity(count);
        for _ in 0..count {
            let Some((&len, tail)) = rest.split_first() else {
                return Err(invalid("ends inside a volume"));
            };
            let len = usize::from(len);
            if tail.len() < len + 32 {
                return Err(invalid("ends inside a volume"));
            }
            let name = std::str::from_utf8(&tail[..len])
                .map_err(|_| invalid("a volume name is not UTF-8"))
                .and_then(|n| VolumeName::new(n).map_err(|e| invalid(&e.to_string())))?;
            let mut id = [0u8; 32];
            id.copy_from_slice(&tail[len..len + 32]);
            let root = ChunkId(id);
            volumes.push((name, root));
            rest = &tail[len + 32..];
        }
        if !rest.is_empty() {
            return Err(invalid("bytes after the last volume"));
        }
        if volumes.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(invalid("volumes not sorted by name, or a name repeated"));
        }
        Ok(Self { volumes })
    }
}

fn check_volumes(volumes: &[(VolumeName, RootId)]) -> Result<(), String> {
    check_sorted_names(volumes.iter().map(|(name, _)| name), volumes.len())
}

/// Between 1 and [`VOLUMES_MAX`] `names` (`count` of them), sorted, none
/// twice.
fn check_sorted_names<'a>(
    names: impl Iterator<Item = &'a VolumeName>,
    count: usize,
) -> Result<(), String> {
    if count == 0 || count > VOLUMES_MAX {
        return Err(format!(
            "{count} volumes (a machine has 1 to {VOLUMES_MAX})"
        ));
    }
    let mut previous: Option<&VolumeName> = None;
    for name in names {
        if previous == Some(name) {
            return Err(format!("volume {name} named twice"));
        }
        previous = Some(name);
    }
    Ok(())
}

impl MachineRoot {
    /// Whether `names` may be a machine's volumes (1 to [`VOLUMES_MAX`],
    /// none twice), as [`MachineRoot::new`] checks them: a session's
    /// volumes are checked before they have roots.
    pub fn check_names(names: &[VolumeName]) -> Result<(), Error> {
        let mut sorted: Vec<&VolumeName> = names.iter().collect();
        sorted.sort();
        check_sorted_names(sorted.into_iter(), names.len())
            .map_err(|what| Error::new(ErrorKind::InvalidEncoding, format!("machine root: {what}")))
    }
}

#[cfg(test)]
mod tests;

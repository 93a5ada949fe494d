//! Bookkeeping shared by snapshots and launches: name validation, the small
//! fixed-size record files they are stored in, the lock that serializes their
//! creation and deletion, and the roots they keep alive.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Mutex, Weak};

use blockrep_core::{ChunkId, SourceId};

use crate::error::{Error, ErrorKind};
use crate::launch::LaunchVolume;
use crate::retention::RetentionPolicy;
use crate::store::{Store, lock};
use crate::vfs::Vfs;

/// Bytes reserved for a name in a record: names are at most 64 bytes.
pub(crate) const NAME_FIELD_LEN: usize = 64;

/// State of the store that is about snapshots and launches rather than blobs.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    /// Serializes every create and delete of snapshots and launches (and the opening
    /// of launches), so "does the name exist" and "publish it" are one step.
    pub(crate) lock: Mutex<()>,
    /// The policy for automatic snapshots.
    pub(crate) retention: Mutex<RetentionPolicy>,
    /// Launch volumes open in this process, so that one launch is never written
    /// through two volumes (their flushes would overwrite each other's head).
    pub(crate) open_launches: Mutex<HashMap<String, Weak<LaunchVolume>>>,
}

/// Validates a snapshot or launch name: the same rule as source ids,
/// `[a-z0-9][a-z0-9._-]{0,63}` without `..`, because names become file names.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    SourceId::new(name).map(|_| ()).map_err(|_| {
        Error::new(
            ErrorKind::Invalid,
            format!(
                "invalid {what} name {name:?}: must match [a-z0-9][a-z0-9._-]{{0,63}} without '..'"
            ),
        )
    })
}

/// Appends `name` zero-padded to [`NAME_FIELD_LEN`] bytes. Names are validated,
/// so they fit.
pub(crate) fn put_name(out: &mut Vec<u8>, name: &str) {
    debug_assert!(name.len() <= NAME_FIELD_LEN, "validated names fit");
    let start = out.len();
    out.extend_from_slice(name.as_bytes());
    out.resize(start + NAME_FIELD_LEN, 0);
}

/// Reads a name of `len` bytes from a zero-padded field; `None` unless it is a
/// valid name with zero padding.
pub(crate) fn get_name(field: &[u8], len: u8) -> Option<String> {
    let len = usize::from(len);
    if field.len() != NAME_FIELD_LEN || len > NAME_FIELD_LEN {
        return None;
    }
    if field[len..].iter().any(|&b| b != 0) {
        return None;
    }
    let name = std::str::from_utf8(&field[..len]).ok()?;
    SourceId::new(name).ok()?;
    Some(name.to_owned())
}

/// Little-endian u64 at `at` (the caller has checked the length).
pub(crate) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

/// A 32-byte id at `at` (the caller has checked the length).
pub(crate) fn id_at(bytes: &[u8], at: usize) -> ChunkId {
    let mut id = [0u8; 32];
    id.copy_from_slice(&bytes[at..at + 32]);
    ChunkId(id)
}

/// Appends the crc32 of everything in `out` so far.
pub(crate) fn seal_with_crc(out: &mut Vec<u8>) {
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Checks length, magic and the trailing crc32 of a record.
pub(crate) fn check_record(
    what: &str,
    bytes: &[u8],
    magic: &[u8; 8],
    len: usize,
) -> Result<(), Error> {
    let corrupt = |problem: &str| Error::new(ErrorKind::Corrupt, format!("{what}: {problem}"));
    if bytes.len() != len {
        return Err(corrupt("wrong length"));
    }
    if bytes[..8] != magic[..] {
        return Err(corrupt("bad magic or unsupported version"));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[len - 4..]);
    if u32::from_le_bytes(crc) != crc32fast::hash(&bytes[..len - 4]) {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(())
}

/// Valid names of the entries of `dir`, sorted; empty when `dir` does not exist.
/// Temporary files and directories (leading `.`) are not valid names, so they are
/// skipped.
pub(crate) fn list_names(vfs: &dyn Vfs, dir: &Path) -> Result<Vec<String>, Error> {
    let entries = match vfs.list_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Some(name) = entry.to_str()
            && validate_name("entry", name).is_ok()
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

impl Store {
    /// Every root that something durable refers to: each source's head, each
    /// snapshot, and each launch's base and its own flushed root. Sorted, without
    /// duplicates. A record that cannot be read is an error, never skipped, so a
    /// garbage collector marking from this list cannot miss a root.
    pub fn referenced_roots(&self) -> Result<Vec<ChunkId>, Error> {
        let mut roots = BTreeSet::new();
        for name in list_names(self.vfs(), &self.data_dir().join("sources"))? {
            let source = SourceId::new(&name)
                .map_err(|e| Error::new(ErrorKind::Invalid, format!("source {name}: {e}")))?;
            if let Some(head) = self.head(&source)? {
                roots.insert(head.root);
            }
        }
        for snapshot in self.list_snapshots(None)? {
            roots.insert(snapshot.root);
        }
        for launch in self.list_launches(None)? {
            roots.insert(launch.base_root);
            roots.insert(launch.root);
        }
        Ok(roots.into_iter().collect())
    }

    /// Sets the policy used by [`Store::expire_snapshots`] and
    /// [`Store::create_auto_snapshot_if_due`]. The default is
    /// [`RetentionPolicy::default`]. Not persisted: set it after each open.
    pub fn set_retention_policy(&self, policy: RetentionPolicy) {
        *lock(&self.catalog.retention) = policy;
    }

    /// The policy for automatic snapshots.
    pub fn retention_policy(&self) -> RetentionPolicy {
        lock(&self.catalog.retention).clone()
    }
}

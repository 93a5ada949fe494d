//! Bookkeeping shared by snapshots and launches: name validation, the lock that serializes their
//! creation and deletion, and the roots they keep alive.

use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, Weak};

use blockrep_core::SourceId;

use crate::error::{Error, ErrorKind};
use crate::retention::RetentionPolicy;
use crate::vfs::Vfs;

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
    /// A volume holds its store, so the store names them without their type
    /// (`launch.rs` downcasts): the catalog sits below launches.
    /// Keyed by launch name, or `LAUNCH/VOLUME` for a volume of a machine's
    /// launch (a `/` no launch name holds).
    pub(crate) open_launches: Mutex<HashMap<String, Weak<dyn Any + Send + Sync>>>,
    /// Serializes the read-modify-write of a machine launch's head by the
    /// flushes of its volumes (each volume replaces its own root in the
    /// launch's machine root). Taken with no other store lock held but the
    /// GC fence's read side.
    pub(crate) launch_heads: Mutex<()>,
    /// When each launch volume closed in this process last served a request
    /// (same keys), so that one opened again (every NBD connection opens it)
    /// is not taken as idle since forever.
    pub(crate) launch_last_io: Mutex<HashMap<String, std::time::Instant>>,
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

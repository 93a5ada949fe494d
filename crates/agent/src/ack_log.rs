//! The acknowledgement log: one line per commit the server acknowledged.
//!
//! A line is `epoch=N root=HEX complete=true|false unix_ms=N scan_started_unix_ms=N`
//! (`unix_ms` when the acknowledgement arrived; `scan_started_unix_ms` the moment
//! the disk was read from, before its frozen view was taken when there is one:
//! the point in time the root holds), appended with one
//! `write` after the server's `Committed` (or `CutoverReady`) arrived, so every
//! line names a root the server had already made durable. Whoever reads the log
//! (an operator, a test killing processes) can hold the server to each of them.
//!
//! The file is not fsynced: the server's store is the durable record; this log
//! only has to survive the agent's process, which a completed `write` does.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blockrep_core::ChunkId;
use tracing::warn;

/// An append-only file of acknowledged commits (see the module docs for the format).
#[derive(Debug)]
pub struct AckLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AckLog {
    /// Opens `path` for appending, creating it if missing; earlier lines are kept,
    /// so one file can record the commits of successive agent runs.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// Appends the line of one acknowledged commit. A failed write is logged, not
    /// returned: replication matters more than its record, and a missing line
    /// only weakens what a reader can check, it never claims too much.
    pub(crate) fn record(
        &self,
        epoch: u64,
        root: &ChunkId,
        complete: bool,
        scan_started_unix_ms: u64,
    ) {
        let unix_ms = blockrep_core::clock::now_unix_ms();
        // One `write` of the whole line: with O_APPEND, readers never see half a
        // line followed by another writer's bytes.
        let line = format!(
            "epoch={epoch} root={} complete={complete} unix_ms={unix_ms} \
             scan_started_unix_ms={scan_started_unix_ms}\n",
            root.to_hex()
        );
        // A panic elsewhere while holding this lock cannot leave the file in a
        // state worse than a short line, so a poisoned lock is still usable.
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(error) = file.write_all(line.as_bytes()) {
            warn!(path = %self.path.display(), %error, "cannot append to the acknowledgement log");
        }
    }
}

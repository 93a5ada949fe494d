//! The old content of blocks a cut still needs, copied before a write
//! replaces them: in memory up to a budget, then in a spill file beside the
//! disk, up to a hard cap.
//!
//! The spill file is `.NAME.blockrep-spill.PID` (mode 0600) in the disk's
//! directory; it exists only while a cut that spilled is live, and a new
//! capture removes those of processes that no longer run.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::CAPTURE_BLOCK_BYTES;

const BLOCK: usize = CAPTURE_BLOCK_BYTES as usize;
const SPILL_MARK: &str = ".blockrep-spill.";

/// Where a preserved block is.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Memory(usize),
    Spill(u64),
}

/// What [`PreserveStore::insert`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inserted {
    /// The block is kept.
    Kept,
    /// The cap is reached: nothing was kept.
    OverBudget,
}

#[derive(Debug)]
pub(super) struct PreserveStore {
    slots: HashMap<u64, Slot>,
    memory: Vec<Box<[u8]>>,
    memory_free: Vec<usize>,
    memory_slots_max: usize,
    blocks_max: u64,
    spill_path: PathBuf,
    spill: Option<File>,
    spill_len_slots: u64,
    spill_free: Vec<u64>,
}

/// The spill file of this process for `disk`.
pub(super) fn spill_path(disk: &Path) -> PathBuf {
    let name = disk
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    disk.with_file_name(format!(".{name}{SPILL_MARK}{}", std::process::id()))
}

/// Removes the spill files of `disk` left by processes that no longer run
/// (a crash or SIGKILL during a cut). Best effort: a failure is logged.
pub(super) fn remove_stale_spills(disk: &Path) {
    let Some(name) = disk.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let dir = match disk.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(".{name}{SPILL_MARK}");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                tracing::info!(path = %entry.path().display(), "removed a stale capture spill file")
            }
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), "cannot remove a stale capture spill file: {e}")
            }
        }
    }
}

impl PreserveStore {
    pub(super) fn new(spill_path: PathBuf, memory_bytes: u64, max_bytes: u64) -> Self {
        Self {
            slots: HashMap::new(),
            memory: Vec::new(),
            memory_free: Vec::new(),
            memory_slots_max: usize::try_from(memory_bytes / CAPTURE_BLOCK_BYTES)
                .unwrap_or(usize::MAX),
            blocks_max: max_bytes / CAPTURE_BLOCK_BYTES,
            spill_path,
            spill: None,
            spill_len_slots: 0,
            spill_free: Vec::new(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every block kept, in no order.
    pub(super) fn blocks(&self) -> Vec<u64> {
        self.slots.keys().copied().collect()
    }

    /// Blocks kept.
    pub(super) fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Keeps `block`, its content written by `fill` into a 4 KiB buffer.
    pub(super) fn insert(
        &mut self,
        block: u64,
        fill: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<Inserted> {
        if self.slots.contains_key(&block) {
            return Ok(Inserted::Kept);
        }
        if self.len() >= self.blocks_max {
            return Ok(Inserted::OverBudget);
        }
        let slot = if let Some(index) = self.memory_free.pop() {
            Slot::Memory(index)
        } else if self.memory.len() < self.memory_slots_max {
            self.memory.push(vec![0; BLOCK].into_boxed_slice());
            Slot::Memory(self.memory.len() - 1)
        } else {
            Slot::Spill(self.spill_slot()?)
        };
        let filled = match slot {
            Slot::Memory(index) => fill(&mut self.memory[index]),
            Slot::Spill(index) => {
                let mut buffer = [0u8; BLOCK];
                fill(&mut buffer).and_then(|()| {
                    self.spill_file()?
                        .write_all_at(&buffer, index * CAPTURE_BLOCK_BYTES)
                })
            }
        };
        match filled {
            Ok(()) => {
                self.slots.insert(block, slot);
                Ok(Inserted::Kept)
            }
            Err(e) => {
                self.free(slot);
                Err(e)
            }
        }
    }

    /// Copies `dst.len()` bytes of preserved `block` from `start` within it,
    /// when the block is kept.
    pub(super) fn read(&self, block: u64, start: usize, dst: &mut [u8]) -> io::Result<bool> {
        let Some(slot) = self.slots.get(&block) else {
            return Ok(false);
        };
        match *slot {
            Slot::Memory(index) => {
                dst.copy_from_slice(&self.memory[index][start..start + dst.len()])
            }
            Slot::Spill(index) => self
                .spill
                .as_ref()
                .ok_or_else(|| io::Error::other("capture spill file not open"))?
                .read_exact_at(dst, index * CAPTURE_BLOCK_BYTES + start as u64)?,
        }
        Ok(true)
    }

    /// Drops `block`; its slot is reused.
    pub(super) fn remove(&mut self, block: u64) {
        if let Some(slot) = self.slots.remove(&block) {
            self.free(slot);
        }
    }

    /// Drops every block and removes the spill file. Memory is returned.
    pub(super) fn clear(&mut self) {
        self.slots = HashMap::new();
        self.memory = Vec::new();
        self.memory_free = Vec::new();
        self.spill_free = Vec::new();
        self.spill_len_slots = 0;
        if self.spill.take().is_some()
            && let Err(e) = std::fs::remove_file(&self.spill_path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.spill_path.display(), "cannot remove the capture spill file: {e}");
        }
    }

    fn free(&mut self, slot: Slot) {
        match slot {
            Slot::Memory(index) => self.memory_free.push(index),
            Slot::Spill(index) => self.spill_free.push(index),
        }
    }

    fn spill_slot(&mut self) -> io::Result<u64> {
        if let Some(index) = self.spill_free.pop() {
            return Ok(index);
        }
        self.spill_file()?;
        self.spill_len_slots += 1;
        Ok(self.spill_len_slots - 1)
    }

    fn spill_file(&mut self) -> io::Result<&File> {
        if self.spill.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.spill_path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("capture spill file {}: {e}", self.spill_path.display()),
                    )
                })?;
            self.spill = Some(file);
        }
        self.spill
            .as_ref()
            .ok_or_else(|| io::Error::other("capture spill file not open"))
    }
}

impl Drop for PreserveStore {
    fn drop(&mut self) {
        self.clear();
    }
}

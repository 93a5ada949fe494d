//! A launch volume's write overlay: what clients wrote since the last fold,
//! at 4 KiB granularity, durable at every flush, with no hashing and no store
//! insert on the write path.
//!
//! # Why a sparse file and a map journal
//!
//! The overlay is a sparse file the size of the volume, where block `b` lives
//! at byte `b * 4096`, plus a map that says, per block, whether the file holds
//! it (`Data`), it reads as zeroes (`Zero`), or it is still the base's (the
//! replica, through the chunk cache). A log with an index was the other
//! choice; it was not taken because:
//! - a write lands where a disk's would: a sequential writer makes sequential
//!   I/O in the file, a rewrite of a block takes no new space, and reads of
//!   written data are plain `pread`s at the same offset, with no index to
//!   keep in memory (the map costs two bits per block: 64 KiB per GiB);
//! - space is bounded by the volume's size with no compaction of the data.
//!
//! # Durability
//!
//! A write goes to the file (the page cache), then its change of the map is
//! appended to `map` as a record with a crc32 (the page cache too), then
//! the map in memory changes. A flush makes the file's data durable
//! (`fdatasync`), then appends a *sync marker* naming the machine's boot
//! (`/proc/sys/kernel/random/boot_id`) and syncs `map`.
//!
//! On open, `map` is replayed: every whole record up to the last marker;
//! the records after it only if that marker was written in this boot. Within
//! one boot the page cache outlives the process, so a server killed (SIGKILL,
//! a panic) loses no completed write, flushed or not, exactly as a process
//! writing a file would not. After a power loss (another boot) the records
//! past the last marker are cut off: their data may never have reached the
//! disk, and a block is `Data` only if a flush made its data durable before
//! the marker that covers it. Either way every write acknowledged by a flush
//! or FUA is there, and no block reads as a hole where a write was never
//! made durable. A block rewritten after its last flush may show the new or
//! the old data, as a disk's would. A torn or damaged record ends the
//! replay there.
//!
//! A fold (`fold.rs`) moves blocks into the store and *unmaps* them; the
//! unmap is queued like a write and reaches `map` with the next record. Only
//! then is the block's space given back (`punch`), so a crash never finds a
//! block mapped to a hole that was punched.
//!
//! # Files
//!
//! `DATA/overlays/LAUNCH` (or `LAUNCH@VOLUME` for a volume of a machine's
//! launch) holds `data` and `map`. `map` starts with a header (magic,
//! version, block count, crc32), then records: magic, count, that many
//! operations (kind u8, first block u64, block count u64), crc32 of all of
//! it; or a sync marker: magic, boot id (16 bytes), crc32. When `map` has grown past [`MAP_COMPACT_BYTES`] it is rewritten as
//! one record per run of the current map, atomically.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind};

pub(super) mod bits;
mod compact;
mod dir;
mod file_io;
mod records;
mod target;

use bits::Bits;
pub(crate) use dir::{mapped_blocks_in, remove};
use file_io::DataSync;
pub(crate) use file_io::OverlayIo;
use file_io::write_data;
#[cfg(test)]
pub(crate) use records::TEST_BOOT;
use records::{
    HEADER_LEN, HEADER_MAGIC, MARKER_LEN, MARKER_MAGIC, Op, OpKind, Record, VERSION, boot_id,
    encode_record,
};
pub(super) use target::{
    open_target_again, punch_or_zero, read_cut, read_target, remove_cut, write_cut, write_target,
};

/// Bytes per overlay block: the granularity of writes and of the map.
pub const OVERLAY_BLOCK_BYTES: u64 = 4096;
/// `map` is rewritten whole at a sync when it has grown past this (and past
/// twice what a rewrite would take).
const MAP_COMPACT_BYTES: u64 = 4 << 20;
/// A write makes a sync of its own (to rewrite `map`) only past this: a
/// client that never flushes must not grow `map` without bound, but a sync
/// of the data in the write path stalls that write, so it stays rare.
const MAP_FORCED_COMPACT_BYTES: u64 = 64 << 20;
/// What a block of the volume reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// The base: the volume's root as of the last fold.
    Base,
    /// The overlay file's bytes at the block's offset.
    Data,
    /// Zeroes.
    Zero,
}

/// An open overlay. Not synchronized: its volume's lock covers it.
#[derive(Debug)]
pub(crate) struct Overlay {
    dir: Arc<Path>,
    /// Shared with reads and writes done outside the volume's lock.
    data: Arc<File>,
    /// Through which every sync of `data` goes (see [`DataSync`]).
    data_sync: Arc<DataSync>,
    map: File,
    map_len: u64,
    blocks: u64,
    size_bytes: u64,
    data_bits: Bits,
    zero_bits: Bits,
    /// Whether `map` has records past its last sync marker.
    unsynced: bool,
    /// Blocks unmapped by records past the last sync marker.
    unsynced_unmaps: Vec<(u64, u64)>,
    /// `map`'s length at which compaction is considered next.
    next_compaction_check: u64,
    /// This boot's id; `None` where the system does not tell it (records
    /// past the last marker are then never replayed).
    boot: Option<[u8; 16]>,
    /// Data writes so far (blocks written or zeroed), and how many of them
    /// the data file's last sync covers: it is dirty while they differ,
    /// and a sync made without the volume's lock covers only those before
    /// it took the file.
    data_writes: u64,
    synced_writes: u64,
    /// Blocks unmapped (their map change recorded durably) whose space is
    /// still to be given back.
    to_punch: Vec<(u64, u64)>,
    /// Block ranges being read or written outside the volume's lock, by
    /// token: never punched meanwhile.
    busy: Vec<(u64, u64, u64)>,
    /// The last token handed out.
    last_token: u64,
    /// A sync failed: see [`Overlay::check_usable`].
    failed: bool,
    /// The data file is a materialization's target (`materialize.rs`): a
    /// whole copy of the volume, so nothing in it is ever punched, and
    /// blocks made zero are zeroed in it at once.
    keep_data: bool,
    /// `map`'s length past which a sync considers rewriting it.
    next_sync_compaction_check: u64,
}

fn io_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("overlay {what} {}", path.display()), e)
}

impl Overlay {
    /// Where the overlay of launch `name` (volume `volume`, for a machine's
    /// launch) lives.
    pub(crate) fn dir_of(data_dir: &Path, name: &str, volume: Option<&str>) -> PathBuf {
        let leaf = match volume {
            Some(volume) => format!("{name}@{volume}"),
            None => name.to_owned(),
        };
        data_dir.join("overlays").join(leaf)
    }

    /// Opens the overlay in `dir` for a volume of `size_bytes`, replaying its
    /// map; `None` when there is none. A map of another size is `Corrupt`.
    pub(crate) fn open(dir: &Path, size_bytes: u64) -> Result<Option<Self>, Error> {
        let map_path = dir.join("map");
        let map = match OpenOptions::new().read(true).write(true).open(&map_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("cannot open", &map_path, e)),
        };
        let target = read_target(dir)?;
        let data_path = target.clone().unwrap_or_else(|| dir.join("data"));
        let data = match &target {
            Some(target) => open_target_again(target, size_bytes)?,
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .open(&data_path)
                .map_err(|e| io_error("cannot open", &data_path, e))?,
        };
        if target.is_some() {
            // Left by a stop between the switch to the target and the
            // removal of the old file: nothing reads it any more.
            let _ = std::fs::remove_file(dir.join("data"));
        }
        let mut overlay = Self::with_files(dir, data, map, size_bytes);
        overlay.keep_data = target.is_some();
        overlay.replay()?;
        Ok(Some(overlay))
    }

    /// Creates an empty overlay in `dir` (which must not hold one), durably.
    pub(crate) fn create(dir: &Path, size_bytes: u64) -> Result<Self, Error> {
        // Owner-only whatever the umask, as every file of the data directory.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error("cannot create", dir, e))?;
        let data_path = dir.join("data");
        let data = create_file(&data_path)?;
        data.set_len(size_bytes)
            .map_err(|e| io_error("cannot size", &data_path, e))?;
        let tmp = dir.join("map.tmp");
        let map = create_file(&tmp)?;
        let mut overlay = Self::with_files(dir, data, map, size_bytes);
        let mut header = overlay.header();
        header.extend_from_slice(&overlay.marker());
        overlay.write_map_at(&header, 0)?;
        overlay.map_len = header.len() as u64;
        overlay
            .map
            .sync_all()
            .map_err(|e| io_error("cannot sync", &tmp, e))?;
        overlay
            .data
            .sync_all()
            .map_err(|e| io_error("cannot sync", &data_path, e))?;
        std::fs::rename(&tmp, dir.join("map")).map_err(|e| io_error("cannot publish", &tmp, e))?;
        sync_dir(dir)?;
        // The entries of `dir` in `overlays/` and of `overlays/` in the data
        // directory, every time: a retry after a failed sync finds them made.
        for ancestor in dir.ancestors().skip(1).take(2) {
            sync_dir(ancestor)?;
        }
        Ok(overlay)
    }

    fn with_files(dir: &Path, data: File, map: File, size_bytes: u64) -> Self {
        let blocks = size_bytes.div_ceil(OVERLAY_BLOCK_BYTES);
        Self {
            dir: Arc::from(dir),
            data: Arc::new(data),
            data_sync: Arc::default(),
            map,
            map_len: 0,
            blocks,
            size_bytes,
            data_bits: Bits::new(blocks),
            zero_bits: Bits::new(blocks),
            unsynced: false,
            unsynced_unmaps: Vec::new(),
            next_compaction_check: MAP_FORCED_COMPACT_BYTES,
            boot: boot_id(),
            data_writes: 0,
            synced_writes: 0,
            to_punch: Vec::new(),
            busy: Vec::new(),
            last_token: 0,
            failed: false,
            keep_data: false,
            next_sync_compaction_check: MAP_COMPACT_BYTES,
        }
    }

    fn marker(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MARKER_LEN as usize);
        out.extend_from_slice(&MARKER_MAGIC);
        out.extend_from_slice(&self.boot.unwrap_or([0; 16]));
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN as usize);
        out.extend_from_slice(&HEADER_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.blocks.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Number of blocks (the last one may be short).
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// What block `block` reads as.
    pub(crate) fn state(&self, block: u64) -> BlockState {
        if self.data_bits.get(block) {
            BlockState::Data
        } else if self.zero_bits.get(block) {
            BlockState::Zero
        } else {
            BlockState::Base
        }
    }

    /// Whether any of `count` blocks from `first` is mapped (not the base's).
    pub(crate) fn any_mapped(&self, first: u64, count: u64) -> bool {
        self.data_bits.any_in(first, count) || self.zero_bits.any_in(first, count)
    }

    /// Whether all of `count` blocks from `first` are mapped: nothing of
    /// them is read from the base.
    pub(crate) fn all_mapped(&self, first: u64, count: u64) -> bool {
        self.data_bits.all_in_either(&self.zero_bits, first, count)
    }

    /// Blocks mapped now (data or zero).
    pub(crate) fn mapped_blocks(&self) -> u64 {
        self.data_bits.count() + self.zero_bits.count()
    }

    /// Writes whole blocks from `first` (the last of the volume may be
    /// short): `data` is their bytes, ending at a block end or the volume's.
    pub(crate) fn write_blocks(&mut self, first: u64, data: &[u8]) -> Result<(), Error> {
        let count = (data.len() as u64).div_ceil(OVERLAY_BLOCK_BYTES);
        write_data(&self.data, &self.dir, first, data)?;
        self.wrote_blocks(first, count)
    }

    /// Marks `count` blocks from `first` as `Data`: their bytes are in the
    /// file (written with [`Overlay::io`] outside the volume's lock).
    pub(crate) fn wrote_blocks(&mut self, first: u64, count: u64) -> Result<(), Error> {
        self.note_data_written();
        self.log(OpKind::Data, first, count)?;
        self.data_bits.set_range(first, count, true);
        self.zero_bits.set_range(first, count, false);
        self.bound_map()
    }

    /// Starts I/O on `count` blocks from `first` outside the volume's lock:
    /// they are not punched until [`Overlay::io_done`] with the token.
    pub(crate) fn io(&mut self, first: u64, count: u64) -> (OverlayIo, u64) {
        self.last_token += 1;
        self.busy.push((first, first + count, self.last_token));
        (self.reader(), self.last_token)
    }

    /// The file, for reads under the volume's lock (no punch can happen
    /// then, so nothing is marked busy).
    pub(crate) fn reader(&self) -> OverlayIo {
        OverlayIo {
            data: Arc::clone(&self.data),
            dir: Arc::clone(&self.dir),
            data_sync: Arc::clone(&self.data_sync),
        }
    }

    /// Whether any of `count` blocks from `first` is read or written outside
    /// the volume's lock now.
    pub(crate) fn is_busy(&self, first: u64, count: u64) -> bool {
        self.busy
            .iter()
            .any(|(start, end, _)| *start < first + count && first < *end)
    }

    /// Whether the data file is a materialization's target.
    pub(crate) fn is_materialized(&self) -> bool {
        self.keep_data
    }

    /// Runs of mapped blocks: `(first, count, is_data)` (else zero).
    pub(crate) fn mapped_runs(&self) -> Vec<(u64, u64, bool)> {
        self.runs()
            .into_iter()
            .map(|op| (op.first, op.count, op.kind == OpKind::Data))
            .collect()
    }

    /// Makes `file` (a materialization's target, which holds every mapped
    /// block's bytes at its offset) the data file from now on. Nothing may
    /// be busy. The old file is the caller's to remove.
    pub(crate) fn switch_data(&mut self, file: File) {
        self.data = Arc::new(file);
        self.keep_data = true;
        self.note_data_written();
        self.to_punch.clear();
    }

    /// Ends the I/O of `token`.
    pub(crate) fn io_done(&mut self, token: u64) {
        self.busy.retain(|(_, _, t)| *t != token);
    }

    /// Makes `count` blocks from `first` read as zeroes, touching no data
    /// (but a materialization's target, which must read as the volume once
    /// the blocks are folded).
    pub(crate) fn zero_blocks(&mut self, first: u64, count: u64) -> Result<(), Error> {
        self.check_usable()?;
        if self.keep_data {
            let offset = first * OVERLAY_BLOCK_BYTES;
            let len = ((first + count) * OVERLAY_BLOCK_BYTES).min(self.size_bytes) - offset;
            punch_or_zero(&self.data, offset, len)
                .map_err(|e| io_error("cannot zero blocks of", &self.dir, e))?;
            self.note_data_written();
        }
        self.log(OpKind::Zero, first, count)?;
        self.zero_bits.set_range(first, count, true);
        self.data_bits.set_range(first, count, false);
        self.bound_map()
    }

    /// Gives `count` blocks from `first` back to the base (a fold stored
    /// them). Their space is punched once the change is durable.
    pub(crate) fn unmap(&mut self, first: u64, count: u64) -> Result<(), Error> {
        if !self.any_mapped(first, count) {
            return Ok(());
        }
        self.log(OpKind::Unmap, first, count)?;
        self.data_bits.set_range(first, count, false);
        self.zero_bits.set_range(first, count, false);
        self.bound_map()
    }

    /// Syncs (always allowed: a disk may persist at any time) when `map`
    /// has grown past its bound, so that it is rewritten even for a client
    /// that never flushes. Called once a change is complete in the file,
    /// `map` and memory, never between: a sync punches blocks that read as
    /// the base.
    fn bound_map(&mut self) -> Result<(), Error> {
        if self.map_len >= self.next_compaction_check {
            self.sync()?;
            self.next_compaction_check = self.map_len.max(MAP_FORCED_COMPACT_BYTES) * 2;
        }
        Ok(())
    }

    /// Appends one change to `map` (not synced).
    fn log(&mut self, kind: OpKind, first: u64, count: u64) -> Result<(), Error> {
        self.check_usable()?;
        let record = encode_record(&[Op { kind, first, count }]);
        self.write_map_at(&record, self.map_len)?;
        self.map_len += record.len() as u64;
        self.unsynced = true;
        if kind == OpKind::Unmap {
            self.unsynced_unmaps.push((first, count));
        }
        Ok(())
    }

    fn note_data_written(&mut self) {
        self.data_writes += 1;
    }

    /// Whether the data file was written since its last sync.
    fn data_dirty(&self) -> bool {
        self.data_writes != self.synced_writes
    }

    /// The data file, to sync without the volume's lock before
    /// [`Overlay::sync`], and the count of data writes it covers, if
    /// anything was written since the last sync. It stays dirty until
    /// [`Overlay::data_synced`]: a sync under the lock meanwhile (a fold's)
    /// syncs the data itself before its marker.
    pub(crate) fn take_dirty_data(&mut self) -> Result<Option<(OverlayIo, u64)>, Error> {
        self.check_usable()?;
        if !self.data_dirty() {
            return Ok(None);
        }
        Ok(Some((self.reader(), self.data_writes)))
    }

    /// The file [`Overlay::take_dirty_data`] gave, with `writes` data
    /// writes, is synced: clean, unless written since (then
    /// [`Overlay::sync`] syncs only what was written meanwhile) or no longer
    /// this overlay's data (a materialization's start changed it).
    pub(crate) fn data_synced(&mut self, io: &OverlayIo, writes: u64) {
        if Arc::ptr_eq(&self.data, &io.data) {
            self.synced_writes = self.synced_writes.max(writes);
        }
    }

    /// A sync of the file [`Overlay::take_dirty_data`] gave failed (noted
    /// for a restart by the data's sync): as a failed [`Overlay::sync`],
    /// nothing more is promised durable.
    pub(crate) fn data_sync_failed(&mut self, e: Error) -> Error {
        self.failed = true;
        e
    }

    /// A sync of the map failed: nothing more is promised durable, and a
    /// restart in this boot must not trust the page cache past the last
    /// marker.
    fn fail(&mut self) {
        self.failed = true;
        dir::note_sync_failure(&self.dir);
    }

    /// Makes every write so far durable: the data first, then the map
    /// changes that name it. Then gives back the space of blocks whose
    /// unmap is now durable and that were not written again.
    pub(crate) fn sync(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        if self.data_dirty() {
            if let Err(e) = self.data_sync.sync(&self.data, &self.dir) {
                // The kernel may have dropped the pages it could not write:
                // a later sync that succeeds would not mean they are on disk
                // (the data's sync noted it for a restart).
                self.failed = true;
                return Err(io_error("cannot sync", &self.dir, e));
            }
            self.synced_writes = self.data_writes;
        }
        if self.unsynced {
            let marker = self.marker();
            self.write_map_at(&marker, self.map_len)?;
            if let Err(e) = self.map.sync_data() {
                self.fail();
                return Err(io_error("cannot sync", &self.dir, e));
            }
            self.map_len += marker.len() as u64;
            self.unsynced = false;
            let unmapped = std::mem::take(&mut self.unsynced_unmaps);
            self.to_punch.extend(unmapped);
        }
        self.punch()?;
        if self.map_len > self.next_sync_compaction_check {
            // Counting the runs walks the whole map: only now and then.
            let compacted = self.compacted_len();
            if self.map_len > 2 * compacted {
                self.compact()?;
            }
            self.next_sync_compaction_check =
                self.map_len.max(2 * compacted).max(MAP_COMPACT_BYTES) + MAP_COMPACT_BYTES / 4;
        }
        Ok(())
    }

    /// Fails once a sync of the overlay failed: from then on nothing it
    /// holds can be promised durable, so the volume serves no more writes
    /// or flushes (reads go on); reopening it (a server restart) replays
    /// what is durable.
    fn check_usable(&self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "overlay {} failed to sync earlier: writes and flushes are refused until \
                     the server restarts",
                    self.dir.display()
                ),
            ));
        }
        Ok(())
    }

    fn write_map_at(&self, bytes: &[u8], at: u64) -> Result<(), Error> {
        self.map
            .write_all_at(bytes, at)
            .map_err(|e| io_error("cannot write the map of", &self.dir, e))
    }

    /// Punches the blocks whose unmap is durable and that are still unmapped.
    fn punch(&mut self) -> Result<(), Error> {
        if self.keep_data {
            // A materialization's target holds the whole volume.
            self.to_punch.clear();
            return Ok(());
        }
        let mut ranges = std::mem::take(&mut self.to_punch);
        ranges.sort_unstable();
        let mut kept = Vec::new();
        // Adjacent ranges merged: a fold unmaps a chunk at a time, and one
        // call for a run of them spares a syscall (and, on a file system
        // mounted with `discard`, a synchronous discard) per chunk.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (first, count) in ranges {
            if self.is_busy(first, count) {
                // Read or written outside the lock now: the next sync.
                kept.push((first, count));
                continue;
            }
            match merged.last_mut() {
                Some((_, end)) if *end >= first => *end = (*end).max(first + count),
                _ => merged.push((first, first + count)),
            }
        }
        for (first, end) in merged {
            let mut block = first;
            while block < end {
                if self.state(block) != BlockState::Base {
                    block += 1;
                    continue;
                }
                let run_start = block;
                while block < end && self.state(block) == BlockState::Base {
                    block += 1;
                }
                let offset = run_start * OVERLAY_BLOCK_BYTES;
                let len = (block * OVERLAY_BLOCK_BYTES).min(self.size_bytes) - offset;
                // Giving space back is an economy: a file system that cannot
                // punch keeps the stale bytes, which no read reaches.
                let _ = rustix::fs::fallocate(
                    &*self.data,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    offset,
                    len,
                );
            }
        }
        self.to_punch = kept;
        Ok(())
    }

    /// Rebuilds the map from `map`: the header, then every whole record in
    /// order; a record that is torn or fails its crc ends the map there
    /// (the file is cut, so the next record follows the last good one).
    fn replay(&mut self) -> Result<(), Error> {
        let path = self.dir.join("map");
        let len = self
            .map
            .metadata()
            .map_err(|e| io_error("cannot stat", &path, e))?
            .len();
        let mut header = [0u8; HEADER_LEN as usize];
        if len < HEADER_LEN {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("overlay map {} has no header", path.display()),
            ));
        }
        self.map
            .read_exact_at(&mut header, 0)
            .map_err(|e| io_error("cannot read", &path, e))?;
        if header.as_slice() != self.header().as_slice() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "overlay map {} does not belong to a volume of {} bytes (or is damaged)",
                    path.display(),
                    self.size_bytes
                ),
            ));
        }
        let mut at = HEADER_LEN;
        // The end of the last marker, and the boot it was written in.
        let mut synced_end = at;
        let mut marker_boot = None;
        let mut tail = Vec::new();
        let map = self
            .map
            .try_clone()
            .map_err(|e| io_error("cannot open", &path, e))?;
        let dir = self.dir.clone();
        let mut reader = records::MapReader::new(&map, &dir, len);
        while let Some((record, record_len)) = reader.record(at)? {
            at += record_len;
            match record {
                Record::Ops(ops) => tail.extend(ops),
                Record::Marker(boot) => {
                    for op in tail.drain(..) {
                        self.apply_replayed(op)?;
                    }
                    synced_end = at;
                    marker_boot = Some(boot);
                }
            }
        }
        // After a failed sync the page cache is not to be trusted either.
        let same_boot =
            self.boot.is_some() && marker_boot == self.boot && !dir::sync_failed_before(&self.dir);
        if same_boot && !tail.is_empty() {
            // Written in this boot by a process that is gone: the page
            // cache holds their data. Made durable now, so that a power
            // loss cannot take back what this server serves from here on.
            for op in tail {
                self.apply_replayed(op)?;
            }
            self.map_len = at;
            self.cut(&path, at)?;
            self.note_data_written();
            self.unsynced = true;
            return self.sync();
        }
        if self.keep_data && !tail.is_empty() {
            let ranges: Vec<_> = tail.iter().map(|op| (op.first, op.count)).collect();
            write_cut(&self.dir, &ranges)?;
        }
        self.map_len = synced_end;
        self.cut(&path, synced_end)?;
        if marker_boot != self.boot {
            // Records from here on are this boot's: a marker of it first, so
            // that a kill before the next sync loses none of them.
            self.unsynced = true;
            self.sync()?;
        }
        // The map ends at a marker now: nothing left that the note was for.
        dir::clear_sync_failure(&self.dir)
    }

    /// Cuts `map` at `at` if it is longer (a torn or damaged tail).
    fn cut(&self, path: &Path, at: u64) -> Result<(), Error> {
        let len = self
            .map
            .metadata()
            .map_err(|e| io_error("cannot stat", path, e))?
            .len();
        if at < len {
            self.map
                .set_len(at)
                .and_then(|()| self.map.sync_all())
                .map_err(|e| io_error("cannot cut the torn tail of", path, e))?;
        }
        Ok(())
    }

    fn apply_replayed(&mut self, op: Op) -> Result<(), Error> {
        match op.first.checked_add(op.count) {
            Some(end) if end <= self.blocks => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "overlay map {} names blocks {}+{} of a volume of {} blocks",
                        self.dir.display(),
                        op.first,
                        op.count,
                        self.blocks
                    ),
                ));
            }
        }
        let (data, zero) = match op.kind {
            OpKind::Data => (true, false),
            OpKind::Zero => (false, true),
            OpKind::Unmap => {
                // Its space may not have been given back before the stop.
                self.to_punch.push((op.first, op.count));
                (false, false)
            }
        };
        self.data_bits.set_range(op.first, op.count, data);
        self.zero_bits.set_range(op.first, op.count, zero);
        Ok(())
    }
}

/// Creates (or empties) a file for reading and writing, owner-only.
pub(super) fn create_file(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error("cannot create", path, e))
}

/// Syncs directory `dir` (overlays live on the real file system, beside the
/// store's files).
pub(super) fn sync_dir(dir: &Path) -> Result<(), Error> {
    crate::fsutil::sync_dir(&crate::vfs::RealFs, dir)
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
pub(crate) mod tests;

//! A live file-system workload that records what it made durable and when, and
//! the check of a recovery point against that record.
//!
//! The writer works in a mounted file system: it creates files with content
//! derived from their sequence number (fsyncing each file and its directory),
//! renames some, deletes some (fsyncing the directory), and rewrites pages of a
//! "database" file in place (`pwrite` + `fdatasync`). For each operation it
//! records when it started and when its fsync returned (unix ms).
//!
//! A recovery point whose view was taken at `view_unix_ms` and acknowledged at
//! `acked_unix_ms` must then hold every operation made durable before the view,
//! and nothing that had not started by the acknowledgement. Operations in
//! between may or may not be there (a crash-consistent image is any state the
//! disk could have been in at that instant).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::SplitMix64;

/// Directory of the created files, under the file system's root.
pub const FILES_DIR: &str = "files";
/// The file rewritten in place.
pub const DB_FILE: &str = "db";
/// Pages of the database file.
pub const DB_PAGES: u64 = 16;
const PAGE_BYTES: usize = 4096;
/// Long names make the directory span many blocks (and an indexed directory on
/// ext4), so that a scan may catch it in the middle of a split. The writer
/// runs flat out: the more operations fall inside a scan, the likelier a
/// point read live is caught mixing moments.
const NAME_PADDING: usize = 120;
/// Files the writer keeps at least before it starts deleting.
const LIVE_FILES_MIN: usize = 24;

/// Unix milliseconds now, as the agent stamps its acknowledgements.
pub use blockrep_core::clock::now_unix_ms;

/// What one operation on a created file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// Written under its created name, file and directory fsynced.
    Create,
    /// Renamed to its renamed name, directory fsynced.
    Rename,
    /// Unlinked, directory fsynced.
    Delete,
}

/// One durable operation on file `seq`.
#[derive(Debug, Clone, Copy)]
pub struct FileEvent {
    pub seq: u64,
    pub op: FileOp,
    pub started_unix_ms: u64,
    /// When the last fsync of the operation returned; [`NEVER`] for the
    /// operation that failed half way.
    pub durable_unix_ms: u64,
}

/// `durable_unix_ms` of an operation that failed and may or may not have
/// reached the disk.
pub const NEVER: u64 = u64::MAX;

/// One in-place rewrite of a database page.
#[derive(Debug, Clone, Copy)]
pub struct PageEvent {
    pub page: u64,
    pub version: u64,
    pub started_unix_ms: u64,
    /// When `fdatasync` returned ([`NEVER`] if it failed).
    pub durable_unix_ms: u64,
}

/// Everything the writer did, in order.
#[derive(Debug, Clone, Default)]
pub struct DurableLog {
    pub files: Vec<FileEvent>,
    pub pages: Vec<PageEvent>,
}

/// Name of file `seq`: created, or after its rename.
pub fn file_name(seq: u64, renamed: bool) -> String {
    let tag = if renamed { 'r' } else { 'c' };
    format!("{seq:08}-{tag}-{}", "n".repeat(NAME_PADDING))
}

/// `(seq, renamed)` of a name [`file_name`] made.
pub fn parse_name(name: &str) -> Option<(u64, bool)> {
    let (seq, rest) = name.split_once('-')?;
    let renamed = match rest.split_once('-')? {
        ("c", padding) if padding.len() == NAME_PADDING => false,
        ("r", padding) if padding.len() == NAME_PADDING => true,
        _ => return None,
    };
    Some((seq.parse().ok()?, renamed))
}

/// Bytes stamped with `tag` and `version`, `len` long: a header of both, then
/// a blake3 stream of them, so that a misplaced or stale block is detected.
fn stamped(tag: u64, version: u64, len: usize) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&tag.to_le_bytes());
    hasher.update(&version.to_le_bytes());
    let mut bytes = vec![0; len];
    hasher.finalize_xof().fill(&mut bytes);
    let header = [tag.to_le_bytes(), version.to_le_bytes()].concat();
    let n = header.len().min(len);
    bytes[..n].copy_from_slice(&header[..n]);
    bytes
}

/// Content of file `seq`: 512 B to 64 KiB, so files span one to sixteen blocks
/// (and blocks freed by deletes are soon reused: a scan that mixes moments
/// shows as a file holding another's bytes).
pub fn file_content(seq: u64) -> Vec<u8> {
    let len = 512 + (seq.wrapping_mul(2_654_435_761) % (64 * 1024 - 512));
    stamped(seq, u64::MAX, len as usize)
}

/// Content of database page `page` at `version` (version 0: as first written).
pub fn page_content(page: u64, version: u64) -> Vec<u8> {
    stamped(page, version, PAGE_BYTES)
}

/// The writer thread; stopped (and joined) when dropped.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<DurableLog>>,
    handle: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Writer {
    /// Creates the files directory and the database file (every page at
    /// version 0), makes them durable, and starts writing under `root`.
    pub fn start(root: &Path, seed: u64) -> Self {
        let files = root.join(FILES_DIR);
        std::fs::create_dir(&files).unwrap();
        let mut db = File::create(root.join(DB_FILE)).unwrap();
        for page in 0..DB_PAGES {
            db.write_all(&page_content(page, 0)).unwrap();
        }
        db.sync_all().unwrap();
        File::open(root).unwrap().sync_all().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(DurableLog::default()));
        let (root, thread_stop, thread_log) =
            (root.to_owned(), Arc::clone(&stop), Arc::clone(&log));
        let handle = std::thread::spawn(move || write_loop(&root, seed, &thread_stop, &thread_log));
        Self {
            stop,
            log,
            handle: Some(handle),
        }
    }

    /// Operations made durable so far.
    pub fn operations(&self) -> usize {
        let log = self.log.lock().unwrap();
        log.files.len() + log.pages.len()
    }

    /// Files made durable so far.
    pub fn files(&self) -> usize {
        self.log.lock().unwrap().files.len()
    }

    /// Stops the writer and returns its record; panics with the writer's error
    /// if it failed.
    pub fn stop(self) -> DurableLog {
        let (log, result) = self.stop_either_way();
        if let Err(error) = result {
            panic!("the writer failed: {error}");
        }
        log
    }

    /// Whether the writer has ended by itself (an operation failed).
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops the writer; its record, and how it ended: the error of the
    /// operation that failed, if one did (the disk went away under it). The
    /// record holds only operations whose fsync succeeded.
    pub fn stop_either_way(mut self) -> (DurableLog, Result<(), String>) {
        self.stop.store(true, Ordering::Relaxed);
        let result = self.handle.take().unwrap().join().unwrap();
        (self.log.lock().unwrap().clone(), result)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn write_loop(
    root: &Path,
    seed: u64,
    stop: &AtomicBool,
    log: &Mutex<DurableLog>,
) -> Result<(), String> {
    let files = root.join(FILES_DIR);
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let directory = File::open(&files).map_err(|e| io("open the directory", e))?;
    let db = OpenOptions::new()
        .write(true)
        .open(root.join(DB_FILE))
        .map_err(|e| io("open the database", e))?;
    let mut rng = SplitMix64::new(seed);
    let (mut created, mut renamed): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    let mut versions = [0u64; DB_PAGES as usize];
    let file_event = |seq, op, started_unix_ms| {
        log.lock().unwrap().files.push(FileEvent {
            seq,
            op,
            started_unix_ms,
            durable_unix_ms: now_unix_ms(),
        });
    };
    // An operation that failed half way (the disk went away under it) may
    // have reached the disk all the same: it is recorded as started and
    // never durable, so a check allows either outcome.
    let attempted = |seq, op, started_unix_ms, result: Result<(), String>| {
        result.inspect_err(|_| {
            log.lock().unwrap().files.push(FileEvent {
                seq,
                op,
                started_unix_ms,
                durable_unix_ms: NEVER,
            });
        })
    };
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let started = now_unix_ms();
        let path = files.join(file_name(seq, false));
        let created_file = (|| {
            let mut file = File::create_new(&path).map_err(|e| io("create", e))?;
            file.write_all(&file_content(seq))
                .map_err(|e| io("write", e))?;
            file.sync_all().map_err(|e| io("fsync a file", e))?;
            directory
                .sync_all()
                .map_err(|e| io("fsync the directory", e))
        })();
        attempted(seq, FileOp::Create, started, created_file)?;
        file_event(seq, FileOp::Create, started);
        created.push(seq);

        if seq % 3 == 0 && created.len() > 1 {
            // Any file but the newest.
            let victim = created.swap_remove(rng.index(created.len() - 1));
            let started = now_unix_ms();
            let moved = std::fs::rename(
                files.join(file_name(victim, false)),
                files.join(file_name(victim, true)),
            )
            .map_err(|e| io("rename", e))
            .and_then(|()| {
                directory
                    .sync_all()
                    .map_err(|e| io("fsync the directory", e))
            });
            attempted(victim, FileOp::Rename, started, moved)?;
            file_event(victim, FileOp::Rename, started);
            renamed.push(victim);
        }

        if seq % 2 == 0 && created.len() + renamed.len() > LIVE_FILES_MIN {
            let from_renamed = !renamed.is_empty() && rng.below(2) == 0;
            let (list, was_renamed) = if from_renamed {
                (&mut renamed, true)
            } else {
                (&mut created, false)
            };
            let victim = list.swap_remove(rng.index(list.len()));
            let started = now_unix_ms();
            let removed = std::fs::remove_file(files.join(file_name(victim, was_renamed)))
                .map_err(|e| io("unlink", e))
                .and_then(|()| {
                    directory
                        .sync_all()
                        .map_err(|e| io("fsync the directory", e))
                });
            attempted(victim, FileOp::Delete, started, removed)?;
            file_event(victim, FileOp::Delete, started);
        }

        let page = rng.below(DB_PAGES);
        versions[page as usize] += 1;
        let version = versions[page as usize];
        let started = now_unix_ms();
        let rewritten = db
            .write_all_at(&page_content(page, version), page * PAGE_BYTES as u64)
            .map_err(|e| io("pwrite the database", e))
            .and_then(|()| db.sync_data().map_err(|e| io("fdatasync the database", e)));
        if let Err(error) = rewritten {
            // Its bytes may have reached the disk all the same.
            log.lock().unwrap().pages.push(PageEvent {
                page,
                version,
                started_unix_ms: started,
                durable_unix_ms: NEVER,
            });
            return Err(error);
        }
        log.lock().unwrap().pages.push(PageEvent {
            page,
            version,
            started_unix_ms: started,
            durable_unix_ms: now_unix_ms(),
        });
    }
    Ok(())
}

/// Where a file is in some state of the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Created,
    Renamed,
    Absent,
}

fn place_after(op: FileOp) -> Place {
    match op {
        FileOp::Create => Place::Created,
        FileOp::Rename => Place::Renamed,
        FileOp::Delete => Place::Absent,
    }
}

/// What [`verify`] checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Verified {
    /// Files made durable before the view (present or rightly absent).
    pub files_durable: usize,
    /// Of those, files read and compared.
    pub files_read: usize,
    /// Database pages compared.
    pub pages: u64,
}

/// Checks the file system mounted at `root` (a recovery point) against the
/// writer's `log`: every operation durable before `view_unix_ms` is there,
/// nothing that started after `acked_unix_ms` is, and every file read has
/// exactly its content. Returns what was checked, or the problems found.
pub fn verify(
    log: &DurableLog,
    root: &Path,
    view_unix_ms: u64,
    acked_unix_ms: u64,
) -> Result<Verified, Vec<String>> {
    let mut problems = Vec::new();
    let mut verified = Verified::default();
    // What the recovery point holds: seq -> names found.
    let mut found: BTreeMap<u64, Vec<(bool, PathBuf)>> = BTreeMap::new();
    let files = root.join(FILES_DIR);
    match std::fs::read_dir(&files) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                match parse_name(&name) {
                    Some((seq, renamed)) => {
                        found.entry(seq).or_default().push((renamed, entry.path()))
                    }
                    None => problems.push(format!("unexpected file {name:?}")),
                }
            }
        }
        Err(e) => problems.push(format!("cannot list {}: {e}", files.display())),
    }

    let mut events: BTreeMap<u64, Vec<FileEvent>> = BTreeMap::new();
    for event in &log.files {
        events.entry(event.seq).or_default().push(*event);
    }
    for (seq, history) in &events {
        let names = found.remove(seq).unwrap_or_default();
        let observed = match names.as_slice() {
            [] => Place::Absent,
            [(false, _)] => Place::Created,
            [(true, _)] => Place::Renamed,
            _ => {
                problems.push(format!("file {seq} is there under both names"));
                continue;
            }
        };
        let durable = history
            .iter()
            .rposition(|e| e.durable_unix_ms < view_unix_ms);
        let Some(durable) = durable else {
            // Not durable at the view: it may be anywhere between absent and
            // written, but not if it had not even been started by the ack.
            if observed != Place::Absent && history[0].started_unix_ms > acked_unix_ms {
                problems.push(format!(
                    "file {seq} is there although its creation started at {}, after the point was acknowledged at {acked_unix_ms}",
                    history[0].started_unix_ms
                ));
            }
            continue;
        };
        verified.files_durable += 1;
        // Any state from the last one durable before the view to the last
        // one started before the acknowledgement.
        let latest = history
            .iter()
            .rposition(|e| e.started_unix_ms <= acked_unix_ms)
            .unwrap_or(durable)
            .max(durable);
        let allowed: Vec<Place> = history[durable..=latest]
            .iter()
            .map(|e| place_after(e.op))
            .collect();
        if !allowed.contains(&observed) {
            let e = history[durable];
            problems.push(format!(
                "file {seq}: {:?} at the point, expected one of {allowed:?} ({:?} made durable at {} < view {view_unix_ms})",
                observed, e.op, e.durable_unix_ms
            ));
            continue;
        }
        if let [(_, path)] = names.as_slice() {
            verified.files_read += 1;
            match std::fs::read(path) {
                Ok(bytes) if bytes == file_content(*seq) => {}
                Ok(bytes) => problems.push(format!(
                    "file {seq} (durable at {}) holds {} bytes that differ from its {} written bytes",
                    history[0].durable_unix_ms,
                    bytes.len(),
                    file_content(*seq).len()
                )),
                Err(e) => problems.push(format!("cannot read file {seq}: {e}")),
            }
        }
    }
    for seq in found.keys() {
        problems.push(format!("file {seq} was never written"));
    }

    match std::fs::read(root.join(DB_FILE)) {
        Ok(db) if db.len() == DB_PAGES as usize * PAGE_BYTES => {
            for page in 0..DB_PAGES {
                let history: Vec<&PageEvent> =
                    log.pages.iter().filter(|e| e.page == page).collect();
                let durable = history
                    .iter()
                    .filter(|e| e.durable_unix_ms < view_unix_ms)
                    .map(|e| e.version)
                    .max()
                    .unwrap_or(0);
                let mut allowed = vec![durable];
                allowed.extend(
                    history
                        .iter()
                        .filter(|e| e.version > durable && e.started_unix_ms <= acked_unix_ms)
                        .map(|e| e.version),
                );
                let bytes = &db[page as usize * PAGE_BYTES..][..PAGE_BYTES];
                if !holds_versions(bytes, page, &allowed) {
                    let header =
                        |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
                    problems.push(format!(
                        "database page {page}: holds page {} version {} (or torn), expected a version in {allowed:?}",
                        header(0),
                        header(8)
                    ));
                }
                verified.pages += 1;
            }
        }
        Ok(db) => problems.push(format!("the database holds {} bytes", db.len())),
        Err(e) => problems.push(format!("cannot read the database: {e}")),
    }
    if problems.is_empty() {
        Ok(verified)
    } else {
        Err(problems)
    }
}

/// The size of a sector: what a disk writes whole or not at all.
const SECTOR_BYTES: usize = 512;

/// Whether database page `page` holds one of the `allowed` versions, or,
/// sector by sector, a mix of them: a write in flight when the disk stopped
/// (unacknowledged, so a later version than the durable one) may have
/// reached some of its sectors and not others, as on any disk. A sector of
/// any other content is not allowed.
fn holds_versions(bytes: &[u8], page: u64, allowed: &[u64]) -> bool {
    let versions: Vec<Vec<u8>> = allowed.iter().map(|v| page_content(page, *v)).collect();
    if versions.iter().any(|v| v.as_slice() == bytes) {
        return true;
    }
    bytes.chunks(SECTOR_BYTES).enumerate().all(|(i, sector)| {
        versions
            .iter()
            .any(|v| &v[i * SECTOR_BYTES..][..sector.len()] == sector)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_torn_between_allowed_versions_by_sectors_is_allowed_and_nothing_else() {
        let (old, new) = (page_content(3, 24), page_content(3, 25));
        let mut torn = new.clone();
        torn[SECTOR_BYTES..].copy_from_slice(&old[SECTOR_BYTES..]);
        assert!(holds_versions(&new, 3, &[24, 25]));
        assert!(holds_versions(&torn, 3, &[24, 25]));
        // Torn with a version that is not allowed, or torn inside a sector.
        assert!(!holds_versions(&torn, 3, &[25, 26]));
        let mut split = new.clone();
        split[100..].copy_from_slice(&old[100..]);
        assert!(!holds_versions(&split, 3, &[24, 25]));
        let mut garbage = old.clone();
        garbage[2000] ^= 1;
        assert!(!holds_versions(&garbage, 3, &[24, 25]));
    }
}

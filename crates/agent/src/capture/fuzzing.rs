//! The capture export under a hostile NBD client, for the cargo-fuzz target
//! `capture_export` (`fuzz/`) and the corpus replay test
//! (`tests/it/fuzz_corpus.rs`). Not part of the API: panics are the point.
//!
//! Input: one flags byte, then the bytes a client sends, fed to
//! [`blockrep_nbd::NbdServer::serve_connection`]. Every few writes (1 to 8,
//! flag bits 2-4), just before the write, the previous cut is checked and
//! then committed or dropped, and a new cut is taken with a copy of the disk
//! made at its instant; so each cut is checked after the writes that came
//! after it. Flag bit 0 gives cuts a preserve budget of 2 blocks (so they
//! turn live); bit 1 makes the first cut full.
//!
//! Checked: nothing panics, the disk file keeps its size, and a cut that
//! stayed crash-consistent reads every sealed chunk exactly as the copy
//! made at its instant, whatever the client wrote in between.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use blockrep_core::{ChunkId, Consistency, Geometry};
use blockrep_nbd::{Client, Export, Limits, NbdServer, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Capture, CaptureOptions, Cut};

/// The fuzzed disk: not a whole number of blocks, so the short last block
/// and chunk are exercised.
pub const FUZZ_DISK_BYTES: u64 = 96 * 1024 + 1000;
const CHUNK_BYTES: u32 = 16 * 1024;

/// What one run did, so seeds can be checked to reach their states.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Writes and write-zeroes the export served.
    pub writes: u64,
    /// Cuts checked against their copy.
    pub cuts_checked: u64,
}

struct AnyName(Arc<dyn Export>);

impl Registry for AnyName {
    fn lookup(&self, _client: &Client, _name: &str) -> Option<Arc<dyn Export>> {
        Some(Arc::clone(&self.0))
    }
    fn list(&self, _client: &Client) -> Vec<(String, String)> {
        vec![("disk".into(), String::new())]
    }
}

/// The cut being checked, and what the checks found.
#[derive(Default)]
struct Checker {
    writes_seen: u64,
    cut: Option<(Arc<Cut>, Vec<u8>)>,
    outcome: Outcome,
    /// The first failed check. Requests run on the blocking pool, where a
    /// panic would only end the connection: failures are kept and asserted
    /// once the client is gone.
    failure: Option<String>,
}

/// The capture export with cuts taken between the client's writes.
struct Cutting {
    capture: Arc<Capture>,
    inner: Arc<dyn Export>,
    disk: PathBuf,
    geometry: Geometry,
    cut_every: u64,
    first_full: bool,
    checker: Mutex<Checker>,
}

impl Cutting {
    fn before_write(&self) {
        let mut checker = self.checker.lock().unwrap_or_else(PoisonError::into_inner);
        checker.writes_seen += 1;
        if !(checker.writes_seen - 1).is_multiple_of(self.cut_every) {
            return;
        }
        let full = checker.writes_seen == 1 && self.first_full;
        if let Some((cut, copy)) = checker.cut.take() {
            let checked = check_cut(&cut, &copy, self.geometry);
            checker.record(checked);
            let root = ChunkId([checker.outcome.cuts_checked as u8; 32]);
            if checker.outcome.cuts_checked.is_multiple_of(2) {
                cut.committed(root);
            }
        }
        let mut copy = Vec::new();
        let cut = self.capture.cut_at(full, || {
            copy = std::fs::read(&self.disk).unwrap_or_default();
        });
        checker.cut = Some((cut, copy));
    }
}

impl Checker {
    fn record(&mut self, checked: Result<(), String>) {
        match checked {
            Ok(()) => self.outcome.cuts_checked += 1,
            Err(failure) => {
                self.failure.get_or_insert(failure);
            }
        }
    }
}

impl Export for Cutting {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.before_write();
        self.inner.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.before_write();
        self.inner.write_zeroes(offset, len)
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn multi_conn_safe(&self) -> bool {
        self.inner.multi_conn_safe()
    }
}

fn initial_content() -> Vec<u8> {
    (0..FUZZ_DISK_BYTES)
        .map(|i| (i / 4096 * 7 + i % 13) as u8)
        .collect()
}

/// Runs `data` against a capture export on a disk file in `dir`.
pub fn drive_capture_export(dir: &Path, data: &[u8]) -> Outcome {
    let Some((&flags, stream)) = data.split_first() else {
        return Outcome::default();
    };
    std::fs::create_dir_all(dir).expect("fuzz directory");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, initial_content()).expect("fuzz disk");
    let mut options = CaptureOptions::beside(&disk);
    options.preserve_memory_bytes = 8 * 1024;
    options.preserve_max_bytes = if flags & 1 != 0 { 8 * 1024 } else { 1 << 20 };
    let capture = Capture::open(&disk, options).expect("capture opens");
    let cutting = Arc::new(Cutting {
        inner: capture.export(),
        capture: Arc::clone(&capture),
        disk: disk.clone(),
        geometry: Geometry::new(FUZZ_DISK_BYTES, CHUNK_BYTES).expect("geometry"),
        cut_every: u64::from((flags >> 2) & 7) + 1,
        first_full: flags & 2 != 0,
        checker: Mutex::new(Checker::default()),
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let server = Arc::new(NbdServer::new(
            Arc::new(AnyName(Arc::clone(&cutting) as Arc<dyn Export>)),
            Limits::default(),
        ));
        let (client, server_end) = tokio::io::duplex(1 << 16);
        let serving = tokio::spawn(async move {
            let _ = server.serve_connection(server_end, Client::new(None)).await;
        });
        let (mut replies, mut requests) = tokio::io::split(client);
        let drain = async {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(replies.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let feed = async {
            // The server may close first (a broken stream): then stop.
            let _ = requests.write_all(stream).await;
            let _ = requests.shutdown().await;
        };
        tokio::join!(feed, drain);
        let _ = serving.await;
    });
    // Every write has run: the last cut must still read as of its instant.
    let mut checker = cutting
        .checker
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((cut, copy)) = checker.cut.take() {
        let checked = check_cut(&cut, &copy, cutting.geometry);
        checker.record(checked);
    }
    if let Some(failure) = &checker.failure {
        panic!("{failure}");
    }
    let size = std::fs::metadata(&disk).expect("disk metadata").len();
    assert_eq!(size, FUZZ_DISK_BYTES, "the client changed the disk's size");
    let mut outcome = checker.outcome.clone();
    outcome.writes = capture.stats().writes;
    outcome
}

/// Reads every chunk of `cut` and compares it with `copy` (unless the cut
/// turned live); releases every third chunk and checks it no longer reads.
fn check_cut(cut: &Cut, copy: &[u8], geometry: Geometry) -> Result<(), String> {
    let chunks = cut.chunks(geometry);
    for (position, &index) in chunks.iter().enumerate() {
        let range = geometry
            .chunk_range(index)
            .ok_or(format!("chunk {index} is past the disk"))?;
        let mut buf = vec![0u8; range.len()];
        cut.read_at(range.start as u64, &mut buf)
            .map_err(|e| format!("sealed chunk {index} does not read: {e}"))?;
        if cut.consistency() == Consistency::CrashConsistent && buf != copy[range.clone()] {
            return Err(format!("chunk {index} differs from the disk at the cut"));
        }
        for (offset, len) in cut.written_ranges(geometry, index) {
            if offset as usize + len as usize > range.len() || len == 0 {
                return Err(format!("range {offset}+{len} of chunk {index} is wrong"));
            }
        }
        if position % 3 == 2 {
            cut.release(geometry, index);
            if cut.read_at(range.start as u64, &mut buf).is_ok() {
                return Err(format!("released chunk {index} still reads"));
            }
        }
    }
    Ok(())
}

/// Seed inputs: a client that negotiates the default export and writes,
/// zeroes, trims, flushes and reads across the disk (the last, short chunk
/// included), once with the full budget and once with a tiny one.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut stream = Vec::new();
    stream.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    stream.extend_from_slice(b"IHAVEOPT");
    stream.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    stream.extend_from_slice(&0u32.to_be_bytes()); // the default export
    let mut request = |command: u16, flags: u16, offset: u64, len: u32, payload: bool| {
        stream.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        stream.extend_from_slice(&flags.to_be_bytes());
        stream.extend_from_slice(&command.to_be_bytes());
        stream.extend_from_slice(&7u64.to_be_bytes());
        stream.extend_from_slice(&offset.to_be_bytes());
        stream.extend_from_slice(&len.to_be_bytes());
        if payload {
            stream.extend((0..len).map(|i| (i % 251) as u8 ^ 0x5a));
        }
    };
    for round in 0..3u64 {
        request(1, 0, round * 4096 + 100, 5000, true); // WRITE across blocks
        request(1, 1, FUZZ_DISK_BYTES - 600, 600, true); // WRITE, FUA, the tail
        request(6, 0, 40_000 + round * 512, 9000, false); // WRITE_ZEROES
        request(4, 0, 0, 8192, false); // TRIM
        request(0, 0, 0, 4096, false); // READ
        request(3, 0, 0, 0, false); // FLUSH
    }
    request(1, 0, FUZZ_DISK_BYTES - 10, 4096, false); // past the end: refused
    request(2, 0, 0, 0, false); // DISC
    let with = |flags: u8| {
        let mut input = vec![flags];
        input.extend_from_slice(&stream);
        input
    };
    vec![
        ("writes", with(1 << 2)),
        ("writes-full-cut", with((2 << 2) | 2)),
        ("writes-tiny-budget", with(1)),
    ]
}

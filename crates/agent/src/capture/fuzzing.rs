//! The capture export under a hostile NBD client, for the cargo-fuzz target
//! `capture_export` (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`). Not part of the API: panics are the point.
//!
//! Input: one flags byte, then the bytes a client sends, fed to
//! [`blockrep_nbd::NbdServer::serve_connection`] in pieces. Before each piece
//! a cut is taken (with a copy of the disk made at its instant) and the
//! previous cut is checked, then committed or dropped. Flags: bit 0 gives
//! cuts a preserve budget of 2 blocks (so they turn live), bit 1 makes the
//! first cut full, bits 2-4 pick the piece size (16 << n bytes).
//!
//! Checked: nothing panics, the disk file keeps its size, and a cut that
//! stayed crash-consistent reads every sealed chunk exactly as the copy
//! made at its instant, however the client wrote in between.

use std::path::Path;
use std::sync::Arc;

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
    let geometry = Geometry::new(FUZZ_DISK_BYTES, CHUNK_BYTES).expect("geometry");
    let piece_bytes = 16usize << ((flags >> 2) & 7);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut outcome = Outcome::default();
    runtime.block_on(async {
        let server = Arc::new(NbdServer::new(
            Arc::new(AnyName(capture.export())),
            Limits::default(),
        ));
        let (mut client, server_end) = tokio::io::duplex(1 << 16);
        let serving = tokio::spawn(async move {
            let _ = server.serve_connection(server_end, Client::new(None)).await;
        });
        let (mut replies, mut requests) = tokio::io::split(&mut client);
        let drain = async {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(replies.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let feed = async {
            let mut previous: Option<(Arc<Cut>, Vec<u8>)> = None;
            for (number, piece) in stream.chunks(piece_bytes).enumerate() {
                let full = number == 0 && flags & 2 != 0;
                let cut = checked_cut(&capture, &disk, full, geometry, &mut previous, &mut outcome);
                previous = Some(cut);
                if requests.write_all(piece).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = requests.shutdown().await;
            previous
        };
        let (last, ()) = tokio::join!(feed, drain);
        let _ = serving.await;
        // Every write has run: the last cut must still read as of its instant.
        if let Some((cut, copy)) = last {
            check_cut(&cut, &copy, geometry, &mut outcome);
        }
    });
    let size = std::fs::metadata(&disk).expect("disk metadata").len();
    assert_eq!(size, FUZZ_DISK_BYTES, "the client changed the disk's size");
    outcome.writes = capture.stats().writes;
    outcome
}

/// Checks and ends the previous cut (committing every other one), then
/// cuts anew with a copy of the disk taken at the instant.
fn checked_cut(
    capture: &Arc<Capture>,
    disk: &Path,
    full: bool,
    geometry: Geometry,
    previous: &mut Option<(Arc<Cut>, Vec<u8>)>,
    outcome: &mut Outcome,
) -> (Arc<Cut>, Vec<u8>) {
    if let Some((cut, copy)) = previous.take() {
        check_cut(&cut, &copy, geometry, outcome);
        if outcome.cuts_checked.is_multiple_of(2) {
            cut.committed(ChunkId([outcome.cuts_checked as u8; 32]));
        }
    }
    let mut copy = Vec::new();
    let cut = capture.cut_at(full, || {
        copy = std::fs::read(disk).expect("copy at the cut");
    });
    (cut, copy)
}

fn check_cut(cut: &Cut, copy: &[u8], geometry: Geometry, outcome: &mut Outcome) {
    let chunks = cut.chunks(geometry);
    for (position, &index) in chunks.iter().enumerate() {
        let range = geometry.chunk_range(index).expect("chunk in the disk");
        let mut buf = vec![0u8; range.len()];
        cut.read_at(range.start as u64, &mut buf)
            .expect("a sealed chunk reads");
        if cut.consistency() == Consistency::CrashConsistent {
            assert!(
                buf == copy[range.clone()],
                "chunk {index} differs from the disk at the cut"
            );
        }
        for (offset, len) in cut.written_ranges(geometry, index) {
            assert!(offset as usize + len as usize <= range.len());
        }
        if position % 3 == 2 {
            cut.release(geometry, index);
            assert!(cut.read_at(range.start as u64, &mut buf).is_err());
        }
    }
    outcome.cuts_checked += 1;
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
        ("writes", with(4 << 2)),
        ("writes-full-cut", with((3 << 2) | 2)),
        ("writes-tiny-budget", with((5 << 2) | 1)),
    ]
}

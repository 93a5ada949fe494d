//! Stream corruption below TLS: the real agent library, with the
//! `fault-injection` tap in its configuration, replicates to a real server on
//! 127.0.0.1 (in process, over mutual TLS) while the tap flips bits in one
//! plaintext frame (header fields or payload) or cuts the stream inside one.
//! TLS delivers the damage faithfully; the protocol must catch every case
//! before anything is committed, and a clean session afterwards must converge.
//!
//! `BLOCKREP_CORRUPT_INJECTIONS` (default 400) scales the run and
//! `BLOCKREP_CORRUPT_SEED` picks another sequence of injections.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::env_u64;
use blockrep_agent::fault::{Injection, Region, SharedTap, StreamCorrupter};
use blockrep_agent::{AgentConfig, Compression, EpochReport, Error};
use blockrep_core::{ChunkId, Geometry, Root, SourceId, scan_buffer};
use blockrep_proto::ErrorCode;
use blockrep_server::{Server, ServerConfig};
use blockrep_store::Store;
use blockrep_testkit::{Pki, SplitMix64, random_bytes};

const SOURCE: &str = "corrupt";
const CHUNK_BYTES: usize = 64 << 10;
const DISK_CHUNKS: usize = 64;
/// Chunks each iteration changes: two random (sent raw), two compressible
/// (zstd), one zeroed (a zero chunk frame) and one copy of a chunk the server
/// holds (a reference frame).
const CHANGED_PER_ITERATION: usize = 6;
/// Frame types of an agent session that resumes a replica with one changed
/// index page: Hello, GetPages, Backlog, Offer, the chunks, Commit.
const HELLO: u8 = 1;
const GET_PAGES: u8 = 3;
const CHUNK: u8 = 5;
const COMMIT: u8 = 6;
const BACKLOG: u8 = 9;
const OFFER: u8 = 10;
/// A session the server never ends (it would wait at most its idle timeout).
const SESSION_TIME_MAX: Duration = Duration::from_secs(30);
/// The server's idle timeout: a frame whose length field was made larger waits
/// this long for bytes that never come.
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A byte other than zero, to flip at least one bit.
fn nonzero_byte(rng: &mut SplitMix64) -> u8 {
    (rng.index(255) + 1) as u8
}

fn expected_frames() -> Vec<u8> {
    let mut frames = vec![HELLO, GET_PAGES, BACKLOG, OFFER];
    frames.extend([CHUNK; CHANGED_PER_ITERATION]);
    frames.push(COMMIT);
    frames
}

/// Picks the next injection: flips alternate between header and payload
/// bytes, over every frame type the session sends that has such bytes; one in
/// four injections is a truncation inside a frame (or just before it).
fn pick_injection(rng: &mut SplitMix64, number: u64) -> Injection {
    if number % 4 == 3 {
        return Injection::Truncate {
            frame_number: rng.index(expected_frames().len()) as u32,
            position: rng.next_u64(),
        };
    }
    let region = if (number - number / 4) % 2 == 0 {
        Region::Header
    } else {
        Region::Payload
    };
    let types: &[u8] = match region {
        Region::Header => &[HELLO, GET_PAGES, BACKLOG, OFFER, CHUNK, COMMIT],
        Region::Payload => &[HELLO, GET_PAGES, OFFER, CHUNK, COMMIT],
    };
    let frame_type = types[rng.index(types.len())];
    let occurrence = if frame_type == CHUNK {
        rng.index(CHANGED_PER_ITERATION) as u32
    } else {
        0
    };
    // One bit, one byte, or a burst of up to four bytes.
    let masks = match rng.index(3) {
        0 => vec![1u8 << rng.index(8)],
        1 => vec![nonzero_byte(rng)],
        _ => (0..2 + rng.index(3)).map(|_| nonzero_byte(rng)).collect(),
    };
    Injection::Flip {
        frame_type,
        occurrence,
        region,
        position: rng.next_u64(),
        masks,
    }
}

struct Harness {
    pki: Pki,
    work: tempfile::TempDir,
    addr: SocketAddr,
    store: Arc<Store>,
    source: SourceId,
    disk: Vec<u8>,
    geometry: Geometry,
}

impl Harness {
    fn disk_path(&self) -> PathBuf {
        self.work.path().join("disk.raw")
    }

    fn write_disk(&self) {
        std::fs::write(self.disk_path(), &self.disk).unwrap();
    }

    fn config(&self, tap: Option<SharedTap>) -> AgentConfig {
        let mut config = AgentConfig::new(
            self.disk_path(),
            self.addr.to_string(),
            self.source.clone(),
            self.pki.cert("ca"),
            self.pki.cert(SOURCE),
            self.pki.key(SOURCE),
        );
        config.chunk_size_bytes = CHUNK_BYTES as u32;
        // Always zstd where it pays, so that every iteration sends the same
        // frames (the adaptive policy could turn compression off).
        config.compression = Compression::Zstd;
        // Whole chunks, the frames this test's model injects into (patch
        // frames are refused by their own checks: tests/patches.rs).
        config.patches = false;
        config.plaintext_tap = tap;
        config
    }

    fn chunk(&self, index: usize) -> &[u8] {
        &self.disk[index * CHUNK_BYTES..(index + 1) * CHUNK_BYTES]
    }

    fn disk_root(&self) -> ChunkId {
        Root::from_chunk_ids(self.geometry, &scan_buffer(&self.disk, self.geometry)).id()
    }

    fn head(&self) -> Option<(u64, ChunkId)> {
        self.store
            .head(&self.source)
            .unwrap()
            .map(|h| (h.epoch, h.root))
    }

    /// Changes `CHANGED_PER_ITERATION` distinct chunks; returns the ids of the
    /// chunks the agent will have to send with data.
    fn mutate(&mut self, rng: &mut SplitMix64, iteration: u64) -> Vec<ChunkId> {
        let mut indices: Vec<usize> = Vec::new();
        // The zeroed chunk must hold data now, the copied one too (and stay).
        let nonzero: Vec<usize> = (0..DISK_CHUNKS)
            .filter(|&i| self.chunk(i).iter().any(|&b| b != 0))
            .collect();
        let zeroed = nonzero[rng.index(nonzero.len())];
        let copied = loop {
            let candidate = nonzero[rng.index(nonzero.len())];
            if candidate != zeroed {
                break candidate;
            }
        };
        let held = self.chunk(copied).to_vec();
        indices.push(zeroed);
        // The copy must change the chunk it lands on.
        loop {
            let index = rng.index(DISK_CHUNKS);
            if index != copied && index != zeroed && self.chunk(index) != held {
                indices.push(index);
                break;
            }
        }
        while indices.len() < CHANGED_PER_ITERATION {
            let index = rng.index(DISK_CHUNKS);
            if index != copied && !indices.contains(&index) {
                indices.push(index);
            }
        }
        let mut data_ids = Vec::new();
        for (slot, &index) in indices.iter().enumerate() {
            let seed = iteration * 16 + slot as u64;
            let content = match slot {
                0 => vec![0u8; CHUNK_BYTES],
                1 => held.clone(),
                2 | 3 => random_bytes(CHUNK_BYTES, seed ^ 0xC0DE),
                _ => format!("blockrep stream corruption {seed}: the quick brown fox. ")
                    .into_bytes()
                    .into_iter()
                    .cycle()
                    .take(CHUNK_BYTES)
                    .collect(),
            };
            if (2..CHANGED_PER_ITERATION).contains(&slot) {
                data_ids.push(ChunkId::from(blake3::hash(&content)));
            }
            self.disk[index * CHUNK_BYTES..(index + 1) * CHUNK_BYTES].copy_from_slice(&content);
        }
        self.write_disk();
        data_ids
    }

    /// Reads the committed replica back chunk by chunk from the store (every
    /// blob read is blake3-checked) and compares it with the disk.
    fn assert_replica_equals_disk(&self) {
        let (_, root_id) = self.head().expect("a committed head");
        let root = self.store.read_root(&root_id).unwrap();
        let ids = self.store.chunk_ids(&root).unwrap();
        for (index, id) in ids.iter().enumerate() {
            let expected = self.chunk(index);
            if id.is_zero() {
                assert!(
                    expected.iter().all(|&b| b == 0),
                    "chunk {index} is zero on the replica only"
                );
            } else {
                let data = self.store.read_blob(id).unwrap();
                assert!(data == expected, "chunk {index} differs from the disk");
            }
        }
    }

    /// A clean session, and the types of the frames it sent; a session the
    /// server has not finished tearing down yet makes it `Busy` for a moment.
    async fn clean_run(&self) -> (Vec<EpochReport>, Vec<u8>) {
        for _ in 0..100 {
            let recorder = Arc::new(Mutex::new(StreamCorrupter::new(Injection::Nothing)));
            let config = self.config(Some(recorder.clone()));
            match blockrep_agent::run_once(&config, |_| {}).await {
                Ok(outcome) => {
                    let frames = recorder.lock().unwrap().frames().to_vec();
                    return (
                        outcome.epochs,
                        frames.iter().map(|f| f.frame_type).collect(),
                    );
                }
                Err(Error::Refused {
                    code: ErrorCode::Busy,
                    ..
                }) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("a clean session failed: {e}"),
            }
        }
        panic!("the source stayed busy");
    }
}

/// How the injected session ended, for the breakdown.
fn reason(result: &Result<blockrep_agent::RunOutcome, Error>) -> String {
    match result {
        Ok(_) => "committed".into(),
        Err(Error::Refused { code, .. }) => format!("server: {code}"),
        Err(Error::Lost(_)) => "connection ended".into(),
        Err(Error::Protocol(_)) => "agent: protocol error".into(),
        Err(other) => format!("other: {other}"),
    }
}

fn describe(injection: &Injection) -> String {
    match injection {
        Injection::Flip {
            frame_type,
            occurrence,
            region,
            masks,
            ..
        } => format!("flip {masks:02x?} in {region:?} of frame type {frame_type} #{occurrence}"),
        Injection::Truncate { frame_number, .. } => format!("truncate in frame #{frame_number}"),
        Injection::Nothing => "nothing".into(),
    }
}

async fn start_server(pki: &Pki, data: &Path) -> (SocketAddr, Arc<Store>) {
    let mut config = ServerConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        data.to_owned(),
        pki.path().to_owned(),
    );
    config.admin_listen = None;
    config.retention = None;
    config.gc_interval = None;
    config.idle_timeout = IDLE_TIMEOUT;
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let store = server.store();
    tokio::spawn(server.run(std::future::pending()));
    (addr, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_truncated_plaintext_is_always_detected_before_commit() {
    let injections = env_u64("BLOCKREP_CORRUPT_INJECTIONS").unwrap_or(400);
    let seed = env_u64("BLOCKREP_CORRUPT_SEED").unwrap_or(0x5EED_C0AA);
    let mut rng = SplitMix64::new(seed);
    let pki = Pki::new(&[SOURCE]);
    let work = tempfile::tempdir().unwrap();
    let (addr, store) = start_server(&pki, &work.path().join("data")).await;
    // A disk of random, text-like and zero chunks, replicated once cleanly.
    let mut disk = Vec::with_capacity(DISK_CHUNKS * CHUNK_BYTES);
    for index in 0..DISK_CHUNKS {
        match index % 3 {
            0 => disk.extend(random_bytes(CHUNK_BYTES, index as u64)),
            1 => disk.extend(std::iter::repeat_n(b'a' + (index % 26) as u8, CHUNK_BYTES)),
            _ => disk.extend(std::iter::repeat_n(0u8, CHUNK_BYTES)),
        }
    }
    let geometry = Geometry::new(disk.len() as u64, CHUNK_BYTES as u32).unwrap();
    let mut harness = Harness {
        pki,
        work,
        addr,
        store,
        source: SourceId::new(SOURCE).unwrap(),
        disk,
        geometry,
    };
    harness.write_disk();
    harness.clean_run().await;
    harness.assert_replica_equals_disk();

    let (mut flips_header, mut flips_payload, mut truncations) = (0u64, 0u64, 0u64);
    let (mut detected, mut committed_corrupt) = (0u64, 0u64);
    let (mut resent_bytes, mut dirty_bytes) = (0u64, 0u64);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut undetected: Vec<String> = Vec::new();
    for number in 0..injections {
        let data_ids = harness.mutate(&mut rng, number);
        dirty_bytes += (CHANGED_PER_ITERATION * CHUNK_BYTES) as u64;
        let injection = pick_injection(&mut rng, number);
        match &injection {
            Injection::Flip {
                region: Region::Header,
                ..
            } => flips_header += 1,
            Injection::Flip { .. } => flips_payload += 1,
            Injection::Truncate { .. } => truncations += 1,
            Injection::Nothing => unreachable!("every injection changes the stream"),
        }
        let head_before = harness.head();
        let blobs_before = harness.store.blob_count();
        // What this epoch may add to the store: its data chunks, its index
        // page and its root, where the store does not hold them yet.
        let new_root = Root::from_chunk_ids(
            harness.geometry,
            &scan_buffer(&harness.disk, harness.geometry),
        );
        let mut expected_new: HashSet<ChunkId> = data_ids.iter().copied().collect();
        expected_new.extend(new_root.page_ids().iter().copied());
        expected_new.insert(new_root.id());
        expected_new.retain(|id| !harness.store.contains(id));

        let corrupter = Arc::new(Mutex::new(StreamCorrupter::new(injection.clone())));
        let config = harness.config(Some(corrupter.clone()));
        let result =
            tokio::time::timeout(SESSION_TIME_MAX, blockrep_agent::run_once(&config, |_| {}))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "injection {number} ({}): the session hung",
                        describe(&injection)
                    )
                });
        let applied = corrupter.lock().unwrap().applied().cloned();
        let applied = applied.unwrap_or_else(|| {
            panic!(
                "injection {number} ({}) never found its frame; frames seen: {:?}",
                describe(&injection),
                corrupter.lock().unwrap().frames()
            )
        });

        // Every injection lies at or before the end of the Commit frame, the
        // last frame of the session: nothing may be committed.
        let head_after = harness.head();
        let moved = head_after != head_before;
        committed_corrupt += u64::from(moved);
        if result.is_err() && !moved {
            detected += 1;
        } else {
            undetected.push(format!(
                "#{number} {} at byte {} of a {}-byte frame of type {}: {}",
                describe(&injection),
                applied.frame_offset,
                applied.frame_len,
                applied.frame_type,
                if moved {
                    "committed"
                } else {
                    "session succeeded"
                }
            ));
        }
        *reasons.entry(reason(&result)).or_default() += 1;

        // Only verified chunks reach the store: whatever the failed session
        // stored reads back with its blake3 equal to its id. (Its verifier may
        // still be storing chunks queued before the damage: the count is
        // checked after the resume, below.)
        for id in &data_ids {
            if harness.store.contains(id) {
                harness.store.read_blob(id).unwrap();
            }
        }
        let report = harness.store.verify(None, None).unwrap();
        assert!(report.is_clean(), "damaged store: {:?}", report.damaged);

        // Resume cleanly: the replica converges; chunks the failed session had
        // already stored travel as references, not again as data. The census
        // of this clean session checks the frame model the injections use.
        let (epochs, frames) = harness.clean_run().await;
        if !moved {
            assert_eq!(frames, expected_frames(), "a resume sends other frames");
        }
        resent_bytes += epochs.iter().map(|e| e.raw_bytes_sent).sum::<u64>();
        // The failed and the resumed session together stored exactly the
        // epoch's blobs: none under an id that is not the blake3 of its bytes,
        // none of a damaged frame under another id.
        assert_eq!(
            harness.store.blob_count(),
            blobs_before + expected_new.len(),
            "injection {number} ({}): the store holds a blob this epoch did not send",
            describe(&injection)
        );
        assert_eq!(harness.head().map(|h| h.1), Some(harness.disk_root()));
        harness.assert_replica_equals_disk();
    }

    let out = harness.work.path().join("export.raw");
    harness.store.export(&harness.source, &out).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == harness.disk,
        "export differs from the disk"
    );

    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "stream corruption: injected {injections} (flips {}: headers {flips_header}, payloads {flips_payload}; \
         truncations {truncations}), detected {detected} ({:.0}%), committed corrupt {committed_corrupt}; \
         resend on resume: {:.1} MiB of {:.1} MiB dirty (ratio {:.2})",
        flips_header + flips_payload,
        100.0 * detected as f64 / injections.max(1) as f64,
        mib(resent_bytes),
        mib(dirty_bytes),
        resent_bytes as f64 / dirty_bytes.max(1) as f64,
    );
    println!("stream corruption: seed {seed:#x}; sessions ended by {reasons:?}");
    assert!(
        undetected.is_empty(),
        "{} of {injections} corruptions were not detected:\n{}",
        undetected.len(),
        undetected.join("\n")
    );
    assert_eq!(committed_corrupt, 0);
}

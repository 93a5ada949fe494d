//! Continuous replication: epochs under a writer, resume after killed agents and
//! servers, deduplication across sources, throttling and states.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;
use blockrep_server::SourceState;
use blockrep_testkit::{Pki, ServerProcess, random_bytes, write_at};

const MIB: usize = 1 << 20;
const CHUNK: u32 = 65_536;

#[test]
fn continuous_agent_follows_a_writer_and_sends_only_changed_chunks() {
    let AgentRig {
        pki, work, server, ..
    } = rig(&["web"], &[]);
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(64 * MIB, 1)).unwrap();
    let admin = server.admin_addr.unwrap();
    let agent = spawn_agent(
        &disk,
        server.addr,
        "web",
        pki.path(),
        &["--interval", "300ms"],
    );
    assert!(
        wait_until(Duration::from_secs(60), || agent.epochs().len() == 1),
        "no initial sync"
    );
    let initial_bytes = agent.sum("bytes_sent");
    let view = admin_source(admin, "web").unwrap();
    assert_eq!(view.state, SourceState::Healthy, "{view:?}");

    // 200 random 4 KiB blocks, in place, as a running workload would. The
    // agent is stopped while they are written so that they all land between
    // two scans: a chunk written both before and after a scan is rightly sent
    // twice, which would blur the count this test checks.
    let mut chunks = BTreeSet::new();
    agent.signal("STOP");
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let blocks: Vec<(u64, Vec<u8>)> = (0..200u64)
        .map(|i| {
            (
                (blake3::hash(&i.to_le_bytes()).as_bytes()[0] as u64 * 61 + i * 97) % (64 * 256),
                random_bytes(4096, 1000 + i),
            )
        })
        .collect();
    for (block, bytes) in &blocks {
        std::os::unix::fs::FileExt::write_all_at(&file, bytes, block * 4096).unwrap();
        chunks.insert(block * 4096 / u64::from(CHUNK));
    }
    drop(file);
    agent.signal("CONT");
    let expected = disk_root(&disk, CHUNK);
    wait_for_head_root(admin, "web", &expected, Duration::from_secs(30));
    // The server shows the root before the agent has printed the epoch that
    // sent it: wait for that line before counting bytes.
    assert!(wait_until(Duration::from_secs(10), || agent
        .epochs()
        .iter()
        .any(|(_, root)| *root == expected)));
    let delta_bytes = agent.sum("bytes_sent") - initial_bytes;
    let chunk_frames = chunks.len() as u64 * (u64::from(CHUNK) + 64 + 32);
    assert!(
        delta_bytes <= chunk_frames + 4096,
        "sent {delta_bytes} bytes for {} changed chunks: {:#?}",
        chunks.len(),
        agent.lines()
    );
    // The changed 4 KiB blocks travel as patches: at least their bytes (random,
    // so incompressible) are on the wire.
    let distinct_blocks: BTreeSet<u64> = blocks.iter().map(|(block, _)| *block).collect();
    assert!(
        delta_bytes >= distinct_blocks.len() as u64 * 4096,
        "sent too little: {delta_bytes}"
    );

    // SIGTERM: the agent stops cleanly with status 0.
    let mut agent = agent;
    agent.stop_cleanly();
}

#[test]
fn killed_agent_resumes_the_initial_sync_without_starting_over() {
    let rig = rig(&["big"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    let image = random_bytes(256 * MIB, 2);
    std::fs::write(&disk, &image).unwrap();
    let data = work.path().join("data");
    let admin = server.admin_addr.unwrap();
    let mut agent = spawn_agent(
        &disk,
        server.addr,
        "big",
        pki.path(),
        &[
            "--once",
            "--commit-every",
            "32MiB",
            "--max-rate",
            "200MiB/s",
        ],
    );
    let received = || admin_source(admin, "big").map_or(0, |v| v.bytes_received_total);
    assert!(
        wait_until(Duration::from_secs(60), || received() >= 96 * MIB as u64),
        "no progress"
    );
    agent.child.kill().unwrap();
    agent.wait();
    let view = admin_source(admin, "big").unwrap();
    assert_eq!(view.state, SourceState::InitialSync, "{view:?}");
    assert!(
        view.bytes_received_total < 256 * MIB as u64,
        "the sync finished before the kill"
    );

    let resumed = agent_once(
        &disk,
        server.addr,
        "big",
        pki.path(),
        &["--commit-every", "32MiB"],
    );
    assert_success(&resumed);
    let total = admin_source(admin, "big").unwrap().bytes_received_total;
    assert!(
        total as f64 <= 1.25 * image.len() as f64,
        "sent {total} bytes for a {} byte disk",
        image.len()
    );
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "big", &out));
    assert!(std::fs::read(&out).unwrap() == image, "replica differs");
    assert_eq!(
        admin_source(admin, "big").unwrap().state,
        SourceState::Healthy
    );
}

/// Every block of `image` is zero or a whole, well-placed stamp; returns the
/// highest sequence number found.
fn check_stamps(image: &[u8]) -> u64 {
    let mut highest = 0;
    for (index, block) in image.chunks(4096).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let seq = u64::from_le_bytes(block[8..16].try_into().unwrap());
        assert_eq!(
            block,
            stamped_block(index as u64, seq).as_slice(),
            "torn or misplaced block {index}"
        );
        highest = highest.max(seq);
    }
    highest
}

/// Bytes of a block that a live read may take from one version and the rest
/// from another: a page read while a `pwrite` of it is under way.
const LIVE_READ_PIECE: usize = 8;

/// [`check_stamps`] of an image read live while `written` (index, seq, in
/// the order the writer began them) went on: a block may also be torn
/// between the versions its index has had (zeros first), a piece of
/// [`LIVE_READ_PIECE`] bytes from each, since a page read live while a
/// write of it is under way holds part of both. Each piece must still be
/// one of that block's own versions: nothing misplaced or foreign passes.
fn check_stamps_read_live(image: &[u8], written: &[(u64, u64)]) {
    let mut versions: std::collections::HashMap<u64, Vec<Vec<u8>>> = Default::default();
    for &(index, seq) in written {
        versions
            .entry(index)
            .or_insert_with(|| vec![vec![0u8; 4096]])
            .push(stamped_block(index, seq));
    }
    for (index, block) in image.chunks(4096).enumerate() {
        let whole = block.iter().all(|&b| b == 0)
            || stamped_block(
                index as u64,
                u64::from_le_bytes(block[8..16].try_into().unwrap()),
            ) == block;
        if whole {
            continue;
        }
        let of_index = versions.get(&(index as u64)).map_or(&[][..], Vec::as_slice);
        for (piece, bytes) in block.chunks(LIVE_READ_PIECE).enumerate() {
            let at = piece * LIVE_READ_PIECE..(piece + 1) * LIVE_READ_PIECE;
            assert!(
                of_index.iter().any(|version| version[at.clone()] == *bytes),
                "block {index}: bytes {at:?} are no version written there"
            );
        }
    }
}

#[test]
fn killed_server_is_rejoined_and_no_acknowledged_epoch_is_lost_or_torn() {
    let pki = Pki::new(&["db"]);
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let blocks = (32 * MIB / 4096) as u64;
    std::fs::write(&disk, vec![0u8; 32 * MIB]).unwrap();
    let data = work.path().join("data");
    // Restarted on the same address while the agent reconnects: one below
    // the ephemeral range, which no connection is given meanwhile.
    let listen = closed_addr().to_string();
    let mut server = ServerProcess::start_on(&bin(), &listen, &data, pki.path(), &[]);
    let agent = spawn_agent(
        &disk,
        server.addr,
        "db",
        pki.path(),
        &["--interval", "100ms"],
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Every write, noted before it begins: what a live read may have seen.
    let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let (stop, disk) = (std::sync::Arc::clone(&stop), disk.clone());
        let written = std::sync::Arc::clone(&written);
        std::thread::spawn(move || {
            let mut seq = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let index = u64::from_le_bytes(
                    blake3::hash(&seq.to_le_bytes()).as_bytes()[..8]
                        .try_into()
                        .unwrap(),
                ) % blocks;
                written.lock().unwrap().push((index, seq));
                write_at(&disk, index * 4096, &stamped_block(index, seq));
                seq += 1;
                if seq % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            seq
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || agent.epochs().len() >= 3),
        "no epochs"
    );
    server.kill();
    let acknowledged = agent.epochs();
    let (last_epoch, last_root) = acknowledged.last().cloned().unwrap();
    // With the server down, its last head is intact and consistent. The
    // disk is read live (no reflink on this file system), so a block being
    // written as it was read may hold part of two of its versions.
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "db", &out));
    check_stamps_read_live(&std::fs::read(&out).unwrap(), &written.lock().unwrap());

    std::thread::sleep(Duration::from_millis(500));
    let server = ServerProcess::start_on(&bin(), &listen, &data, pki.path(), &[]);
    let admin = server.admin_addr.unwrap();
    let view = admin_source(admin, "db").unwrap();
    assert!(
        view.epoch >= last_epoch,
        "acknowledged epoch {last_epoch} lost: head is {}",
        view.epoch
    );
    if view.epoch == last_epoch {
        assert_eq!(view.root.as_deref(), Some(last_root.as_str()));
    }
    // The agent reconnects by itself and keeps replicating.
    assert!(
        wait_until(Duration::from_secs(30), || agent.epochs().len()
            > acknowledged.len() + 2),
        "agent did not resume: {}",
        agent.stderr.lock().unwrap()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last_seq = writer.join().unwrap();
    let expected = disk_root(&disk, CHUNK);
    wait_for_head_root(admin, "db", &expected, Duration::from_secs(30));
    assert_success(&export(&data, "db", &out));
    let replica = std::fs::read(&out).unwrap();
    assert!(check_stamps(&replica) < last_seq);
    assert!(replica == std::fs::read(&disk).unwrap());
}

#[test]
fn chunks_shared_with_another_source_do_not_travel_again() {
    // Data is shared only between the sources of one tenant.
    let pki = Pki::new(&[]);
    pki.issue_in_tenant("first", "shared");
    pki.issue_in_tenant("second", "shared");
    let work = tempfile::tempdir().unwrap();
    let first = work.path().join("first.raw");
    let second = work.path().join("second.raw");
    let image = random_bytes(32 * MIB, 3);
    std::fs::write(&first, &image).unwrap();
    // The second disk shares 90% of its chunks with the first.
    let mut other = image.clone();
    for chunk in (0..other.len() / CHUNK as usize).filter(|c| c % 10 == 3) {
        let start = chunk * CHUNK as usize;
        other[start..start + CHUNK as usize]
            .copy_from_slice(&random_bytes(CHUNK as usize, 5000 + chunk as u64));
    }
    std::fs::write(&second, &other).unwrap();
    let data = work.path().join("data");
    let server = ServerProcess::start(&bin(), &data, pki.path());
    assert_success(&agent_once(&first, server.addr, "first", pki.path(), &[]));
    let output = agent_once(&second, server.addr, "second", pki.path(), &[]);
    assert_success(&output);
    let sent = sum_field(&output, "bytes_sent");
    assert!(
        (sent as f64) <= 0.15 * other.len() as f64,
        "second source sent {sent} bytes"
    );
    assert!(
        sum_field(&output, "ref_chunks_sent") >= (other.len() / CHUNK as usize * 9 / 10) as u64
    );
    let view = admin_source(server.admin_addr.unwrap(), "second").unwrap();
    assert!(view.chunks_deduplicated_total >= 460, "{view:?}");
    let out = work.path().join("export.raw");
    assert_success(&export(&data, "second", &out));
    assert!(std::fs::read(&out).unwrap() == other);
}

#[test]
fn max_rate_throttles_the_transfer() {
    let AgentRig {
        pki, work, server, ..
    } = rig(&["slow"], &[]);
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(64 * MIB, 4)).unwrap();
    let started = Instant::now();
    let output = agent_once(
        &disk,
        server.addr,
        "slow",
        pki.path(),
        &["--max-rate", "20MiB/s"],
    );
    let elapsed = started.elapsed();
    assert_success(&output);
    assert!(
        elapsed >= Duration::from_millis(2500),
        "too fast: {elapsed:?}"
    );
    // 3.2 s at the rate; the rest is start-up, the handshake and the
    // commit's fsync, which a loaded machine can stretch.
    assert!(
        elapsed <= Duration::from_millis(8000),
        "too slow: {elapsed:?}"
    );
}

#[test]
fn rate_changes_on_sighup_without_restarting() {
    let rig = rig(&["tuned"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(48 * MIB, 6)).unwrap();
    let settings = work.path().join("agent.conf");
    std::fs::write(&settings, "# throttled at first\nmax-rate = 2MiB/s\n").unwrap();
    let admin = server.admin_addr.unwrap();
    let mut agent = spawn_agent(
        &disk,
        server.addr,
        "tuned",
        pki.path(),
        &["--once", "--config", settings.to_str().unwrap()],
    );
    // The signal handler is in place once the session is up (before, a
    // SIGHUP would end the agent).
    assert!(
        wait_until(Duration::from_secs(30), || admin_source(admin, "tuned")
            .is_some_and(|view| view.connected)),
        "the agent never connected: {}",
        agent.stderr.lock().unwrap()
    );
    std::fs::write(&settings, "max-rate = unlimited\n").unwrap();
    agent.signal("HUP");
    // At 2 MiB/s this would take 24 s; unthrottled it finishes in a few.
    let started = Instant::now();
    let status = agent.wait();
    assert!(status.success(), "{}", agent.stderr.lock().unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "rate change ignored"
    );
    assert_eq!(admin_source(admin, "tuned").unwrap().epoch, 1);
}

#[test]
fn sources_turn_stalled_without_an_agent_and_lagging_behind_the_rpo() {
    let rig = rig(
        &["quiet", "behind"],
        &["--stall-after", "1s", "--rpo-target", "1s"],
    );
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let admin = server.admin_addr.unwrap();
    let quiet = work.path().join("quiet.raw");
    std::fs::write(&quiet, random_bytes(MIB, 7)).unwrap();
    assert_success(&agent_once(&quiet, server.addr, "quiet", pki.path(), &[]));
    assert!(wait_until(Duration::from_secs(10), || admin_source(
        admin, "quiet"
    )
    .unwrap()
    .state
        == SourceState::Stalled));

    // A throttled agent far behind its disk: lag passes the 1 s RPO target while
    // it is still in contact.
    let behind = work.path().join("behind.raw");
    std::fs::write(&behind, random_bytes(2 * MIB, 8)).unwrap();
    assert_success(&agent_once(&behind, server.addr, "behind", pki.path(), &[]));
    std::fs::write(&behind, random_bytes(2 * MIB, 9)).unwrap();
    let _agent = spawn_agent(
        &behind,
        server.addr,
        "behind",
        pki.path(),
        &["--max-rate", "200KiB/s", "--interval", "200ms"],
    );
    assert!(
        wait_until(Duration::from_secs(10), || admin_source(admin, "behind")
            .unwrap()
            .state
            == SourceState::Lagging),
        "{:?}",
        admin_source(admin, "behind")
    );
    let view = admin_source(admin, "behind").unwrap();
    assert!(
        view.bytes_pending > 0 && view.chunks_pending > 0,
        "{view:?}"
    );
    let table = std::process::Command::new(BIN)
        .args(["status", "--admin", &admin.to_string(), "--admin-token"])
        .arg(pki.path().join("admin.token"))
        .output()
        .unwrap();
    assert_success(&table);
    assert!(
        stdout(&table).contains("lagging") && stdout(&table).contains("stalled"),
        "{}",
        stdout(&table)
    );
}

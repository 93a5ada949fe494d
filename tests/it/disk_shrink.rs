//! A source disk that shrinks under the agent: an image file truncated and
//! re-extended, again and again, while a continuous agent scans it and sends
//! its chunks. The agent must not die (a scan through a memory mapping gets
//! SIGBUS there), must say what happened, and must replicate the disk exactly
//! once it is left alone.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use crate::common::*;
use blockrep_testkit::random_bytes;

const MIB: u64 = 1 << 20;
const CHUNK: u32 = 65_536;
/// Large enough that a scan takes many times the truncated window below.
const DISK: u64 = 64 * MIB;
/// How long the file stays truncated each time.
const SHORT_FOR: Duration = Duration::from_millis(1);
/// How long it stays at its full size between truncations.
const FULL_FOR: Duration = Duration::from_millis(15);
/// How long the truncations go on.
const TRUNCATING_FOR: Duration = Duration::from_secs(8);

#[test]
fn agent_survives_a_disk_truncated_while_it_scans_and_then_replicates_it() {
    let AgentRig {
        pki, work, server, ..
    } = rig(&["shrink"], &[]);
    let disk = work.path().join("shrink.raw");
    let original = random_bytes(DISK as usize, 21);
    std::fs::write(&disk, &original).unwrap();
    let mut agent = spawn_agent(
        &disk,
        server.addr,
        "shrink",
        pki.path(),
        &["--interval", "10ms"],
    );
    assert!(
        wait_until(Duration::from_secs(60), || !agent.epochs().is_empty()),
        "no initial sync: {}",
        agent.stderr.lock().unwrap()
    );

    // Cut the file to half its size and give it back its length (the cut
    // half reads as zeros then), every few milliseconds, while the agent
    // scans and sends without pause.
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let started = Instant::now();
    let mut truncations = 0u32;
    while started.elapsed() < TRUNCATING_FOR && agent.try_wait().is_none() {
        file.set_len(DISK / 2).unwrap();
        std::thread::sleep(SHORT_FOR);
        file.set_len(DISK).unwrap();
        truncations += 1;
        std::thread::sleep(FULL_FOR);
    }
    let died = agent.try_wait();
    assert!(
        died.is_none(),
        "the agent died after {truncations} truncations: {:?} (signal {:?})\n{}",
        died,
        died.and_then(|status| status.signal()),
        agent.stderr.lock().unwrap()
    );

    // Leave the disk alone with its first content: the replica must follow.
    file.write_all_at(&original, 0).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let expected = disk_root(&disk, CHUNK);
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .epochs()
            .last()
            .is_some_and(|(_, root)| *root == expected)),
        "the replica did not come back to the disk: {:?}\n{}",
        agent.epochs().last(),
        agent.stderr.lock().unwrap()
    );
    assert!(
        agent.try_wait().is_none(),
        "the agent exited: {}",
        agent.stderr.lock().unwrap()
    );
    let log = agent.stderr.lock().unwrap().clone();
    assert!(
        log.contains("during the scan") || log.contains("shrank"),
        "the agent never said the disk shrank under it ({truncations} truncations):\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    // And the server holds exactly that disk.
    let out = work.path().join("export.raw");
    drop(agent);
    drop(server);
    assert_success(&export(&work.path().join("data"), "shrink", &out));
    assert!(std::fs::read(&out).unwrap() == original, "export differs");
}

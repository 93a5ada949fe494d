//! A machine's large epoch is committed in steps (`--commit-every`), each a
//! machine root of what the server holds so far: an initial sync killed half
//! way resumes with what it had not yet committed, not from the start.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use crate::machine::{MIB, epoch_sum, machine_agent_once, machine_disk_args, machine_root};
use blockrep_store::Store;
use blockrep_testkit::ack_log::read_acks;
use blockrep_testkit::random_bytes;

/// Chunks of 64 KiB in the two 4 MiB disks of the test.
const CHUNKS: u64 = 2 * 64;

#[test]
fn an_interrupted_machine_sync_resumes_from_its_last_step() {
    let rig = rig(&["web"], &["--gc-interval", "off"]);
    let disks = vec![
        ("a", random_bytes(4 * MIB, 11)),
        ("b", random_bytes(4 * MIB, 12)),
    ];
    let ack_log = rig.path("acks.log");
    let (first, mut rest) = machine_disk_args(&rig, &disks);
    // About 2 MiB/s: the sync takes four seconds, a step every 512 KiB.
    rest.extend(
        [
            "--commit-every",
            "512KiB",
            "--max-rate",
            "16Mbit/s",
            "--compress",
            "none",
            "--ack-log",
            ack_log.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let mut agent = rig.spawn_agent(Path::new(&first), "web", &rest);
    // Killed once a step of the second disk is acknowledged (the first
    // disk's 4 MiB make eight steps).
    let b_started =
        |acks: &[blockrep_testkit::ack_log::Ack]| acks.iter().filter(|a| !a.complete).count() >= 10;
    assert!(
        wait_until(Duration::from_secs(60), || b_started(&read_acks(&ack_log))),
        "no steps: {:?}",
        agent.lines()
    );
    agent.child.kill().unwrap();
    agent.wait();
    let acks = read_acks(&ack_log);
    assert!(acks.iter().all(|a| !a.complete), "{acks:?}");
    let store = Store::open_read_only(&rig.data()).unwrap();
    let head = store
        .head(&blockrep_core::SourceId::new("web").unwrap())
        .unwrap()
        .unwrap();
    assert!(!head.initial_sync_done(), "a step is not a complete point");
    assert_eq!(
        store.volume_roots(&head.root).unwrap().len(),
        2,
        "a step names both volumes"
    );
    drop(store);

    // The next run sends only what the steps had not committed.
    let stdout = machine_agent_once(&rig, &disks);
    let sent = epoch_sum(&stdout, "chunks_sent");
    assert!(sent > 0, "nothing left to send after ten steps: {stdout}");
    assert!(
        sent < CHUNKS - 40,
        "{sent} of {CHUNKS} chunks sent again after steps of 512 KiB: {stdout}"
    );
    assert_eq!(
        rig_head_root(&rig),
        machine_root(&disks),
        "the machine is not its disks"
    );
}

fn rig_head_root(rig: &blockrep_testkit::AgentRig) -> blockrep_core::ChunkId {
    Store::open_read_only(&rig.data())
        .unwrap()
        .head(&blockrep_core::SourceId::new("web").unwrap())
        .unwrap()
        .unwrap()
        .root
}

//! Tests of snapshots of launches: one instant of every volume.

use std::sync::Arc;

use crate::error::ErrorKind;
use crate::launch::materialize::tests::{DISK_LEN, fixture};
use crate::testutil::{root_disk, source};

#[test]
fn a_snapshot_of_a_launch_is_one_instant_of_a_writer() {
    let (_dir, store, _model) = fixture();
    let volume = store.open_launch("l").unwrap();
    // Every 4 KiB block stamped, in order, over and over: a snapshot of
    // one instant holds, for some m, each block's last stamp up to m.
    let blocks = DISK_LEN / 4096;
    let stamp = |seq: u64| {
        let mut block = vec![0u8; 4096];
        block[..8].copy_from_slice(&seq.to_le_bytes());
        block
    };
    for seq in 0..blocks {
        volume.write(seq * 4096, &stamp(seq)).unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (volume, stop) = (Arc::clone(&volume), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seq = blocks;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                volume.write((seq % blocks) * 4096, &stamp(seq)).unwrap();
                seq += 1;
            }
        })
    };
    for round in 0..5 {
        let name = format!("at-{round}");
        let snapshot = store
            .snapshot_launch("l", Some(&source()), Some(&name), None, 10 + round)
            .unwrap();
        assert_eq!(snapshot.kind, crate::snapshot::SnapshotKind::Launch);
        let disk = root_disk(&store, &snapshot.root);
        let seqs: Vec<u64> = (0..blocks as usize)
            .map(|b| u64::from_le_bytes(disk[b * 4096..b * 4096 + 8].try_into().unwrap()))
            .collect();
        let m = *seqs.iter().max().unwrap();
        for (b, seq) in seqs.iter().enumerate() {
            let b = b as u64;
            let last = m - (m + blocks - b) % blocks;
            assert_eq!(*seq, last, "block {b} in snapshot {name}: not one instant");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let other = blockrep_core::SourceId::new("other").unwrap();
    let refused = store.snapshot_launch("l", Some(&other), None, None, 99);
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::Invalid);
}

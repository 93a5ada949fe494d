//! A collection on a bucket shared by several servers (SeaweedFS on
//! loopback): the other servers take part in its round, so what they
//! touched is kept, what they learned of before it and name after it is
//! refused rather than left dangling, and one that does not answer stops
//! the collection before anything is removed.

use blockrep_core::{Geometry, SourceId};
use blockrep_store::{BucketOptions, ErrorKind, GcOptions, RoundEnd, RoundPhase, Store};
use blockrep_testkit::random_bytes;
use blockrep_testkit::seaweedfs::SeaweedFs;
use std::time::{Duration, Instant};

use crate::bucket_store::blocking_bucket;

const NOW: u64 = 1_700_000_000_000;
const TTL: u64 = 60_000;
const CHUNK: usize = 65_536;
const DISK: usize = 16 * CHUNK;
const POLL: Duration = Duration::from_millis(20);

fn open(weed: &SeaweedFs, dir: &tempfile::TempDir, prefix: &str) -> Store {
    Store::open_in_bucket(
        dir.path(),
        blocking_bucket(weed, prefix),
        BucketOptions::default(),
    )
    .unwrap()
}

/// Two servers' stores on the bucket prefix `prefix`, each with its own
/// working copy.
fn two_stores(weed: &SeaweedFs, prefix: &str) -> [(tempfile::TempDir, Store); 2] {
    [(); 2].map(|()| {
        let dir = tempfile::tempdir().unwrap();
        let store = open(weed, &dir, prefix);
        (dir, store)
    })
}

fn geometry() -> Geometry {
    Geometry::new(DISK as u64, CHUNK as u32).unwrap()
}

/// A disk whose first chunk is `first` and the rest random from `seed`.
fn disk_with(first: &[u8], seed: u64) -> Vec<u8> {
    let mut disk = random_bytes(DISK, seed);
    disk[..CHUNK].copy_from_slice(first);
    disk
}

fn exported(store: &Store, source: &SourceId, dir: &tempfile::TempDir) -> Vec<u8> {
    let out = dir.path().join(format!("{source}.img"));
    store.export(source, &out).unwrap();
    std::fs::read(&out).unwrap()
}

/// Server A collects; server B has a session that learned of a dead chunk
/// before the round and one that touches another dead chunk during it.
#[test]
fn a_collection_keeps_what_another_server_touched_and_refuses_what_it_only_knew() {
    let Some(weed) = SeaweedFs::start("collection round") else {
        return;
    };
    let geometry = geometry();
    let [(dir_a, a), (dir_b, b)] = two_stores(&weed, "round");
    let (src_a, src_b) = (
        SourceId::new("a-src").unwrap(),
        SourceId::new("b-src").unwrap(),
    );
    a.claim_presence("a", TTL, NOW).unwrap();
    b.claim_presence("b", TTL, NOW).unwrap();
    a.claim_source(&src_a, "a", TTL, NOW).unwrap();
    b.claim_source(&src_b, "b", TTL, NOW).unwrap();

    // A's first image is replaced whole by its second: its pack is dead.
    let old = random_bytes(DISK, 1);
    let (root, pages) = a.insert_image(&old, geometry).unwrap();
    a.commit(&src_a, 1, &root, &pages, 0, NOW).unwrap();
    let new = random_bytes(DISK, 2);
    let (root, pages) = a.insert_image(&new, geometry).unwrap();
    a.commit(&src_a, 2, &root, &pages, 0, NOW).unwrap();

    // B learns of A's packs, and a session of B finds the old image's
    // second chunk stored before any collection runs.
    b.reload_packs().unwrap();
    let knew = disk_with(&old[CHUNK..2 * CHUNK], 4);
    let (root_knew, pages_knew) = b.insert_image(&knew, geometry).unwrap();

    let touched = disk_with(&old[..CHUNK], 3);
    let report = std::thread::scope(|scope| {
        let collecting = scope.spawn(|| {
            let peers = a.claim_gc("a", TTL, NOW + 10).unwrap();
            assert_eq!(peers, ["b"]);
            let report = a.gc(&GcOptions::default());
            a.release_gc();
            report
        });
        // B sees the round and joins it; a session of B then stores an
        // image holding the old image's first chunk: found, so touched.
        let round = round_seen(&b);
        assert_eq!(round.holder, "a");
        let mut part = b.join_round("b", &round, NOW + 20).unwrap();
        let stored = b.insert_image(&touched, geometry).unwrap();
        assert_eq!(part.wait_past(RoundPhase::Track, POLL), None);
        part.send_touched().unwrap();
        assert_eq!(
            part.wait_past(RoundPhase::Sweep, POLL),
            Some(RoundEnd::Done)
        );
        assert_eq!(part.finish(RoundEnd::Done), RoundEnd::Done);
        (collecting.join().unwrap().unwrap(), stored)
    });
    let (report, (root_touched, pages_touched)) = report;
    assert!(report.packs_compacted >= 1, "{report:?}");
    assert!(report.blobs_removed >= 14, "{report:?}");
    assert!(report.blobs_copied >= 1, "{report:?}");

    // What B touched during the round was kept: its commit names it and
    // reads back whole, on B and on a third server.
    b.commit(&src_b, 1, &root_touched, &pages_touched, 0, NOW + 30)
        .unwrap();
    assert!(exported(&b, &src_b, &dir_b) == touched);
    // What B only knew of was removed, and B knows it: the commit fails
    // rather than publish a head naming a chunk the bucket lacks.
    let refused = b
        .commit(&src_b, 2, &root_knew, &pages_knew, 0, NOW + 40)
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Missing, "{refused}");
    assert!(exported(&a, &src_a, &dir_a) == new);

    let dir_c = tempfile::tempdir().unwrap();
    let c = open(&weed, &dir_c, "round");
    assert!(exported(&c, &src_a, &dir_c) == new);
    assert!(exported(&c, &src_b, &dir_c) == touched);
    assert!(c.verify(None, None).unwrap().is_clean());
}

/// Waits until `b` sees a round in its first phase.
fn round_seen(b: &Store) -> blockrep_store::Round {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(round) = b.gc_round().unwrap()
            && round.phase == RoundPhase::Track
        {
            return round;
        }
        assert!(Instant::now() < deadline, "no round appeared");
        std::thread::sleep(POLL);
    }
}

#[test]
fn a_server_that_cannot_tell_how_a_round_ended_publishes_nothing_until_it_can() {
    let Some(weed) = SeaweedFs::start("unsettled round") else {
        return;
    };
    let geometry = geometry();
    let [(_dir_a, a), (dir_b, b)] = two_stores(&weed, "unsettled");
    let source = SourceId::new("b-src").unwrap();
    a.claim_presence("a", TTL, NOW).unwrap();
    b.claim_presence("b", TTL, NOW).unwrap();
    b.claim_source(&source, "b", TTL, NOW).unwrap();
    let disk = random_bytes(DISK, 5);
    let (root, pages) = b.insert_image(&disk, geometry).unwrap();

    std::thread::scope(|scope| {
        // A short collection lease: the round waits two of them (plus the
        // slack) for B's ids, then stops.
        let collecting = scope.spawn(|| {
            assert_eq!(a.claim_gc("a", 1_000, NOW + 10).unwrap(), ["b"]);
            let outcome = a.gc(&GcOptions::default());
            a.release_gc();
            outcome
        });
        let round = round_seen(&b);
        // B joins, then loses its part before it knows the end (as when the
        // bucket stops answering): it refuses to publish.
        drop(b.join_round("b", &round, NOW + 20).unwrap());
        let refused = b
            .commit(&source, 1, &root, &pages, 0, NOW + 30)
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
        assert!(
            refused
                .to_string()
                .contains("read the bucket's packs again")
        );
        let blocked = b
            .publishing_blocked(NOW + 30)
            .expect("B waits for the round");
        assert!(blocked.contains("collection round"), "{blocked}");
        assert!(
            !b.settle_round(NOW + 40).unwrap(),
            "the round is still running"
        );
        let stopped = collecting.join().unwrap().unwrap_err();
        assert_eq!(stopped.kind(), ErrorKind::Busy, "{stopped}");
    });
    // The round ended (aborted): B reads the packs again and goes on.
    assert!(b.settle_round(NOW + 50).unwrap());
    assert_eq!(b.publishing_blocked(NOW + 50), None);
    b.commit(&source, 1, &root, &pages, 0, NOW + 60).unwrap();
    assert!(exported(&b, &source, &dir_b) == disk);
}

#[test]
fn a_server_present_that_does_not_take_part_stops_the_collection_before_it_removes_anything() {
    let Some(weed) = SeaweedFs::start("silent server") else {
        return;
    };
    let geometry = geometry();
    let [(_dir_a, a), (_dir_b, b)] = two_stores(&weed, "silent");
    let source = SourceId::new("a-src").unwrap();
    a.claim_presence("a", TTL, NOW).unwrap();
    b.claim_presence("b", TTL, NOW).unwrap();
    a.claim_source(&source, "a", TTL, NOW).unwrap();
    for seed in [1, 2] {
        let (root, pages) = a.insert_image(&random_bytes(DISK, seed), geometry).unwrap();
        a.commit(&source, seed, &root, &pages, 0, NOW).unwrap();
    }
    let dry = GcOptions {
        dry_run: true,
        ..GcOptions::default()
    };
    let before = a.gc(&dry).unwrap();
    assert!(before.packs_compacted >= 1, "{before:?}");

    // B is present and never looks at the bucket: the collection waits
    // for it as long as a presence lasts (the collector's one second plus
    // the slack), then stops.
    assert_eq!(a.claim_gc("a", 1_000, NOW + 10).unwrap(), ["b"]);
    let refused = a.gc(&GcOptions::default()).unwrap_err();
    a.release_gc();
    assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
    assert!(
        refused.to_string().contains("did not take part"),
        "{refused}"
    );
    let round = b.gc_round().unwrap().unwrap();
    assert_eq!(round.phase, RoundPhase::Aborted);
    // A round that ended cannot be joined.
    assert_eq!(
        b.join_round("b", &round, NOW + 20).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    let after = a.gc(&dry).unwrap();
    assert_eq!(after.packs_total, before.packs_total, "{after:?}");
    assert!(after.packs_compacted >= 1, "{after:?}");

    // Once B's presence has lapsed a lease time ago (A's, here one second:
    // B could still hold a source's lease until then), A collects alone.
    drop(b);
    assert_eq!(a.claim_gc("a", 1_000, NOW + TTL + 500).unwrap(), ["b"]);
    a.release_gc();
    assert!(
        a.claim_gc("a", 1_000, NOW + TTL + 1_000)
            .unwrap()
            .is_empty()
    );
    let report = a.gc(&GcOptions::default()).unwrap();
    a.release_gc();
    assert!(report.packs_compacted >= 1, "{report:?}");
    let dir_c = tempfile::tempdir().unwrap();
    let c = open(&weed, &dir_c, "silent");
    assert!(exported(&c, &source, &dir_c) == random_bytes(DISK, 2));
    assert!(c.verify(None, None).unwrap().is_clean());
}

#[test]
fn a_server_whose_announcement_lapsed_publishes_nothing_until_it_rejoined_and_rounds_ended() {
    let Some(weed) = SeaweedFs::start("rejoin") else {
        return;
    };
    let geometry = geometry();
    let [(dir_b, b), (_dir_c, c)] = two_stores(&weed, "rejoin");
    let source = SourceId::new("b-src").unwrap();
    b.claim_presence("b", 1_000, NOW).unwrap();
    b.claim_source(&source, "b", TTL, NOW).unwrap();
    let disk = random_bytes(DISK, 6);
    let (root, pages) = b.insert_image(&disk, geometry).unwrap();

    // B was paused past its announcement (its source's lease is still
    // good): before its renewal runs, it sees the announcement expired...
    let refused = b
        .commit(&source, 1, &root, &pages, 0, NOW + 1_500)
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
    assert!(refused.to_string().contains("announcement"), "{refused}");
    let blocked = b
        .publishing_blocked(NOW + 1_500)
        .expect("health says so too");
    assert!(blocked.contains("announcement"), "{blocked}");
    // ...and the renewal gives it up: B publishes nothing.
    let lost = b.renew_leases(TTL, NOW + 2_000);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(!b.is_announced("b"));
    let blocked = b
        .publishing_blocked(NOW + 2_000)
        .expect("B must announce itself");
    assert!(blocked.contains("announce"), "{blocked}");
    let refused = b
        .commit(&source, 1, &root, &pages, 0, NOW + 2_100)
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
    assert!(refused.to_string().contains("packs again"), "{refused}");
    // Announced again, not yet rejoined: still nothing.
    b.claim_presence("b", TTL, NOW + 3_000).unwrap();
    let refused = b
        .commit(&source, 1, &root, &pages, 0, NOW + 3_100)
        .unwrap_err();
    assert!(refused.to_string().contains("packs again"), "{refused}");

    c.claim_presence("c", TTL, NOW + 3_000).unwrap();
    std::thread::scope(|scope| {
        let collecting = scope.spawn(|| {
            assert_eq!(c.claim_gc("c", 1_000, NOW + 3_100).unwrap(), ["b"]);
            let outcome = c.gc(&GcOptions::default());
            c.release_gc();
            outcome
        });
        // B rejoins while C's round is open: it waits for that round too.
        round_seen(&b);
        b.rejoin("b", NOW + 3_200).unwrap();
        let refused = b
            .commit(&source, 1, &root, &pages, 0, NOW + 3_300)
            .unwrap_err();
        assert!(refused.to_string().contains("packs again"), "{refused}");
        assert!(!b.settle_round(NOW + 3_400).unwrap());
        // B never joined: the round stops, and B goes on.
        let stopped = collecting.join().unwrap().unwrap_err();
        assert!(
            stopped.to_string().contains("did not take part"),
            "{stopped}"
        );
    });
    assert!(b.settle_round(NOW + 3_500).unwrap());
    b.commit(&source, 1, &root, &pages, 0, NOW + 3_600).unwrap();
    assert!(exported(&b, &source, &dir_b) == disk);
}

#[test]
fn a_read_of_a_chunk_another_server_s_collection_moved_finds_it_again() {
    let Some(weed) = SeaweedFs::start("moved chunk") else {
        return;
    };
    let geometry = geometry();
    let [(_dir_a, a), (_dir_b, b)] = two_stores(&weed, "moved");
    let source = SourceId::new("a-src").unwrap();
    a.claim_presence("a", TTL, NOW).unwrap();
    a.claim_source(&source, "a", TTL, NOW).unwrap();
    // The second image keeps only the first chunk of the first: the first
    // pack is mostly dead, and its one live chunk will move.
    let first = random_bytes(DISK, 7);
    let second = disk_with(&first[..CHUNK], 8);
    for (epoch, disk) in [(1, &first), (2, &second)] {
        let (root, pages) = a.insert_image(disk, geometry).unwrap();
        a.commit(&source, epoch, &root, &pages, 0, NOW).unwrap();
    }
    let kept = blockrep_core::scan_buffer(&first, geometry)[0];
    // B reads it where A stored it. B never announced itself, so A's
    // collection does not wait for it, as for a server in the moment
    // before it reads the listing again.
    b.reload_packs().unwrap();
    assert!(b.read_blob_unverified(&kept).unwrap() == first[..CHUNK]);
    assert!(a.claim_gc("a", TTL, NOW + 10).unwrap().is_empty());
    let report = a.gc(&GcOptions::default()).unwrap();
    a.release_gc();
    assert!(
        report.packs_compacted >= 1 && report.blobs_copied >= 1,
        "{report:?}"
    );
    // Its pack is gone; B's read finds the chunk where it moved.
    assert!(b.read_blob_unverified(&kept).unwrap() == first[..CHUNK]);
}

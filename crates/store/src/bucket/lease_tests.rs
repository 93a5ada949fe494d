//! Renewals racing releases and claims of the same lease, made to happen
//! in one order at the gates of `gated.rs`.

use super::super::gated::{gated_bucket, open_on, put_chunk};
use crate::GcOptions;

const TTL_MS: u64 = 30_000;
const NOW: u64 = 1_700_000_000_000;

#[test]
fn a_collection_lease_released_while_it_is_renewed_stays_released() {
    let gated = gated_bucket();
    let (_a_dir, a) = open_on(&gated);
    let (_b_dir, b) = open_on(&gated);
    a.claim_gc("server-a", TTL_MS, NOW).unwrap();
    std::thread::scope(|scope| {
        let written = gated.lease_puts.arm();
        let renewal = scope.spawn(|| a.renew_leases(TTL_MS, NOW + 1_000));
        written.wait("the renewal never wrote the lease");
        // The renewal's write is in the bucket, its answer not yet back:
        // the collection ends now, and its release finds the lease changed.
        a.release_gc();
        written.release();
        assert!(renewal.join().unwrap().is_empty());
    });
    // Neither this server's next collection nor another server's is kept
    // waiting by a lease nobody holds.
    let refused = |e: crate::Error| format!("{:?}: {e}", e.kind());
    b.claim_gc("server-b", TTL_MS, NOW + 2_000)
        .map_err(refused)
        .expect("another server's collection was refused");
    b.release_gc();
    a.claim_gc("server-a", TTL_MS, NOW + 3_000)
        .map_err(refused)
        .expect("this server's next collection was refused");
}

/// A store on a new gated bucket that serves source `web` under its lease,
/// taken at `NOW`.
fn serving_web() -> (
    std::sync::Arc<super::super::gated::Gated>,
    tempfile::TempDir,
    crate::Store,
    blockrep_core::SourceId,
) {
    let gated = gated_bucket();
    let (dir, store) = open_on(&gated);
    let source = blockrep_core::SourceId::new("web").unwrap();
    store
        .claim_source(&source, "server-a", TTL_MS, NOW)
        .unwrap();
    (gated, dir, store, source)
}

#[test]
fn a_source_lease_taken_again_while_the_old_one_is_renewed_stays_held() {
    let (gated, _dir, store, source) = serving_web();
    let late = NOW + TTL_MS - 1;
    std::thread::scope(|scope| {
        let written = gated.lease_puts.arm();
        // Renewed just before its expiry; its answer is held.
        let renewal = scope.spawn(|| store.renew_leases(TTL_MS, late));
        written.wait("the renewal never wrote the lease");
        // A session's claim, by a clock already past the old expiry, takes
        // the lease again over the renewal's write.
        store
            .claim_source(&source, "server-a", TTL_MS, NOW + TTL_MS + 1)
            .unwrap();
        written.release();
        renewal.join().unwrap();
    });
    let held = store.remote.as_ref().unwrap().lease(&source);
    assert!(
        held.is_some_and(|record| record.expires_unix_ms == NOW + 2 * TTL_MS + 1),
        "the claim's lease was replaced by the renewal's older write"
    );
    assert!(store.serves(&source, NOW + TTL_MS + 2));
}

#[test]
fn a_server_rejoining_while_a_collection_deletes_a_pack_forgets_its_blobs() {
    let gated = gated_bucket();
    let (_a_dir, a) = open_on(&gated);
    // A wrote pack 1, which no record names; the collector C writes pack 2,
    // so pack 1 is below its newest.
    let dead = put_chunk(&a, 1);
    a.sync().unwrap();
    let (_c_dir, c) = open_on(&gated);
    put_chunk(&c, 2);
    c.sync().unwrap();
    std::thread::scope(|scope| {
        let read = gated.round_gets.arm();
        // A's announcement lapsed; it rejoins while C collects without it.
        let rejoin = scope.spawn(|| a.rejoin("server-a", NOW));
        read.wait("the rejoin never read the round");
        c.claim_gc("server-c", TTL_MS, NOW).unwrap();
        let report = c.gc(&GcOptions::default());
        c.release_gc();
        read.release();
        rejoin.join().unwrap().unwrap();
        assert!(report.unwrap().packs_compacted >= 1);
    });
    assert!(
        !a.contains(&dead),
        "a rejoined server still counts on a blob of a pack the collection deleted"
    );
}

#[test]
fn a_claim_reads_the_packs_of_a_late_commit_of_the_previous_holder() {
    let gated = gated_bucket();
    let (_a_dir, a) = open_on(&gated);
    let (_b_dir, b) = open_on(&gated);
    let source = blockrep_core::SourceId::new("db").unwrap();
    let geometry = blockrep_core::Geometry::new(1 << 20, 65_536).unwrap();
    b.claim_source(&source, "server-b", TTL_MS, NOW).unwrap();
    let (root, pages) = b.insert_image(&[7u8; 1 << 20], geometry).unwrap();
    b.commit(&source, 1, &root, &pages, 0, NOW).unwrap();
    let late = std::thread::scope(|scope| {
        let listed = gated.pack_listings.arm();
        // A takes the source, by a clock past B's lease; its claim's first
        // pack listing is held once it has its answer.
        let claim = scope.spawn(|| a.claim_source(&source, "server-a", TTL_MS, NOW + TTL_MS + 1));
        listed.wait("the claim never listed the packs");
        // B, by its own clock still within its lease, commits late.
        let (root, pages) = b.insert_image(&[8u8; 1 << 20], geometry).unwrap();
        b.commit(&source, 2, &root, &pages, 0, NOW + 1).unwrap();
        listed.release();
        claim.join().unwrap().unwrap();
        root.id()
    });
    let head = a
        .head(&source)
        .unwrap()
        .expect("A has no head of the source");
    assert_eq!(
        (head.epoch, head.root),
        (2, late),
        "A missed the late commit"
    );
    assert!(
        a.contains(&late),
        "A took a head whose root is in a pack it never read"
    );
}

#[test]
fn a_lease_taken_while_the_server_releases_its_leases_is_released_too() {
    let (gated, _dir, store, _) = serving_web();
    std::thread::scope(|scope| {
        let written = gated.lease_puts.arm();
        // The renew loop announces the server again as it stops: its write
        // is in the bucket, its answer held.
        let announce = scope.spawn(|| store.claim_presence("server-a", TTL_MS, NOW));
        written.wait("the announcement never wrote its lease");
        store.release_leases().unwrap();
        written.release();
        announce.join().unwrap().unwrap();
    });
    assert!(!store.is_announced("server-a"));
    let remote = store.remote.as_ref().unwrap();
    let mut leases = remote.bucket.read_leases("servers").unwrap();
    leases.extend(remote.bucket.read_leases("").unwrap());
    assert!(!leases.is_empty());
    for (name, lease) in leases {
        assert_eq!(
            lease.expires_unix_ms, 0,
            "{name} is still held after the stop"
        );
    }
}

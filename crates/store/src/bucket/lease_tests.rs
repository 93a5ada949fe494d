//! Renewals racing releases and claims of the same lease, made to happen
//! in one order at the gates of `gated.rs`.

use super::super::gated::{WAIT, gated_bucket, open_on};

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
        written
            .recv_timeout(WAIT)
            .expect("the renewal never wrote the lease");
        // The renewal's write is in the bucket, its answer not yet back:
        // the collection ends now, and its release finds the lease changed.
        a.release_gc();
        gated.lease_puts.release();
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

#[test]
fn a_source_lease_taken_again_while_the_old_one_is_renewed_stays_held() {
    let gated = gated_bucket();
    let (_dir, store) = open_on(&gated);
    let source = blockrep_core::SourceId::new("web").unwrap();
    store
        .claim_source(&source, "server-a", TTL_MS, NOW)
        .unwrap();
    let late = NOW + TTL_MS - 1;
    std::thread::scope(|scope| {
        let written = gated.lease_puts.arm();
        // Renewed just before its expiry; its answer is held.
        let renewal = scope.spawn(|| store.renew_leases(TTL_MS, late));
        written
            .recv_timeout(WAIT)
            .expect("the renewal never wrote the lease");
        // A session's claim, by a clock already past the old expiry, takes
        // the lease again over the renewal's write.
        store
            .claim_source(&source, "server-a", TTL_MS, NOW + TTL_MS + 1)
            .unwrap();
        gated.lease_puts.release();
        renewal.join().unwrap();
    });
    let held = store.remote.as_ref().unwrap().lease(&source);
    assert!(
        held.is_some_and(|record| record.expires_unix_ms == NOW + 2 * TTL_MS + 1),
        "the claim's lease was replaced by the renewal's older write"
    );
    assert!(store.serves(&source, NOW + TTL_MS + 2));
}

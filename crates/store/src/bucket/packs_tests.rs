//! A store's own uploads racing its listings of the bucket's packs, and a
//! collection racing a refresh: each race made to happen, at the gates of
//! `gated.rs`, in the one order that used to lose blobs.

use std::time::{Duration, Instant};

use blockrep_core::ChunkId;

use super::super::gated::{
    Armed, Gated, WAIT, gated_bucket, gated_store, open_on, pack_keys, put_chunk,
};
use crate::{GcOptions, Store};

/// Writes a chunk into a pack and seals it by writing a second one; the
/// sealed pack's upload is then held before its index is put. Returns the
/// first chunk's id, and the gate that holds the upload.
fn seal_with_index_held<'a>(gated: &'a Gated, store: &Store) -> (ChunkId, Armed<'a>) {
    let held = gated.index_puts.arm();
    let first = put_chunk(store, 1);
    put_chunk(store, 2);
    held.wait("the sealed pack's index was never put");
    (first, held)
}

/// Releases the held index put and waits until the upload is done.
fn finish_upload(held: Armed<'_>, store: &Store) {
    held.release();
    let start = Instant::now();
    while store.upload_stats().unwrap().objects_pending > 0 {
        assert!(start.elapsed() < WAIT, "the upload never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Seals a pack whose upload is held before its index is put, runs `list`
/// (which lists `packs/`) on another thread, and lets the upload end once
/// the listing has its answer, before `list` goes on with it. Returns the
/// sealed pack's first chunk and what `list` returned.
fn list_while_an_upload_ends<T: Send>(
    gated: &Gated,
    store: &Store,
    list: impl FnOnce() -> T + Send,
) -> (ChunkId, T) {
    let (first, held) = seal_with_index_held(gated, store);
    let listed_back = std::thread::scope(|scope| {
        let listed = gated.pack_listings.arm();
        let listing = scope.spawn(list);
        listed.wait("nothing listed the packs");
        finish_upload(held, store);
        listed.release();
        listing.join().unwrap()
    });
    (first, listed_back)
}

#[test]
fn a_pack_published_while_a_refresh_lists_keeps_its_blobs() {
    let (gated, _dir, store) = gated_store();
    // The listing has no index of the sealed pack; its upload ends before
    // the refresh compares.
    let (first, refreshed) = list_while_an_upload_ends(&gated, &store, || store.blobs.refresh());
    refreshed.unwrap();
    assert!(
        store.contains(&first),
        "the refresh took the store's own new pack for one deleted elsewhere"
    );
    // And the next refresh, which lists the pack, leaves it as it is.
    store.blobs.refresh().unwrap();
    assert!(store.contains(&first));
}

#[test]
fn a_collection_listing_while_a_pack_is_published_leaves_the_pack() {
    let (gated, _dir, store) = gated_store();
    let (_, removed) =
        list_while_an_upload_ends(&gated, &store, || store.blobs.remove_unpublished());
    assert_eq!(removed.unwrap(), 0);
    let keys = pack_keys(&gated);
    let indexes: Vec<&String> = keys.iter().filter(|k| k.ends_with(".idx")).collect();
    assert!(!indexes.is_empty(), "{keys:?}");
    for index in indexes {
        let pack = index.replace(".idx", ".pack");
        assert!(
            keys.contains(&pack),
            "{index} is published, but its pack was deleted: {keys:?}"
        );
    }
}

#[test]
fn a_collection_listing_while_a_pack_number_is_claimed_leaves_the_claim() {
    let (gated, _dir, store) = gated_store();
    std::thread::scope(|scope| {
        let claimed = gated.claims.arm();
        let writer = scope.spawn(|| put_chunk(&store, 1));
        claimed.wait("no pack number was claimed");
        // The claim is in the bucket; the store has not heard back yet.
        let removed = store.blobs.remove_unpublished();
        let keys = pack_keys(&gated);
        claimed.release();
        writer.join().unwrap();
        assert_eq!(removed.unwrap(), 0, "the claim was taken for a dead one");
        assert_eq!(keys.len(), 1, "{keys:?}");
    });
}

#[test]
fn a_pack_this_store_deletes_while_a_refresh_lists_is_not_taken_in_again() {
    let (gated, _dir, store) = gated_store();
    put_chunk(&store, 1);
    put_chunk(&store, 2);
    store.sync().unwrap();
    let number = store.blobs.pack_numbers().unwrap()[0];
    std::thread::scope(|scope| {
        let listed = gated.pack_listings.arm();
        let refresh = scope.spawn(|| store.blobs.refresh());
        listed.wait("the refresh never listed");
        // The listing still names the pack; it is deleted now, before the
        // refresh compares.
        store.blobs.pack_backend().remove(number).unwrap();
        listed.release();
        refresh
            .join()
            .unwrap()
            .expect("the refresh took in a pack deleted since its listing");
    });
    assert!(!store.blobs.pack_numbers().unwrap().contains(&number));
}

#[test]
fn a_collection_planned_while_a_refresh_reads_another_servers_pack_leaves_it() {
    let gated = gated_bucket();
    let (_a_dir, a) = open_on(&gated);
    let (_b_dir, b) = open_on(&gated);
    // A writes pack 1; B, claiming after A, writes pack 2 and publishes it;
    // A's next pack is claimed past B's, so B's is below A's newest.
    put_chunk(&a, 1);
    let theirs = put_chunk(&b, 2);
    b.sync().unwrap();
    a.sync().unwrap();
    put_chunk(&a, 3);
    assert!(b.contains(&theirs) && !a.contains(&theirs));
    let held = gated.index_gets.arm();
    let peers = crate::bucket::RoundPeers(&a);
    let options = GcOptions::default();
    let (collected, planned) = std::sync::mpsc::channel::<()>();
    let (report, refreshed) = std::thread::scope(|scope| {
        let mut refresh = None;
        let report = a.blobs.collect(
            &options,
            || {
                // Between the mark and the plan, a refresh (a session
                // taking a source's lease) lists pack 2 and reads its index.
                refresh = Some(scope.spawn(|| a.blobs.refresh()));
                held.wait("the refresh never read pack 2's index");
                scope.spawn(move || {
                    // The read stays held until the collection is over, or
                    // for 2 s if it waits for the refresh (as it must): a
                    // plan that does not wait runs while pack 2 has no
                    // entries, whatever the machine's pace.
                    let _ = planned.recv_timeout(Duration::from_secs(2));
                    held.release();
                });
                // B's head names its chunk.
                Ok(([theirs].into_iter().collect(), 1))
            },
            &peers,
            &mut |_| true,
        );
        drop(collected);
        (report, refresh.unwrap().join().unwrap())
    });
    report.unwrap();
    let keys = pack_keys(&gated);
    for key in ["t/packs/00000002.pack", "t/packs/00000002.idx"] {
        assert!(
            keys.iter().any(|k| k == key),
            "the collection deleted another server's pack: {keys:?}"
        );
    }
    assert!(a.contains(&theirs));
    refreshed.unwrap();
}

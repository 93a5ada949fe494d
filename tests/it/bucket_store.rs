//! The replica store kept in a bucket of a real S3-compatible store
//! (SeaweedFS on loopback): everything a local store does, with a data
//! directory that is only a working copy and a cache.

use std::sync::Arc;

use blockrep_core::{Geometry, SourceId};
use blockrep_objects::{BlockingBucket, Bucket, S3Location, S3Service};
use blockrep_store::{BucketOptions, ErrorKind, GcOptions, LaunchKind, Store};
use blockrep_testkit::rng::SplitMix64;
use blockrep_testkit::seaweedfs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedFs};

pub(crate) fn blocking_bucket(weed: &SeaweedFs, prefix: &str) -> BlockingBucket {
    let service = S3Service {
        endpoint: Some(weed.endpoint.clone()),
        region: Some("us-east-1".into()),
        credentials: Some((ACCESS_KEY_ID.into(), SECRET_ACCESS_KEY.into())),
    };
    let location = S3Location::parse(&format!("s3://blockrep/{prefix}")).unwrap();
    BlockingBucket::new(Bucket::s3(&location, &service).unwrap()).unwrap()
}

/// Two stores, as two servers open them, on the bucket prefix `prefix`,
/// each in a data directory of its own (kept with it).
fn two_servers(
    weed: &SeaweedFs,
    prefix: &str,
    options: BucketOptions,
) -> ((tempfile::TempDir, Store), (tempfile::TempDir, Store)) {
    let open = || {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_bucket(dir.path(), blocking_bucket(weed, prefix), options);
        (dir, store.unwrap())
    };
    (open(), open())
}

const NOW: u64 = 1_700_000_000_000;
const TTL_MS: u64 = 10_000;

#[test]
fn a_store_in_a_bucket_commits_snapshots_launches_and_reopens_from_the_bucket_alone() {
    let Some(weed) = SeaweedFs::start("store in a bucket") else {
        return;
    };
    let geometry = Geometry::new(4 << 20, 65_536).unwrap();
    let mut disk = vec![0u8; 4 << 20];
    SplitMix64::new(7).fill(&mut disk[..3 << 20]);
    let source = SourceId::new("web-1").unwrap();
    let first = tempfile::tempdir().unwrap();
    // A cache of one byte: every sealed pack is dropped from the data
    // directory once uploaded, so reads go to the bucket.
    let options = BucketOptions { cache_bytes: 1 };
    let root = {
        let store = Arc::new(
            Store::open_in_bucket(first.path(), blocking_bucket(&weed, "one"), options).unwrap(),
        );
        let (root, pages) = store.insert_image(&disk, geometry).unwrap();
        // No commit without the source's lease.
        let refused = store.commit(&source, 1, &root, &pages, 0, NOW).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Leased, "{refused}");
        store
            .claim_source(&source, "server-1", TTL_MS, NOW)
            .unwrap();
        store.commit(&source, 1, &root, &pages, 0, NOW).unwrap();
        let stats = store.upload_stats().unwrap();
        assert_eq!((stats.bytes_pending, stats.objects_pending), (0, 0));
        assert!(stats.uploaded_bytes_total >= 3 << 20, "{stats:?}");
        store
            .create_snapshot(&source, Some("before"), None, NOW)
            .unwrap();
        store
            .create_launch(&source, "before", "drill", LaunchKind::Test, NOW)
            .unwrap();
        let volume = store.open_launch("drill").unwrap();
        volume.write(10, b"hello").unwrap();
        volume.flush(NOW + 1).unwrap();
        root
    };
    // No pack stays local beyond the cache's budget.
    let local_packs: u64 = std::fs::read_dir(first.path().join("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        local_packs < 1 << 20,
        "{local_packs} bytes of packs kept locally"
    );

    // A second data directory, empty: everything comes from the bucket.
    let second = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open_in_bucket(second.path(), blocking_bucket(&weed, "one"), options).unwrap(),
    );
    assert_eq!(store.head(&source).unwrap().unwrap().root, root.id());
    assert_eq!(
        store.snapshot(&source, "before").unwrap().unwrap().root,
        root.id()
    );
    let out = second.path().join("export.img");
    store.export(&source, &out).unwrap();
    assert!(std::fs::read(&out).unwrap() == disk, "export differs");
    let volume = store.open_launch("drill").unwrap();
    let mut buf = [0u8; 7];
    volume.read(9, &mut buf).unwrap();
    let mut want = [0u8; 7];
    want.copy_from_slice(&disk[9..16]);
    want[1..6].copy_from_slice(b"hello");
    assert_eq!(buf, want);
    drop(volume);
    assert!(store.verify(None, None).unwrap().is_clean());

    // A second commit that changes a chunk, then GC of the first once
    // nothing names it: the bucket loses the dead pack, reads go on.
    // The same server, restarted: it takes its lease again.
    store
        .claim_source(&source, "server-1", TTL_MS, NOW + 2)
        .unwrap();
    store.delete_launch("drill").unwrap();
    store.delete_snapshot(&source, "before").unwrap();
    disk[..65_536].fill(9);
    let (root2, pages2) = store.insert_image(&disk, geometry).unwrap();
    store
        .commit(&source, 2, &root2, &pages2, 0, NOW + 2)
        .unwrap();
    let gc_options = GcOptions {
        live_share_min: 1.0,
        ..GcOptions::default()
    };
    // Only under the bucket's collection lease.
    let refused = store.gc(&gc_options).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
    store.claim_gc("server-1", TTL_MS, NOW + 2).unwrap();
    // A claim left by a server that died before writing its pack.
    let bucket = blocking_bucket(&weed, "one");
    bucket
        .put_new("packs/00099999.pack", bytes::Bytes::new())
        .unwrap();
    let report = store.gc(&gc_options).unwrap();
    store.release_gc();
    assert!(
        bucket.get("packs/00099999.pack").unwrap().is_none(),
        "orphaned claim kept"
    );
    assert!(report.blobs_dead > 0, "{report:?}");
    assert!(store.verify(None, None).unwrap().is_clean());
    drop(store);
    let third = tempfile::tempdir().unwrap();
    let store =
        Store::open_in_bucket(third.path(), blocking_bucket(&weed, "one"), options).unwrap();
    assert!(store.list_launches(None).unwrap().is_empty());
    let out = third.path().join("export.img");
    store.export(&source, &out).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == disk,
        "export after GC differs"
    );
    assert!(store.verify(None, None).unwrap().is_clean());
}

#[test]
fn a_server_that_lost_its_lease_can_never_replace_a_newer_head() {
    let Some(weed) = SeaweedFs::start("lease fencing") else {
        return;
    };
    let geometry = Geometry::new(1 << 20, 65_536).unwrap();
    let source = SourceId::new("db").unwrap();
    let options = BucketOptions::default();
    let ((_dir_a, a), (_dir_b, b)) = two_servers(&weed, "fence", options);
    let image = |seed: u64| {
        let mut disk = vec![0u8; 1 << 20];
        SplitMix64::new(seed).fill(&mut disk);
        disk
    };
    const TTL: u64 = 1_000;
    let lease_a = a.claim_source(&source, "a", TTL, NOW).unwrap().unwrap();
    let (root1, pages1) = a.insert_image(&image(1), geometry).unwrap();
    a.commit(&source, 1, &root1, &pages1, 0, NOW).unwrap();

    // B may not take the source while A's lease runs.
    let held = b.claim_source(&source, "b", TTL, NOW + 500).unwrap_err();
    assert_eq!(held.kind(), ErrorKind::Leased, "{held}");
    assert!(held.to_string().contains("leased to a"), "{held}");

    // A is paused past its expiry; B takes over, reads A's head and its
    // packs from the bucket, and commits on top of it.
    let lease_b = b
        .claim_source(&source, "b", TTL, NOW + 1_500)
        .unwrap()
        .unwrap();
    assert!(
        lease_b.generation > lease_a.generation,
        "{lease_a:?} {lease_b:?}"
    );
    assert_eq!(b.head(&source).unwrap().unwrap().root, root1.id());
    let (root2, pages2) = b.insert_image(&image(2), geometry).unwrap();
    b.commit(&source, 2, &root2, &pages2, 0, NOW + 1_600)
        .unwrap();

    // A resumes believing it still holds the lease (its clock says so):
    // the bucket refuses its late head, which names what B's does not.
    let (root_late, pages_late) = a.insert_image(&image(3), geometry).unwrap();
    let refused = a
        .commit(&source, 2, &root_late, &pages_late, 0, NOW + 900)
        .unwrap_err();
    assert!(
        refused.to_string().contains("another server wrote it"),
        "{refused}"
    );
    // Past its expiry by its own clock, A refuses by itself.
    let lapsed = a
        .commit(&source, 2, &root_late, &pages_late, 0, NOW + 1_700)
        .unwrap_err();
    assert_eq!(lapsed.kind(), ErrorKind::Leased, "{lapsed}");
    // A's renewal finds the lease gone.
    let lost = a.renew_leases(TTL, NOW + 1_800);
    assert_eq!(lost.len(), 1, "{lost:?}");

    // A collection beside A brings A in (see `bucket_gc.rs`); a second
    // collection is refused meanwhile, and no session starts elsewhere
    // while it runs.
    b.claim_presence("b", TTL, NOW + 1_800).unwrap();
    a.claim_presence("a", TTL, NOW + 1_800).unwrap();
    assert_eq!(b.claim_gc("b", TTL, NOW + 1_900).unwrap(), ["a"]);
    let second = a.claim_gc("a", TTL, NOW + 1_950).unwrap_err();
    assert_eq!(second.kind(), ErrorKind::Busy, "{second}");
    let waiting = a.claim_source(&source, "a", TTL, NOW + 2_000).unwrap_err();
    assert_eq!(waiting.kind(), ErrorKind::Busy, "{waiting}");
    assert!(waiting.to_string().contains("collecting"), "{waiting}");
    b.release_gc();
    // Once A's presence lapsed a lease time ago, B collects alone.
    assert!(
        b.claim_gc("b", TTL, NOW + 1_800 + 2 * TTL)
            .unwrap()
            .is_empty()
    );
    b.gc(&GcOptions::default()).unwrap();
    b.release_gc();
    drop((a, b));

    // What the bucket holds: B's head, readable whole.
    let dir_c = tempfile::tempdir().unwrap();
    let c = Store::open_in_bucket(dir_c.path(), blocking_bucket(&weed, "fence"), options).unwrap();
    assert_eq!(c.head(&source).unwrap().unwrap().root, root2.id());
    let out = dir_c.path().join("export.img");
    c.export(&source, &out).unwrap();
    assert!(std::fs::read(&out).unwrap() == image(2));
}

#[test]
fn a_data_directory_is_either_a_local_store_or_one_bucket_s_working_copy() {
    let Some(weed) = SeaweedFs::start("working copy") else {
        return;
    };
    let options = BucketOptions::default();
    // A local store is never emptied by opening it as a bucket's copy.
    let local = tempfile::tempdir().unwrap();
    let source = SourceId::new("keep").unwrap();
    {
        let store = Store::open(local.path()).unwrap();
        let geometry = Geometry::new(65_536, 65_536).unwrap();
        let (root, pages) = store.insert_image(&[5u8; 65_536], geometry).unwrap();
        store.commit(&source, 1, &root, &pages, 0, NOW).unwrap();
    }
    let refused =
        Store::open_in_bucket(local.path(), blocking_bucket(&weed, "copy"), options).unwrap_err();
    assert!(
        refused.to_string().contains("holds a local store"),
        "{refused}"
    );
    assert!(
        Store::open(local.path())
            .unwrap()
            .head(&source)
            .unwrap()
            .is_some()
    );

    // A working copy is not opened as a local store, nor for another bucket.
    let copy = tempfile::tempdir().unwrap();
    drop(Store::open_in_bucket(copy.path(), blocking_bucket(&weed, "copy"), options).unwrap());
    let refused = Store::open(copy.path()).unwrap_err();
    assert!(refused.to_string().contains("working copy of"), "{refused}");
    assert!(Store::open_read_only(copy.path()).is_err());
    let other =
        Store::open_in_bucket(copy.path(), blocking_bucket(&weed, "other"), options).unwrap_err();
    assert!(other.to_string().contains("not of"), "{other}");
    drop(Store::open_in_bucket(copy.path(), blocking_bucket(&weed, "copy"), options).unwrap());
}

#[test]
fn a_server_lists_the_snapshots_another_server_took_as_the_bucket_holds_them() {
    let Some(weed) = SeaweedFs::start("snapshots of another server") else {
        return;
    };
    let geometry = Geometry::new(1 << 20, 65_536).unwrap();
    let source = SourceId::new("db").unwrap();
    let options = BucketOptions::default();
    let ((dir_a, a), (dir_b, b)) = two_servers(&weed, "lists", options);
    let b = Arc::new(b);
    let names = |store: &Store, source: Option<&SourceId>| -> Vec<String> {
        let listed = store.list_snapshots(source).unwrap();
        listed.into_iter().map(|s| s.name).collect()
    };
    const TTL: u64 = 10_000;
    a.claim_source(&source, "a", TTL, NOW).unwrap();
    let mut disk = vec![0u8; 1 << 20];
    SplitMix64::new(11).fill(&mut disk);
    let (root, pages) = a.insert_image(&disk, geometry).unwrap();
    a.commit(&source, 1, &root, &pages, 0, NOW).unwrap();
    a.create_snapshot(&source, Some("first"), None, NOW)
        .unwrap();
    a.create_snapshot(&source, Some("second"), None, NOW + 1)
        .unwrap();

    // B opened before A took them: its working copy does not have them
    // until it reads the bucket again.
    assert!(names(&b, Some(&source)).is_empty());
    assert_eq!(b.refresh_snapshots(Some(&source), NOW + 2).unwrap(), 2);
    assert_eq!(names(&b, Some(&source)), ["first", "second"]);
    // Nothing changed: nothing is read again (the listing's ETags match
    // the versions B read).
    assert_eq!(b.refresh_snapshots(None, NOW + 3).unwrap(), 0);

    // A deletes one and takes another: B sees both changes.
    a.delete_snapshot(&source, "first").unwrap();
    a.create_snapshot(&source, Some("third"), None, NOW + 4)
        .unwrap();
    assert_eq!(b.refresh_snapshots(None, NOW + 5).unwrap(), 2);
    assert_eq!(names(&b, None), ["second", "third"]);
    assert_eq!(
        b.list_snapshots(Some(&source)).unwrap()[1].root,
        root.id(),
        "B's record is A's"
    );

    // Launches too: one A makes appears on B, and goes when A deletes it.
    a.create_launch(&source, "second", "drill", LaunchKind::Test, NOW + 8)
        .unwrap();
    let launches = |store: &Store| -> Vec<String> {
        let listed = store.list_launches(None).unwrap();
        listed.into_iter().map(|l| l.name).collect()
    };
    assert!(launches(&b).is_empty());
    assert!(b.refresh_launches(NOW + 9).unwrap() >= 2);
    assert_eq!(launches(&b), ["drill"]);
    // Its root is readable on B: the packs that hold it were read too.
    let drill = b.list_launches(None).unwrap().remove(0);
    b.launch_volumes(&drill).unwrap();
    assert_eq!(b.refresh_launches(NOW + 10).unwrap(), 0);
    // What a volume of it wrote on B (unfolded: B's alone) goes with B's
    // copy when A deletes the launch, as when B deletes one itself.
    {
        let volume = b.open_launch("drill").unwrap();
        volume.write(0, b"written on B").unwrap();
    }
    let overlay = dir_b.path().join("overlays/drill");
    assert!(overlay.exists());
    a.delete_launch("drill").unwrap();
    assert!(b.refresh_launches(NOW + 11).unwrap() >= 2);
    assert!(launches(&b).is_empty());
    assert!(!dir_b.path().join("launches/drill").exists());
    assert!(!overlay.exists(), "B kept the overlay of a deleted launch");

    // A refresh never touches the records of a source this server serves:
    // a file the bucket lacks stays in A's working copy while A holds the
    // lease, and goes once the lease lapsed.
    let stray = dir_a.path().join("sources/db/snapshots/stray");
    std::fs::write(&stray, b"x").unwrap();
    assert_eq!(a.refresh_snapshots(None, NOW + 6).unwrap(), 0);
    assert!(stray.exists());
    assert_eq!(a.refresh_snapshots(None, NOW + TTL + 1).unwrap(), 1);
    assert!(!stray.exists());
}

//! Tests of `snapshot.rs`.

use super::*;
use crate::RetentionPolicy;
use crate::testutil::{commit_disk, pack_bytes, sample_disk, source};
use blockrep_core::Geometry;
use std::fs;

type PauseHook = Box<dyn FnOnce()>;

thread_local! {
    /// Run once by the next snapshot taken on this thread, between reading
    /// the head and publishing the snapshot.
    static PAUSE: std::cell::RefCell<Option<PauseHook>> = const { std::cell::RefCell::new(None) };
}

/// The point between reading the head and publishing the snapshot, where a
/// test stages what other threads do meanwhile.
pub(super) fn pause_point() {
    if let Some(hook) = PAUSE.with(|pause| pause.borrow_mut().take()) {
        hook();
    }
}

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;
const T0_MS: u64 = 19_000 * DAY_MS;

fn store_with_head() -> (tempfile::TempDir, Store, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let geometry = Geometry::new(20 * 4096 + 300, 4096).unwrap();
    let disk = sample_disk(geometry.disk_size_bytes() as usize, 3);
    commit_disk(&store, &source(), &disk, geometry, 1);
    (dir, store, disk)
}

#[test]
fn record_round_trips_and_detects_damage() {
    let snapshot = Snapshot {
        name: "before-upgrade".into(),
        source: source(),
        kind: SnapshotKind::Cutover,
        epoch: 9,
        root: ChunkId([7; 32]),
        created_unix_ms: 123,
        expires_unix_ms: 456,
        consistency: Consistency::Quiesced,
    };
    let bytes = snapshot.encode();
    assert_eq!(bytes.len(), SNAPSHOT_LEN);
    assert_eq!(Snapshot::decode(&bytes).unwrap(), snapshot);
    for i in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0x04;
        assert!(Snapshot::decode(&damaged).is_err(), "flip at {i}");
    }
    assert!(Snapshot::decode(&bytes[..200]).is_err());
}

#[test]
fn create_list_get_delete() {
    let (_dir, store, _) = store_with_head();
    let head = store.head(&source()).unwrap().unwrap();
    let named = store
        .create_snapshot(&source(), Some("pre-test"), None, T0_MS)
        .unwrap();
    assert_eq!(named.root, head.root);
    assert_eq!(named.epoch, 1);
    assert_eq!(named.kind, SnapshotKind::Manual);
    assert_eq!(named.expires_unix_ms, 0);
    let generated = store
        .create_snapshot(&source(), None, Some(Duration::from_secs(60)), T0_MS + 1)
        .unwrap();
    assert_eq!(generated.name, format!("s-1-{}", T0_MS + 1));
    assert_eq!(generated.expires_unix_ms, T0_MS + 1 + 60_000);
    // Same millisecond again: the generated name moves aside.
    let again = store
        .create_snapshot(&source(), None, None, T0_MS + 1)
        .unwrap();
    assert_eq!(again.name, format!("s-1-{}-2", T0_MS + 1));

    assert_eq!(
        store.list_snapshots(Some(&source())).unwrap(),
        vec![named.clone(), generated.clone(), again.clone()]
    );
    assert_eq!(store.list_snapshots(None).unwrap().len(), 3);
    let other = SourceId::new("other").unwrap();
    assert!(store.list_snapshots(Some(&other)).unwrap().is_empty());
    assert_eq!(
        store.snapshot(&source(), "pre-test").unwrap(),
        Some(named.clone())
    );
    assert_eq!(store.snapshot(&source(), "nope").unwrap(), None);

    // Survives a reopen.
    let reopened = Store::open(store.data_dir()).unwrap();
    assert_eq!(reopened.list_snapshots(None).unwrap().len(), 3);

    assert_eq!(store.delete_snapshot(&source(), "pre-test").unwrap(), named);
    let err = store.delete_snapshot(&source(), "pre-test").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(store.list_snapshots(None).unwrap(), vec![generated, again]);
}

#[test]
fn create_refuses_bad_requests() {
    let (_dir, store, _) = store_with_head();
    store
        .create_snapshot(&source(), Some("a"), None, T0_MS)
        .unwrap();
    let exists = store
        .create_snapshot(&source(), Some("a"), None, T0_MS)
        .unwrap_err();
    assert_eq!(exists.kind(), ErrorKind::AlreadyExists);
    let no_head = store
        .create_snapshot(&SourceId::new("idle").unwrap(), None, None, T0_MS)
        .unwrap_err();
    assert_eq!(no_head.kind(), ErrorKind::NotFound);
    for bad in ["", "..", "a/b", ".hidden", "Upper", &"x".repeat(65)] {
        let err = store
            .create_snapshot(&source(), Some(bad), None, T0_MS)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{bad:?}");
    }
    let zero_ttl = store
        .create_snapshot(&source(), None, Some(Duration::ZERO), T0_MS)
        .unwrap_err();
    assert_eq!(zero_ttl.kind(), ErrorKind::Invalid);
    assert_eq!(store.list_snapshots(None).unwrap().len(), 1);
}

#[test]
fn creating_a_snapshot_copies_no_data() {
    let (dir, store, _) = store_with_head();
    let blobs_before = store.blob_count();
    let packs_before = pack_bytes(dir.path());
    for i in 0..5 {
        store
            .create_snapshot(&source(), Some(&format!("s{i}")), None, T0_MS + i)
            .unwrap();
    }
    assert_eq!(store.blob_count(), blobs_before);
    assert_eq!(pack_bytes(dir.path()), packs_before);
    let snapshot_file = dir
        .path()
        .join("sources")
        .join(source().as_str())
        .join("snapshots")
        .join("s0");
    assert_eq!(
        fs::metadata(snapshot_file).unwrap().len(),
        SNAPSHOT_LEN as u64
    );
}

#[test]
fn snapshots_keep_their_root_as_the_head_moves() {
    let (_dir, store, disk) = store_with_head();
    let first = store
        .create_snapshot(&source(), Some("first"), None, T0_MS)
        .unwrap();
    let geometry = Geometry::new(disk.len() as u64, 4096).unwrap();
    let head2 = commit_disk(&store, &source(), &sample_disk(disk.len(), 5), geometry, 2);
    let second = store
        .create_snapshot(&source(), Some("second"), None, T0_MS + 1)
        .unwrap();
    assert_ne!(first.root, second.root);
    assert_eq!(second.root, head2.root);
    assert_eq!((first.epoch, second.epoch), (1, 2));
    assert_eq!(
        store.snapshot(&source(), "first").unwrap().unwrap().root,
        first.root
    );
}

#[test]
fn manual_snapshots_expire_only_by_ttl() {
    let (_dir, store, _) = store_with_head();
    let forever = store
        .create_snapshot(&source(), Some("forever"), None, T0_MS)
        .unwrap();
    let hour = store
        .create_snapshot(
            &source(),
            Some("one-hour"),
            Some(Duration::from_secs(3600)),
            T0_MS,
        )
        .unwrap();
    assert!(
        store
            .expire_snapshots(T0_MS + HOUR_MS - 1)
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.expire_snapshots(T0_MS + HOUR_MS).unwrap(), vec![hour]);
    assert!(
        store
            .expire_snapshots(T0_MS + 365 * DAY_MS)
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.list_snapshots(None).unwrap(), vec![forever]);
}

#[test]
fn auto_snapshots_follow_the_policy_over_eight_days() {
    let (_dir, store, _) = store_with_head();
    store
        .create_snapshot(&source(), Some("manual"), None, T0_MS)
        .unwrap();
    let cutover = store
        .create_snapshot_of_kind(&source(), SnapshotKind::Cutover, None, None, T0_MS)
        .unwrap();
    assert_eq!(cutover.name, format!("cutover-1-{T0_MS}"));
    let end = T0_MS + 8 * DAY_MS;
    let mut now = T0_MS;
    let mut taken = 0;
    let mut removed = 0;
    // One check per 10 minutes; the pure tests cover checks off the slot grid.
    while now <= end {
        if let Some(snapshot) = store.create_auto_snapshot_if_due(&source(), now).unwrap() {
            assert_eq!(snapshot.kind, SnapshotKind::Auto);
            assert_eq!(snapshot.name, format!("auto-{now}"));
            taken += 1;
        }
        removed += store.expire_snapshots(now).unwrap().len();
        now += 10 * MINUTE_MS;
    }
    assert_eq!(taken, 8 * 144 + 1);
    let all = store.list_snapshots(Some(&source())).unwrap();
    let auto: Vec<u64> = all
        .iter()
        .filter(|s| s.kind == SnapshotKind::Auto)
        .map(|s| s.created_unix_ms)
        .collect();
    assert_eq!(removed, taken - auto.len());
    // 6 in the last hour, 24 hourly, 7 daily; the newest counts in all three.
    assert_eq!(auto.len(), 6 + 23 + 6);
    assert_eq!(auto.iter().filter(|&&t| end - t < HOUR_MS).count(), 6);
    assert_eq!(auto.iter().filter(|&&t| end - t < DAY_MS).count(), 6 + 23);
    assert_eq!(auto.first(), Some(&(T0_MS + 2 * DAY_MS)));
    // Manual and cutover snapshots without a TTL are untouched.
    assert_eq!(all.len(), auto.len() + 2);
}

#[test]
fn a_configured_policy_is_used() {
    let (_dir, store, _) = store_with_head();
    store.set_retention_policy(
        RetentionPolicy::new(&[crate::RetentionTier {
            every: Duration::from_secs(60),
            keep_for: Duration::from_secs(120),
        }])
        .unwrap(),
    );
    for minute in 0..10 {
        let now = T0_MS + minute * MINUTE_MS;
        assert!(
            store
                .create_auto_snapshot_if_due(&source(), now)
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .create_auto_snapshot_if_due(&source(), now + 1)
                .unwrap()
                .is_none()
        );
        store.expire_snapshots(now).unwrap();
    }
    let kept: Vec<u64> = store
        .list_snapshots(None)
        .unwrap()
        .iter()
        .map(|s| s.created_unix_ms)
        .collect();
    assert_eq!(kept, vec![T0_MS + 8 * MINUTE_MS, T0_MS + 9 * MINUTE_MS]);
}

/// The race of a snapshot with a commit and a collection: the snapshot
/// reads head 1; meanwhile head 2 is committed (head 1's chunks are now
/// named by nothing durable) and a collection starts; then the snapshot is
/// published naming root 1. The snapshot's blobs must survive, and later
/// collections must keep working.
#[test]
fn a_collection_racing_a_snapshot_keeps_what_it_names() {
    use crate::GcOptions;
    use crate::testutil::root_disk;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, mpsc};

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    // One record per pack: every blob of epoch 1 alone in a sealed pack
    // that a collection deletes once nothing names it.
    store.set_pack_size_max_bytes(1);
    let geometry = Geometry::new(20 * 4096 + 300, 4096).unwrap();
    let disk1 = sample_disk(geometry.disk_size_bytes() as usize, 3);
    let disk2 = sample_disk(geometry.disk_size_bytes() as usize, 5);
    let head1 = commit_disk(&store, &source(), &disk1, geometry, 1);

    let paused_ran = Arc::new(Mutex::new(None));
    let gc_thread = Arc::new(Mutex::new(None));
    {
        let (store, paused_ran, gc_thread) = (
            Arc::clone(&store),
            Arc::clone(&paused_ran),
            Arc::clone(&gc_thread),
        );
        PAUSE.with(|pause| {
            *pause.borrow_mut() = Some(Box::new(move || {
                // The head moves on (on another thread: this one may hold
                // the fence, which the commit takes too).
                let committer = Arc::clone(&store);
                std::thread::spawn(move || {
                    commit_disk(&committer, &source(), &disk2, geometry, 2);
                })
                .join()
                .unwrap();
                let started = Arc::new(AtomicBool::new(false));
                let (done_tx, done_rx) = mpsc::channel();
                let collector = Arc::clone(&store);
                let collector_started = Arc::clone(&started);
                *gc_thread.lock().unwrap() = Some(std::thread::spawn(move || {
                    collector_started.store(true, Ordering::SeqCst);
                    let result = collector.gc(&GcOptions::default());
                    let _ = done_tx.send(());
                    result
                }));
                // Until the collection has finished, or it cannot list the
                // roots because this snapshot holds the fence: it then
                // lists them after the publish.
                loop {
                    if done_rx.try_recv().is_ok()
                        || (started.load(Ordering::SeqCst) && store.blobs.fence().fence_is_held())
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                *paused_ran.lock().unwrap() = Some(());
            }));
        });
    }
    let snapshot = store
        .create_snapshot(&source(), Some("raced"), None, T0_MS)
        .unwrap();
    assert!(paused_ran.lock().unwrap().is_some(), "the pause point ran");
    assert_eq!(snapshot.root, head1.root);
    assert_eq!(snapshot.epoch, 1);
    let report = gc_thread
        .lock()
        .unwrap()
        .take()
        .unwrap()
        .join()
        .unwrap()
        .expect("the racing collection succeeds");
    assert!(report.roots_marked >= 1);

    // The snapshot is whole: it verifies, reads back as disk 1, and later
    // collections (which mark from it) work and keep it whole.
    let verified = store.verify(Some(&source()), Some("raced")).unwrap();
    assert!(verified.is_clean(), "{:#?}", verified.damaged);
    assert_eq!(root_disk(&store, &snapshot.root), disk1);
    let again = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(again.roots_marked, 2);
    assert_eq!(root_disk(&store, &snapshot.root), disk1);
    assert!(store.verify(None, None).unwrap().is_clean());
}

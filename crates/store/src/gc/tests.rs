//! Tests of `gc.rs`.

use super::*;
use crate::testutil::{Rng, churn, pack_bytes, pack_files, root_disk};
use crate::{LaunchKind, LaunchVolume};
use blockrep_core::{Geometry, Root, SourceId, scan_buffer};
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

const CHUNK: u32 = 4096;

fn web() -> SourceId {
    SourceId::new("web-1").unwrap()
}

fn db() -> SourceId {
    SourceId::new("db-1").unwrap()
}

/// Stores every non-zero chunk of `disk` (idempotent) and returns the ids.
fn insert_chunks(store: &Store, disk: &[u8], geometry: Geometry) -> Vec<ChunkId> {
    let ids = scan_buffer(disk, geometry);
    for (index, id) in ids.iter().enumerate() {
        if !id.is_zero() {
            let range = geometry.chunk_range(index as u64).unwrap();
            store
                .insert(
                    crate::BlobKind::Chunk,
                    *id,
                    crate::StoredCodec::Raw,
                    range.len() as u32,
                    &disk[range],
                )
                .unwrap();
        }
    }
    ids
}

/// Commits `ids` as `epoch` without inserting any chunk: what a session
/// does for chunks it stored earlier or that the agent sent as `Ref`.
fn commit_ids(
    store: &Store,
    source: &SourceId,
    geometry: Geometry,
    ids: &[ChunkId],
    epoch: u64,
) -> Result<crate::CommitStats, Error> {
    let (root, pages) = Root::build(geometry, ids);
    store.commit(
        source,
        epoch,
        &root,
        &pages,
        0,
        blockrep_core::clock::now_unix_ms(),
    )
}

fn commit(store: &Store, source: &SourceId, disk: &[u8], geometry: Geometry, epoch: u64) {
    let ids = insert_chunks(store, disk, geometry);
    commit_ids(store, source, geometry, &ids, epoch).unwrap();
}

fn read_all(volume: &LaunchVolume) -> Vec<u8> {
    let mut out = vec![0xaa; volume.size_bytes() as usize];
    volume.read(0, &mut out).unwrap();
    out
}

/// A store with history: two sources, snapshots (one deleted), a launch with
/// flushed and unflushed writes held open, an unopened launch, and small
/// packs, so that collection has dead data spread over many sealed packs.
struct Scenario {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    heads: Vec<(SourceId, Vec<u8>)>,
    snapshots: Vec<(SourceId, String, Vec<u8>)>,
    /// Launches and their flushed disks.
    launches: Vec<(String, Vec<u8>)>,
    /// The open volume of launch "drill" and its current disk.
    volume: Option<(Arc<LaunchVolume>, Vec<u8>)>,
    /// Chunks that were committed once and that nothing references now.
    dead: Vec<ChunkId>,
    /// The blob index's memory budget, when a test makes it tiny.
    index_bytes: Option<usize>,
}

const PACK_BYTES: u64 = 48 * 1024;

fn scenario(seed: u64) -> Scenario {
    scenario_with(seed, None)
}

/// [`scenario`] with the blob index's memory budget set to `index_bytes`.
fn scenario_with(seed: u64, index_bytes: Option<usize>) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    store.set_pack_size_max_bytes(PACK_BYTES);
    if let Some(bytes) = index_bytes {
        store.set_index_memory_max_bytes(bytes);
    }
    let geometry = Geometry::new(40 * u64::from(CHUNK) + 1000, CHUNK).unwrap();
    let mut rng = Rng::new(seed);
    let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
    churn(&mut rng, &mut disk, geometry, 90);
    let mut committed = HashSet::new();
    let mut snapshots = Vec::new();
    let mut db_disk = Vec::new();
    for epoch in 1..=10 {
        if epoch > 1 {
            churn(&mut rng, &mut disk, geometry, 50);
        }
        commit(&store, &web(), &disk, geometry, epoch);
        committed.extend(scan_buffer(&disk, geometry));
        if [1, 2, 4].contains(&epoch) {
            let name = format!("e{epoch}");
            store
                .create_snapshot(&web(), Some(&name), None, 1000 + epoch)
                .unwrap();
            snapshots.push((web(), name, disk.clone()));
        }
        if epoch == 3 {
            // A second source sharing half its chunks with this epoch.
            db_disk = disk.clone();
            churn(&mut rng, &mut db_disk, geometry, 50);
            commit(&store, &db(), &db_disk, geometry, 1);
        }
    }
    store.delete_snapshot(&web(), "e1").unwrap();
    snapshots.remove(0);
    store
        .create_launch(
            &web(),
            "e2",
            "drill",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    store
        .create_launch(
            &web(),
            "e4",
            "idle",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    let volume = store.open_launch("drill").unwrap();
    let mut model = snapshots[0].2.clone();
    let write = |rng: &mut Rng, model: &mut Vec<u8>| {
        let len = 1 + rng.below(3 * u64::from(CHUNK)) as usize;
        let offset = rng.below(model.len() as u64 - len as u64) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        volume.write(offset as u64, &data).unwrap();
        model[offset..offset + len].copy_from_slice(&data);
    };
    for _ in 0..4 {
        write(&mut rng, &mut model);
    }
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    let flushed = model.clone();
    for _ in 0..3 {
        write(&mut rng, &mut model);
    }
    let heads = vec![(web(), disk.clone()), (db(), db_disk)];
    let launches = vec![
        ("drill".to_owned(), flushed),
        ("idle".to_owned(), snapshots[1].2.clone()),
    ];
    let mut live = HashSet::new();
    for disk in heads
        .iter()
        .map(|h| &h.1)
        .chain(snapshots.iter().map(|s| &s.2))
        .chain(launches.iter().map(|l| &l.1))
        .chain([&model])
    {
        live.extend(scan_buffer(disk, geometry));
    }
    let dead = committed.difference(&live).copied().collect();
    Scenario {
        dir,
        store,
        heads,
        snapshots,
        launches,
        volume: Some((volume, model)),
        dead,
        index_bytes,
    }
}

impl Scenario {
    /// Checks every head, snapshot and launch (and the open volume, if any)
    /// against the expected disks, and that verification finds nothing.
    fn check(&self, store: &Arc<Store>) {
        let out = self.dir.path().join("export.raw");
        for (source, disk) in &self.heads {
            store.export(source, &out).unwrap();
            assert_eq!(&fs::read(&out).unwrap(), disk, "head of {source}");
        }
        let names: Vec<String> = store
            .list_snapshots(None)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names.len(), self.snapshots.len());
        for (source, name, disk) in &self.snapshots {
            let snapshot = store.snapshot(source, name).unwrap().unwrap();
            assert_eq!(&root_disk(store, &snapshot.root), disk, "snapshot {name}");
        }
        for (name, disk) in &self.launches {
            let launch = store.launch(name).unwrap().unwrap();
            assert_eq!(&root_disk(store, &launch.root), disk, "launch {name}");
        }
        if let Some((volume, disk)) = &self.volume {
            assert_eq!(&read_all(volume), disk, "open volume");
        }
        let report = store.verify(None, None).unwrap();
        assert!(report.is_clean(), "{:#?}", report.damaged);
    }

    fn reopen(&mut self) -> Arc<Store> {
        self.volume = None;
        let store = Arc::new(Store::open(self.dir.path()).unwrap());
        store.set_pack_size_max_bytes(PACK_BYTES);
        if let Some(bytes) = self.index_bytes {
            store.set_index_memory_max_bytes(bytes);
        }
        self.store = Arc::clone(&store);
        store
    }
}

fn pack_count(dir: &Path) -> usize {
    pack_files(dir).len()
}

#[test]
fn gc_frees_only_unreferenced_data() {
    gc_frees_only_unreferenced_data_of(scenario(1));
}

/// The same with the blob index in runs on disk (a budget of 8 entries):
/// moved and removed entries, packs deleted under a manifest that covers
/// them, and a reopen that trusts the runs.
#[test]
fn gc_frees_only_unreferenced_data_with_the_index_on_disk() {
    let s = scenario_with(1, Some(8 * 128));
    assert!(
        s.dir.path().join("index/manifest").exists(),
        "the index has runs"
    );
    gc_frees_only_unreferenced_data_of(s);
}

fn gc_frees_only_unreferenced_data_of(mut s: Scenario) {
    let store = Arc::clone(&s.store);
    let blobs_before = store.blob_count();
    let bytes_before = pack_bytes(s.dir.path());
    let files_before = pack_files(s.dir.path());
    let report = store.gc(&GcOptions::default()).unwrap();
    assert!(report.packs_compacted >= 2, "{report:?}");
    assert!(
        report.bytes_freed > 0 && report.blobs_removed > 0,
        "{report:?}"
    );
    assert_eq!(report.packs_total as usize, files_before.len());
    assert_eq!(report.packs_kept_damaged, 0);
    assert_eq!(
        report.bytes_live + report.bytes_dead,
        bytes_before,
        "every byte of every pack is live or dead"
    );
    assert_eq!(pack_bytes(s.dir.path()), bytes_before - report.bytes_freed);
    assert_eq!(
        store.blob_count(),
        blobs_before - report.blobs_removed as usize
    );
    let files_after = pack_files(s.dir.path());
    let removed = files_before
        .keys()
        .filter(|name| !files_after.contains_key(*name))
        .count();
    assert_eq!(removed as u64, report.packs_compacted);
    assert!(
        s.dead.iter().any(|id| !store.contains(id)),
        "some dead chunk is gone"
    );
    assert_eq!(store.last_gc_report(), Some(report));
    s.check(&store);

    // Everything at once: every sealed pack with a dead byte is compacted.
    let all = store
        .gc(&GcOptions {
            live_share_min: 1.0,
            dry_run: false,
        })
        .unwrap();
    s.check(&store);
    let newest = store.blobs.newest_pack_number();
    for id in &s.dead {
        if let Ok(location) = store.blobs.location(id) {
            assert!(location.pack >= newest - 1, "{all:?}");
        }
    }
    let store = s.reopen();
    s.check(&store);
}

#[test]
fn a_read_only_reader_keeps_reading_across_a_collection() {
    let s = scenario(3);
    let reader = Arc::new(Store::open_read_only(s.dir.path()).unwrap());
    // One snapshot read before (its packs' handles are cached), the rest
    // after the collection moved blobs and deleted packs.
    let (source, name, disk) = &s.snapshots[0];
    let snapshot = reader.snapshot(source, name).unwrap().unwrap();
    assert_eq!(&root_disk(&reader, &snapshot.root), disk);
    let report = s.store.gc(&GcOptions::default()).unwrap();
    assert!(report.packs_compacted > 0 && report.blobs_copied > 0);
    let unchanged = Scenario {
        dir: tempfile::tempdir().unwrap(),
        store: Arc::clone(&reader),
        heads: s.heads.clone(),
        snapshots: s.snapshots.clone(),
        launches: s.launches.clone(),
        volume: None,
        dead: Vec::new(),
        index_bytes: None,
    };
    unchanged.check(&reader);
}

#[test]
fn a_dry_run_changes_nothing_and_predicts_the_real_run() {
    let mut s = scenario(2);
    // Unflushed launch writes are live only to the process that holds them;
    // close the volume so the read-only store sees the same store.
    s.volume = None;
    let store = Arc::clone(&s.store);
    let files = pack_files(s.dir.path());
    let blobs = store.blob_count();
    let dry_run = GcOptions {
        dry_run: true,
        ..GcOptions::default()
    };
    let predicted = store.gc(&dry_run).unwrap();
    assert!(predicted.dry_run && predicted.packs_compacted > 0 && predicted.bytes_freed > 0);
    assert_eq!(pack_files(s.dir.path()), files, "pack files byte-identical");
    assert_eq!(store.blob_count(), blobs);

    let reader = Store::open_read_only(s.dir.path()).unwrap();
    assert_eq!(reader.gc(&dry_run).unwrap(), predicted);
    assert_eq!(
        reader.gc(&GcOptions::default()).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    assert_eq!(pack_files(s.dir.path()), files);

    let done = store.gc(&GcOptions::default()).unwrap();
    assert_eq!(
        done,
        GcReport {
            dry_run: false,
            ..predicted
        }
    );
    s.check(&store);
    for bad in [-0.1, 1.5, f64::NAN] {
        let options = GcOptions {
            live_share_min: bad,
            dry_run: true,
        };
        assert_eq!(store.gc(&options).unwrap_err().kind(), ErrorKind::Invalid);
    }
}

/// A store with small packs, one source committed at epoch 1.
fn small_store() -> (tempfile::TempDir, Arc<Store>, Geometry, Rng, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    store.set_pack_size_max_bytes(4 * (u64::from(CHUNK) + 52));
    let geometry = Geometry::new(16 * u64::from(CHUNK), CHUNK).unwrap();
    let mut rng = Rng::new(99);
    let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
    rng.fill(&mut disk);
    commit(&store, &web(), &disk, geometry, 1);
    (dir, store, geometry, rng, disk)
}

fn export(store: &Store, dir: &Path) -> Vec<u8> {
    let out = dir.join("export.raw");
    store.export(&web(), &out).unwrap();
    fs::read(out).unwrap()
}

#[test]
fn chunks_inserted_before_gc_and_committed_after_its_mark_are_kept() {
    let (dir, store, geometry, mut rng, disk1) = small_store();
    let mut disk2 = disk1.clone();
    churn(&mut rng, &mut disk2, geometry, 60);
    let ids2 = insert_chunks(&store, &disk2, geometry);
    let mut disk3 = disk2.clone();
    churn(&mut rng, &mut disk3, geometry, 60);
    let ids3 = insert_chunks(&store, &disk3, geometry);
    // Dead filler seals the packs that hold the uncommitted chunks.
    let mut filler = vec![0u8; 8 * CHUNK as usize];
    rng.fill(&mut filler);
    insert_chunks(
        &store,
        &filler,
        Geometry::new(filler.len() as u64, CHUNK).unwrap(),
    );
    let newest = store.blobs.newest_pack_number();
    let uncommitted_in_sealed_packs = ids2
        .iter()
        .chain(&ids3)
        .filter(|id| store.blobs.location(id).is_ok_and(|l| l.pack < newest))
        .count();
    assert!(uncommitted_in_sealed_packs > 4);

    // The commits come from the GC thread's own hook, at the exact points
    // between steps: epoch 2 after the mark, epoch 3 after the copy (so its
    // chunks must be caught by the fenced sweep).
    let report = store
        .gc_with_hook(&GcOptions::default(), &mut |stage| {
            match stage {
                GcStage::Marked => {
                    commit_ids(&store, &web(), geometry, &ids2, 2).unwrap();
                    store.create_snapshot(&web(), Some("two"), None, 1).unwrap();
                }
                GcStage::Copied => {
                    commit_ids(&store, &web(), geometry, &ids3, 3).unwrap();
                }
                _ => {}
            }
            true
        })
        .unwrap();
    assert!(report.packs_compacted > 0, "{report:?}");
    assert!(report.blobs_removed > 0, "the filler is gone: {report:?}");
    for store in [
        Arc::clone(&store),
        Arc::new(Store::open(dir.path()).unwrap()),
    ] {
        assert_eq!(export(&store, dir.path()), disk3);
        let two = store.snapshot(&web(), "two").unwrap().unwrap();
        assert_eq!(root_disk(&store, &two.root), disk2);
        assert!(store.verify(None, None).unwrap().is_clean());
    }
}

/// Epoch 2 replaces every chunk of epoch 1; returns a chunk of epoch 1 (now
/// dead) that sits in a sealed pack, with its bytes.
fn dead_chunk(
    store: &Store,
    geometry: Geometry,
    rng: &mut Rng,
    disk1: &[u8],
) -> (Vec<u8>, ChunkId, Vec<u8>) {
    let mut disk2 = vec![0u8; disk1.len()];
    rng.fill(&mut disk2);
    commit(store, &web(), &disk2, geometry, 2);
    let newest = store.blobs.newest_pack_number();
    let ids1 = scan_buffer(disk1, geometry);
    let index = ids1
        .iter()
        .position(|id| store.blobs.location(id).unwrap().pack < newest)
        .unwrap();
    let range = geometry.chunk_range(index as u64).unwrap();
    (disk2, ids1[index], disk1[range].to_vec())
}

#[test]
fn a_ref_to_a_chunk_gc_dropped_is_refused_not_committed_dangling() {
    let (dir, store, geometry, mut rng, disk1) = small_store();
    let (disk2, dead, dead_bytes) = dead_chunk(&store, geometry, &mut rng, &disk1);
    // The session learns through Offer/Have that the store holds it...
    assert!(store.contains(&dead));
    let all = GcOptions {
        live_share_min: 1.0,
        dry_run: false,
    };
    // ...then a collection drops it before the commit.
    store.gc(&all).unwrap();
    assert!(!store.contains(&dead));
    let mut ids = scan_buffer(&disk2, geometry);
    ids[0] = dead;
    let err = commit_ids(&store, &web(), geometry, &ids, 3).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Missing);
    assert_eq!(store.head(&web()).unwrap().unwrap().epoch, 2);
    assert_eq!(export(&store, dir.path()), disk2);
    // The agent sends the data on its next try.
    store
        .insert(
            crate::BlobKind::Chunk,
            dead,
            crate::StoredCodec::Raw,
            CHUNK,
            &dead_bytes,
        )
        .unwrap();
    commit_ids(&store, &web(), geometry, &ids, 3).unwrap();
    let mut disk3 = disk2.clone();
    disk3[..CHUNK as usize].copy_from_slice(&dead_bytes);
    assert_eq!(export(&store, dir.path()), disk3);
}

#[test]
fn a_contains_hit_during_gc_keeps_the_chunk() {
    for stage_of_hit in [GcStage::Marked, GcStage::Copied] {
        let (dir, store, geometry, mut rng, disk1) = small_store();
        let (disk2, dead, dead_bytes) = dead_chunk(&store, geometry, &mut rng, &disk1);
        let all = GcOptions {
            live_share_min: 1.0,
            dry_run: false,
        };
        let report = store
            .gc_with_hook(&all, &mut |stage| {
                if stage == stage_of_hit {
                    assert!(store.contains(&dead));
                }
                true
            })
            .unwrap();
        assert!(report.blobs_removed > 0, "{report:?}");
        assert!(store.contains(&dead), "hit at {stage_of_hit:?}");
        let mut ids = scan_buffer(&disk2, geometry);
        ids[3] = dead;
        commit_ids(&store, &web(), geometry, &ids, 3).unwrap();
        let mut disk3 = disk2.clone();
        disk3[3 * CHUNK as usize..4 * CHUNK as usize].copy_from_slice(&dead_bytes);
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(export(&reopened, dir.path()), disk3);
        assert!(reopened.verify(None, None).unwrap().is_clean());
    }
}

#[test]
fn replication_and_launch_writes_continue_while_gc_runs() {
    let (dir, store, geometry, _, disk1) = small_store();
    store
        .create_snapshot(&web(), Some("base"), None, 1)
        .unwrap();
    store
        .create_launch(
            &web(),
            "base",
            "drill",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    let writing = AtomicBool::new(true);
    let all = GcOptions {
        live_share_min: 0.9,
        dry_run: false,
    };
    let (last_disk, snapshots, volume_model, runs) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rng = Rng::new(5);
            let mut disk = disk1.clone();
            let mut history = vec![disk1.clone()];
            let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
            for epoch in 2..=60u64 {
                churn(&mut rng, &mut disk, geometry, 30);
                // Reuse a chunk of an older epoch, most likely dead by now.
                let old = &history[rng.below(history.len() as u64) as usize];
                let (from, to) = (rng.below(16), rng.below(16));
                let chunk = CHUNK as usize;
                let piece = old[from as usize * chunk..(from as usize + 1) * chunk].to_vec();
                disk[to as usize * chunk..(to as usize + 1) * chunk].copy_from_slice(&piece);
                history.push(disk.clone());
                // Ref-style: send only what the store says it lacks.
                let ids = scan_buffer(&disk, geometry);
                for (index, id) in ids.iter().enumerate() {
                    if !id.is_zero() && !store.contains(id) {
                        let range = geometry.chunk_range(index as u64).unwrap();
                        store
                            .insert(
                                crate::BlobKind::Chunk,
                                *id,
                                crate::StoredCodec::Raw,
                                CHUNK,
                                &disk[range],
                            )
                            .unwrap();
                    }
                }
                let mut attempts = 0;
                while let Err(e) = commit_ids(&store, &web(), geometry, &ids, epoch) {
                    // A chunk found before a collection dropped it: resend.
                    assert_eq!(e.kind(), ErrorKind::Missing, "{e}");
                    attempts += 1;
                    assert!(attempts < 20);
                    insert_chunks(&store, &disk, geometry);
                }
                if epoch % 7 == 0 {
                    let name = format!("s{epoch}");
                    store
                        .create_snapshot(&web(), Some(&name), None, epoch)
                        .unwrap();
                    snapshots.push((name, disk.clone()));
                    if snapshots.len() > 2 {
                        let (gone, _) = snapshots.remove(0);
                        store.delete_snapshot(&web(), &gone).unwrap();
                    }
                }
            }
            writing.store(false, Ordering::SeqCst);
            (disk, snapshots)
        });
        let launcher = scope.spawn(|| {
            let volume = store.open_launch("drill").unwrap();
            let mut model = disk1.clone();
            let mut rng = Rng::new(6);
            let mut round = 0;
            while writing.load(Ordering::SeqCst) || round < 20 {
                round += 1;
                let len = 1 + rng.below(2 * u64::from(CHUNK)) as usize;
                let offset = rng.below((model.len() - len) as u64) as usize;
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                volume.write(offset as u64, &data).unwrap();
                model[offset..offset + len].copy_from_slice(&data);
                let mut back = vec![0u8; len];
                volume.read(offset as u64, &mut back).unwrap();
                assert_eq!(back, data);
                if round % 5 == 0 {
                    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
                }
                assert_eq!(read_all(&volume), model);
            }
            (volume, model)
        });
        let mut runs = 0;
        while writing.load(Ordering::SeqCst) || runs < 3 {
            store.gc(&all).unwrap();
            runs += 1;
        }
        let (disk, snapshots) = writer.join().unwrap();
        let (volume, model) = launcher.join().unwrap();
        store.gc(&all).unwrap();
        assert_eq!(read_all(&volume), model, "unflushed writes survive gc");
        volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
        (disk, snapshots, model, runs)
    });
    assert!(runs >= 3);
    for store in [
        Arc::clone(&store),
        Arc::new(Store::open(dir.path()).unwrap()),
    ] {
        assert_eq!(export(&store, dir.path()), last_disk);
        for (name, disk) in &snapshots {
            let snapshot = store.snapshot(&web(), name).unwrap().unwrap();
            assert_eq!(&root_disk(&store, &snapshot.root), disk);
        }
        let drill = store.launch("drill").unwrap().unwrap();
        assert_eq!(root_disk(&store, &drill.root), volume_model);
        assert!(store.verify(None, None).unwrap().is_clean());
    }
}

#[test]
fn a_crash_at_any_step_of_compaction_loses_nothing() {
    let cases = [
        (GcStage::Marked, false),
        (GcStage::Copied, false),
        (GcStage::Copied, true),
        (GcStage::Swept, false),
        (GcStage::PackDeleted, false),
    ];
    for (stop_at, torn_copy) in cases {
        let mut s = scenario(7);
        let options = GcOptions {
            live_share_min: 0.9,
            dry_run: false,
        };
        let report = s
            .store
            .gc_with_hook(&options, &mut |stage| stage != stop_at)
            .unwrap();
        if stop_at == GcStage::PackDeleted {
            assert_eq!(report.packs_compacted, 1, "stopped after one deletion");
        }
        // The crash: the process is gone, and with it the volume's
        // unflushed writes.
        let store_dir = s.dir.path().to_owned();
        drop(s.volume.take());
        let packs_at_crash = pack_count(&store_dir);
        if torn_copy {
            assert!(report.blobs_copied > 0);
            let newest = pack_files(&store_dir).into_keys().next_back().unwrap();
            let path = store_dir.join("packs").join(newest);
            let len = fs::metadata(&path).unwrap().len();
            let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(len - 30).unwrap();
        }
        let store = s.reopen();
        s.check(&store);
        assert_eq!(pack_count(&store_dir), packs_at_crash);
        // The next collection finishes the job.
        store.gc(&options).unwrap();
        s.check(&store);
        let store = s.reopen();
        s.check(&store);
    }
}

/// Servers beside the collection whose fences hold for `checks` more checks.
struct Lapsing(std::sync::atomic::AtomicU32);

impl crate::blobs::Peers for Lapsing {
    fn touched(&self) -> Result<Vec<ChunkId>, Error> {
        Ok(Vec::new())
    }

    fn still_fenced(&self) -> Result<(), Error> {
        match self.0.fetch_sub(1, Ordering::SeqCst) {
            0 => Err(Error::new(ErrorKind::Busy, "lapsed")),
            _ => Ok(()),
        }
    }
}

#[test]
fn a_collection_whose_peers_may_go_on_deletes_nothing_more_and_restores_what_it_dropped() {
    let (dir, store, geometry, mut rng, disk1) = small_store();
    let (disk2, dead, _) = dead_chunk(&store, geometry, &mut rng, &disk1);
    let packs = pack_count(dir.path());
    let all = GcOptions {
        live_share_min: 1.0,
        dry_run: false,
    };
    // Fenced at the sweep, lapsed at the first deletion.
    let peers = Lapsing(std::sync::atomic::AtomicU32::new(1));
    let err = store
        .blobs
        .collect(&all, || store.mark(), &peers, &mut |_| true)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    // The copies were added, nothing was deleted, and the entries the sweep
    // dropped are back: another server may still name them.
    assert!(pack_count(dir.path()) >= packs);
    assert!(store.contains(&dead));
    let mut ids = scan_buffer(&disk2, geometry);
    ids[0] = dead;
    commit_ids(&store, &web(), geometry, &ids, 3).unwrap();
    assert!(store.verify(None, None).unwrap().is_clean());
    // The next collection decides again: the chunk is live now.
    commit(&store, &web(), &disk2, geometry, 4);
    store.gc(&all).unwrap();
    assert!(!store.contains(&dead));
    assert_eq!(export(&store, dir.path()), disk2);
}

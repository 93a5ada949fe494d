//! Tests of machine commits: all volumes or none, read back, exported, kept by
//! GC and checked by verify, and single-disk heads read as one-volume machines.

use std::fs;
use std::os::unix::fs::FileExt;

use blockrep_core::{ChunkId, Geometry, scan_buffer};

use super::*;
use crate::error::ErrorKind;
use crate::testutil::{Rng, churn, commit_disk, root_disk, store_disk};
use crate::{GcOptions, StoredRoot};

const CHUNK: u32 = 4096;

fn web() -> SourceId {
    SourceId::new("web-1").unwrap()
}

fn name(s: &str) -> VolumeName {
    VolumeName::new(s).unwrap()
}

/// Three disks of different sizes: `boot` a chunk multiple, `data` not one,
/// `log` sparse (one chunk of data in 64).
fn three_disks(rng: &mut Rng) -> Vec<(VolumeName, Geometry, Vec<u8>)> {
    let boot = Geometry::new(20 * u64::from(CHUNK), CHUNK).unwrap();
    let data = Geometry::new(33 * u64::from(CHUNK) + 1234, CHUNK).unwrap();
    let log = Geometry::new(64 * u64::from(CHUNK), CHUNK).unwrap();
    let mut out = Vec::new();
    for (n, geometry, share) in [("boot", boot, 90), ("data", data, 60), ("log", log, 0)] {
        let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
        churn(rng, &mut disk, geometry, share);
        if n == "log" {
            rng.fill(&mut disk[7 * CHUNK as usize..8 * CHUNK as usize]);
        }
        out.push((name(n), geometry, disk));
    }
    out
}

/// Stores every non-zero chunk of each disk and commits them as one machine.
fn commit_machine_disks(
    store: &Store,
    epoch: u64,
    disks: &[(VolumeName, Geometry, Vec<u8>)],
) -> Result<crate::CommitStats, Error> {
    let built: Vec<_> = disks
        .iter()
        .map(|(n, geometry, disk)| {
            let (root, pages) = store_disk(store, disk, *geometry);
            (n, root, pages)
        })
        .collect();
    commit_built(store, epoch, &built, Consistency::CrashConsistent)
}

/// Commits volumes already stored (name, root, pages) as one machine.
fn commit_built(
    store: &Store,
    epoch: u64,
    built: &[(&VolumeName, Root, Vec<Page>)],
    consistency: Consistency,
) -> Result<crate::CommitStats, Error> {
    let volumes: Vec<VolumeCommit<'_>> = built
        .iter()
        .map(|(n, root, pages)| VolumeCommit {
            name: n,
            root,
            pages,
        })
        .collect();
    store.commit_machine(&web(), epoch, &volumes, 10, true, consistency, 20)
}

fn assert_machine_is(store: &Store, root: &ChunkId, disks: &[(VolumeName, Geometry, Vec<u8>)]) {
    let machine = store.read_machine(root).unwrap();
    assert_eq!(machine.volumes().len(), disks.len());
    for (n, _, disk) in disks {
        let volume_root = machine.volume(n.as_str()).unwrap();
        assert!(
            root_disk(store, &volume_root) == *disk,
            "volume {n} differs"
        );
    }
}

#[test]
fn a_machine_commits_reads_back_and_exports_each_volume() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let disks = three_disks(&mut Rng::new(1));
    let head = commit_machine_disks(&store, 1, &disks).unwrap().head;
    assert!(matches!(
        store.read_stored_root(&head.root).unwrap(),
        StoredRoot::Machine(_)
    ));
    assert_eq!(head.consistency, Consistency::CrashConsistent);
    assert_machine_is(&store, &head.root, &disks);
    drop(store);

    // After a reopen, each volume exports as its disk.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.head(&web()).unwrap(), Some(head));
    for (n, _, disk) in &disks {
        let out = dir.path().join(format!("{n}.raw"));
        let stats = store.export_volume(&web(), Some(n.as_str()), &out).unwrap();
        assert_eq!(stats.disk_size_bytes, disk.len() as u64);
        assert!(fs::read(&out).unwrap() == *disk, "export of {n} differs");
    }
    // Without a name, several volumes cannot be exported; a wrong name is refused.
    let err = store.export(&web(), &dir.path().join("x.raw")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.to_string().contains("boot, data, log"), "{err}");
    let err = store
        .export_volume(&web(), Some("swap"), &dir.path().join("x.raw"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(!dir.path().join("x.raw").exists());
    // A disk-root reader is told what it got.
    let err = store.read_root(&head.root).unwrap_err();
    assert!(err.to_string().contains("machine root"), "{err}");
}

#[test]
fn a_machine_commit_with_a_missing_chunk_moves_no_volume() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rng = Rng::new(2);
    let disks = three_disks(&mut rng);
    let first = commit_machine_disks(&store, 1, &disks).unwrap().head;

    // Epoch 2 changes every volume, but one chunk of `data` never arrives.
    let mut next = disks.clone();
    for (_, geometry, disk) in &mut next {
        churn(&mut rng, disk, *geometry, 30);
    }
    let built: Vec<_> = next
        .iter()
        .map(|(n, geometry, disk)| {
            let (root, pages) = store_disk(&store, disk, *geometry);
            if n.as_str() != "data" {
                return (n, root, pages);
            }
            // One chunk of `data` never arrives: its id names nothing stored.
            let mut ids = scan_buffer(disk, *geometry);
            ids[2] = ChunkId::from(blake3::hash(b"never sent"));
            let (root, pages) = Root::build(*geometry, &ids);
            (n, root, pages)
        })
        .collect();
    let err = commit_built(&store, 2, &built, Consistency::Live).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Missing, "{err}");
    // The head still names epoch 1's machine, whole.
    assert_eq!(store.head(&web()).unwrap(), Some(first));
    assert_machine_is(&store, &first.root, &disks);
}

#[test]
fn a_single_disk_head_reads_as_a_one_volume_machine_and_grows_into_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rng = Rng::new(3);
    let geometry = Geometry::new(30 * u64::from(CHUNK) + 10, CHUNK).unwrap();
    let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
    churn(&mut rng, &mut disk, geometry, 70);
    let head = commit_disk(&store, &web(), &disk, geometry, 1);
    let machine = store.read_machine(&head.root).unwrap();
    assert_eq!(machine.volumes(), &[(name("disk"), head.root)]);
    let out = dir.path().join("disk.raw");
    store.export_volume(&web(), Some("disk"), &out).unwrap();
    assert!(fs::read(&out).unwrap() == disk);

    // The next epoch is a machine: the old disk as `disk`, plus a new volume.
    let mut extra = vec![0u8; 8 * CHUNK as usize];
    rng.fill(&mut extra);
    let disks = vec![
        (name("disk"), geometry, disk),
        (
            name("extra"),
            Geometry::new(extra.len() as u64, CHUNK).unwrap(),
            extra,
        ),
    ];
    let head = commit_machine_disks(&store, 2, &disks).unwrap().head;
    assert_machine_is(&store, &head.root, &disks);
}

#[test]
fn gc_keeps_every_volume_of_machine_heads_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.set_pack_size_max_bytes(64 * 1024);
    let mut rng = Rng::new(4);
    let first = three_disks(&mut rng);
    let head1 = commit_machine_disks(&store, 1, &first).unwrap().head;
    store.create_snapshot(&web(), Some("s1"), None, 30).unwrap();
    let mut second = first.clone();
    for (_, geometry, disk) in &mut second {
        churn(&mut rng, disk, *geometry, 50);
    }
    let head2 = commit_machine_disks(&store, 2, &second).unwrap().head;
    let mut third = second.clone();
    for (_, geometry, disk) in &mut third {
        churn(&mut rng, disk, *geometry, 50);
    }
    let head3 = commit_machine_disks(&store, 3, &third).unwrap().head;

    let options = GcOptions {
        live_share_min: 1.0,
        dry_run: false,
    };
    let report = store.gc(&options).unwrap();
    // Epoch 2 is referred to by nothing: its own chunks are garbage.
    assert!(report.blobs_removed > 0, "{report:?}");
    assert_eq!(report.roots_marked, 6, "two machines of three volumes");
    assert_machine_is(&store, &head1.root, &first);
    assert_machine_is(&store, &head3.root, &third);
    assert!(store.read_machine(&head2.root).is_err());
    let verify = store.verify(None, None).unwrap();
    assert!(verify.is_clean(), "{verify:?}");
    // Two machine roots and three disk roots each.
    assert_eq!(verify.roots_checked, 8);
}

#[test]
fn verify_names_the_volume_a_damaged_chunk_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let disks = three_disks(&mut Rng::new(5));
    let head = commit_machine_disks(&store, 1, &disks).unwrap().head;
    let (_, geometry, log) = &disks[2];
    let ids = scan_buffer(log, *geometry);
    let (index, victim) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| !id.is_zero())
        .unwrap();
    // A chunk only `log` holds.
    assert!(
        disks[..2]
            .iter()
            .all(|(_, g, d)| !scan_buffer(d, *g).contains(victim))
    );
    let location = store.blobs.location(victim).unwrap();
    let pack = dir
        .path()
        .join("packs")
        .join(crate::blobs::pack_file_name(location.pack));
    let file = fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(pack)
        .unwrap();
    let at = location.offset + 52 + 9;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 1], at).unwrap();

    let report = store.verify(None, None).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let damaged = &report.damaged[0];
    assert_eq!(damaged.id, *victim);
    assert_eq!(damaged.affected.len(), 1);
    let affected = &damaged.affected[0];
    assert_eq!(affected.volume, Some(name("log")));
    assert_eq!(
        affected.root,
        store
            .read_machine(&head.root)
            .unwrap()
            .volume("log")
            .unwrap()
    );
    assert_eq!(affected.chunks[0].index, index as u64);
}

/// Reads a whole launch volume.
fn read_volume(volume: &crate::LaunchVolume) -> Vec<u8> {
    let mut out = vec![0u8; volume.size_bytes() as usize];
    volume.read(0, &mut out).unwrap();
    out
}

#[test]
fn a_machine_launch_opens_each_volume_and_flushes_them_independently() {
    let dir = tempfile::tempdir().unwrap();
    let mut disks = three_disks(&mut Rng::new(6));
    {
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        commit_machine_disks(&store, 1, &disks).unwrap();
        store.create_snapshot(&web(), Some("s1"), None, 30).unwrap();
        let info = store
            .create_launch(&web(), "s1", "drill", crate::LaunchKind::Test, 40)
            .unwrap();
        let names: Vec<String> = store
            .launch_volumes(&info)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["boot", "data", "log"]);
        // Several volumes: one must be named; an unknown one is refused.
        let err = store.open_launch("drill").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        let err = store.open_launch_volume("drill", Some("swap")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

        let boot = store.open_launch_volume("drill", Some("boot")).unwrap();
        let log = store.open_launch_volume("drill", Some("log")).unwrap();
        // The same volume is shared, another is not.
        assert!(std::sync::Arc::ptr_eq(
            &boot,
            &store.open_launch_volume("drill", Some("boot")).unwrap()
        ));
        for (volume, (_, _, disk)) in [(&boot, &disks[0]), (&log, &disks[2])] {
            assert!(read_volume(volume) == *disk);
        }
        // Writes to two volumes, flushed one after the other: each flush
        // keeps the other's.
        boot.write(5000, b"boot was written").unwrap();
        disks[0].2[5000..5016].copy_from_slice(b"boot was written");
        log.write(3 * u64::from(CHUNK) + 7, &[0xee; 9000]).unwrap();
        let at = 3 * CHUNK as usize + 7;
        disks[2].2[at..at + 9000].fill(0xee);
        boot.flush(50).unwrap();
        log.flush(60).unwrap();
        // A volume open keeps the launch from being deleted.
        let err = store.delete_launch("drill").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
        let info = store.launch("drill").unwrap().unwrap();
        assert_eq!(info.generation, 2);
        assert_eq!(info.flushed_unix_ms, 60);
        // The snapshot and the head are untouched.
        let head = store.head(&web()).unwrap().unwrap();
        assert_eq!(info.base_root, head.root);
        assert_ne!(info.root, head.root);
    }
    // After a reopen and a collection, the launch reads as flushed.
    let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
    let options = GcOptions {
        live_share_min: 1.0,
        dry_run: false,
    };
    store.gc(&options).unwrap();
    let info = store.launch("drill").unwrap().unwrap();
    assert_machine_is(&store, &info.root, &disks);
    for (n, _, disk) in &disks {
        let volume = store.open_launch_volume("drill", Some(n.as_str())).unwrap();
        assert!(read_volume(&volume) == *disk, "volume {n} differs");
    }
    let report = store.verify(None, None).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // Every volume closed: the launch deletes.
    store.delete_launch("drill").unwrap();
    assert!(store.launch("drill").unwrap().is_none());
}

#[test]
fn a_single_disk_launch_is_also_its_volume_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
    let geometry = Geometry::new(10 * u64::from(CHUNK), CHUNK).unwrap();
    let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
    churn(&mut Rng::new(7), &mut disk, geometry, 80);
    commit_disk(&store, &web(), &disk, geometry, 1);
    store.create_snapshot(&web(), Some("s1"), None, 30).unwrap();
    let info = store
        .create_launch(&web(), "s1", "one", crate::LaunchKind::Test, 40)
        .unwrap();
    assert_eq!(store.launch_volumes(&info).unwrap(), [name("disk")]);
    let volume = store.open_launch_volume("one", Some("disk")).unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &volume,
        &store.open_launch("one").unwrap()
    ));
    let err = store.open_launch_volume("one", Some("data")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    volume.write(0, b"x").unwrap();
    volume.flush(50).unwrap();
    // Still a disk root: a single disk's launch never becomes a machine.
    let info = store.launch("one").unwrap().unwrap();
    assert!(matches!(
        store.read_stored_root(&info.root).unwrap(),
        StoredRoot::Disk(_)
    ));
}

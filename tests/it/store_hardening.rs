//! The store keeps what it holds to its owner and to a bounded memory:
//!
//! - every directory of a data directory is 0700 and every file 0600, whatever
//!   the umask of the server (run here under `umask 000`), and a data
//!   directory left 0755 is tightened when a writable store opens it;
//! - `blockrep export` writes its image 0600, and an export that fails part-way
//!   (a damaged pack) leaves no file and never touches an existing one;
//! - an open launch volume keeps a bounded number of index pages in memory
//!   while a client reads all of it.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::{BIN, agent_once, assert_success, export_with, stderr};
use blockrep_core::{ChunkId, Geometry, SourceId};
use blockrep_store::{
    BlobKind, Downtime, GcOptions, LaunchKind, LaunchVolume, Lifecycle, LifecycleStage, Store,
};
use blockrep_testkit::{Pki, ServerProcess};

/// A script that runs `blockrep` under `umask 000`, the most permissive there
/// is: whatever the store creates gets exactly the mode it asks for.
fn permissive_blockrep(dir: &Path) -> PathBuf {
    let script = dir.join("blockrep-umask-000");
    fs::write(
        &script,
        format!("#!/bin/sh\numask 000\nexec '{BIN}' \"$@\"\n"),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every directory and file under `dir` (itself included) whose mode is not
/// 0700 (directories) or 0600 (files), with its mode.
fn loose_modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut loose = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode(&path) != want {
            loose.push((path.clone(), mode(&path)));
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        }
    }
    loose.sort();
    loose
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_server_under_a_permissive_umask_keeps_its_data_owner_only() {
    let work = tempfile::tempdir().unwrap();
    let bin = permissive_blockrep(work.path());
    let pki = Pki::new(&["web-1"]);
    // A data directory as an older version (or `mkdir`) left it.
    let data = work.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    let disk = work.path().join("disk.img");
    fs::write(
        &disk,
        blockrep_testkit::mixed_image(3 * 1024 * 1024 + 4096, 7),
    )
    .unwrap();

    let mut server = ServerProcess::start(&bin, &data, pki.path());
    assert_success(&agent_once(&disk, server.addr, "web-1", pki.path(), &[]));
    server.kill();
    assert!(data.join("packs").is_dir());
    assert!(data.join("sources/web-1/head").is_file());
    assert_eq!(loose_modes(&data), vec![], "server log: {}", server.log());

    // The image is the whole disk: owner-only too, even replacing a 0644 file.
    let images = work.path().join("images");
    fs::create_dir(&images).unwrap();
    let image = images.join("web-1.img");
    fs::write(&image, b"an older image").unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
    assert_success(&export_with(&bin, &data, "web-1", &image));
    assert_eq!(fs::read(&image).unwrap(), fs::read(&disk).unwrap());
    assert_eq!(mode(&image), 0o600);
    assert_eq!(entries(&images), ["web-1.img"]);
}

#[test]
fn an_export_that_fails_part_way_leaves_no_file() {
    let work = tempfile::tempdir().unwrap();
    let pki = Pki::new(&["web-1"]);
    let data = work.path().join("data");
    let disk = work.path().join("disk.img");
    fs::write(&disk, blockrep_testkit::random_bytes(2 * 1024 * 1024, 11)).unwrap();
    let mut server = ServerProcess::start(&crate::common::bin(), &data, pki.path());
    assert_success(&agent_once(&disk, server.addr, "web-1", pki.path(), &[]));
    server.kill();

    // Damage the first record of the first pack: a chunk (roots and pages
    // are stored at the commit, after the chunks), so the export gets past
    // the root and its pages, creates its image, and fails while copying.
    let pack = fs::read_dir(data.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .min()
        .unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    assert_eq!(bytes[4], BlobKind::Chunk as u8, "first record is a chunk");
    bytes[52 + 100] ^= 0x55;
    fs::write(&pack, bytes).unwrap();

    let images = work.path().join("images");
    fs::create_dir(&images).unwrap();
    let fresh = images.join("fresh.img");
    let failed = crate::common::export(&data, "web-1", &fresh);
    assert!(!failed.status.success(), "the damaged export succeeded");
    assert!(!fresh.exists(), "a partial image was left behind");
    assert_eq!(
        entries(&images),
        Vec::<String>::new(),
        "{}",
        stderr(&failed)
    );

    // An existing file is replaced only by a complete image.
    let precious = images.join("precious.img");
    fs::write(&precious, b"keep me").unwrap();
    let failed = crate::common::export(&data, "web-1", &precious);
    assert!(!failed.status.success());
    assert_eq!(fs::read(&precious).unwrap(), b"keep me");
    assert_eq!(entries(&images), ["precious.img"], "{}", stderr(&failed));

    // A symbolic link is refused, not replaced nor written through.
    let link = images.join("link.img");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let refused = crate::common::export(&data, "web-1", &link);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("is not a regular file"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(fs::read(&precious).unwrap(), b"keep me");
}

fn web() -> SourceId {
    SourceId::new("web-1").unwrap()
}

/// Stores every non-zero chunk of `disk` and commits it as `epoch`.
fn commit(store: &Store, disk: &[u8], geometry: Geometry, epoch: u64) -> ChunkId {
    let (root, pages) = blockrep_testkit::store::store_disk(store, disk, geometry);
    store
        .commit(
            &web(),
            epoch,
            &root,
            &pages,
            1,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    root.id()
}

/// The store's own files (packs, saved pack scans, heads, snapshots, launch
/// files, lifecycle, the lock, compaction copies) through the library, under
/// the test's umask (0022 as a rule: before, packs and records were 0644).
#[test]
fn every_file_the_store_creates_is_owner_only() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let store = Arc::new(Store::open_exclusive(&data).unwrap());
    // Small packs: several are sealed (with saved scans) and GC compacts.
    store.set_pack_size_max_bytes(64 * 1024);
    let geometry = Geometry::new(64 * 4096 + 100, 4096).unwrap();
    let mut disk = blockrep_testkit::random_bytes(geometry.disk_size_bytes() as usize, 3);
    commit(&store, &disk, geometry, 1);
    store.create_snapshot(&web(), Some("one"), None, 1).unwrap();
    store
        .create_launch(
            &web(),
            "one",
            "drill",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    let volume = store.open_launch("drill").unwrap();
    volume.write(4096, &[9; 10_000]).unwrap();
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    drop(volume);
    disk[..200_000].fill(1);
    let root = commit(&store, &disk, geometry, 2);
    store.delete_snapshot(&web(), "one").unwrap();
    store.delete_launch("drill").unwrap();
    store
        .set_lifecycle(
            &web(),
            &Lifecycle {
                stage: LifecycleStage::CutOver,
                epoch: 2,
                root,
                snapshot: "one".into(),
                launch: "drill".into(),
                cutover_unix_ms: 1,
                downtime: Downtime::default(),
            },
        )
        .unwrap();
    let report = store.gc(&GcOptions::default()).unwrap();
    assert!(report.packs_compacted > 0, "{report:?}");
    store.create_snapshot(&web(), Some("two"), None, 2).unwrap();
    drop(store);
    // A writable open saves the scans of the sealed packs it scanned.
    drop(Store::open_exclusive(&data).unwrap());
    let names: Vec<String> = entries(&data.join("packs"));
    assert!(names.iter().any(|n| n.ends_with(".idx")), "{names:?}");
    let umask = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:").map(|u| u.trim().to_owned()))
        .unwrap_or_default();
    assert_eq!(loose_modes(&data), vec![], "umask {umask}");
}

/// Reads all of `volume` in 1 MiB requests, as an NBD client copying it
/// would, checking after each that at most `most_pages` index pages are held.
fn read_whole(volume: &LaunchVolume, len: usize, most_pages: usize) -> Vec<u8> {
    const REQUEST_BYTES: usize = 1024 * 1024;
    let mut out = vec![0xaa; len];
    for (index, piece) in out.chunks_mut(REQUEST_BYTES).enumerate() {
        volume.read((index * REQUEST_BYTES) as u64, piece).unwrap();
        assert!(
            volume.pages_in_memory() <= most_pages,
            "{} pages in memory",
            volume.pages_in_memory()
        );
    }
    out
}

/// A client that reads a whole launch volume, many index pages long, leaves
/// at most the bound of clean pages in memory, and reads the right bytes;
/// pages with unflushed writes stay until the flush, and stay right through a
/// collection.
#[test]
fn a_launch_volume_keeps_a_bounded_number_of_index_pages() {
    const CLEAN_PAGES_MAX: usize = 3;
    const CHUNK: usize = 4096;
    let work = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(work.path()).unwrap());
    // 7 index pages (1024 chunks each), mostly sparse so the test is quick.
    let geometry = Geometry::new((6 * 1024 + 500) as u64 * CHUNK as u64 + 123, 4096).unwrap();
    let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
    for (index, chunk) in disk.chunks_mut(CHUNK).enumerate() {
        if index % 61 == 0 {
            chunk.fill((index % 251) as u8 + 1);
        }
    }
    commit(&store, &disk, geometry, 1);
    let pages_total = geometry.chunk_count().div_ceil(1024) as usize;
    assert_eq!(pages_total, 7);
    store
        .create_snapshot(&web(), Some("base"), None, 1)
        .unwrap();
    store
        .create_launch(
            &web(),
            "base",
            "reader",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    let volume = store.open_launch("reader").unwrap();
    volume.set_clean_pages_max(CLEAN_PAGES_MAX);

    assert!(read_whole(&volume, disk.len(), CLEAN_PAGES_MAX) == disk);
    assert_eq!(volume.pages_in_memory(), CLEAN_PAGES_MAX);

    // Writes in five pages: those stay, beside at most the clean bound.
    let written: Vec<usize> = (0..5).map(|page| page * 1024 * CHUNK + 7).collect();
    for &offset in &written {
        volume.write(offset as u64, b"written").unwrap();
        disk[offset..offset + 7].copy_from_slice(b"written");
    }
    let dirty = written.len();
    assert!(read_whole(&volume, disk.len(), CLEAN_PAGES_MAX + dirty) == disk);
    // A collection while the pages are dirty keeps what they name.
    store.gc(&GcOptions::default()).unwrap();
    assert!(read_whole(&volume, disk.len(), CLEAN_PAGES_MAX + dirty) == disk);
    volume.flush(blockrep_core::clock::now_unix_ms()).unwrap();
    assert!(volume.pages_in_memory() <= CLEAN_PAGES_MAX);
    assert!(read_whole(&volume, disk.len(), CLEAN_PAGES_MAX) == disk);
    drop(volume);

    // What was flushed is what a reopened store reads.
    drop(store);
    let store = Arc::new(Store::open(work.path()).unwrap());
    let volume = store.open_launch("reader").unwrap();
    let mut out = vec![0; disk.len()];
    volume.read(0, &mut out).unwrap();
    assert!(out == disk);
    assert!(volume.pages_in_memory() <= blockrep_store::LAUNCH_PAGES_CACHED_MAX);
}

//! Tests of opening, committing and exporting, and of the blob layer as the
//! store uses it (saved scans, torn tails, damage).
use super::*;
use crate::blobs::pack_file_name;
use crate::format::RECORD_HEADER_LEN;
use blockrep_core::scan_buffer;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::testutil::{sample_disk, source};

/// Stores every non-zero chunk of `disk` and commits it as `epoch` of the
/// test source.
fn commit_disk(store: &Store, disk: &[u8], geometry: Geometry, epoch: u64) -> Head {
    crate::testutil::commit_disk(store, &source(), disk, geometry, epoch)
}

#[test]
fn commit_reopen_export_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let geometry = Geometry::new(40 * 4096 + 100, 4096).unwrap();
    let disk = sample_disk(geometry.disk_size_bytes() as usize, 3);
    let head = {
        let store = Store::open(dir.path()).unwrap();
        commit_disk(&store, &disk, geometry, 1)
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.head(&source()).unwrap(), Some(head));
    let out = dir.path().join("out.raw");
    let stats = store.export(&source(), &out).unwrap();
    assert_eq!(stats.disk_size_bytes, disk.len() as u64);
    assert_eq!(fs::read(&out).unwrap(), disk);
    assert_eq!(store.sources().unwrap(), vec![source()]);
}

#[test]
fn commit_requires_the_next_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let geometry = Geometry::new(8192, 4096).unwrap();
    let disk = sample_disk(8192, 5);
    commit_disk(&store, &disk, geometry, 1);
    let (root, pages) = Root::build(geometry, &scan_buffer(&disk, geometry));
    for wrong in [1, 3] {
        let err = store
            .commit(
                &source(),
                wrong,
                &root,
                &pages,
                0,
                blockrep_core::clock::now_unix_ms(),
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::EpochMismatch);
    }
    assert_eq!(store.head(&source()).unwrap().unwrap().epoch, 1);
}

#[test]
fn insert_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = b"chunk bytes";
    let id = ChunkId::from(blake3::hash(data));
    assert!(
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, 11, data)
            .unwrap()
    );
    assert!(
        !store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, 11, data)
            .unwrap()
    );
    assert_eq!(store.read_blob(&id).unwrap(), data);
    let info = store.blob_info(&id).unwrap();
    assert_eq!((info.kind, info.raw_len), (BlobKind::Chunk, 11));
    assert_eq!(
        store.blob_info(&ChunkId::from(blake3::hash(b"other"))),
        None
    );
}

/// The pack files under `dir`, by name, with their bytes.
fn packs_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "pack") {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                found.push((name, fs::read(&path).unwrap()));
            }
        }
    }
    found.sort();
    found
}

/// A record written from a crc the caller computed is the record the store
/// would have written itself, and it reads back after a reopen (whose scan
/// checks every record's crc).
#[test]
fn a_record_from_a_given_crc_is_the_record_made_from_the_bytes() {
    let (given, made) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let blobs: Vec<Vec<u8>> = (0..5u8)
        .map(|n| sample_disk(4096 + usize::from(n) * 1000, n))
        .collect();
    {
        let (given, made) = (
            Store::open(given.path()).unwrap(),
            Store::open(made.path()).unwrap(),
        );
        for data in &blobs {
            let id = ChunkId::from(blake3::hash(data));
            let len = data.len() as u32;
            let crc = crc32fast::hash(data);
            assert!(
                given
                    .insert_with_crc(BlobKind::Chunk, id, StoredCodec::Raw, len, data, crc)
                    .unwrap()
            );
            assert!(
                made.insert(BlobKind::Chunk, id, StoredCodec::Raw, len, data)
                    .unwrap()
            );
        }
        given.sync().unwrap();
        made.sync().unwrap();
    }
    let packs = packs_of(given.path());
    assert!(!packs.is_empty(), "no pack written");
    assert_eq!(packs, packs_of(made.path()));
    let reopened = Store::open(given.path()).unwrap();
    for data in &blobs {
        let id = ChunkId::from(blake3::hash(data));
        assert_eq!(&reopened.read_blob(&id).unwrap(), data);
    }
}

/// The real file system, counting the writes made to pack files: whole
/// (`write_all_at`) and in two parts (`write_all_at_parts`).
#[derive(Debug, Default)]
struct CountingFs {
    writes: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
}

#[derive(Debug)]
struct CountingFile {
    inner: std::sync::Arc<dyn crate::vfs::VfsFile>,
    writes: Option<std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>>,
}

impl CountingFile {
    fn count(&self, which: usize) {
        if let Some(writes) = &self.writes {
            writes[which].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl crate::vfs::VfsFile for CountingFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.count(0);
        self.inner.write_all_at(buf, offset)
    }
    fn write_all_at_parts(&self, head: &[u8], tail: &[u8], offset: u64) -> std::io::Result<()> {
        self.count(1);
        self.inner.write_all_at_parts(head, tail, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len_bytes: u64) -> std::io::Result<()> {
        self.inner.set_len(len_bytes)
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.inner.sync_all()
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
}

impl crate::vfs::Vfs for CountingFs {
    fn open(
        &self,
        path: &Path,
        mode: crate::vfs::OpenMode,
    ) -> std::io::Result<std::sync::Arc<dyn crate::vfs::VfsFile>> {
        let pack = path.extension().is_some_and(|e| e == "pack");
        Ok(std::sync::Arc::new(CountingFile {
            inner: crate::vfs::RealFs.open(path, mode)?,
            writes: pack.then(|| std::sync::Arc::clone(&self.writes)),
        }))
    }
    fn file_len(&self, path: &Path) -> std::io::Result<u64> {
        crate::vfs::RealFs.file_len(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        crate::vfs::RealFs.is_dir(path)
    }
    fn list_dir(&self, path: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
        crate::vfs::RealFs.list_dir(path)
    }
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        crate::vfs::RealFs.create_dir(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        crate::vfs::RealFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        crate::vfs::RealFs.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        crate::vfs::RealFs.remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        crate::vfs::RealFs.sync_dir(path)
    }
}

/// Each record reaches its pack in one write of its header and its bytes,
/// not a write of each.
#[test]
fn a_record_is_one_write() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let fs = CountingFs::default();
    let writes = std::sync::Arc::clone(&fs.writes);
    let store = Store::open_with_vfs(dir.path(), std::sync::Arc::new(fs)).unwrap();
    let before = (writes[0].load(Relaxed), writes[1].load(Relaxed));
    for n in 0..7u8 {
        let data = vec![n + 1; 4096];
        let id = ChunkId::from(blake3::hash(&data));
        let new = store.insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &data);
        assert!(new.unwrap(), "blob {n} is new");
    }
    let after = (writes[0].load(Relaxed), writes[1].load(Relaxed));
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 7),
        "(whole writes, two-part writes) to packs for 7 records"
    );
}

/// 4 KiB blobs of distinct bytes in packs sealed at 16 KiB, then closed.
fn store_with_sealed_packs(dir: &Path) -> Vec<ChunkId> {
    let store = Store::open(dir).unwrap();
    store.set_pack_size_max_bytes(16 * 1024);
    let ids: Vec<ChunkId> = (0..24u32)
        .map(|i| {
            let data: Vec<u8> = (0..4096u32).map(|j| (i * 31 + j * 7) as u8).collect();
            let id = ChunkId::from(blake3::hash(&data));
            store
                .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &data)
                .unwrap();
            id
        })
        .collect();
    store.sync().unwrap();
    ids
}

fn index_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".idx"))
        .collect();
    names.sort();
    names
}

/// The saved scan of a sealed pack is what a reopen uses: damage to a
/// record's data (not its header) made after the scan was saved is not
/// seen at the open, only at a read, which then drops the saved scan so
/// that the next open scans the pack and sees it too.
#[test]
fn sealed_packs_open_from_their_saved_scans() {
    let dir = tempfile::tempdir().unwrap();
    let ids = store_with_sealed_packs(dir.path());
    let (packs, victim) = {
        let store = Store::open(dir.path()).unwrap();
        let packs = store.blobs.pack_numbers().unwrap();
        (packs, store.blobs.location(&ids[0]).unwrap())
    };
    assert!(packs.len() >= 4, "{packs:?}");
    assert_eq!(victim.pack, packs[0]);
    let sealed: Vec<String> = packs[..packs.len() - 1]
        .iter()
        .map(|n| format!("{n:08}.idx"))
        .collect();
    assert_eq!(
        index_files(dir.path()),
        sealed,
        "one saved scan per sealed pack"
    );

    let pack = dir.path().join("packs").join(pack_file_name(victim.pack));
    let file = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    FileExt::write_all_at(&file, b"X", victim.offset + RECORD_HEADER_LEN as u64 + 100).unwrap();
    drop(file);

    let store = Store::open(dir.path()).unwrap();
    assert!(
        store.contains(&ids[0]),
        "the damage was seen at the open: the pack was scanned, not loaded"
    );
    assert_eq!(store.blob_count(), ids.len());
    for id in &ids[1..] {
        assert!(store.read_blob(id).is_ok());
    }
    assert_eq!(
        store.read_blob(&ids[0]).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert!(
        !store.contains(&ids[0]),
        "a damaged record still counts as stored"
    );
    assert!(!index_files(dir.path()).contains(&sealed[0]));
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    assert!(!store.contains(&ids[0]), "the rescan missed the damage");
    assert_eq!(index_files(dir.path()), sealed);
    // A sound copy is stored again when the agent resends it.
    let data: Vec<u8> = (0..4096u32).map(|j| (j * 7) as u8).collect();
    assert!(
        store
            .insert(BlobKind::Chunk, ids[0], StoredCodec::Raw, 4096, &data)
            .unwrap()
    );
    assert_eq!(store.read_blob(&ids[0]).unwrap(), data);
}

/// A saved scan that does not describe its pack (another pack's, a damaged
/// one) is not believed, and one left by a deleted pack is removed.
#[test]
fn saved_scans_that_do_not_match_their_pack_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ids = store_with_sealed_packs(dir.path());
    drop(Store::open(dir.path()).unwrap());
    let packs = dir.path().join("packs");
    let saved = index_files(dir.path());
    let second = fs::read(packs.join(&saved[1])).unwrap();
    // Pack 1 gets pack 2's saved scan; pack 2's is damaged; pack 99 has none.
    fs::write(packs.join(&saved[0]), &second).unwrap();
    let mut damaged = second.clone();
    damaged[40] ^= 1;
    fs::write(packs.join(&saved[1]), &damaged).unwrap();
    fs::write(packs.join("00000099.idx"), &second).unwrap();

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.blob_count(), ids.len());
    for id in &ids {
        assert!(store.contains(id));
        assert!(store.read_blob(id).is_ok());
    }
    assert_eq!(index_files(dir.path()), saved, "the orphan is removed");
    assert_eq!(
        fs::read(packs.join(&saved[1])).unwrap(),
        second,
        "rewritten"
    );
    assert_ne!(
        fs::read(packs.join(&saved[0])).unwrap(),
        second,
        "rewritten"
    );
}

#[test]
fn torn_tail_is_dropped_and_head_survives() {
    let dir = tempfile::tempdir().unwrap();
    let geometry = Geometry::new(16 * 4096, 4096).unwrap();
    let disk = sample_disk(geometry.disk_size_bytes() as usize, 7);
    let head = {
        let store = Store::open(dir.path()).unwrap();
        let head = commit_disk(&store, &disk, geometry, 1);
        // An uncommitted blob, then a torn half-record, as a crash would leave.
        let extra = vec![0x5a; 4096];
        let id = ChunkId::from(blake3::hash(&extra));
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &extra)
            .unwrap();
        head
    };
    let pack = dir.path().join("packs").join(pack_file_name(1));
    let len_before = fs::metadata(&pack).unwrap().len();
    let mut file = OpenOptions::new().append(true).open(&pack).unwrap();
    file.write_all(&b"BRB1\x01\x01\x00\x00"[..]).unwrap();
    file.write_all(&[0xee; 100]).unwrap();
    drop(file);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(fs::metadata(&pack).unwrap().len(), len_before);
    assert_eq!(store.head(&source()).unwrap(), Some(head));
    let out = dir.path().join("out.raw");
    store.export(&source(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), disk);
    // Appending after recovery works and survives another reopen.
    let disk2 = sample_disk(disk.len(), 9);
    let head2 = commit_disk(&store, &disk2, geometry, 2);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.head(&source()).unwrap(), Some(head2));
    store.export(&source(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), disk2);
}

#[test]
fn damage_in_the_middle_of_the_last_pack_is_not_mistaken_for_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
    let ids: Vec<ChunkId> = blobs
        .iter()
        .map(|b| ChunkId::from(blake3::hash(b)))
        .collect();
    {
        let store = Store::open(dir.path()).unwrap();
        for (id, blob) in ids.iter().zip(&blobs) {
            store
                .insert(BlobKind::Chunk, *id, StoredCodec::Raw, 4096, blob)
                .unwrap();
        }
        store.sync().unwrap();
    }
    let pack = dir.path().join("packs").join(pack_file_name(1));
    let len_before = fs::metadata(&pack).unwrap().len();
    // Damage the second record's data, then its neighbour's header magic.
    let record = (RECORD_HEADER_LEN + 4096) as u64;
    let file = OpenOptions::new().write(true).open(&pack).unwrap();
    FileExt::write_all_at(&file, &[0xff], record + RECORD_HEADER_LEN as u64 + 7).unwrap();
    FileExt::write_all_at(&file, b"XXXX", 2 * record).unwrap();
    drop(file);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        fs::metadata(&pack).unwrap().len(),
        len_before,
        "committed data was cut off"
    );
    assert_eq!(store.read_blob(&ids[0]).unwrap(), blobs[0]);
    assert_eq!(
        store.read_blob(&ids[1]).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    assert!(
        store.read_blob(&ids[2]).is_err(),
        "a record with a broken header is not readable"
    );
    assert_eq!(
        store.read_blob(&ids[3]).unwrap(),
        blobs[3],
        "records after the damage were lost"
    );
}

#[test]
fn damaged_blob_is_reported_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = vec![0x42u8; 4096];
    let id = ChunkId::from(blake3::hash(&data));
    store
        .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &data)
        .unwrap();
    store.sync().unwrap();
    let pack = dir.path().join("packs").join(pack_file_name(1));
    let file = OpenOptions::new().write(true).open(&pack).unwrap();
    FileExt::write_all_at(&file, &[0x43], 100).unwrap();
    assert_eq!(store.read_blob(&id).unwrap_err().kind(), ErrorKind::Corrupt);
}

#[test]
fn a_record_damaged_before_a_crash_is_stored_again_not_deduplicated() {
    // A chunk appended but not fsynced when the power went may come back
    // with a sound header and torn data, followed by later records (so it
    // is not cut as a torn tail). The agent resends it after the crash; the
    // store must not answer "already stored" with the damaged record.
    let dir = tempfile::tempdir().unwrap();
    let data = vec![0x42u8; 4096];
    let id = ChunkId::from(blake3::hash(&data));
    let later = vec![0x17u8; 4096];
    let later_id = ChunkId::from(blake3::hash(&later));
    {
        let store = Store::open(dir.path()).unwrap();
        for (id, bytes) in [(id, &data), (later_id, &later)] {
            store
                .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, bytes)
                .unwrap();
        }
        store.sync().unwrap();
    }
    let pack = dir.path().join("packs").join(pack_file_name(1));
    let file = OpenOptions::new().write(true).open(&pack).unwrap();
    FileExt::write_all_at(&file, &[0u8; 100], RECORD_HEADER_LEN as u64 + 1000).unwrap();
    drop(file);
    let store = Store::open(dir.path()).unwrap();
    assert!(!store.contains(&id), "a damaged record answered an offer");
    assert!(store.contains(&later_id));
    assert!(
        store
            .insert(BlobKind::Chunk, id, StoredCodec::Raw, 4096, &data)
            .unwrap(),
        "the resent chunk was taken as already stored"
    );
    assert_eq!(store.read_blob(&id).unwrap(), data);
    store.sync().unwrap();
    drop(store);
    // After another open the sound copy still wins over the damaged one.
    let store = Store::open(dir.path()).unwrap();
    assert!(store.contains(&id));
    assert_eq!(store.read_blob(&id).unwrap(), data);
}

#[test]
fn read_only_store_sees_later_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reader = Store::open_read_only(dir.path()).unwrap();
    let geometry = Geometry::new(8 * 4096, 4096).unwrap();
    let disk = sample_disk(geometry.disk_size_bytes() as usize, 11);
    commit_disk(&store, &disk, geometry, 1);
    let out = dir.path().join("out.raw");
    reader.export(&source(), &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), disk);
    assert!(
        reader
            .insert(BlobKind::Chunk, ChunkId([1; 32]), StoredCodec::Raw, 1, b"x")
            .is_err()
    );
}

#[test]
fn an_image_of_another_size_than_its_geometry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let geometry = Geometry::new(3 * 4096, 4096).unwrap();
    let err = store.insert_image(&[1; 4096], geometry).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert_eq!(store.blob_count(), 0);
    let (root, pages) = store.insert_image(&[1; 3 * 4096], geometry).unwrap();
    // Three equal chunks: one blob.
    assert_eq!(store.blob_count(), 1);
    assert_eq!(root.geometry(), geometry);
    assert_eq!(pages.len(), 1);
}

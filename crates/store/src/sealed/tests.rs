use std::os::unix::fs::FileExt;
use std::path::Path;

use blockrep_core::{Geometry, Root, SourceId, hash_chunk};
use blockrep_keys::{Kek, KeyDir, Keyring, Sealer, init_kek_file};

use super::*;
use crate::blobs::{Fault, pack_file_name};
use crate::format::{RECORD_CRC_AT, RECORD_HEADER_LEN};
use crate::testutil::every_file;
use crate::{ErrorKind, GcOptions, LaunchKind};

/// A chunk of 64 KiB that holds `marker` many times, varied so that zstd
/// does not make it trivial.
fn marked_chunk(marker: &str, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(65_536);
    let mut i = seed;
    while out.len() < 65_536 {
        out.extend_from_slice(marker.as_bytes());
        out.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
        i += 1;
    }
    out.truncate(65_536);
    out
}

struct Keys {
    _dir: tempfile::TempDir,
    kek: Kek,
    key_dir: KeyDir,
}

impl Keys {
    fn new(sources: &[&SourceId]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        init_kek_file(&dir.path().join("kek")).unwrap();
        let kek = Kek::from_file(&dir.path().join("kek")).unwrap();
        let key_dir = KeyDir::open(&dir.path().join("keys")).unwrap();
        for source in sources {
            key_dir.create(source, &kek, 1).unwrap();
        }
        Self {
            _dir: dir,
            kek,
            key_dir,
        }
    }

    fn load_into(&self, store: &Store) {
        store
            .keyring()
            .extend_from(&self.key_dir, &self.kek)
            .unwrap();
    }
}

fn current(store: &Store, source: &SourceId) -> Arc<Sealer> {
    store.keyring().current(source).unwrap()
}

/// Stores `chunk` of the source `sealer` seals (zstd-compressed when
/// `compress`): its stored id and whether it was new.
fn put(store: &Store, sealer: &Sealer, chunk: &[u8], compress: bool) -> (ChunkId, bool) {
    put_in(store, sealer, sealer.id_space(), chunk, compress)
}

/// [`put`] with the chunk named in `space` (its source's).
fn put_in(
    store: &Store,
    sealer: &Sealer,
    space: blockrep_core::IdSpace,
    chunk: &[u8],
    compress: bool,
) -> (ChunkId, bool) {
    let id = space.hash_chunk(chunk);
    let compressed;
    let (codec, stored) = if compress {
        compressed = zstd::bulk::compress(chunk, 1).unwrap();
        (StoredCodec::Zstd, compressed.as_slice())
    } else {
        (StoredCodec::Raw, chunk)
    };
    let new = store
        .insert_sealed(sealer, id, codec, chunk.len() as u32, stored)
        .unwrap();
    (id, new)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn sealed_blobs_show_nothing_of_their_content_and_read_back() {
    let web = SourceId::new("web-1").unwrap();
    let db = SourceId::new("db-1").unwrap();
    let keys = Keys::new(&[&web, &db]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    let sealer = current(&store, &web);

    // One chunk stored raw, one zstd-compressed, both sealed.
    let raw_chunk = marked_chunk("MARKER-raw-chunk-7f3a", 0);
    let zstd_chunk = marked_chunk("MARKER-zstd-chunk-91c2", 1);
    let (raw_id, zstd_id) = (
        ChunkId::from(blake3::hash(&raw_chunk)),
        ChunkId::from(blake3::hash(&zstd_chunk)),
    );
    let (raw_stored, new) = put(&store, &sealer, &raw_chunk, false);
    assert!(new);
    let (zstd_stored, _) = put(&store, &sealer, &zstd_chunk, true);
    assert_eq!(raw_stored, sealer.id_space().map(raw_id));
    assert_ne!(raw_stored, raw_id);
    store.sync().unwrap();

    // Nothing on disk holds a marker or a plain id.
    for (name, bytes) in every_file(dir.path()) {
        for needle in [&b"MARKER-raw"[..], b"MARKER-zstd", &raw_id.0, &zstd_id.0] {
            assert!(!contains(&bytes, needle), "{name} holds {needle:?}");
        }
    }

    // They read back by their stored ids, checked.
    assert_eq!(store.read_blob(&raw_stored).unwrap(), raw_chunk);
    assert_eq!(store.read_blob(&zstd_stored).unwrap(), zstd_chunk);
    let (bytes, _) = store.read_blob_with_values(&zstd_stored).unwrap();
    assert_eq!(bytes, zstd_chunk);
    assert!(store.blobs.check(&raw_stored, BlobKind::Chunk).is_ok());

    // Equal chunks dedup within the source, never across sources.
    let (again, new) = put(&store, &sealer, &raw_chunk, false);
    assert_eq!((again, new), (raw_stored, false));
    let db_sealer = current(&store, &db);
    let (db_stored, new) = put(&store, &db_sealer, &raw_chunk, false);
    assert!(new);
    assert_ne!(db_stored, raw_stored);
    store.sync().unwrap();

    // Opened without its keys, the store refuses to read them, as
    // unavailable rather than damaged; with the keys they read again.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let error = store.read_blob(&raw_stored).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::KeyUnavailable, "{error}");
    assert!(matches!(
        store.blobs.check(&raw_stored, BlobKind::Chunk),
        Err(Fault::NoKey(..))
    ));
    assert!(store.contains(&raw_stored));
    keys.load_into(&store);
    assert_eq!(store.read_blob(&raw_stored).unwrap(), raw_chunk);
}

/// Overwrites the stored bytes of `id`'s record with `bytes` and fixes the
/// record's crc32, as someone who meant it would: only the seal can tell.
fn rewrite_record(dir: &Path, store: &Store, id: &ChunkId, bytes: &[u8]) {
    let at = store.blobs.location(id).unwrap();
    let pack = dir.join("packs").join(pack_file_name(at.pack));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pack)
        .unwrap();
    let mut header = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut header, at.offset).unwrap();
    assert_eq!(bytes.len(), at.header.stored_len as usize);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..RECORD_CRC_AT]);
    crc.update(bytes);
    header[RECORD_CRC_AT..].copy_from_slice(&crc.finalize().to_le_bytes());
    file.write_all_at(&header, at.offset).unwrap();
    file.write_all_at(bytes, at.offset + RECORD_HEADER_LEN as u64)
        .unwrap();
}

fn stored_bytes(dir: &Path, store: &Store, id: &ChunkId) -> Vec<u8> {
    let at = store.blobs.location(id).unwrap();
    let pack = std::fs::read(dir.join("packs").join(pack_file_name(at.pack))).unwrap();
    let start = at.offset as usize + RECORD_HEADER_LEN;
    pack[start..start + at.header.stored_len as usize].to_vec()
}

#[test]
fn a_flipped_or_swapped_sealed_blob_is_refused_and_reported() {
    let web = SourceId::new("web-1").unwrap();
    let db = SourceId::new("db-1").unwrap();
    let keys = Keys::new(&[&web, &db]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    let (web_sealer, db_sealer) = (current(&store, &web), current(&store, &db));
    let put = |sealer: &Sealer, chunk: &[u8]| put(&store, sealer, chunk, false).0;
    let flipped = put(&web_sealer, &marked_chunk("flip", 0));
    let victim = put(&web_sealer, &marked_chunk("victim", 0));
    let intruder = put(&db_sealer, &marked_chunk("intruder", 0));
    let sibling = put(&web_sealer, &marked_chunk("sibling", 0));
    store.sync().unwrap();

    // A flipped byte in the cipher text, crc fixed up.
    let mut bytes = stored_bytes(dir.path(), &store, &flipped);
    bytes[1000] ^= 1;
    rewrite_record(dir.path(), &store, &flipped, &bytes);
    // Another source's sealed bytes in the victim's place, and a sibling's
    // (same source, same key) in the intruder's.
    let db_bytes = stored_bytes(dir.path(), &store, &intruder);
    rewrite_record(dir.path(), &store, &victim, &db_bytes);
    let web_bytes = stored_bytes(dir.path(), &store, &sibling);
    rewrite_record(dir.path(), &store, &intruder, &web_bytes);
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    for id in [flipped, victim, intruder] {
        match store.blobs.check(&id, BlobKind::Chunk) {
            Err(Fault::AuthFailed(_, _, why)) => {
                assert!(why.contains("authentication"), "{why}")
            }
            other => panic!("{id}: {other:?}"),
        }
        let error = store.read_blob(&id).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
        assert!(error.to_string().contains("authentication"), "{error}");
    }
    // Refused reads return nothing, and the damage stops counting as stored
    // so the agent sends the chunk again; the untouched sibling reads.
    assert!(!store.contains(&victim));
    assert_eq!(
        store.read_blob(&sibling).unwrap(),
        marked_chunk("sibling", 0)
    );
}

#[test]
fn a_shredded_source_cannot_be_read_from_an_earlier_copy() {
    let web = SourceId::new("web-1").unwrap();
    let db = SourceId::new("db-1").unwrap();
    let keys = Keys::new(&[&web, &db]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    let web_chunk = marked_chunk("web data", 3);
    let db_chunk = marked_chunk("db data", 4);
    let (web_id, _) = put(&store, &current(&store, &web), &web_chunk, false);
    let (db_id, _) = put(&store, &current(&store, &db), &db_chunk, false);
    store.sync().unwrap();
    drop(store);

    // A copy of the data directory taken before the source is shredded.
    let copy = tempfile::tempdir().unwrap();
    for (name, bytes) in every_file(dir.path()) {
        let relative = Path::new(&name).strip_prefix(dir.path()).unwrap();
        let to = copy.path().join(relative);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, bytes).unwrap();
    }
    assert_eq!(keys.key_dir.shred(&web).unwrap(), 1);

    // The copy, with the old KEK and the key directory as it is now: the
    // shredded source's bytes are gone for good, the other source reads.
    let store = Store::open(copy.path()).unwrap();
    let ring = Keyring::new();
    assert_eq!(ring.extend_from(&keys.key_dir, &keys.kek).unwrap(), 1);
    store
        .keyring()
        .extend_from(&keys.key_dir, &keys.kek)
        .unwrap();
    let error = store.read_blob(&web_id).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::KeyUnavailable);
    assert!(error.to_string().contains("shredded"), "{error}");
    assert_eq!(store.read_blob(&db_id).unwrap(), db_chunk);
}

/// The stored ids of `disk`'s chunks under `sealer` (zero chunks keep the
/// zero id: they are never stored), each non-zero chunk stored sealed.
fn store_disk(store: &Store, sealer: &Sealer, disk: &[u8], geometry: Geometry) -> Vec<ChunkId> {
    store_disk_in(store, sealer, sealer.id_space(), disk, geometry)
}

/// [`store_disk`] with chunks named in `space`.
fn store_disk_in(
    store: &Store,
    sealer: &Sealer,
    space: blockrep_core::IdSpace,
    disk: &[u8],
    geometry: Geometry,
) -> Vec<ChunkId> {
    let mut ids = Vec::new();
    for index in 0..geometry.chunk_count() {
        let range = geometry.chunk_range(index).unwrap();
        let chunk = &disk[range];
        if hash_chunk(chunk).is_zero() {
            ids.push(ChunkId::ZERO);
        } else {
            ids.push(put_in(store, sealer, space, chunk, index % 2 == 0).0);
        }
    }
    ids
}

#[test]
fn an_encrypted_source_commits_exports_launches_and_verifies_sealed() {
    let web = SourceId::new("web-1").unwrap();
    let keys = Keys::new(&[&web]);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    keys.load_into(&store);
    let sealer = current(&store, &web);

    // Eight chunks: marked ones, a zero one, a duplicate, a short last one.
    let geometry = Geometry::new(7 * 65_536 + 10_000, 65_536).unwrap();
    let mut disk = Vec::new();
    for i in 0..8u32 {
        let chunk = match i {
            3 => vec![0u8; 65_536],
            5 => marked_chunk("MARKER-chunk-1", 1),
            _ => marked_chunk(&format!("MARKER-chunk-{i}"), i),
        };
        disk.extend_from_slice(&chunk);
    }
    disk.truncate(geometry.disk_size_bytes() as usize);
    let ids = store_disk(&store, &sealer, &disk, geometry);
    assert_eq!(ids[1], ids[5]);
    let (root, pages) = Root::build(geometry, &ids);
    store.commit(&web, 1, &root, &pages, 0, 1_000).unwrap();

    // Exported byte for byte; verify reads everything through the seals.
    let image = dir.path().join("export.raw");
    store.export(&web, &image).unwrap();
    assert_eq!(std::fs::read(&image).unwrap(), disk);
    std::fs::remove_file(&image).unwrap();
    let report = store.verify(None, None).unwrap();
    assert!(report.is_clean(), "{report:?}");

    // A launch writes through the seals too.
    store
        .create_snapshot(&web, Some("before"), None, 2_000)
        .unwrap();
    store
        .create_launch(&web, "before", "drill", LaunchKind::Test, 2_000)
        .unwrap();
    let volume = store.open_launch("drill").unwrap();
    volume
        .write(70_000, b"MARKER-written-by-the-launch")
        .unwrap();
    volume.flush(3_000).unwrap();
    let mut back = vec![0u8; 28];
    volume.read(70_000, &mut back).unwrap();
    assert_eq!(&back, b"MARKER-written-by-the-launch");
    drop(volume);
    store.sync().unwrap();

    // No file of the data directory holds a marker, or a chunk's plain id.
    let plain_ids: Vec<ChunkId> = (0..geometry.chunk_count())
        .map(|i| hash_chunk(&disk[geometry.chunk_range(i).unwrap()]))
        .filter(|id| !id.is_zero())
        .collect();
    for (name, bytes) in every_file(dir.path()) {
        assert!(!contains(&bytes, b"MARKER"), "{name} holds a marker");
        for id in &plain_ids {
            assert!(!contains(&bytes, &id.0), "{name} holds plain id {id}");
        }
    }

    // A new epoch, a collection, and everything still verifies and exports.
    disk[..65_536].copy_from_slice(&marked_chunk("MARKER-epoch-2", 9));
    let ids = store_disk(&store, &sealer, &disk, geometry);
    let (root, pages) = Root::build(geometry, &ids);
    store.commit(&web, 2, &root, &pages, 0, 4_000).unwrap();
    store.delete_launch("drill").unwrap();
    store.delete_snapshot(&web, "before").unwrap();
    let collected = store.gc(&GcOptions::default()).unwrap();
    assert!(collected.blobs_dead > 0, "{collected:?}");
    assert!(store.verify(None, None).unwrap().is_clean());
    store.export(&web, &image).unwrap();
    assert_eq!(std::fs::read(&image).unwrap(), disk);
    std::fs::remove_file(&image).unwrap();
    drop(store);

    // Without its keys the store cannot export it, and says why.
    let store = Store::open(dir.path()).unwrap();
    let error = store.export(&web, &image).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::KeyUnavailable, "{error}");
    assert!(!image.exists());
}

/// A new data key seals new blobs, but the source's chunks keep their ids:
/// what the old key sealed is shared by the new epoch, and every point,
/// before the new key and after, exports and verifies.
#[test]
fn a_new_data_key_keeps_the_source_s_ids_and_its_older_points() {
    let web = SourceId::new("web-1").unwrap();
    let keys = Keys::new(&[&web]);
    let dir = tempfile::tempdir().unwrap();
    let geometry = Geometry::new(4 * 65_536, 65_536).unwrap();
    let first: Vec<u8> = (0..4u32)
        .flat_map(|i| marked_chunk(&format!("first-{i}"), i))
        .collect();
    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    let space = store.id_space_of(&web);
    let ids = store_disk_in(&store, &current(&store, &web), space, &first, geometry);
    let (root, pages) = Root::build(geometry, &ids);
    store.commit(&web, 1, &root, &pages, 0, 1).unwrap();
    let first_root = root.id();
    drop(store);

    // The source's second key; a store that holds both.
    let (record, _) = keys.key_dir.create(&web, &keys.kek, 2).unwrap();
    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    let sealer = current(&store, &web);
    assert_eq!(sealer.reference(), record.reference);
    assert_eq!(
        store.id_space_of(&web),
        space,
        "the id space moved with the key"
    );
    let mut second = first.clone();
    second[..65_536].copy_from_slice(&marked_chunk("second-0", 9));
    let blobs_before = store.blob_count();
    let ids = store_disk_in(&store, &sealer, space, &second, geometry);
    // Only the changed chunk is new: the other three are the old key's.
    assert_eq!(store.blob_count(), blobs_before + 1);
    let (root, pages) = Root::build(geometry, &ids);
    store.commit(&web, 2, &root, &pages, 0, 3).unwrap();

    let out = dir.path().join("out.raw");
    store.export(&web, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), second);
    std::fs::remove_file(&out).unwrap();
    store.export_root(&first_root, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), first);
    assert!(store.verify(None, None).unwrap().is_clean());
}

/// The root of a blank disk is the same for every source: it is kept in
/// clear, so shredding one encrypted source leaves another's blank disk
/// readable.
#[test]
fn a_blank_disk_s_root_depends_on_no_source_s_key() {
    let (a, b) = (SourceId::new("a").unwrap(), SourceId::new("b").unwrap());
    let keys = Keys::new(&[&a, &b]);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    let geometry = Geometry::new(2 * 65_536, 65_536).unwrap();
    let ids = vec![ChunkId::ZERO; 2];
    let (root, pages) = Root::build(geometry, &ids);
    store.commit(&a, 1, &root, &pages, 0, 1).unwrap();
    store.commit(&b, 1, &root, &pages, 0, 1).unwrap();
    store.sync().unwrap();
    drop(store);
    keys.key_dir.shred(&a).unwrap();
    let store = Store::open(dir.path()).unwrap();
    keys.load_into(&store);
    let out = dir.path().join("b.raw");
    store.export(&b, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), vec![0u8; 2 * 65_536]);
}

/// Two marked chunks committed as `source`'s epoch 1.
fn commit_marked(store: &Store, source: &SourceId, marker: &str) {
    let sealer = current(store, source);
    let geometry = Geometry::new(2 * 65_536, 65_536).unwrap();
    let mut disk = marked_chunk(marker, 1);
    disk.extend_from_slice(&marked_chunk(marker, 2));
    let ids = store_disk(store, &sealer, &disk, geometry);
    let (root, pages) = Root::build(geometry, &ids);
    store.commit(source, 1, &root, &pages, 0, 1_000).unwrap();
}

/// Snapshot and launch records of an encrypted source carry a MAC: one
/// altered, put in another source's or launch's place, or stripped of its
/// MAC is refused, and so is an older launch head put back (its witness).
#[test]
fn snapshot_and_launch_records_are_authenticated() {
    use crate::authentic::AUTH_TRAILER_LEN;
    use crate::format::{LAUNCH_HEAD_LEN, SNAPSHOT_LEN};

    let (web, db) = (SourceId::new("web").unwrap(), SourceId::new("db").unwrap());
    let keys = Keys::new(&[&web, &db]);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    keys.load_into(&store);
    store.keyring().witness_in(keys.key_dir.clone());
    for source in [&web, &db] {
        commit_marked(&store, source, "MARKER");
        store
            .create_snapshot(source, Some("s1"), None, 2_000)
            .unwrap();
    }
    let snapshot_file = |source: &SourceId| {
        dir.path()
            .join("sources")
            .join(source.as_str())
            .join("snapshots/s1")
    };
    let original = std::fs::read(snapshot_file(&web)).unwrap();
    assert_eq!(original.len(), SNAPSHOT_LEN + AUTH_TRAILER_LEN);
    let refused = |what: &str, bytes: &[u8], expect: &str| {
        std::fs::write(snapshot_file(&web), bytes).unwrap();
        let error = store.snapshot(&web, "s1").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Corrupt, "{what}: {error}");
        assert!(error.to_string().contains(expect), "{what}: {error}");
        assert!(store.list_snapshots(None).is_err(), "{what}");
    };
    let mut flipped = original.clone();
    *flipped.last_mut().unwrap() ^= 1;
    refused("flipped MAC", &flipped, "fails authentication");
    let db_record = std::fs::read(snapshot_file(&db)).unwrap();
    refused("db's record", &db_record, "is not a key of source web");
    refused("stripped", &original[..SNAPSHOT_LEN], "not authenticated");
    std::fs::write(snapshot_file(&web), &original).unwrap();
    assert_eq!(store.snapshot(&web, "s1").unwrap().unwrap().source, web);

    // A launch written twice: its first head put back is a rollback; the
    // head of another launch in its place does not authenticate.
    for name in ["drill", "other"] {
        store
            .create_launch(&web, "s1", name, LaunchKind::Test, 2_000)
            .unwrap();
    }
    let head_file = |name: &str| dir.path().join("launches").join(name).join("head");
    let volume = store.open_launch("drill").unwrap();
    volume.write(0, b"MARKER-first").unwrap();
    volume.flush(3_000).unwrap();
    let first = std::fs::read(head_file("drill")).unwrap();
    assert_eq!(first.len(), LAUNCH_HEAD_LEN + AUTH_TRAILER_LEN);
    volume.write(0, b"MARKER-again").unwrap();
    volume.flush(4_000).unwrap();
    drop(volume);
    let second = std::fs::read(head_file("drill")).unwrap();
    std::fs::write(head_file("drill"), &first).unwrap();
    let error = store.launch("drill").unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(error.to_string().contains("rolled back"), "{error}");
    assert!(store.open_launch("drill").is_err());
    std::fs::write(
        head_file("drill"),
        std::fs::read(head_file("other")).unwrap(),
    )
    .unwrap();
    let error = store.launch("drill").unwrap_err();
    assert!(
        error.to_string().contains("fails authentication"),
        "{error}"
    );
    std::fs::write(head_file("drill"), &second).unwrap();
    assert_eq!(store.launch("drill").unwrap().unwrap().generation, 2);

    // A deleted launch's witness goes with it: a new launch of its name
    // starts again at generation 0.
    store.delete_launch("drill").unwrap();
    store
        .create_launch(&web, "s1", "drill", LaunchKind::Test, 5_000)
        .unwrap();
    assert_eq!(store.launch("drill").unwrap().unwrap().generation, 0);
    drop(store);

    // Without the keys, the records cannot be vouched for: not served.
    let store = Store::open(dir.path()).unwrap();
    let error = store.snapshot(&web, "s1").unwrap_err();
    assert_eq!(error.kind(), ErrorKind::KeyUnavailable, "{error}");
    let error = store.launch("drill").unwrap_err();
    assert_eq!(error.kind(), ErrorKind::KeyUnavailable, "{error}");
}

use std::os::unix::fs::FileExt;
use std::path::Path;

use blockrep_core::SourceId;
use blockrep_keys::{Kek, KeyDir, Keyring, Sealer, init_kek_file};

use super::*;
use crate::ErrorKind;
use crate::blobs::{Fault, pack_file_name};
use crate::format::{RECORD_CRC_AT, RECORD_HEADER_LEN};

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

/// Every byte of the data directory's files, one buffer per file.
fn every_file(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
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
    let (raw_stored, new) = store
        .insert_sealed(
            &sealer,
            BlobKind::Chunk,
            &raw_id,
            StoredCodec::Raw,
            65_536,
            &raw_chunk,
        )
        .unwrap();
    assert!(new);
    let compressed = zstd::bulk::compress(&zstd_chunk, 1).unwrap();
    let (zstd_stored, _) = store
        .insert_sealed(
            &sealer,
            BlobKind::Chunk,
            &zstd_id,
            StoredCodec::Zstd,
            65_536,
            &compressed,
        )
        .unwrap();
    assert_eq!(raw_stored.0, sealer.stored_id(&raw_id.0));
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
    let (again, new) = store
        .insert_sealed(
            &sealer,
            BlobKind::Chunk,
            &raw_id,
            StoredCodec::Raw,
            65_536,
            &raw_chunk,
        )
        .unwrap();
    assert_eq!((again, new), (raw_stored, false));
    let db_sealer = current(&store, &db);
    let (db_stored, new) = store
        .insert_sealed(
            &db_sealer,
            BlobKind::Chunk,
            &raw_id,
            StoredCodec::Raw,
            65_536,
            &raw_chunk,
        )
        .unwrap();
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
    let put = |sealer: &Sealer, chunk: &[u8]| {
        store
            .insert_sealed(
                sealer,
                BlobKind::Chunk,
                &ChunkId::from(blake3::hash(chunk)),
                StoredCodec::Raw,
                65_536,
                chunk,
            )
            .unwrap()
            .0
    };
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
    let (web_id, _) = store
        .insert_sealed(
            &current(&store, &web),
            BlobKind::Chunk,
            &ChunkId::from(blake3::hash(&web_chunk)),
            StoredCodec::Raw,
            65_536,
            &web_chunk,
        )
        .unwrap();
    let (db_id, _) = store
        .insert_sealed(
            &current(&store, &db),
            BlobKind::Chunk,
            &ChunkId::from(blake3::hash(&db_chunk)),
            StoredCodec::Raw,
            65_536,
            &db_chunk,
        )
        .unwrap();
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

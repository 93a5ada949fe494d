//! Tests of `verify.rs`.

use super::*;
use crate::testutil::{Rng, churn, commit_disk};
use crate::{LaunchKind, StoredCodec};
use blockrep_core::{Geometry, scan_buffer};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

const CHUNK: u32 = 4096;

fn web() -> SourceId {
    SourceId::new("web-1").unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    geometry: Geometry,
    disk1: Vec<u8>,
    disk2: Vec<u8>,
}

/// Epoch 1 (snapshot "s1", launch "t" from it), then epoch 2 with a third of
/// the chunks changed (snapshot "s2").
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let geometry = Geometry::new(24 * u64::from(CHUNK) + 500, CHUNK).unwrap();
    let mut rng = Rng::new(11);
    let mut disk1 = vec![0u8; geometry.disk_size_bytes() as usize];
    churn(&mut rng, &mut disk1, geometry, 90);
    commit_disk(&store, &web(), &disk1, geometry, 1);
    store.create_snapshot(&web(), Some("s1"), None, 1).unwrap();
    store
        .create_launch(
            &web(),
            "s1",
            "t",
            LaunchKind::Test,
            blockrep_core::clock::now_unix_ms(),
        )
        .unwrap();
    let mut disk2 = disk1.clone();
    churn(&mut rng, &mut disk2, geometry, 35);
    commit_disk(&store, &web(), &disk2, geometry, 2);
    store.create_snapshot(&web(), Some("s2"), None, 2).unwrap();
    Fixture {
        dir,
        store,
        geometry,
        disk1,
        disk2,
    }
}

fn flip_byte(store: &Store, dir: &std::path::Path, id: &ChunkId, at_in_stored: u64) {
    let location = store.blobs.location(id).unwrap();
    let path = dir.join("packs").join(pack_file_name(location.pack));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let offset = location.offset + 52 + at_in_stored;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], offset).unwrap();
}

fn referrers(blob: &DamagedBlob) -> Vec<String> {
    let mut names: Vec<String> = blob
        .affected
        .iter()
        .map(|a| a.referrer.to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn a_clean_store_verifies_clean() {
    let f = fixture();
    let report = f.store.verify(None, None).unwrap();
    assert!(report.is_clean(), "{:?}", report.damaged);
    let mut chunks: HashSet<ChunkId> = scan_buffer(&f.disk1, f.geometry).into_iter().collect();
    chunks.extend(scan_buffer(&f.disk2, f.geometry));
    chunks.remove(&ChunkId::ZERO);
    // head = s2, s1 = launch t: two roots of one page each.
    assert_eq!(
        (
            report.roots_checked,
            report.pages_checked,
            report.chunks_checked
        ),
        (2, 2, chunks.len() as u64)
    );
    assert!(report.bytes_read > 0);
    let one = f.store.verify(Some(&web()), Some("s1")).unwrap();
    assert!(one.is_clean());
    assert_eq!(one.roots_checked, 1);
    let other = SourceId::new("other").unwrap();
    assert_eq!(
        f.store.verify(Some(&other), None).unwrap(),
        VerifyReport::default()
    );
    assert_eq!(
        f.store.verify(None, Some("s1")).unwrap_err().kind(),
        ErrorKind::Invalid
    );
    assert_eq!(
        f.store
            .verify(Some(&web()), Some("nope"))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn a_flipped_byte_names_the_chunk_and_everything_it_breaks() {
    let f = fixture();
    let ids1 = scan_buffer(&f.disk1, f.geometry);
    let ids2 = scan_buffer(&f.disk2, f.geometry);
    let shared_index = (0..ids1.len())
        .find(|&i| !ids1[i].is_zero() && ids1[i] == ids2[i])
        .unwrap();
    let shared = ids1[shared_index];
    let only_s1_index = (0..ids1.len())
        .find(|&i| !ids1[i].is_zero() && !ids2.contains(&ids1[i]))
        .unwrap();
    let only_s1 = ids1[only_s1_index];
    let shared_location = f.store.blobs.location(&shared).unwrap();
    flip_byte(&f.store, f.dir.path(), &shared, 100);
    flip_byte(&f.store, f.dir.path(), &only_s1, 7);

    let report = f.store.verify(None, None).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.damaged.len(), 2, "{:#?}", report.damaged);
    let blob = |id: ChunkId| report.damaged.iter().find(|d| d.id == id).unwrap();
    let damaged = blob(shared);
    assert_eq!(damaged.kind, BlobKind::Chunk);
    assert_eq!(damaged.damage, Damage::ChecksumMismatch);
    assert_eq!(
        damaged.place,
        Some(BlobPlace {
            pack: shared_location.pack,
            offset_bytes: shared_location.offset
        })
    );
    assert_eq!(
        referrers(damaged),
        [
            "launch t",
            "snapshot web-1/s1",
            "snapshot web-1/s2",
            "source web-1 head"
        ]
    );
    let place = ChunkPlace {
        index: shared_index as u64,
        offset_bytes: shared_index as u64 * u64::from(CHUNK),
    };
    for affected in &damaged.affected {
        assert_eq!(affected.chunks, vec![place], "{}", affected.referrer);
        assert_eq!(affected.chunks_total, 1);
    }
    assert_eq!(referrers(blob(only_s1)), ["launch t", "snapshot web-1/s1"]);
    // The bytes are still read only once however many roots share them.
    let chunks = report.chunks_checked;
    assert_eq!(f.store.verify(None, None).unwrap().chunks_checked, chunks);

    let one = f.store.verify(Some(&web()), Some("s2")).unwrap();
    assert_eq!(one.damaged.len(), 1);
    assert_eq!(one.damaged[0].id, shared);
    assert_eq!(referrers(&one.damaged[0]), ["snapshot web-1/s2"]);
}

#[test]
fn damaged_pages_wrong_hashes_and_missing_blobs_are_reported() {
    let f = fixture();
    let head = f.store.head(&web()).unwrap().unwrap();
    let root = f.store.read_root(&head.root).unwrap();
    let page = root.page_ids()[0];
    flip_byte(&f.store, f.dir.path(), &page, 40);
    let report = f.store.verify(None, None).unwrap();
    assert_eq!(report.damaged.len(), 1);
    let damaged = &report.damaged[0];
    assert_eq!((damaged.id, damaged.kind), (page, BlobKind::Page));
    assert_eq!(
        referrers(damaged),
        ["snapshot web-1/s2", "source web-1 head"]
    );
    assert!(
        damaged
            .affected
            .iter()
            .all(|a| a.pages == [0] && a.root == head.root)
    );

    // A record whose crc is right but whose bytes are not those of its id.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.set_pack_size_max_bytes(1);
    let geometry = Geometry::new(3 * u64::from(CHUNK), CHUNK).unwrap();
    let disk: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8 + 1).collect();
    let ids = scan_buffer(&disk, geometry);
    let wrong = vec![0x77u8; CHUNK as usize];
    store
        .insert(BlobKind::Chunk, ids[1], StoredCodec::Raw, CHUNK, &wrong)
        .unwrap();
    commit_disk(&store, &web(), &disk, geometry, 1);
    // One record per pack: losing a pack file loses exactly one blob.
    let lost = store.blobs.location(&ids[2]).unwrap();
    drop(store);
    fs::remove_file(dir.path().join("packs").join(pack_file_name(lost.pack))).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let report = store.verify(None, None).unwrap();
    let damage: Vec<(ChunkId, Damage)> = report
        .damaged
        .iter()
        .map(|d| (d.id, d.damage.clone()))
        .collect();
    let mut expected = vec![(ids[1], Damage::HashMismatch), (ids[2], Damage::Missing)];
    expected.sort_by_key(|d| d.0);
    assert_eq!(damage, expected);
    let missing = report.damaged.iter().find(|d| d.id == ids[2]).unwrap();
    assert_eq!(missing.place, None);
    assert_eq!(missing.affected[0].chunks[0].index, 2);
}

/// Publishes `root` as the head of `source` without the checks a commit
/// makes, as a store written before those checks (or by a hostile
/// reference) may hold it.
fn publish_unchecked_head(store: &Store, source: &SourceId, root: &Root, pages: &[Page]) {
    for page in pages {
        if let Some((bytes, id)) = page.encode_with_id() {
            store
                .blobs
                .put_index_blob(BlobKind::Page, id, &bytes, None)
                .unwrap();
        }
    }
    store
        .blobs
        .put_index_blob(BlobKind::Root, root.id(), &root.encode(), None)
        .unwrap();
    publish_unchecked_head_id(store, source, root.id());
}

fn publish_unchecked_head_id(store: &Store, source: &SourceId, root: ChunkId) {
    store.sync().unwrap();
    let head = crate::Head {
        epoch: 1,
        root,
        scan_started_unix_ms: 1,
        committed_unix_ms: 1,
        synced_scan_started_unix_ms: 1,
        consistency: blockrep_core::Consistency::Live,
    };
    let dir = store.source_dir(source);
    crate::fsutil::create_dir_durable(store.vfs(), &dir).unwrap();
    crate::fsutil::publish_atomic(store.vfs(), &dir.join("head"), &head.encode()).unwrap();
}

/// Ids that name intact blobs of the wrong kind or length: a page whose
/// chunk ids are another root's page id, that root's id and a chunk of the
/// wrong length; a head whose root id is a chunk. Each blob is intact by
/// itself, so only the kind and length checks can see it; `export` fails.
#[test]
fn ids_naming_blobs_of_the_wrong_kind_or_length_are_reported() {
    let f = fixture();
    let head = f.store.head(&web()).unwrap().unwrap();
    let web_root = f.store.read_root(&head.root).unwrap();
    let web_page = web_root.page_ids()[0];
    let web_chunk = *scan_buffer(&f.disk2, f.geometry)
        .iter()
        .find(|id| !id.is_zero())
        .unwrap();
    let short = vec![0x42u8; 100];
    let short_id = ChunkId::from(blake3::hash(&short));
    f.store
        .insert(BlobKind::Chunk, short_id, StoredCodec::Raw, 100, &short)
        .unwrap();

    let evil = SourceId::new("evil").unwrap();
    let geometry = Geometry::new(8 * u64::from(CHUNK), CHUNK).unwrap();
    let mut ids = vec![ChunkId::ZERO; 8];
    ids[0] = web_page;
    ids[1] = head.root;
    ids[2] = short_id;
    ids[3] = web_chunk;
    let (root, pages) = Root::build(geometry, &ids);
    publish_unchecked_head(&f.store, &evil, &root, &pages);
    let rogue = SourceId::new("rogue").unwrap();
    publish_unchecked_head_id(&f.store, &rogue, web_chunk);

    let report = f.store.verify(None, None).unwrap();
    let found: Vec<(ChunkId, BlobKind, Damage, Vec<String>)> = report
        .damaged
        .iter()
        .map(|d| (d.id, d.kind, d.damage.clone(), referrers(d)))
        .collect();
    let mut chunks_expected = vec![
        (
            web_page,
            BlobKind::Chunk,
            Damage::WrongKind {
                stored: BlobKind::Page,
            },
            vec!["source evil head".to_owned()],
        ),
        (
            head.root,
            BlobKind::Chunk,
            Damage::WrongKind {
                stored: BlobKind::Root,
            },
            vec!["source evil head".to_owned()],
        ),
        (
            short_id,
            BlobKind::Chunk,
            Damage::WrongLength {
                expected: vec![CHUNK],
                stored: 100,
            },
            vec!["source evil head".to_owned()],
        ),
    ];
    chunks_expected.sort_by_key(|d| d.0);
    let mut expected = vec![(
        web_chunk,
        BlobKind::Root,
        Damage::WrongKind {
            stored: BlobKind::Chunk,
        },
        vec!["source rogue head".to_owned()],
    )];
    expected.extend(chunks_expected);
    assert_eq!(found, expected);
    let wrong_length = report.damaged.iter().find(|d| d.id == short_id).unwrap();
    assert_eq!(wrong_length.affected[0].chunks[0].index, 2);
    assert_eq!(
        wrong_length.damage.to_string(),
        "chunk of 100 bytes where the geometry needs 4096"
    );
    // The same ids, referenced as what they are, are intact.
    let web_only = f.store.verify(Some(&web()), None).unwrap();
    assert!(web_only.is_clean(), "{:#?}", web_only.damaged);
    // What the damage breaks: the export of the disk that names them.
    let out = f.dir.path().join("evil.img");
    assert!(f.store.export(&evil, &out).is_err());
}

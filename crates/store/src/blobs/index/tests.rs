//! Tests of the index's runs against what a crash leaves: every run entry
//! names a durable record of a pack the manifest covers, or nothing.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::blobs::pack::{BlobKind, RecordHeader, StoredCodec};

const LEN: u32 = 100;

fn id(n: u8) -> ChunkId {
    ChunkId(*blake3::hash(&[n]).as_bytes())
}

fn at(id: ChunkId, pack: u32, offset: u64) -> Location {
    Location {
        pack,
        offset,
        header: RecordHeader {
            kind: BlobKind::Chunk,
            codec: StoredCodec::Raw,
            sealed: false,
            stored_len: LEN,
            raw_len: LEN,
            id,
            crc: 7,
        },
        crc_ok: true,
    }
}

fn open(dir: &Path) -> BlobIndex {
    BlobIndex::open(
        IndexOptions {
            dir: Some(dir.to_owned()),
            mem_max_entries: 0,
        },
        false,
    )
}

fn durable(packs: &[(u32, u64)]) -> BTreeMap<u32, u64> {
    packs.iter().copied().collect()
}

/// A collection copied X out of pack 1 into pack 2, and a flush ran before
/// the copy was durable: the runs keep X's old place, so the index after a
/// crash (an open of what is on disk) still finds X.
#[test]
fn a_copy_not_yet_durable_leaves_its_source_in_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let x = id(1);
    let mut index = open(dir.path());
    let old = at(x, 1, 0);
    index.insert(x, old);
    index.note_pack(1, old.record_len_bytes());
    let copy = at(x, 2, 0);
    index.relocate(x, copy, old);
    index
        .flush(&durable(&[(1, old.record_len_bytes()), (2, 0)]))
        .unwrap();
    assert_eq!(index.get(&x), Some(copy), "the table answers with the copy");
    let after_crash = open(dir.path());
    assert_eq!(after_crash.get(&x), Some(old));
    assert_eq!(after_crash.len(), 1);
    // Once the copy is durable, the runs name it.
    index
        .flush(&durable(&[(2, copy.record_len_bytes())]))
        .unwrap();
    assert_eq!(open(dir.path()).get(&x), Some(copy));
}

/// X was in the runs at pack 1; a collection removed it and deleted pack 1;
/// X was stored again, not durably yet, when a flush ran. The runs must not
/// keep naming pack 1, which the manifest no longer covers.
#[test]
fn runs_do_not_name_a_deleted_pack_the_manifest_stops_covering() {
    let dir = tempfile::tempdir().unwrap();
    let x = id(2);
    let mut index = open(dir.path());
    let old = at(x, 1, 0);
    index.insert(x, old);
    index.note_pack(1, old.record_len_bytes());
    index
        .flush(&durable(&[(1, old.record_len_bytes())]))
        .unwrap();
    index.remove(&x);
    index.forget_pack(1);
    let again = at(x, 3, 0);
    index.insert(x, again);
    index.flush(&durable(&[(3, 0)])).unwrap();
    let after_crash = open(dir.path());
    assert!(!after_crash.covered().contains_key(&1));
    assert_eq!(after_crash.get(&x), None);
    assert_eq!(after_crash.len(), 0);
}

/// An id removed (its removal in a run) and stored again is counted once.
#[test]
fn an_id_removed_and_stored_again_is_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = (id(3), id(4));
    let mut index = open(dir.path());
    let first = at(x, 1, 0);
    index.insert(x, first);
    index.insert(y, at(y, 1, 200));
    index.note_pack(1, 400);
    index.flush(&durable(&[(1, 400)])).unwrap();
    index.remove(&x);
    index.flush(&durable(&[(1, 400)])).unwrap();
    index.insert(x, at(x, 2, 0));
    index.note_pack(2, 200);
    index.flush(&durable(&[(1, 400), (2, 200)])).unwrap();
    assert_eq!(index.len(), 2);
    assert_eq!(open(dir.path()).len(), 2);
}

/// A record found damaged lowers its pack's coverage to where it is, so an
/// open reads the pack from there; the pack stays covered below.
#[test]
fn damage_lowers_coverage_to_the_damaged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = open(dir.path());
    index.insert(id(5), at(id(5), 1, 0));
    index.insert(id(6), at(id(6), 1, 200));
    index.note_pack(1, 400);
    index.flush(&durable(&[(1, 400)])).unwrap();
    index.uncover(1, 200);
    assert_eq!(open(dir.path()).covered().get(&1), Some(&200));
}

/// Y's record in pack 1 was found damaged, and Y was stored again in pack 2,
/// not durably yet, when a flush ran: after a crash the runs must not call
/// the damaged record sound (the store would take Y as held and drop the
/// agent's next copy).
#[test]
fn a_damaged_record_stored_again_is_not_sound_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let y = id(7);
    let mut index = open(dir.path());
    let first = at(y, 1, 0);
    index.insert(y, first);
    index.note_pack(1, first.record_len_bytes());
    index
        .flush(&durable(&[(1, first.record_len_bytes())]))
        .unwrap();
    let damaged = Location {
        crc_ok: false,
        ..first
    };
    index.insert(y, damaged);
    index.uncover(1, 0);
    let again = at(y, 2, 0);
    index.insert(y, again);
    index.note_pack(2, again.record_len_bytes());
    index
        .flush(&durable(&[(1, first.record_len_bytes()), (2, 0)]))
        .unwrap();
    let after_crash = open(dir.path());
    assert!(
        after_crash.get(&y).is_none_or(|at| !at.crc_ok),
        "{:?}",
        after_crash.get(&y)
    );
}

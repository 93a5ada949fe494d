//! Verification: every blob that a head, a snapshot or a launch references is
//! read back from its pack and checked (record header, crc32, decoding, blake3
//! against its id), and checked to be what it is referenced as: a root named by
//! a head, snapshot or launch must be stored as a root, a page id as a page, and
//! a chunk id as a chunk whose length is the one the root's geometry gives its
//! position (the last chunk of a disk may be short). An id that names a blob of
//! another kind or length would make `export` and launches fail although every
//! blob is intact by itself. Damage is reported, with the heads, snapshots and launches
//! it affects and where on their disks it sits, never returned as an error.
//!
//! Each distinct blob is read once however many roots share it: roots first,
//! then their pages, then the chunks in pack order (sequential reads). Only when
//! something is damaged are the roots walked again (pages only) to find who is
//! affected.

use std::collections::{HashMap, HashSet};
use std::fmt;

use blockrep_core::{CHUNKS_PER_PAGE, ChunkId, Geometry, Page, Root, SourceId};

use crate::blobs::{BlobKind, Fault, pack_file_name};
use crate::error::{Error, ErrorKind};
use crate::store::Store;

/// Most chunk positions listed per affected root for one damaged chunk (a
/// chunk may repeat all over a disk); [`Affected::chunks_total`] has the count.
pub const AFFECTED_CHUNKS_LISTED_MAX: usize = 64;

/// What refers to a root.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Referrer {
    /// A source's committed head.
    Head {
        /// The source.
        source: SourceId,
    },
    /// A snapshot.
    Snapshot {
        /// Its source.
        source: SourceId,
        /// Its name.
        name: String,
    },
    /// A launch's own flushed state.
    Launch {
        /// The launch name.
        name: String,
    },
    /// The base root a launch was created from, when it differs from the
    /// launch's own root (kept because the launch records it).
    LaunchBase {
        /// The launch name.
        name: String,
    },
}

impl fmt::Display for Referrer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Referrer::Head { source } => write!(f, "source {source} head"),
            Referrer::Snapshot { source, name } => write!(f, "snapshot {source}/{name}"),
            Referrer::Launch { name } => write!(f, "launch {name}"),
            Referrer::LaunchBase { name } => write!(f, "launch {name} base"),
        }
    }
}

/// What is wrong with a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// No pack holds it.
    Missing,
    /// Its pack could not be read.
    Unreadable(String),
    /// The record's header or crc32 does not match its bytes.
    ChecksumMismatch,
    /// The record is intact but cannot be decoded (zstd, or a page or root
    /// encoding).
    Undecodable(String),
    /// The decoded bytes do not hash to the blob's id.
    HashMismatch,
    /// The blob is intact but stored as another kind than it is referenced as
    /// (e.g. a page id naming a chunk or a root).
    WrongKind {
        /// The kind its record has.
        stored: BlobKind,
    },
    /// A chunk is intact but its length is not the one the referring roots'
    /// geometry gives its position (or they disagree).
    WrongLength {
        /// Lengths the referring positions need, ascending.
        expected: Vec<u32>,
        /// Its decoded length.
        stored: u32,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Missing => f.write_str("missing"),
            Damage::Unreadable(why) => write!(f, "unreadable: {why}"),
            Damage::ChecksumMismatch => f.write_str("checksum mismatch"),
            Damage::Undecodable(why) => write!(f, "undecodable: {why}"),
            Damage::HashMismatch => f.write_str("does not hash to its id"),
            Damage::WrongKind { stored } => {
                write!(
                    f,
                    "stored as a {}, referenced as another kind",
                    kind_name(*stored)
                )
            }
            Damage::WrongLength { expected, stored } => {
                let expected: Vec<String> = expected.iter().map(u32::to_string).collect();
                write!(
                    f,
                    "chunk of {stored} bytes where the geometry needs {}",
                    expected.join(" and ")
                )
            }
        }
    }
}

/// Where a blob's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobPlace {
    /// Pack number (file `packs/NNNNNNNN.pack`).
    pub pack: u32,
    /// Offset of the record in the pack.
    pub offset_bytes: u64,
}

impl fmt::Display for BlobPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {}",
            pack_file_name(self.pack),
            self.offset_bytes
        )
    }
}

/// Where a damaged chunk sits on an affected disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlace {
    /// Chunk index on the disk.
    pub index: u64,
    /// Byte offset of the chunk on the disk.
    pub offset_bytes: u64,
}

/// One root that a damaged blob breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affected {
    /// Who refers to the root.
    pub referrer: Referrer,
    /// The root.
    pub root: ChunkId,
    /// For a damaged index page: which pages of the root it is (each covers
    /// 1024 chunks from `page * 1024`).
    pub pages: Vec<u64>,
    /// For a damaged chunk: where it sits on the disk, in disk order, at most
    /// [`AFFECTED_CHUNKS_LISTED_MAX`].
    pub chunks: Vec<ChunkPlace>,
    /// For a damaged chunk: how many times it occurs on the disk.
    pub chunks_total: u64,
}

/// A referenced blob that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedBlob {
    /// Its id.
    pub id: ChunkId,
    /// What it is (as referenced).
    pub kind: BlobKind,
    /// Where its record is; `None` when it is missing.
    pub place: Option<BlobPlace>,
    /// What is wrong.
    pub damage: Damage,
    /// Every selected head, snapshot and launch it breaks.
    pub affected: Vec<Affected>,
}

/// What [`Store::verify`] checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Distinct roots checked.
    pub roots_checked: u64,
    /// Distinct index pages checked.
    pub pages_checked: u64,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Stored bytes read.
    pub bytes_read: u64,
    /// Damaged blobs: roots, then pages, then chunks, by id.
    pub damaged: Vec<DamagedBlob>,
}

impl VerifyReport {
    /// Whether every checked blob is intact.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

fn kind_name(kind: BlobKind) -> &'static str {
    match kind {
        BlobKind::Chunk => "chunk",
        BlobKind::Page => "index page",
        BlobKind::Root => "root",
    }
}

/// Damaged blobs before attribution, by id and the kind they are referenced
/// as (one id may be referenced as two kinds, and be damaged as one only).
type FoundMap = HashMap<(ChunkId, BlobKind), Found>;

/// A damaged blob before attribution.
struct Found {
    kind: BlobKind,
    place: Option<BlobPlace>,
    damage: Damage,
}

impl Store {
    /// Re-reads and checks every blob reachable from the selected roots: with no
    /// filter, every head, snapshot and launch; with `source`, that source's
    /// head, snapshots and launches; with `source` and `snapshot`, that snapshot.
    /// Damage is reported in the [`VerifyReport`]; errors are for a bad
    /// selection (`Invalid`, `NotFound`) or records that cannot be listed.
    pub fn verify(
        &self,
        source: Option<&SourceId>,
        snapshot: Option<&str>,
    ) -> Result<VerifyReport, Error> {
        let referrers = self.verify_selection(source, snapshot)?;
        if self.is_read_only() {
            // Once, rather than at every blob found missing.
            self.blobs.load_index()?;
        }
        let mut report = VerifyReport::default();
        let mut damaged: FoundMap = HashMap::new();
        let mut seen_roots: HashSet<ChunkId> = HashSet::new();
        let mut seen_pages: HashSet<ChunkId> = HashSet::new();
        let mut lengths_seen: HashSet<(ChunkId, u32, Option<u32>)> = HashSet::new();
        // Every chunk with the lengths its positions need: usually one.
        let mut chunks: HashMap<ChunkId, Vec<u32>> = HashMap::new();
        for (_, root_id) in &referrers {
            if !seen_roots.insert(*root_id) {
                continue;
            }
            report.roots_checked += 1;
            let root = match self.check_blob(root_id, BlobKind::Root, &mut report) {
                Ok(raw) => match Root::decode(&raw) {
                    Ok(root) => root,
                    Err(e) => {
                        let place = self.place_of(root_id);
                        damaged.insert(
                            (*root_id, BlobKind::Root),
                            found(BlobKind::Root, place, undecodable(e)),
                        );
                        continue;
                    }
                },
                Err(found) => {
                    damaged.insert((*root_id, BlobKind::Root), found);
                    continue;
                }
            };
            let geometry = root.geometry();
            for (page_index, page_id) in root.page_ids().iter().enumerate() {
                if page_id.is_zero() {
                    continue;
                }
                // The lengths a page's positions need depend only on the
                // chunk size and, for the last page, the last chunk's length.
                let last_chunk_len = (page_index + 1 == root.page_ids().len())
                    .then(|| geometry.chunk_len(geometry.chunk_count().saturating_sub(1)))
                    .flatten();
                let lengths_new =
                    lengths_seen.insert((*page_id, geometry.chunk_size_bytes(), last_chunk_len));
                if !seen_pages.insert(*page_id) {
                    // Checked already, but under another geometry or place:
                    // what its chunks must measure there is still to record.
                    if lengths_new && let Ok(page) = self.read_page(&root, page_index) {
                        note_chunk_lengths(&mut chunks, geometry, page_index, &page);
                    }
                    continue;
                }
                report.pages_checked += 1;
                let decoded = self
                    .check_blob(page_id, BlobKind::Page, &mut report)
                    .and_then(|raw| {
                        Page::decode(&raw, root.page_len(page_index)).map_err(|e| {
                            found(BlobKind::Page, self.place_of(page_id), undecodable(e))
                        })
                    });
                match decoded {
                    Ok(page) => note_chunk_lengths(&mut chunks, geometry, page_index, &page),
                    Err(found) => {
                        damaged.insert((*page_id, BlobKind::Page), found);
                    }
                }
            }
        }
        // Chunks in pack order, so the packs are read front to back.
        let mut chunks: Vec<(Option<BlobPlace>, ChunkId, Vec<u32>)> = chunks
            .into_iter()
            .map(|(id, lengths)| (self.place_of(&id), id, lengths))
            .collect();
        chunks.sort_unstable_by_key(|(at, id, _)| (at.map(|p| (p.pack, p.offset_bytes)), *id));
        for (_, id, mut expected) in chunks {
            report.chunks_checked += 1;
            match self.check_blob(&id, BlobKind::Chunk, &mut report) {
                Ok(raw) => {
                    // An id is the hash of its bytes, so it has one length:
                    // every position must need exactly that one.
                    let stored = raw.len() as u32;
                    if expected.len() != 1 || expected[0] != stored {
                        expected.sort_unstable();
                        let place = self.place_of(&id);
                        let damage = Damage::WrongLength { expected, stored };
                        damaged
                            .insert((id, BlobKind::Chunk), found(BlobKind::Chunk, place, damage));
                    }
                }
                Err(found) => {
                    damaged.insert((id, BlobKind::Chunk), found);
                }
            }
        }
        if !damaged.is_empty() {
            report.damaged = self.attribute(&referrers, damaged);
        }
        Ok(report)
    }

    /// The roots to verify, each with who refers to it.
    fn verify_selection(
        &self,
        source: Option<&SourceId>,
        snapshot: Option<&str>,
    ) -> Result<Vec<(Referrer, ChunkId)>, Error> {
        let mut out = Vec::new();
        match (source, snapshot) {
            (None, Some(name)) => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("snapshot {name}: name its source too"),
                ));
            }
            (Some(source), Some(name)) => {
                let snapshot = self.snapshot(source, name)?.ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("source {source} has no snapshot named {name}"),
                    )
                })?;
                out.push((
                    Referrer::Snapshot {
                        source: source.clone(),
                        name: snapshot.name,
                    },
                    snapshot.root,
                ));
            }
            (source, None) => {
                let sources = match source {
                    Some(source) => vec![source.clone()],
                    None => self.sources()?,
                };
                for source in sources {
                    if let Some(head) = self.head(&source)? {
                        out.push((Referrer::Head { source }, head.root));
                    }
                }
                for snapshot in self.list_snapshots(source)? {
                    out.push((
                        Referrer::Snapshot {
                            source: snapshot.source,
                            name: snapshot.name,
                        },
                        snapshot.root,
                    ));
                }
                for launch in self.list_launches(source)? {
                    if launch.base_root != launch.root {
                        out.push((
                            Referrer::LaunchBase {
                                name: launch.name.clone(),
                            },
                            launch.base_root,
                        ));
                    }
                    out.push((Referrer::Launch { name: launch.name }, launch.root));
                }
            }
        }
        Ok(out)
    }

    fn place_of(&self, id: &ChunkId) -> Option<BlobPlace> {
        self.blobs
            .place(id)
            .map(|(pack, offset_bytes)| BlobPlace { pack, offset_bytes })
    }

    /// Reads one blob's whole record and checks it; returns the decoded bytes.
    fn check_blob(
        &self,
        id: &ChunkId,
        kind: BlobKind,
        report: &mut VerifyReport,
    ) -> Result<Vec<u8>, Found> {
        let place = |pack, offset_bytes| Some(BlobPlace { pack, offset_bytes });
        match self.blobs.check(id, kind) {
            Ok((raw, bytes_read)) => {
                report.bytes_read += bytes_read;
                Ok(raw)
            }
            Err(fault) => Err(match fault {
                Fault::Missing => found(kind, None, Damage::Missing),
                Fault::WrongKind(pack, offset, stored) => {
                    found(kind, place(pack, offset), Damage::WrongKind { stored })
                }
                Fault::ChecksumMismatch(pack, offset) => {
                    found(kind, place(pack, offset), Damage::ChecksumMismatch)
                }
                Fault::Undecodable(pack, offset, e) => {
                    found(kind, place(pack, offset), Damage::Undecodable(e))
                }
                Fault::HashMismatch(pack, offset) => {
                    found(kind, place(pack, offset), Damage::HashMismatch)
                }
                Fault::Unreadable(pack, offset, e) => {
                    found(kind, place(pack, offset), Damage::Unreadable(e))
                }
            }),
        }
    }

    /// Finds, for each damaged blob, the selected roots it breaks and where.
    fn attribute(&self, referrers: &[(Referrer, ChunkId)], damaged: FoundMap) -> Vec<DamagedBlob> {
        let mut affected: HashMap<(ChunkId, BlobKind), Vec<Affected>> = HashMap::new();
        for (referrer, root_id) in referrers {
            let key = (*root_id, BlobKind::Root);
            if damaged.contains_key(&key) {
                entry_for(&mut affected, key, referrer, root_id);
                continue;
            }
            // Checked intact a moment ago; if it cannot be read now, there is
            // nothing more to attribute through it.
            let Ok(root) = self.read_root(root_id) else {
                continue;
            };
            let geometry = root.geometry();
            for (page_index, page_id) in root.page_ids().iter().enumerate() {
                if page_id.is_zero() {
                    continue;
                }
                let key = (*page_id, BlobKind::Page);
                if damaged.contains_key(&key) {
                    entry_for(&mut affected, key, referrer, root_id)
                        .pages
                        .push(page_index as u64);
                    continue;
                }
                let Ok(page) = self.read_page(&root, page_index) else {
                    continue;
                };
                for (position, chunk_id) in page.ids().iter().enumerate() {
                    let key = (*chunk_id, BlobKind::Chunk);
                    if chunk_id.is_zero() || !damaged.contains_key(&key) {
                        continue;
                    }
                    let entry = entry_for(&mut affected, key, referrer, root_id);
                    entry.chunks_total += 1;
                    if entry.chunks.len() < AFFECTED_CHUNKS_LISTED_MAX {
                        let index = (page_index * CHUNKS_PER_PAGE + position) as u64;
                        entry.chunks.push(ChunkPlace {
                            index,
                            offset_bytes: geometry.chunk_offset(index),
                        });
                    }
                }
            }
        }
        let mut out: Vec<DamagedBlob> = damaged
            .into_iter()
            .map(|(key, found)| DamagedBlob {
                id: key.0,
                kind: found.kind,
                place: found.place,
                damage: found.damage,
                affected: affected.remove(&key).unwrap_or_default(),
            })
            .collect();
        out.sort_by_key(|blob| {
            let rank = match blob.kind {
                BlobKind::Root => 0,
                BlobKind::Page => 1,
                BlobKind::Chunk => 2,
            };
            (rank, blob.id)
        });
        out
    }
}

/// The entry of `referrer` in the list of roots that blob `id` affects, added
/// if needed. Roots are walked one referrer at a time, so its entry is the last.
fn entry_for<'a>(
    affected: &'a mut HashMap<(ChunkId, BlobKind), Vec<Affected>>,
    key: (ChunkId, BlobKind),
    referrer: &Referrer,
    root: &ChunkId,
) -> &'a mut Affected {
    let list = affected.entry(key).or_default();
    if list.last().is_none_or(|last| last.referrer != *referrer) {
        list.push(Affected {
            referrer: referrer.clone(),
            root: *root,
            pages: Vec::new(),
            chunks: Vec::new(),
            chunks_total: 0,
        });
    }
    list.last_mut().expect("pushed above if empty")
}

/// Records, for every non-zero chunk of page `page_index`, the length its
/// position needs under `geometry`.
fn note_chunk_lengths(
    chunks: &mut HashMap<ChunkId, Vec<u32>>,
    geometry: Geometry,
    page_index: usize,
    page: &Page,
) {
    for (position, id) in page.ids().iter().enumerate() {
        if id.is_zero() {
            continue;
        }
        let index = (page_index * CHUNKS_PER_PAGE + position) as u64;
        // A decoded page has as many ids as the geometry has chunks there.
        let Some(len) = geometry.chunk_len(index) else {
            continue;
        };
        let lengths = chunks.entry(*id).or_default();
        if !lengths.contains(&len) {
            lengths.push(len);
        }
    }
}

fn found(kind: BlobKind, place: Option<BlobPlace>, damage: Damage) -> Found {
    Found {
        kind,
        place,
        damage,
    }
}

fn undecodable(e: impl fmt::Display) -> Damage {
    Damage::Undecodable(e.to_string())
}

#[cfg(test)]
mod tests {
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
            .create_launch(&web(), "s1", "t", LaunchKind::Test)
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
                    .put_index_blob(BlobKind::Page, id, &bytes)
                    .unwrap();
            }
        }
        store
            .blobs
            .put_index_blob(BlobKind::Root, root.id(), &root.encode())
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
}

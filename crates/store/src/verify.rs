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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use blockrep_core::{
    CHUNKS_PER_PAGE, ChunkId, Geometry, MachineRoot, Page, Root, SourceId, VolumeName,
};

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
    /// A sealed blob fails authentication: a byte changed, or it was moved
    /// from another place or another source.
    AuthFailed(String),
    /// A sealed blob's data key is not held (shredded, or the store was
    /// opened without its key directory).
    KeyUnavailable(String),
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
            Damage::AuthFailed(why) => write!(f, "fails authentication: {why}"),
            Damage::KeyUnavailable(why) => write!(f, "sealed under a key not held: {why}"),
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
    /// The volume of the referrer's machine the root is; `None` for the
    /// root the referrer names itself (a disk root, or a machine root).
    pub volume: Option<VolumeName>,
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
        // Depth first, so that each referrer's roots (a machine's volumes
        // right after the machine) are walked together; `walked` keeps every
        // disk and machine root with who refers to it, for attribution.
        let mut queue: VecDeque<Walked> = referrers
            .into_iter()
            .map(|(referrer, root)| (referrer, None, root))
            .collect();
        let mut walked: Vec<Walked> = Vec::new();
        let mut machines: HashMap<ChunkId, Vec<(VolumeName, ChunkId)>> = HashMap::new();
        while let Some((referrer, volume, root_id)) = queue.pop_front() {
            walked.push((referrer.clone(), volume, root_id));
            let root_id = &root_id;
            if let Some(volumes) = machines.get(root_id) {
                for (name, volume_root) in volumes.iter().rev() {
                    queue.push_front((referrer.clone(), Some(name.clone()), *volume_root));
                }
                continue;
            }
            if !seen_roots.insert(*root_id) {
                continue;
            }
            report.roots_checked += 1;
            let root = match self.check_blob(root_id, BlobKind::Root, &mut report) {
                Ok(raw) if MachineRoot::is_encoding(&raw) => {
                    match MachineRoot::decode(&raw) {
                        Ok(machine) => {
                            let volumes = machine.volumes().to_vec();
                            for (name, volume_root) in volumes.iter().rev() {
                                queue.push_front((
                                    referrer.clone(),
                                    Some(name.clone()),
                                    *volume_root,
                                ));
                            }
                            machines.insert(*root_id, volumes);
                        }
                        Err(e) => {
                            let place = self.place_of(root_id);
                            damaged.insert(
                                (*root_id, BlobKind::Root),
                                found(BlobKind::Root, place, undecodable(e)),
                            );
                        }
                    }
                    continue;
                }
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
            report.damaged = self.attribute(&walked, damaged);
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
                Fault::AuthFailed(pack, offset, e) => {
                    found(kind, place(pack, offset), Damage::AuthFailed(e))
                }
                Fault::NoKey(pack, offset, e) => {
                    found(kind, place(pack, offset), Damage::KeyUnavailable(e))
                }
                Fault::Unreadable(pack, offset, e) => {
                    found(kind, place(pack, offset), Damage::Unreadable(e))
                }
            }),
        }
    }

    /// Finds, for each damaged blob, the selected roots it breaks and where.
    /// A machine root is in `walked` before its volumes; reading it as a disk
    /// root fails, so only its own damage is attributed through it.
    fn attribute(&self, walked: &[Walked], damaged: FoundMap) -> Vec<DamagedBlob> {
        let mut affected: HashMap<(ChunkId, BlobKind), Vec<Affected>> = HashMap::new();
        for (referrer, volume, root_id) in walked {
            let referrer = &(referrer.clone(), volume.clone());
            let key = (*root_id, BlobKind::Root);
            if damaged.contains_key(&key) {
                entry_for(&mut affected, key, referrer, root_id);
                continue;
            }
            // Checked intact a moment ago; if it cannot be read now (or it is
            // a machine root), there is nothing more to attribute through it.
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

/// A root walked by [`Store::verify`]: who refers to it, the volume it is
/// of that referrer's machine, and its id.
type Walked = (Referrer, Option<VolumeName>, ChunkId);

/// The entry of `referrer` in the list of roots that blob `id` affects, added
/// if needed. Roots are walked one referrer at a time, so its entry is the last.
fn entry_for<'a>(
    affected: &'a mut HashMap<(ChunkId, BlobKind), Vec<Affected>>,
    key: (ChunkId, BlobKind),
    (referrer, volume): &(Referrer, Option<VolumeName>),
    root: &ChunkId,
) -> &'a mut Affected {
    let list = affected.entry(key).or_default();
    if list
        .last()
        .is_none_or(|last| last.referrer != *referrer || last.volume != *volume)
    {
        list.push(Affected {
            referrer: referrer.clone(),
            volume: volume.clone(),
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
mod tests;

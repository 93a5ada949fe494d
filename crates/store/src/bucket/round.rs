//! A collection beside the other servers of a bucket.
//!
//! On one server, a collection keeps what the store's records name and what
//! running sessions and launch volumes touched meanwhile, and its fence keeps
//! commits from straddling the listing of roots and the sweep (see `gc.rs`).
//! Servers that share a bucket have their own sessions, launch volumes and
//! fences, so a collection brings them in through objects under `gc/`:
//!
//! 1. The collector takes the collection lease (`leases/gc/collector`) and
//!    notes the servers present (`leases/servers/`). It writes `gc/round`:
//!    the lease's generation, phase `track`.
//! 2. Each of them, seeing the round (`take_part.rs`), starts its touched set,
//!    takes its fence for writing for a moment (so no commit that began before
//!    the set existed is still publishing), and writes `gc/joined/HOLDER`.
//! 3. Once every server present joined, the collector lists the roots that
//!    its records and every record in the bucket name, marks, and copies the
//!    live records of the packs it compacts, as on one server.
//! 4. It writes phase `sweep`. Each server reads the ids its open launch
//!    volumes hold, takes its fence for writing and keeps it (its commits and
//!    flushes wait), and writes `gc/touched/HOLDER`: every id it touched since
//!    it joined, and those.
//! 5. The collector adds them to its own touched set, sweeps, uploads its
//!    copies, deletes the evacuated packs, and writes phase `done`.
//! 6. Each server reloads the bucket's listing of packs (dropping the entries
//!    of deleted packs, learning the copies) and only then releases its
//!    fence. A commit there afterwards checks what it names against an index
//!    that no longer holds what was removed, and fails with `Missing` as on
//!    one server: the agent sends the data again.
//!
//! A server present that does not join in time, or that joined and lets its
//! presence lapse before it sent its touched ids, aborts the collection
//! before anything is removed (phase `aborted`). A server whose presence had
//! lapsed when the round began (paused, cut off) is not waited for: its
//! leases lapsed with it, so it commits nothing until it takes a source's
//! lease again, which reloads the listing of packs first.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use blockrep_core::ChunkId;
use blockrep_objects::LeaseRecord;
use bytes::Bytes;

use super::bucket_error;
use crate::blobs::Peers;
use crate::error::{Error, ErrorKind};
use crate::format::{HEAD_LEN, LAUNCH_HEAD_LEN, LAUNCH_META_LEN, SNAPSHOT_LEN};
use crate::head::Head;
use crate::launch::LaunchInfo;
use crate::mutex::lock;
use crate::remote::{Collecting, GC_LEASE, PRESENCE_PREFIX, Remote};
use crate::snapshot::Snapshot;
use crate::store::Store;

/// The round's object.
pub(crate) const ROUND_KEY: &str = "gc/round";
/// `gc/joined/HOLDER`: the server took its place in the round.
const JOINED_PREFIX: &str = "gc/joined/";
/// `gc/touched/HOLDER`: what the server touched, sent at the sweep.
const TOUCHED_PREFIX: &str = "gc/touched/";
/// First line of a round object.
const ROUND_MAGIC: &str = "blockrep-gc-round 1";
/// First bytes of a touched object.
const TOUCHED_MAGIC: [u8; 8] = *b"BRTOUCH1";
/// Most ids one server's touched object may carry (2 GiB of ids): a limit on
/// what the collector reads from a peer.
const TOUCHED_IDS_MAX: u64 = 64 << 20;
/// How often the collector looks for the other servers' answers.
pub(crate) const ROUND_POLL: Duration = Duration::from_millis(100);
/// Added to a lease's time when waiting for a server: what it takes to see
/// the round (its poll) and answer.
const ROUND_SLACK: Duration = Duration::from_secs(5);

/// Where a round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundPhase {
    /// Servers join and record what they touch.
    Track,
    /// Servers hold their fences and have sent what they touched.
    Sweep,
    /// The collection ended; servers reload the packs and go on.
    Done,
    /// The collection stopped before removing anything.
    Aborted,
}

impl RoundPhase {
    fn name(self) -> &'static str {
        match self {
            Self::Track => "track",
            Self::Sweep => "sweep",
            Self::Done => "done",
            Self::Aborted => "aborted",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Track, Self::Sweep, Self::Done, Self::Aborted]
            .into_iter()
            .find(|phase| phase.name() == text)
    }
}

/// A collection round as `gc/round` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// Generation of the collection lease it runs under.
    pub generation: u64,
    /// The collecting server.
    pub holder: String,
    pub phase: RoundPhase,
}

impl Round {
    fn encode(&self) -> Bytes {
        Bytes::from(format!(
            "{ROUND_MAGIC}\ngeneration={}\nholder={}\nphase={}\n",
            self.generation,
            self.holder,
            self.phase.name()
        ))
    }

    /// The round `data` (another server's object) records.
    pub(crate) fn decode(data: &[u8]) -> Result<Self, Error> {
        let malformed = |why: &str| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{ROUND_KEY} in the bucket: {why}"),
            )
        };
        let text = std::str::from_utf8(data).map_err(|_| malformed("not text"))?;
        let mut lines = text.lines();
        if lines.next() != Some(ROUND_MAGIC) {
            return Err(malformed("not a blockrep collection round"));
        }
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|line| line.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
                .ok_or_else(|| malformed(&format!("no {name}")))
        };
        let generation = field("generation")?
            .parse()
            .map_err(|_| malformed("a generation that is not a number"))?;
        let holder = field("holder")?;
        let phase =
            RoundPhase::parse(&field("phase")?).ok_or_else(|| malformed("no such phase"))?;
        Ok(Self {
            generation,
            holder,
            phase,
        })
    }
}

/// The touched object of round `generation`: magic, generation, count, ids,
/// and a blake3 of everything before it.
pub(crate) fn encode_touched(generation: u64, ids: &HashSet<ChunkId>) -> Bytes {
    let mut out = Vec::with_capacity(56 + 32 * ids.len());
    out.extend_from_slice(&TOUCHED_MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Bytes::from(out)
}

/// The ids of a touched object, if it is whole and of round `generation`;
/// `Ok(None)` for an object of another round.
pub(crate) fn decode_touched(
    key: &str,
    data: &[u8],
    generation: u64,
) -> Result<Option<Vec<ChunkId>>, Error> {
    let malformed = |why: &str| Error::new(ErrorKind::Corrupt, format!("{key}: {why}"));
    let (body, sum) = data
        .split_at_checked(data.len().saturating_sub(32))
        .filter(|(body, _)| body.len() >= 24)
        .ok_or_else(|| malformed("too short"))?;
    if body[..8] != TOUCHED_MAGIC {
        return Err(malformed("not a blockrep touched set"));
    }
    if blake3::hash(body).as_bytes() != sum {
        return Err(malformed("its checksum does not match"));
    }
    let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
    if word(8) != generation {
        return Ok(None);
    }
    let count = word(16);
    if count > TOUCHED_IDS_MAX || (body.len() - 24) as u64 != count * 32 {
        return Err(malformed("its length does not match its count of ids"));
    }
    Ok(Some(
        body[24..]
            .chunks_exact(32)
            .map(|id| ChunkId(id.try_into().unwrap_or([0; 32])))
            .collect(),
    ))
}

/// The server's joined object for round `generation`.
pub(crate) fn encode_joined(generation: u64) -> Bytes {
    Bytes::from(format!("joined generation={generation}\n"))
}

fn joined_generation(data: &[u8]) -> Option<u64> {
    std::str::from_utf8(data)
        .ok()?
        .trim()
        .strip_prefix("joined generation=")?
        .parse()
        .ok()
}

pub(crate) fn joined_key(holder: &str) -> String {
    format!("{JOINED_PREFIX}{holder}")
}

pub(crate) fn touched_key(holder: &str) -> String {
    format!("{TOUCHED_PREFIX}{holder}")
}

/// What the collector waits for from each server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Joined,
    Touched,
}

impl Collecting {
    /// Now, on the clock the collection lease was taken with.
    fn now_unix_ms(&self) -> u64 {
        self.claimed_unix_ms
            .saturating_add(self.claimed_at.elapsed().as_millis() as u64)
    }
}

impl Store {
    /// The round the collection running here belongs to, when other servers
    /// share the bucket.
    fn collecting(&self) -> Option<(&Remote, Collecting)> {
        let remote = self.remote.as_deref()?;
        let collecting = lock(&remote.round).clone()?;
        (!collecting.peers.is_empty()).then_some((remote, collecting))
    }

    /// Whether this collection has other servers to bring in.
    pub(crate) fn collects_beside_others(&self) -> bool {
        self.collecting().is_some()
    }

    /// Step 1 of the round: asks the servers present to join, and waits until
    /// each one did or is gone. Those gone are left out of the round.
    pub(crate) fn open_round(&self) -> Result<(), Error> {
        let Some((remote, collecting)) = self.collecting() else {
            return Ok(());
        };
        self.write_round(remote, &collecting, RoundPhase::Track)?;
        let joined = self.wait_for(remote, &collecting, Answer::Joined)?;
        if let Some(round) = lock(&remote.round).as_mut() {
            round.peers = joined;
        }
        // The packs they published so far, so that the plan sees them.
        self.blobs.refresh()
    }

    /// Step 4 of the round: asks the servers that joined for what they
    /// touched, and returns it once every one answered (each then holds its
    /// fence until [`Store::close_round`]). A server gone meanwhile fails
    /// the collection: what it touched is unknown.
    pub(crate) fn gather_touched(&self) -> Result<Vec<ChunkId>, Error> {
        let Some((remote, collecting)) = self.collecting() else {
            return Ok(Vec::new());
        };
        self.write_round(remote, &collecting, RoundPhase::Sweep)?;
        self.wait_for(remote, &collecting, Answer::Touched)?;
        let mut ids = Vec::new();
        for peer in &collecting.peers {
            let key = touched_key(peer);
            let (data, _) = remote
                .bucket
                .get(&key)
                .map_err(|e| bucket_error(format!("cannot read {key}"), e))?
                .ok_or_else(|| Error::new(ErrorKind::Io, format!("{key} vanished")))?;
            let peer_ids = decode_touched(&key, &data, collecting.generation)?
                .ok_or_else(|| Error::new(ErrorKind::Io, format!("{key} is of another round")))?;
            ids.extend(peer_ids);
        }
        Ok(ids)
    }

    /// Ends the round (step 5's last write): `done`, or `aborted` when the
    /// collection failed; the servers then reload the packs and release
    /// their fences. The answers are deleted. Best effort: a round left
    /// behind ends for its servers when the collection lease lapses.
    pub(crate) fn close_round(&self, completed: bool) {
        let Some(remote) = self.remote.as_deref() else {
            return;
        };
        let Some(collecting) = lock(&remote.round).take() else {
            return;
        };
        if collecting.peers.is_empty() {
            return;
        }
        let phase = if completed {
            RoundPhase::Done
        } else {
            RoundPhase::Aborted
        };
        if let Err(e) = self.write_round(remote, &collecting, phase) {
            eprintln!("blockrep-store: cannot end the collection round: {e}");
        }
        for peer in &collecting.peers {
            for key in [joined_key(peer), touched_key(peer)] {
                // Left behind, an answer is of an old round: ignored.
                let _ = remote.bucket.delete(&key);
            }
        }
    }

    fn write_round(
        &self,
        remote: &Remote,
        collecting: &Collecting,
        phase: RoundPhase,
    ) -> Result<(), Error> {
        let round = Round {
            generation: collecting.generation,
            holder: collecting.holder.clone(),
            phase,
        };
        remote
            .bucket
            .put(ROUND_KEY, round.encode())
            .map(|_| ())
            .map_err(|e| bucket_error("cannot write the collection round", e))
    }

    /// Waits until every peer of `collecting` gave `answer` for its round.
    /// Returns the peers that did: a peer whose presence lapsed before it
    /// joined is left out; one that lapses after joining, or that is present
    /// and silent past a presence's time, fails the wait.
    fn wait_for(
        &self,
        remote: &Remote,
        collecting: &Collecting,
        answer: Answer,
    ) -> Result<Vec<String>, Error> {
        // A peer that stopped renewing may act for one lease time past its
        // presence (a source's lease taken just before), which itself runs
        // for one lease time at most.
        let deadline = Instant::now() + Duration::from_millis(collecting.ttl_ms) * 2 + ROUND_SLACK;
        let mut waiting: Vec<String> = collecting.peers.clone();
        let mut answered = Vec::new();
        loop {
            let mut still = Vec::new();
            for peer in waiting {
                if self.answered(remote, collecting, &peer, answer)? {
                    answered.push(peer);
                } else if !may_act(
                    remote,
                    &peer,
                    collecting.now_unix_ms(),
                    answer,
                    collecting.ttl_ms,
                )? {
                    if answer == Answer::Touched {
                        return Err(Error::new(
                            ErrorKind::Busy,
                            format!(
                                "server {peer} joined the collection and is gone before it \
                                 sent what it touched; nothing was removed (collect again)"
                            ),
                        ));
                    }
                } else {
                    still.push(peer);
                }
            }
            if still.is_empty() {
                return Ok(answered);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "server {} shares this bucket and did not take part in the \
                         collection in time; nothing was removed",
                        still.join(", ")
                    ),
                ));
            }
            waiting = still;
            std::thread::sleep(ROUND_POLL);
        }
    }

    fn answered(
        &self,
        remote: &Remote,
        collecting: &Collecting,
        peer: &str,
        answer: Answer,
    ) -> Result<bool, Error> {
        let key = match answer {
            Answer::Joined => joined_key(peer),
            Answer::Touched => touched_key(peer),
        };
        let Some((data, _)) = remote
            .bucket
            .get(&key)
            .map_err(|e| bucket_error(format!("cannot read {key}"), e))?
        else {
            return Ok(false);
        };
        Ok(match answer {
            Answer::Joined => joined_generation(&data) == Some(collecting.generation),
            Answer::Touched => decode_touched(&key, &data, collecting.generation)?.is_some(),
        })
    }

    /// Every root that a record in the bucket names: each source's head and
    /// snapshots, each launch's base and root. Another server's records are
    /// in the bucket, not in this one's data directory. A record that cannot
    /// be read or decoded fails the listing, as a local one does.
    pub(crate) fn bucket_roots(&self) -> Result<Vec<ChunkId>, Error> {
        let Some(remote) = self.remote.as_deref() else {
            return Ok(Vec::new());
        };
        let read = |key: &str| -> Result<Option<Vec<u8>>, Error> {
            let Some((object, _)) = remote
                .bucket
                .get(key)
                .map_err(|e| bucket_error(format!("cannot read {key}"), e))?
            else {
                return Ok(None); // deleted since the listing
            };
            Ok(Some(Remote::open_envelope(key, &object)?.to_vec()))
        };
        // An authentication trailer, if any, is not part of the record.
        let record = |bytes: &[u8], len: usize| bytes.get(..len).unwrap_or(bytes).to_vec();
        let mut roots = Vec::new();
        let listed = |dir: &str| {
            remote
                .bucket
                .list_all(dir)
                .map_err(|e| bucket_error(format!("cannot list {dir}/ in the bucket"), e))
        };
        for (key, _) in listed("sources")? {
            let parts: Vec<&str> = key.split('/').collect();
            let Some(bytes) = (match parts.as_slice() {
                ["sources", _, "head"] | ["sources", _, "snapshots", _] => read(&key)?,
                _ => None,
            }) else {
                continue;
            };
            let root = if parts[2] == "head" {
                Head::decode(&record(&bytes, HEAD_LEN)).map(|head| head.root)
            } else {
                Snapshot::decode(&record(&bytes, SNAPSHOT_LEN)).map(|snapshot| snapshot.root)
            }
            .map_err(|e| in_key(&key, e))?;
            roots.push(root);
        }
        let mut launches = std::collections::BTreeSet::new();
        for (key, _) in listed("launches")? {
            if let ["launches", name, "meta"] = key.split('/').collect::<Vec<_>>().as_slice() {
                launches.insert((*name).to_owned());
            }
        }
        for name in launches {
            let meta_key = format!("launches/{name}/meta");
            let head_key = format!("launches/{name}/head");
            let (Some(meta), Some(head)) = (read(&meta_key)?, read(&head_key)?) else {
                continue; // deleted since the listing
            };
            let info = LaunchInfo::decode(
                &record(&meta, LAUNCH_META_LEN),
                &record(&head, LAUNCH_HEAD_LEN),
            )
            .map_err(|e| in_key(&meta_key, e))?;
            roots.push(info.base_root);
            roots.push(info.root);
        }
        Ok(roots)
    }
}

fn in_key(key: &str, e: Error) -> Error {
    Error::new(e.kind(), format!("{key}: {e}"))
}

/// The servers a collection of this store runs beside, for the blob layer.
pub(crate) struct RoundPeers<'a>(pub(crate) &'a Store);

impl Peers for RoundPeers<'_> {
    fn touched(&self) -> Result<Vec<ChunkId>, Error> {
        self.0.gather_touched()
    }

    /// The collection lease must hold for a quarter of its time more: the
    /// servers release their fences when it lapses, judged on their clocks.
    fn still_fenced(&self) -> Result<(), Error> {
        let Some((remote, collecting)) = self.0.collecting() else {
            return Ok(());
        };
        let margin = collecting.ttl_ms / 4;
        match remote.lease_named(GC_LEASE) {
            Some(lease)
                if lease.generation == collecting.generation
                    && lease.expires_unix_ms > collecting.now_unix_ms().saturating_add(margin) =>
            {
                Ok(())
            }
            _ => Err(Error::new(
                ErrorKind::Busy,
                "the collection lease is lapsing (it was not renewed in time): the other \
                 servers may go on, so the collection stops; what it did not delete stays",
            )),
        }
    }
}

/// Whether `peer` may still take part in the round at `now_unix_ms`. To
/// join, a server counts while its presence holds and for one lease time
/// (`ttl_ms`) after it lapsed: a source's lease it took just before may run
/// that much longer, and with it its commits. Once it joined, it must stay
/// present until it has sent its ids.
fn may_act(
    remote: &Remote,
    peer: &str,
    now_unix_ms: u64,
    answer: Answer,
    ttl_ms: u64,
) -> Result<bool, Error> {
    let grace = match answer {
        Answer::Joined => ttl_ms,
        Answer::Touched => 0,
    };
    let present = remote
        .bucket
        .read_leases(PRESENCE_PREFIX.trim_end_matches('/'))
        .map_err(|e| bucket_error("cannot list the servers of the bucket", e))?;
    Ok(present.iter().any(|(_, lease)| {
        lease.holder == peer && lease.expires_unix_ms.saturating_add(grace) > now_unix_ms
    }))
}

/// The collection lease as the bucket holds it now, if any.
pub(crate) fn collection_lease(remote: &Remote) -> Result<Option<LeaseRecord>, Error> {
    let (dir, name) = GC_LEASE.split_once('/').unwrap_or(("", GC_LEASE));
    Ok(remote
        .bucket
        .read_leases(dir)
        .map_err(|e| bucket_error("cannot read the collection lease", e))?
        .into_iter()
        .find(|(found, _)| found == name)
        .map(|(_, lease)| lease))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_reads_back_as_written_and_a_foreign_object_is_refused() {
        for phase in [
            RoundPhase::Track,
            RoundPhase::Sweep,
            RoundPhase::Done,
            RoundPhase::Aborted,
        ] {
            let round = Round {
                generation: 7,
                holder: "server-a".into(),
                phase,
            };
            assert_eq!(Round::decode(&round.encode()).unwrap(), round);
        }
        for bad in [&b"blockrep-lease 1\n"[..], b"", &[0xff, 0xfe]] {
            assert_eq!(Round::decode(bad).unwrap_err().kind(), ErrorKind::Corrupt);
        }
        let no_phase = b"blockrep-gc-round 1\ngeneration=3\nholder=a\nphase=later\n";
        assert_eq!(
            Round::decode(no_phase).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn a_touched_set_reads_back_only_whole_and_of_its_round() {
        let ids: HashSet<ChunkId> = (0u8..5).map(|i| ChunkId([i; 32])).collect();
        let data = encode_touched(9, &ids);
        let back: HashSet<ChunkId> = decode_touched("k", &data, 9)
            .unwrap()
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(back, ids);
        assert_eq!(decode_touched("k", &data, 10).unwrap(), None);
        let mut flipped = data.to_vec();
        flipped[30] ^= 1;
        assert_eq!(
            decode_touched("k", &flipped, 9).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let cut = &data[..data.len() - 40];
        assert!(decode_touched("k", cut, 9).is_err());
        assert!(decode_touched("k", b"short", 9).is_err());
        assert_eq!(joined_generation(&encode_joined(4)), Some(4));
        assert_eq!(joined_generation(b"joined generation=x"), None);
    }
}

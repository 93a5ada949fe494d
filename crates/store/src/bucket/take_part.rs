//! Taking part in another server's collection round (steps 2, 4 and 6 of
//! `round.rs`): this server's touched set runs from its joining to the end of
//! the round, and its fence is held from the sweep until it has reloaded the
//! bucket's packs.

use std::collections::HashSet;
use std::sync::{MutexGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use blockrep_core::ChunkId;

use super::bucket_error;
use super::round::{
    ROUND_KEY, Round, RoundPhase, collection_lease, encode_joined, encode_touched, joined_key,
    touched_key,
};
use crate::blobs::Tracking;
use crate::error::{Error, ErrorKind};
use crate::mutex::lock;
use crate::remote::{Remote, Unsettled};
use crate::store::Store;

/// How a round ended for a server taking part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundEnd {
    /// The collector finished.
    Done,
    /// The collector stopped before removing anything, or failed.
    Aborted,
    /// The collection lease lapsed or passed to another round: the collector
    /// died or was cut off.
    CollectorGone,
    /// The bucket stopped answering before the round's end could be read:
    /// this server publishes nothing until [`Store::settle_round`] has read
    /// it and the packs.
    Unsettled,
}

/// How long a server taking part waits for a bucket that does not answer,
/// in collection lease times, before it lets its fence go and refuses to
/// publish instead (`RoundEnd::Unsettled`).
const SILENT_BUCKET_LEASES: u32 = 2;
/// Reloads of the packs tried at the end of a round before the same.
const RELOAD_ATTEMPTS: u32 = 5;

/// This server's part in a round, from [`Store::join_round`] until
/// [`RoundPart::finish`] (or its drop, which finishes too).
pub struct RoundPart<'a> {
    store: &'a Store,
    remote: &'a Remote,
    holder: String,
    round: Round,
    /// The collection lease's time as read at the join (its expiry then,
    /// less the time), which bounds the wait for a silent bucket.
    lease_ms: u64,
    started_unix_ms: u64,
    started_at: Instant,
    // Field order is drop order: the fence is released before the touched
    // set ends, and both before the run lock.
    fence: Option<RwLockWriteGuard<'a, ()>>,
    tracking: Option<Tracking<'a>>,
    _run: MutexGuard<'a, ()>,
    finished: bool,
}

impl std::fmt::Debug for RoundPart<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundPart")
            .field("holder", &self.holder)
            .field("round", &self.round)
            .field("fenced", &self.fence.is_some())
            .finish()
    }
}

impl Store {
    /// The collection round recorded in the bucket, if any (perhaps ended).
    /// `None` for a local store.
    pub fn gc_round(&self) -> Result<Option<Round>, Error> {
        let Some(remote) = self.remote.as_deref() else {
            return Ok(None);
        };
        match remote.bucket.get(ROUND_KEY) {
            Ok(Some((data, _))) => Round::decode(&data).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(bucket_error("cannot read the collection round", e)),
        }
    }

    /// Joins `round`, another server's collection, as `holder` (step 2 of
    /// `round.rs`): starts this store's touched set, waits for the commits
    /// already publishing, and tells the collector. `now_unix_ms` is this
    /// server's clock, against which the collection lease is judged.
    /// Refused for a round that is not in its first phase, or that this
    /// server runs.
    pub fn join_round(
        &self,
        holder: &str,
        round: &Round,
        now_unix_ms: u64,
    ) -> Result<RoundPart<'_>, Error> {
        let remote = self
            .remote
            .as_deref()
            .ok_or_else(|| Error::new(ErrorKind::Invalid, "a local store has no rounds"))?;
        if round.holder == holder || round.phase != RoundPhase::Track {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "round {} of {} ({:?}) is not one this server can join",
                    round.generation, round.holder, round.phase
                ),
            ));
        }
        let fence = self.blobs.fence();
        // No collection or dry run of this server's own meanwhile: it would
        // end the touched set.
        let run = lock(&fence.run);
        let tracking = fence.start_tracking();
        // A commit that recorded its ids before the set existed publishes
        // before this returns; every later one records into the set.
        drop(fence.write_fence());
        let mut part = RoundPart {
            store: self,
            remote,
            holder: holder.to_owned(),
            round: round.clone(),
            lease_ms: 0,
            started_unix_ms: now_unix_ms,
            started_at: Instant::now(),
            fence: None,
            tracking: Some(tracking),
            _run: run,
            finished: false,
        };
        // Until this server's answer is sent, the collector cannot count it
        // in: a failure here leaves nothing to settle.
        part.finished = true;
        match collection_lease(remote)? {
            Some(lease)
                if lease.generation == round.generation
                    && lease.holder == round.holder
                    && lease.expires_unix_ms > now_unix_ms =>
            {
                part.lease_ms = lease.expires_unix_ms - now_unix_ms;
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("round {} has no collector any more", round.generation),
                ));
            }
        }
        remote
            .bucket
            .put(&joined_key(holder), encode_joined(round.generation))
            .map_err(|e| bucket_error("cannot join the collection round", e))?;
        part.finished = false;
        Ok(part)
    }

    /// Takes part in `round` from start to end (`join_round`, then each
    /// step as the collector reaches it), looking at the bucket every
    /// `poll`. Blocks until the round ends; commits and launch flushes of
    /// this store wait from the sweep to the end. Returns how the round
    /// ended here, and how long this store held its fence.
    pub fn take_part_in_round(
        &self,
        holder: &str,
        round: &Round,
        now_unix_ms: u64,
        poll: Duration,
    ) -> Result<(RoundEnd, Duration), Error> {
        let mut part = self.join_round(holder, round, now_unix_ms)?;
        let mut fenced_at = None;
        let end = match part.wait_past(RoundPhase::Track, poll) {
            Some(end) => end,
            None => {
                fenced_at = Some(Instant::now());
                // The fence is held whether or not the answer arrived: a
                // write the bucket took but did not confirm still counts
                // for the collector, which then deletes.
                if let Err(e) = part.send_touched() {
                    eprintln!("blockrep-store: {e}; waiting for the round to end");
                }
                // Four times as often while fenced: this store's commits
                // wait for the end, which comes soon after the sweep.
                part.wait_past(RoundPhase::Sweep, poll / 4)
                    .unwrap_or(RoundEnd::Aborted)
            }
        };
        let end = part.finish(end);
        Ok((end, fenced_at.map_or(Duration::ZERO, |at| at.elapsed())))
    }

    /// After a round that ended [`RoundEnd::Unsettled`] (or ran without
    /// this server): once the bucket shows that round ended (or its
    /// collector gone), reads the packs again and lets this store publish,
    /// unless it must still announce itself again ([`Store::rejoin`]).
    /// Returns whether no round is left unsettled.
    pub fn settle_round(&self, now_unix_ms: u64) -> Result<bool, Error> {
        let Some(remote) = self.remote.as_deref() else {
            return Ok(true);
        };
        let Some(generation) = lock(&remote.unsettled).round else {
            return Ok(true);
        };
        let ended = match self.gc_round()? {
            Some(now) if now.generation == generation => {
                matches!(now.phase, RoundPhase::Done | RoundPhase::Aborted)
            }
            _ => true,
        };
        let lapsed = collection_lease(remote)?.is_none_or(|lease| {
            lease.generation != generation || lease.expires_unix_ms <= now_unix_ms
        });
        if !(ended || lapsed) {
            return Ok(false);
        }
        self.blobs.refresh()?;
        self.unsettle(|unsettled| {
            if unsettled.round == Some(generation) {
                unsettled.round = None;
            }
        });
        Ok(true)
    }

    /// Why this store may not publish at `now_unix_ms`, if it may not: it
    /// waits for another server's collection round to end, or to announce
    /// itself in the bucket again, or its announcement has expired (the
    /// check every commit makes). `None` for a local store.
    pub fn publishing_blocked(&self, now_unix_ms: u64) -> Option<String> {
        let remote = self.remote.as_deref()?;
        let (round, rejoin) = {
            let unsettled = lock(&remote.unsettled);
            (unsettled.round, unsettled.rejoin)
        };
        match (round, rejoin) {
            (Some(generation), _) => Some(format!(
                "waiting for collection round {generation} of another server to end"
            )),
            (None, true) => Some("waiting to announce itself in the bucket again".into()),
            (None, false) => remote
                .check_presence(now_unix_ms)
                .err()
                .map(|e| e.to_string()),
        }
    }

    /// Changes why this store may not publish, and the flag publishing
    /// checks with it.
    pub(crate) fn unsettle(&self, change: impl FnOnce(&mut Unsettled)) {
        let Some(remote) = self.remote.as_deref() else {
            return;
        };
        let mut unsettled = lock(&remote.unsettled);
        change(&mut unsettled);
        self.blobs
            .unsettled
            .store(unsettled.blocks(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl RoundPart<'_> {
    /// Now on this server's clock.
    fn now_unix_ms(&self) -> u64 {
        self.started_unix_ms
            .saturating_add(self.started_at.elapsed().as_millis() as u64)
    }

    /// Whether the collection lease of this round, as the bucket holds it
    /// now, has lapsed (on this server's clock) or passed to another round.
    fn collector_gone(&self) -> Result<bool, Error> {
        let now = self.now_unix_ms();
        Ok(collection_lease(self.remote)?.is_none_or(|lease| {
            lease.generation != self.round.generation
                || lease.holder != self.round.holder
                || lease.expires_unix_ms <= now
        }))
    }

    /// Waits while the round stays in `phase`: `None` once it moved on to the
    /// next phase, or how it ended. Only what the bucket answered counts: a
    /// bucket that does not answer is asked again, for at most
    /// [`SILENT_BUCKET_LEASES`] lease times since its last answer, and then
    /// the round ends [`RoundEnd::Unsettled`].
    pub fn wait_past(&mut self, phase: RoundPhase, poll: Duration) -> Option<RoundEnd> {
        let silence_max = Duration::from_millis(self.lease_ms) * SILENT_BUCKET_LEASES;
        let mut answered = Instant::now();
        loop {
            let seen = self.store.gc_round().and_then(|round| {
                let gone = self.collector_gone()?;
                Ok((round, gone))
            });
            match seen {
                Ok((Some(round), gone)) if round.generation == self.round.generation => {
                    match round.phase {
                        RoundPhase::Done => return Some(RoundEnd::Done),
                        RoundPhase::Aborted => return Some(RoundEnd::Aborted),
                        // The collector writes its end before it lets the
                        // lease go: read the round once more for it.
                        _ if gone => {
                            return Some(match self.store.gc_round() {
                                Ok(Some(again)) if again.generation == self.round.generation => {
                                    match again.phase {
                                        RoundPhase::Done => RoundEnd::Done,
                                        RoundPhase::Aborted => RoundEnd::Aborted,
                                        _ => RoundEnd::CollectorGone,
                                    }
                                }
                                _ => RoundEnd::CollectorGone,
                            });
                        }
                        now if now != phase => return None,
                        _ => answered = Instant::now(),
                    }
                }
                Ok(_) => return Some(RoundEnd::CollectorGone),
                Err(_) if answered.elapsed() > silence_max => return Some(RoundEnd::Unsettled),
                Err(_) => {}
            }
            std::thread::sleep(poll);
        }
    }

    /// Step 4: reads the ids this server's open launch volumes hold, takes
    /// the fence for writing (held until [`RoundPart::finish`]), and sends
    /// every id touched since joining with them.
    pub fn send_touched(&mut self) -> Result<(), Error> {
        let mut ids: HashSet<ChunkId> = HashSet::new();
        // Before the fence: a flush holds its volume's lock while it waits
        // for the fence. What a volume writes after this read is touched.
        for volume in self.store.open_launch_volumes() {
            let (root, held) = volume.ids_in_memory();
            ids.insert(root);
            ids.extend(held);
        }
        let fence = self.store.blobs.fence();
        self.fence = Some(fence.write_fence());
        ids.extend(fence.touched_snapshot());
        ids.remove(&ChunkId::ZERO);
        self.remote
            .bucket
            .put(
                &touched_key(&self.holder),
                encode_touched(self.round.generation, &ids),
            )
            .map(|_| ())
            .map_err(|e| bucket_error("cannot send what this server touched", e))
    }

    /// Step 6, once the round ended as `end`: reloads the bucket's packs
    /// (dropping the entries of packs deleted, learning the collector's
    /// copies), then releases the fence and ends the touched set. When the
    /// round's end is unknown or the packs cannot be read, this store
    /// refuses to publish until [`Store::settle_round`] succeeds. Returns
    /// how the round ended here.
    pub fn finish(mut self, end: RoundEnd) -> RoundEnd {
        self.finish_now(end)
    }

    fn finish_now(&mut self, end: RoundEnd) -> RoundEnd {
        if self.finished {
            return end;
        }
        self.finished = true;
        let mut end = end;
        if end != RoundEnd::Unsettled {
            let mut delay = Duration::from_millis(100);
            let mut attempt = 1;
            while let Err(e) = self.store.blobs.refresh() {
                eprintln!(
                    "blockrep-store: cannot reload the packs after collection round {}: {e}",
                    self.round.generation
                );
                if attempt == RELOAD_ATTEMPTS {
                    end = RoundEnd::Unsettled;
                    break;
                }
                attempt += 1;
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
        let generation = self.round.generation;
        if end == RoundEnd::Unsettled {
            // Before the fence goes: no commit slips in between.
            self.store
                .unsettle(|unsettled| unsettled.round = Some(generation));
        } else {
            // An older round left unsettled ended before this one began
            // (one collection lease at a time), and the packs are read.
            self.store.unsettle(|unsettled| unsettled.round = None);
        }
        self.fence = None;
        self.tracking = None;
        // The answers are the collector's to delete; one left behind
        // belongs to an old round and is ignored.
        end
    }
}

impl Drop for RoundPart<'_> {
    /// A part dropped before its end is known: its round is unsettled.
    fn drop(&mut self) {
        self.finish_now(RoundEnd::Unsettled);
    }
}

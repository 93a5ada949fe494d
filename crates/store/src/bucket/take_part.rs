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
use crate::remote::Remote;
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
}

/// This server's part in a round, from [`Store::join_round`] until
/// [`RoundPart::finish`] (or its drop, which finishes too).
pub struct RoundPart<'a> {
    store: &'a Store,
    remote: &'a Remote,
    holder: String,
    round: Round,
    /// The collection lease's expiry as last read, on this server's clock.
    lease_expires_unix_ms: u64,
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
            lease_expires_unix_ms: 0,
            started_unix_ms: now_unix_ms,
            started_at: Instant::now(),
            fence: None,
            tracking: Some(tracking),
            _run: run,
            finished: false,
        };
        match part.collector_lease_holds()? {
            true => {}
            false => {
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
        Ok(part)
    }

    /// Takes part in `round` from start to end (`join_round`, then each
    /// step as the collector reaches it), looking at the bucket every
    /// `poll`. Blocks until the round ends; commits and launch flushes of
    /// this store wait from the sweep to the end.
    pub fn take_part_in_round(
        &self,
        holder: &str,
        round: &Round,
        now_unix_ms: u64,
        poll: Duration,
    ) -> Result<RoundEnd, Error> {
        let mut part = self.join_round(holder, round, now_unix_ms)?;
        if let Some(end) = part.wait_past(RoundPhase::Track, poll) {
            part.finish();
            return Ok(end);
        }
        let sent = part.send_touched();
        let end = match &sent {
            Ok(()) => part.wait_past(RoundPhase::Sweep, poll),
            Err(_) => None,
        };
        part.finish();
        sent.map(|()| end.unwrap_or(RoundEnd::Aborted))
    }
}

impl RoundPart<'_> {
    /// Now on this server's clock.
    fn now_unix_ms(&self) -> u64 {
        self.started_unix_ms
            .saturating_add(self.started_at.elapsed().as_millis() as u64)
    }

    /// Whether the collection lease of this round is still held: read from
    /// the bucket, or, when the bucket does not answer, judged by the expiry
    /// last read.
    fn collector_lease_holds(&mut self) -> Result<bool, Error> {
        let now = self.now_unix_ms();
        match collection_lease(self.remote) {
            Ok(Some(lease))
                if lease.generation == self.round.generation
                    && lease.holder == self.round.holder =>
            {
                self.lease_expires_unix_ms = lease.expires_unix_ms;
                Ok(lease.expires_unix_ms > now)
            }
            Ok(_) => Ok(false),
            Err(e) if self.lease_expires_unix_ms == 0 => Err(e),
            Err(_) => Ok(self.lease_expires_unix_ms > now),
        }
    }

    /// Waits while the round stays in `phase`: `None` once it moved on to the
    /// next phase, or how it ended. A bucket that does not answer is asked
    /// again until the collection lease lapses.
    pub fn wait_past(&mut self, phase: RoundPhase, poll: Duration) -> Option<RoundEnd> {
        loop {
            match self.store.gc_round() {
                Ok(Some(round)) if round.generation == self.round.generation => match round.phase {
                    RoundPhase::Done => return Some(RoundEnd::Done),
                    RoundPhase::Aborted => return Some(RoundEnd::Aborted),
                    now if now != phase => return None,
                    _ => {}
                },
                Ok(_) => return Some(RoundEnd::CollectorGone),
                Err(_) => {}
            }
            if !self.collector_lease_holds().unwrap_or(false) {
                return Some(RoundEnd::CollectorGone);
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

    /// Step 6: reloads the bucket's packs (dropping the entries of packs
    /// deleted, learning the collector's copies), then releases the fence
    /// and ends the touched set. A bucket that does not answer is asked
    /// again until it does: this server's commits wait meanwhile, so none
    /// can name a blob the collection removed.
    pub fn finish(mut self) {
        self.finish_now();
    }

    fn finish_now(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let mut delay = Duration::from_millis(100);
        while let Err(e) = self.store.blobs.refresh() {
            eprintln!(
                "blockrep-store: cannot reload the packs after collection round {}: {e}; \
                 trying again",
                self.round.generation
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.fence = None;
        self.tracking = None;
        // The answers are the collector's to delete; one left behind
        // belongs to an old round and is ignored.
    }
}

impl Drop for RoundPart<'_> {
    fn drop(&mut self) {
        self.finish_now();
    }
}

//! Sub-chunk patches, the agent's side of replication.
//!
//! A changed chunk whose index the replica already names (its base, a chunk of
//! this source's own) can travel as the 4 KiB blocks that differ from that
//! base. The agent keeps no per-block state: it asks the server for the block
//! values of the bases (`GetBlockValues`, batched and pipelined), and each
//! encoder gets the new chunk's block values for free from the one blake3 pass
//! that also yields its id. Where the blocks that differ make up less than
//! [`PATCH_SHARE_MAX_PERCENT`] of the chunk, a `Patch` frame carries them;
//! otherwise the whole chunk travels as before.
//!
//! The values are not awaited before encoding starts: [`BaseFetch`] sends the
//! first requests, the encoders start at once, and each waits only for the
//! answer that holds its own chunk's base (answers come in the order asked,
//! which is the order the encoders take chunks in), while the task that
//! writes frames also reads the answers and asks for more.
//!
//! In capture mode the agent knows which blocks were written since the head
//! (the cut's sealed blocks), so it asks for nothing: [`BaseFetch::known`]
//! names each chunk's base at once, and the patch carries exactly the written
//! blocks ([`plan_ranges`]). The server still rebuilds the chunk and checks
//! it against its id, so a dirty set that missed a write cannot store a wrong
//! chunk: the patch is refused and the next session sends whole chunks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

use blockrep_core::{BlockValue, ChunkId, changed_blocks, parse_block_values};
use blockrep_proto::{BLOCK_VALUES_IDS_MAX, Message};
use tokio::sync::mpsc;

use crate::Error;
use crate::connection::{Connection, Transport};

/// A patch is sent only when the bytes of its ranges are below this share of
/// the chunk: a patch nearly as large as its chunk saves little and costs the
/// server a read of the base.
pub(crate) const PATCH_SHARE_MAX_PERCENT: u64 = 75;
/// `GetBlockValues` requests in flight at once: enough to hide the round trip,
/// few enough that the answers (up to a few MiB each) never pile up unread.
const REQUESTS_IN_FLIGHT: usize = 4;

/// The bases of the epoch's changed chunks, as their block values arrive;
/// shared by the encoders, filled by [`BaseFetch`].
#[derive(Default)]
pub(crate) struct Bases {
    /// Chunk index -> the request batch that asks for its base.
    batch_of: HashMap<u64, usize>,
    /// Capture mode: the bases are named up front (in `state`), without
    /// values, and patches carry the written blocks.
    known: bool,
    state: Mutex<Arrived>,
    arrived: Condvar,
}

#[derive(Default)]
struct Arrived {
    by_index: HashMap<u64, Base>,
    /// Batches answered (answers come in the order asked).
    batches: usize,
    /// No more answers will come (the session ended): chunks still waiting
    /// travel whole, or rather not at all, as their frames go nowhere.
    closed: bool,
}

/// The chunk the replica holds at an index, and its block values.
#[derive(Clone)]
pub(crate) struct Base {
    pub id: ChunkId,
    pub values: Arc<Vec<BlockValue>>,
}

impl Bases {
    /// The base of chunk `index`, if a patch against it is possible; waits
    /// (blocking) until the answer that tells has arrived.
    pub(crate) fn get(&self, index: u64) -> Option<Base> {
        if self.known {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            return state.by_index.get(&index).cloned();
        }
        let batch = *self.batch_of.get(&index)?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while state.batches <= batch && !state.closed {
            state = self.arrived.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.by_index.get(&index).cloned()
    }

    /// Whether the bases are known without values (capture mode): a patch
    /// then carries the blocks written since the head.
    pub(crate) fn known(&self) -> bool {
        self.known
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.arrived.notify_all();
    }
}

/// Asks the server for the block values of the chunks the head names at the
/// changed indices (zero chunks have no base), a few requests ahead, and
/// publishes each answer to [`Bases`]. An empty answer for an id means the
/// server will not patch against it: those chunks travel whole.
pub(crate) struct BaseFetch {
    bases: Arc<Bases>,
    batches: Vec<Vec<ChunkId>>,
    /// Id -> the changed chunk indices whose base it is.
    indices_of: HashMap<ChunkId, Vec<u64>>,
    sent: usize,
    received: usize,
    /// Frame bytes of the `GetBlockValues` sent.
    pub bytes_sent: u64,
    /// Bytes of block values received (the answers' payload).
    pub values_bytes_received: u64,
}

impl BaseFetch {
    /// The requests for the bases of `changed` against `head`; none when
    /// `enabled` is false (every chunk then travels whole).
    pub(crate) fn new(head: &[ChunkId], changed: &[u64], enabled: bool) -> Self {
        let mut indices_of: HashMap<ChunkId, Vec<u64>> = HashMap::new();
        let mut ids = Vec::new();
        let mut batch_of = HashMap::new();
        let mut seen = HashSet::new();
        for &index in changed.iter().filter(|_| enabled) {
            let Some(&id) = head.get(index as usize) else {
                continue;
            };
            if id.is_zero() {
                continue;
            }
            if seen.insert(id) {
                ids.push(id);
            }
            indices_of.entry(id).or_default().push(index);
        }
        let batches: Vec<Vec<ChunkId>> = ids
            .chunks(BLOCK_VALUES_IDS_MAX)
            .map(<[ChunkId]>::to_vec)
            .collect();
        for (batch, ids) in batches.iter().enumerate() {
            for id in ids {
                for &index in &indices_of[id] {
                    batch_of.insert(index, batch);
                }
            }
        }
        Self {
            bases: Arc::new(Bases {
                batch_of,
                ..Bases::default()
            }),
            batches,
            indices_of,
            sent: 0,
            received: 0,
            bytes_sent: 0,
            values_bytes_received: 0,
        }
    }

    /// Capture mode: the base of each of `changed` is the chunk `head` names
    /// at its index (none for a zero chunk), known at once; nothing is asked.
    pub(crate) fn known(head: &[ChunkId], changed: &[u64]) -> Self {
        let by_index = changed
            .iter()
            .filter_map(|&index| {
                let id = *head.get(index as usize)?;
                let base = Base {
                    id,
                    values: Arc::default(),
                };
                (!id.is_zero()).then_some((index, base))
            })
            .collect();
        Self {
            bases: Arc::new(Bases {
                known: true,
                state: Mutex::new(Arrived {
                    by_index,
                    ..Arrived::default()
                }),
                ..Bases::default()
            }),
            batches: Vec::new(),
            indices_of: HashMap::new(),
            sent: 0,
            received: 0,
            bytes_sent: 0,
            values_bytes_received: 0,
        }
    }

    /// What the encoders read the bases from.
    pub(crate) fn bases(&self) -> Arc<Bases> {
        Arc::clone(&self.bases)
    }

    /// Sends requests up to the in-flight limit, and flushes them.
    pub(crate) async fn ask(
        &mut self,
        connection: &mut Connection<impl Transport>,
    ) -> Result<(), Error> {
        let before = self.sent;
        while self.sent < self.batches.len() && self.sent < self.received + REQUESTS_IN_FLIGHT {
            self.bytes_sent += connection
                .send(&Message::GetBlockValues {
                    ids: self.batches[self.sent].clone(),
                })
                .await?;
            self.sent += 1;
        }
        if self.sent > before {
            connection.flush().await?;
        }
        Ok(())
    }

    fn pending(&self) -> bool {
        self.received < self.batches.len()
    }

    /// Takes one answer (the oldest request's), publishes it, asks for more.
    async fn accept(
        &mut self,
        answer: Message,
        connection: &mut Connection<impl Transport>,
    ) -> Result<(), Error> {
        let Message::BlockValues { values: answer } = answer else {
            return Err(Error::Protocol("expected BlockValues".into()));
        };
        let batch = &self.batches[self.received];
        if answer.len() != batch.len() {
            return Err(Error::Protocol(format!(
                "BlockValues has {} entries for {} ids asked",
                answer.len(),
                batch.len()
            )));
        }
        self.values_bytes_received += answer.iter().map(|e| e.len() as u64).sum::<u64>();
        {
            let mut state = self.bases.state.lock().unwrap_or_else(|p| p.into_inner());
            for (id, entry) in batch.iter().zip(answer) {
                if let Some(parsed) = parse_block_values(&entry) {
                    let values = Arc::new(parsed);
                    for &index in self.indices_of.get(id).into_iter().flatten() {
                        let base = Base {
                            id: *id,
                            values: Arc::clone(&values),
                        };
                        state.by_index.insert(index, base);
                    }
                }
            }
            state.batches = self.received + 1;
        }
        self.bases.arrived.notify_all();
        self.received += 1;
        self.ask(connection).await
    }

    /// The next encoded frame, reading the answers to the requests in flight
    /// (and asking for more) while it waits.
    pub(crate) async fn next_frame<T>(
        &mut self,
        connection: &mut Connection<impl Transport>,
        frames: &mut mpsc::Receiver<T>,
    ) -> Result<Option<T>, Error> {
        loop {
            if !self.pending() {
                return Ok(frames.recv().await);
            }
            // Both are cancel-safe: an answer not taken stays queued.
            let answer = tokio::select! {
                biased;
                answer = connection.recv() => answer?,
                frame = frames.recv() => return Ok(frame),
            };
            self.accept(answer, connection).await?;
        }
    }

    /// Takes every answer still to come (before a commit, whose answer must
    /// be the next message).
    pub(crate) async fn finish(
        &mut self,
        connection: &mut Connection<impl Transport>,
    ) -> Result<(), Error> {
        while self.pending() {
            let answer = connection.recv().await?;
            self.accept(answer, connection).await?;
        }
        Ok(())
    }
}

impl Drop for BaseFetch {
    /// Encoders waiting for an answer that will never come stop waiting.
    fn drop(&mut self) {
        self.bases.close();
    }
}

/// What a patch carries: the ranges that differ and their new bytes.
pub(crate) struct Plan {
    pub ranges: Vec<(u32, u32)>,
    pub payload: Vec<u8>,
}

/// The ranges of `data` that differ from `base`, and their bytes, when they
/// are small enough to be worth a patch.
pub(crate) fn plan(base: &Base, values: &[BlockValue], data: &[u8]) -> Option<Plan> {
    let raw_len = u32::try_from(data.len()).ok()?;
    plan_ranges(changed_blocks(&base.values, values, raw_len)?, data)
}

/// A patch of `ranges` of `data` (byte ranges of the chunk, in order): the
/// blocks that differ from the base, or in capture mode the blocks the cut
/// says were written since the head. None when they are empty (the chunk
/// changed back to its base: the whole chunk, or the duplicate check, handles
/// it) or not small enough to be worth a patch.
pub(crate) fn plan_ranges(ranges: Vec<(u32, u32)>, data: &[u8]) -> Option<Plan> {
    let changed: u64 = ranges.iter().map(|&(_, len)| u64::from(len)).sum();
    if changed == 0 || changed * 100 >= data.len() as u64 * PATCH_SHARE_MAX_PERCENT {
        return None;
    }
    let mut payload = Vec::with_capacity(changed as usize);
    for &(offset, len) in &ranges {
        payload.extend_from_slice(data.get(offset as usize..(offset + len) as usize)?);
    }
    Some(Plan { ranges, payload })
}

/// Whether a session error was the server refusing a patch (or the block
/// values asked for one): the next session then sends whole chunks, so a
/// refusal cannot repeat forever.
pub(crate) fn refused_patch(error: &Error) -> bool {
    matches!(error, Error::Refused { message, .. } | Error::Protocol(message)
        if message.to_ascii_lowercase().contains("patch") || message.contains("BlockValues"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep_core::BLOCK_VALUE_LEN;
    use bytes::Bytes;

    #[test]
    fn values_that_are_not_whole_are_no_base() {
        assert!(parse_block_values(&Bytes::new()).is_none());
        assert!(parse_block_values(&Bytes::from(vec![0u8; BLOCK_VALUE_LEN + 1])).is_none());
        let two = parse_block_values(&Bytes::from(vec![7u8; 2 * BLOCK_VALUE_LEN])).unwrap();
        assert_eq!(two, vec![[7u8; BLOCK_VALUE_LEN]; 2]);
    }

    #[test]
    fn bases_are_asked_once_per_id_and_waiters_stop_when_the_fetch_ends() {
        let id = |n: u8| ChunkId([n; 32]);
        // Chunk 1 and 3 share a base; chunk 2's is zero (no base to ask for).
        let head = vec![id(9), id(1), ChunkId::ZERO, id(1), id(4)];
        let fetch = BaseFetch::new(&head, &[1, 2, 3, 4], true);
        assert_eq!(fetch.batches, vec![vec![id(1), id(4)]]);
        let bases = fetch.bases();
        assert!(
            bases.get(2).is_none(),
            "a chunk without a base does not wait"
        );
        let waiting = {
            let bases = Arc::clone(&bases);
            std::thread::spawn(move || bases.get(3).is_none())
        };
        // The session ends before the answer: the encoder waiting for it
        // must not wait forever.
        drop(fetch);
        assert!(waiting.join().unwrap());
        let off = BaseFetch::new(&head, &[1, 3, 4], false);
        assert!(off.batches.is_empty() && off.bases().get(1).is_none());
    }

    #[test]
    fn a_patch_of_ranges_carries_their_bytes_when_small_and_inside_the_chunk() {
        let data: Vec<u8> = (0..16 * 4096u32).map(|i| (i / 4096) as u8).collect();
        let plan = plan_ranges(vec![(4096, 4096), (3 * 4096, 8192)], &data).unwrap();
        assert_eq!(plan.ranges, [(4096, 4096), (3 * 4096, 8192)]);
        assert_eq!(plan.payload.len(), 3 * 4096);
        assert!(plan.payload[..4096].iter().all(|&b| b == 1));
        assert!(plan.payload[4096..8192].iter().all(|&b| b == 3));
        assert!(plan.payload[8192..].iter().all(|&b| b == 4));
        // Nothing to carry, 75% of the chunk or more, or past its end: none.
        assert!(plan_ranges(Vec::new(), &data).is_none());
        assert!(plan_ranges(vec![(0, 12 * 4096)], &data).is_none());
        assert!(plan_ranges(vec![(15 * 4096, 8192)], &data).is_none());
    }

    #[test]
    fn a_refusal_that_names_a_patch_turns_patches_off() {
        let refused = Error::Refused {
            code: blockrep_proto::ErrorCode::BadChunk,
            message: "patch for chunk 3 produced 00, expected 11".into(),
        };
        assert!(refused_patch(&refused));
        assert!(!refused_patch(&Error::Lost("reset".into())));
    }
}

//! One epoch of a session: `GetPages`, then `Chunk`, `Patch` and `Offer`
//! frames, then `Commit`, answered with `Committed` once the epoch is durable.
//!
//! Chunks are checked for their place and length here and queued for the
//! verifier; at the `Commit` the verifier drains, the received set is checked,
//! the root is rebuilt from the dirty pages and must equal the agent's, and
//! only then is the epoch committed and acknowledged. An epoch that changed
//! nothing is acknowledged without a write.

use std::sync::Arc;
use std::time::Instant;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{ChunkId, Consistency, VolumeName};
use blockrep_proto::{Codec, ErrorCode, Message};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::labels::commit_label;
use super::machine::MachineCommit;
use super::patches;
use super::{End, Outcome, Reject, Replica, Session, internal};
use crate::capture::{CaptureRecord, CaptureView};
use crate::verify::{Job, Verifier};

/// Counters of the epoch in progress.
#[derive(Default)]
pub(super) struct EpochCounters {
    /// Chunks and patches whose data came zstd-compressed: the agent's
    /// compression choice, as the server sees it.
    pub chunks_compressed: u64,
    pub chunks_received: u64,
    pub zero_chunks: u64,
    pub ref_chunks: u64,
    pub ref_bytes: u64,
    pub bytes_at_start: u64,
    pub started: Option<Instant>,
    /// Chunks received with data that were not the source's own: what the
    /// agent is told was stored. Whether the store already held one for
    /// another source is never told (that would say the data exists).
    pub chunks_new: u64,
}

impl EpochCounters {
    /// Adds this epoch's traffic to the source's running totals (the
    /// ledger's totals follow from them).
    pub(super) fn add_totals(
        &self,
        record: &mut crate::status::SourceRecord,
        bytes_received: u64,
        verified: &crate::verify::VerifyStats,
    ) {
        record.bytes_received_total += bytes_received;
        record.chunks_received_total += self.chunks_received;
        record.chunks_deduplicated_total +=
            self.ref_chunks + (verified.chunks_verified - verified.chunks_stored);
        record.bytes_deduplicated_total += self.ref_bytes;
        record.chunks_compressed_total += self.chunks_compressed;
        if self.chunks_received > 0 {
            record.compressed_chunk_share =
                Some(self.chunks_compressed as f64 / self.chunks_received as f64);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Serves one epoch, up to and including its `Committed`. A single
    /// disk's session has one replica and no volume names; a machine's has
    /// one replica per volume, named by `machine`, and `SelectVolume` says
    /// which one the frames that follow are about.
    pub(super) async fn epoch(
        &mut self,
        replicas: &mut [Replica],
        machine: Option<&[VolumeName]>,
    ) -> Result<(), Outcome> {
        let mut current = 0;
        let mut verifier: Option<Verifier> = None;
        let mut counters = EpochCounters {
            bytes_at_start: self.connection.bytes_read,
            ..EpochCounters::default()
        };
        let idle = self.shared.config.idle_timeout;
        loop {
            let message = match verifier.as_mut() {
                // A verifier only finishes early on failure: report that at once.
                Some(running) => tokio::select! {
                    message = self.read(idle) => message?,
                    reject = running.failed() => return Err(reject.into()),
                },
                None => self.read(idle).await?,
            };
            if let Message::SelectVolume { index } = message {
                current = select_volume(replicas, machine, index)?;
                self.touch();
                continue;
            }
            let replica = &mut replicas[current];
            if let Message::FailbackStart { launch } = message {
                if replicas.iter().any(|r| !r.dirty_pages.is_empty()) {
                    return Err(Reject::new(
                        ErrorCode::UnexpectedMessage,
                        "FailbackStart in the middle of an epoch",
                    )
                    .into());
                }
                let never = self.failback(replicas, machine, current, launch).await?;
                match never {}
            }
            self.check_fence()?;
            match message {
                Message::Chunk {
                    index,
                    id,
                    codec,
                    raw_len,
                    data,
                } => {
                    let id = self
                        .chunk(
                            replica,
                            &mut counters,
                            &mut verifier,
                            index,
                            id,
                            codec,
                            raw_len,
                            data,
                        )
                        .await?;
                    replica.set(index, id);
                    continue; // the hot path: no status update per chunk
                }
                Message::Patch {
                    index,
                    base,
                    id,
                    codec,
                    raw_len,
                    ranges,
                    data,
                } => {
                    let frame = patches::PatchFrame {
                        index,
                        base,
                        id,
                        codec,
                        raw_len,
                        ranges,
                        data,
                    };
                    let id = self
                        .patch(replica, &mut counters, &mut verifier, frame)
                        .await?;
                    replica.set(index, id);
                    continue;
                }
                Message::GetBlockValues { ids } => self.send_block_values(replica, ids).await?,
                Message::GetPages { indices } => {
                    if !replica.dirty_pages.is_empty() {
                        return Err(Reject::new(
                            ErrorCode::UnexpectedMessage,
                            "GetPages after chunks in the same epoch",
                        )
                        .into());
                    }
                    self.send_pages(replica, &indices).await?;
                }
                Message::Backlog {
                    chunks_pending,
                    bytes_pending,
                    ..
                } => {
                    counters.started.get_or_insert_with(Instant::now);
                    self.cutover_times.backlog_unix_ms = now_unix_ms();
                    // The agent's word, held to what its disk can owe: no
                    // more chunks than it has, no more bytes than its size.
                    let geometry = replica.geometry;
                    let chunks_pending = chunks_pending.min(geometry.chunk_count());
                    let bytes_pending = bytes_pending.min(geometry.disk_size_bytes());
                    self.shared.ledger.sources.update(&self.source, |record| {
                        record.set_backlog(machine.map(|_| current), chunks_pending, bytes_pending);
                    });
                }
                report @ Message::Capture { .. } => {
                    self.capture_reported = true;
                    if let Some(view) = CaptureView::from_message(&report) {
                        self.shared.ledger.sources.update(&self.source, |record| {
                            record.capture = Some(CaptureRecord::reported(record.capture, view));
                        });
                    }
                }
                Message::Offer { ids } => {
                    let bits = self.have_bits(&mut replica.references, &ids).await?;
                    self.connection
                        .send(&Message::Have {
                            bits: Bytes::from(bits),
                        })
                        .await
                        .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
                }
                Message::Commit {
                    epoch,
                    root,
                    scan_started_unix_ms,
                    complete,
                    last,
                    consistency,
                } => {
                    if last && !complete {
                        return Err(Reject::new(
                            ErrorCode::UnexpectedMessage,
                            "a cutover's final Commit (last) must be complete",
                        )
                        .into());
                    }
                    if last {
                        self.shared
                            .ledger
                            .sources
                            .update(&self.source, |r| r.cutting_over = true);
                    }
                    let result = match machine {
                        Some(names) => {
                            self.commit_machine(
                                replicas,
                                names,
                                verifier,
                                counters,
                                MachineCommit {
                                    epoch,
                                    agent_root: root,
                                    scan_started_unix_ms,
                                    complete,
                                    last,
                                    consistency,
                                },
                            )
                            .await
                        }
                        None => {
                            self.commit(
                                replica,
                                verifier,
                                counters,
                                epoch,
                                root,
                                scan_started_unix_ms,
                                complete,
                                last,
                                consistency,
                            )
                            .await
                        }
                    };
                    self.shared
                        .ledger
                        .sources
                        .update(&self.source, |r| r.cutting_over = false);
                    self.touch();
                    result?;
                    if last {
                        return self.finish_cutover().await;
                    }
                    return Ok(());
                }
                other => {
                    return Err(Reject::new(
                        ErrorCode::UnexpectedMessage,
                        format!("unexpected {} during an epoch", other.name()),
                    )
                    .into());
                }
            }
            self.touch();
        }
    }

    /// Checks one `Chunk` frame and queues its data for verification; returns the
    /// id the replica now has at `index`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn chunk(
        &mut self,
        replica: &mut Replica,
        counters: &mut EpochCounters,
        verifier: &mut Option<Verifier>,
        index: u64,
        id: ChunkId,
        codec: Codec,
        raw_len: u32,
        data: Bytes,
    ) -> Result<ChunkId, Outcome> {
        let expected_len = replica.geometry.chunk_len(index).ok_or_else(|| {
            Reject::new(
                ErrorCode::BadChunk,
                format!("chunk {index} is beyond the end of the disk"),
            )
        })?;
        if raw_len != expected_len {
            return Err(Reject::new(
                ErrorCode::BadChunk,
                format!("chunk {index} has length {raw_len}, expected {expected_len}"),
            )
            .into());
        }
        replica.references.mark_sent(index)?;
        match codec {
            // A zero chunk carries the reserved zero id and nothing else: any
            // other id would be bytes that nothing checks.
            Codec::Zero if !id.is_zero() => Err(Reject::new(
                ErrorCode::BadChunk,
                format!("zero chunk {index} carries the id {id}, not the zero id"),
            )
            .into()),
            Codec::Zero => {
                counters.zero_chunks += 1;
                Ok(ChunkId::ZERO)
            }
            Codec::Ref => {
                self.admit_reference(&mut replica.references, index, id, raw_len, &data)
                    .await?;
                counters.ref_chunks += 1;
                counters.ref_bytes += u64::from(raw_len);
                Ok(id)
            }
            Codec::Raw | Codec::Zstd => {
                let data_len = data.len() as u64;
                let data_crc = self.connection.data_crc(&data);
                let verifier = verifier.get_or_insert_with(|| {
                    Verifier::spawn(
                        Arc::clone(&self.shared.store),
                        self.sealing.clone(),
                        patches::values_sink(&self.shared),
                    )
                });
                verifier
                    .submit(Job {
                        index,
                        id,
                        codec,
                        raw_len,
                        data,
                        data_crc,
                        patch: None,
                    })
                    .await?;
                // Counted on arrival rather than at the commit, so that data a
                // broken connection makes the agent send again shows up.
                self.shared.ledger.chunk_arrived(data_len);
                counters.chunks_received += 1;
                counters.chunks_compressed += u64::from(codec == Codec::Zstd);
                if !replica.references.is_own(&id) {
                    counters.chunks_new += 1;
                }
                replica.references.received(id);
                Ok(id)
            }
        }
    }

    pub(super) async fn send_pages(
        &mut self,
        replica: &Replica,
        indices: &[u32],
    ) -> Result<(), Outcome> {
        let per_batch = self.pages_per_batch();
        for (n, &index) in indices.iter().enumerate() {
            if n > 0 && n % per_batch == 0 {
                self.connection
                    .flush()
                    .await
                    .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
            }
            let page = replica.page(index as usize).ok_or_else(|| {
                Reject::new(ErrorCode::BadFrame, format!("page {index} does not exist"))
            })?;
            let ids = page.encode();
            self.connection.queue(&Message::Page {
                index,
                ids: Bytes::from(ids),
            });
        }
        self.connection
            .flush()
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn commit(
        &mut self,
        replica: &mut Replica,
        verifier: Option<Verifier>,
        counters: EpochCounters,
        epoch: u64,
        agent_root: ChunkId,
        scan_started_unix_ms: u64,
        complete: bool,
        last: bool,
        consistency: Consistency,
    ) -> Result<(), Outcome> {
        let started = Instant::now();
        let verified = match verifier {
            Some(verifier) => self.connection.working(verifier.finish()).await?,
            None => Default::default(),
        };
        self.check_epoch_chunks(&replica.references, &replica.ids)
            .await?;
        let (root, pages) = replica.build_root();
        let root_id = root.id();
        let committed_page_ids = root.page_ids().to_vec();
        // An epoch that changed nothing (an idle disk) is acknowledged without
        // touching the disk: the replica is unchanged and the agent's scan only
        // tells us it is still current.
        let unchanged = commit_is_unchanged(replica, epoch)?;
        if root_id != agent_root {
            return Err(Reject::new(
                ErrorCode::RootMismatch,
                format!("agent expects root {agent_root}, the received chunks give {root_id}; nothing committed"),
            )
            .into());
        }
        let mut pages_stored = 0;
        let label = if unchanged {
            self.confirm_head(epoch, root_id, complete, consistency)
                .await?
        } else {
            Some(commit_label(complete, consistency))
        };
        if !unchanged {
            let store = Arc::clone(&self.shared.store);
            let source = self.source.clone();
            let committing = tokio::task::spawn_blocking(move || {
                store.commit_labelled(
                    &source,
                    epoch,
                    &root,
                    &pages,
                    scan_started_unix_ms,
                    complete,
                    consistency,
                    blockrep_core::clock::now_unix_ms(),
                )
            });
            let stats = self
                .connection
                .working(committing)
                .await
                .map_err(internal)?
                .map_err(commit_failed)?;
            pages_stored = stats.pages_stored;
            replica.committed(epoch, committed_page_ids);
        }
        replica.references.committed(&replica.ids);
        let bytes_received = self.connection.bytes_read - counters.bytes_at_start;
        let now = now_unix_ms();
        let elapsed = counters.started.map_or(started.elapsed(), |t| t.elapsed());
        self.shared.ledger.sources.update(&self.source, |record| {
            record.epoch = replica.head_epoch;
            record.root = Some(root_id.to_hex());
            if label.is_some() {
                record.consistency = label;
            }
            if complete && !self.capture_reported {
                // Scanned now: capture figures would be stale.
                record.capture = None;
            }
            if complete {
                record.synced_scan_started_unix_ms = scan_started_unix_ms.max(1);
                record.max_replication_time_ms = record
                    .max_replication_time_ms
                    .max(now.saturating_sub(scan_started_unix_ms));
                record.bytes_pending = 0;
                record.chunks_pending = 0;
            } else {
                record.bytes_pending = record.bytes_pending.saturating_sub(bytes_received);
                record.chunks_pending = record.chunks_pending.saturating_sub(
                    counters.chunks_received + counters.ref_chunks + counters.zero_chunks,
                );
            }
            if !unchanged {
                record.last_commit_unix_ms = now;
                record.epochs_committed_total += 1;
                record.throughput_bytes_per_second =
                    bytes_received as f64 / elapsed.as_secs_f64().max(1e-3);
            }
            counters.add_totals(record, bytes_received, &verified);
        });
        if complete {
            crate::migration::complete_pass_committed(&self.shared, &self.source);
            crate::drills::source_committed(&self.shared, &self.source);
        }
        // The source's record above counts the epoch and its chunks; the
        // ledger adds the server-wide histograms.
        if !unchanged {
            info!(
                source = %self.source, epoch, root = %root_id, complete,
                consistency = %commit_label(complete, consistency),
                chunks_received = counters.chunks_received, zero_chunks = counters.zero_chunks,
                ref_chunks = counters.ref_chunks, chunks_stored = verified.chunks_stored,
                bytes_received, pages_stored,
                commit_ms = started.elapsed().as_millis() as u64,
                "epoch committed"
            );
            self.shared
                .ledger
                .epoch_committed(started.elapsed(), bytes_received);
        }
        if last {
            // The cutover snapshot and launch follow; `finish_cutover` answers.
            self.cutover_times.final_commit(
                started,
                &counters,
                scan_started_unix_ms,
                replica.head_epoch,
                root_id,
            );
            return Ok(());
        }
        self.send_committed(replica.head_epoch, root_id, &counters, bytes_received)
            .await
    }

    /// Answers a commit with `Committed`, which also says whether the
    /// operator asked for a cutover.
    pub(super) async fn send_committed(
        &mut self,
        epoch: u64,
        root: ChunkId,
        counters: &EpochCounters,
        bytes_received: u64,
    ) -> Result<(), Outcome> {
        let cutover_requested = self
            .shared
            .ledger
            .sources
            .update(&self.source, |r| r.cutover_requested);
        self.connection
            .send(&Message::Committed {
                epoch,
                root,
                chunks_received: counters.chunks_received,
                bytes_received,
                chunks_stored: counters.chunks_new,
                cutover_requested,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))
    }
}

/// Why a commit of the store failed, as the session ends on it: another
/// writer moved the head (`EpochMismatch`), or anything else, internal.
pub(super) fn commit_failed(e: blockrep_store::Error) -> Outcome {
    match e.kind() {
        blockrep_store::ErrorKind::EpochMismatch => {
            Outcome::Reject(Reject::new(ErrorCode::EpochMismatch, e.to_string()))
        }
        blockrep_store::ErrorKind::Leased => Outcome::Reject(Reject::new(
            ErrorCode::ServedElsewhere,
            format!("nothing committed: {e}"),
        )),
        _ => internal(format!("commit failed, nothing committed: {e}")),
    }
}

/// The replica `SelectVolume { index }` names, refused outside a machine
/// session and for an index past its volumes.
pub(super) fn select_volume(
    replicas: &[Replica],
    machine: Option<&[VolumeName]>,
    index: u16,
) -> Result<usize, Reject> {
    if machine.is_none() {
        return Err(Reject::new(
            ErrorCode::UnexpectedMessage,
            "SelectVolume in a session of one disk",
        ));
    }
    let index = usize::from(index);
    if index >= replicas.len() {
        return Err(Reject::new(
            ErrorCode::BadFrame,
            format!(
                "SelectVolume {index}: the machine has {} volumes",
                replicas.len()
            ),
        ));
    }
    Ok(index)
}

/// Whether a `Commit` of `epoch` is an unchanged epoch (acknowledged without a
/// write: nothing is dirty and it names the head's epoch again), or a new one
/// (the epoch after the head's). Any other epoch is refused.
pub(super) fn commit_is_unchanged(replica: &Replica, epoch: u64) -> Result<bool, Reject> {
    let head_epoch = replica.head_epoch;
    let unchanged = replica.dirty_pages.is_empty() && head_epoch > 0 && epoch == head_epoch;
    if !unchanged && epoch != head_epoch + 1 {
        return Err(Reject::new(
            ErrorCode::EpochMismatch,
            format!("commit of epoch {epoch}, but the replica's head is epoch {head_epoch}"),
        ));
    }
    Ok(unchanged)
}

#[cfg(test)]
mod tests {
    use blockrep_core::Geometry;

    use super::*;
    use crate::session::references::References;

    fn replica(head_epoch: u64) -> Replica {
        let geometry = Geometry::new(1 << 20, 65_536).unwrap();
        let mut replica = Replica::empty(geometry, References::new([0; 32], geometry, &[]));
        replica.head_epoch = head_epoch;
        replica
    }

    #[test]
    fn a_commit_names_the_next_epoch_or_the_head_unchanged() {
        assert!(!commit_is_unchanged(&replica(0), 1).unwrap());
        assert!(!commit_is_unchanged(&replica(4), 5).unwrap());
        assert!(commit_is_unchanged(&replica(4), 4).unwrap());
        for (head, epoch) in [(0, 0), (4, 3), (4, 6)] {
            let refused = commit_is_unchanged(&replica(head), epoch).unwrap_err();
            assert_eq!(refused.code, ErrorCode::EpochMismatch, "{head} {epoch}");
        }
    }

    #[test]
    fn a_changed_epoch_cannot_claim_the_head_epoch() {
        let mut dirty = replica(4);
        dirty.set(0, ChunkId([1; 32]));
        assert!(!commit_is_unchanged(&dirty, 5).unwrap());
        let refused = commit_is_unchanged(&dirty, 4).unwrap_err();
        assert_eq!(refused.code, ErrorCode::EpochMismatch);
    }
}

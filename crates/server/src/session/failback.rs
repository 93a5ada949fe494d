//! Failback: the agent's original disk (or each disk of a machine) is
//! brought to a launch volume's content, one pass per `FailbackStart`, until
//! the agent leaves.
//!
//! A pass of a volume flushes the launch's volume (its durable content is the
//! target), sends the target's and the base's roots, then answers
//! `GetPages`, `GetBasePages`, `Want` and `WantPatched` until `FailbackDone`.
//! A machine's agent says `SelectVolume` before each volume's messages, and
//! may plan every volume (`FailbackStart` each) before it writes any: each
//! volume keeps its pass until its next `FailbackStart`. The source's
//! lifecycle becomes `failing_back` at the first pass and `failed_back` only
//! when every volume's rescanned disk matched its target with finishing asked
//! for; every lifecycle write goes through only if an operator's reset has
//! not moved the record meanwhile.

use std::convert::Infallible;
use std::sync::Arc;

use blockrep_core::{ChunkId, Geometry, Root, VolumeName};
use blockrep_proto::{ErrorCode, FRAME_LEN_MAX, Message};
use blockrep_store::{Downtime, Lifecycle, LifecycleStage};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::epoch::select_volume;
use super::failback_patches;
use super::{End, Outcome, Reject, Replica, Session, internal};

/// One volume's pass, from its `FailbackStart` to the next.
struct VolumePass {
    launch: String,
    target: Root,
    /// `target`'s id, hashed once per pass.
    target_id: ChunkId,
    target_ids: Vec<ChunkId>,
    base: Root,
    /// Its `FailbackDone` matched the target, with finishing asked for.
    finished: bool,
}

/// A failback session: each volume's current pass, the lifecycle record it
/// last saw (or wrote), and what it sent.
struct Failback {
    passes: Vec<Option<VolumePass>>,
    seen: Option<Lifecycle>,
    /// The record this failback writes, from its first pass on.
    record: Option<Lifecycle>,
    chunks_sent: u64,
    bytes_sent: u64,
}

impl Failback {
    /// The pass of volume `index`, which must have started.
    fn pass(&self, index: usize) -> Result<&VolumePass, Reject> {
        self.passes
            .get(index)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Reject::new(
                    ErrorCode::UnexpectedMessage,
                    format!("failback message for volume {index} before its FailbackStart"),
                )
            })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Failback: brings the agent's disk, or each disk of a machine (`names`,
    /// one per replica), to a launch volume's content, starting with volume
    /// `current`'s pass of `launch`, until the agent leaves.
    pub(super) async fn failback(
        &mut self,
        replicas: &[Replica],
        names: Option<&[VolumeName]>,
        mut current: usize,
        launch: String,
    ) -> Result<Infallible, Outcome> {
        let mut state = Failback {
            passes: replicas.iter().map(|_| None).collect(),
            seen: None,
            record: None,
            chunks_sent: 0,
            bytes_sent: 0,
        };
        let volume = |index: usize| names.map(|names| &names[index]);
        let mut start = Some(launch);
        loop {
            if let Some(launch) = start.take() {
                let replica = &replicas[current];
                self.start_pass(&mut state, replica, volume(current), current, launch)
                    .await?;
            }
            match self.read(self.shared.config.idle_timeout).await? {
                Message::SelectVolume { index } => {
                    current = select_volume(replicas, names, index)?;
                }
                Message::FailbackStart { launch } => start = Some(launch),
                Message::GetPages { indices } => {
                    let target = &state.pass(current)?.target;
                    self.send_root_pages(target, &indices).await?;
                }
                Message::GetBasePages { indices } => {
                    let base = &state.pass(current)?.base;
                    self.send_root_pages(base, &indices).await?;
                }
                Message::Want { indices } => {
                    let geometry = replicas[current].geometry;
                    // Read, written out and flushed a few MiB at a time, so a
                    // Want of the most chunks of the largest size does not
                    // gather them all in memory first.
                    for batch in indices.chunks(self.chunks_per_batch(geometry)) {
                        let target_ids = &state.pass(current)?.target_ids;
                        let (sent, bytes) = self.send_chunks(geometry, target_ids, batch).await?;
                        state.chunks_sent += sent;
                        state.bytes_sent += bytes;
                        self.shared.ledger.sources.update(&self.source, |r| {
                            r.failback_chunks_sent_total += sent;
                            r.failback_bytes_sent_total += bytes;
                        });
                    }
                    self.connection
                        .flush()
                        .await
                        .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
                }
                Message::WantPatched { entries } => {
                    let geometry = replicas[current].geometry;
                    let target_ids = &state.pass(current)?.target_ids;
                    let (sent, bytes) = self.send_patched(geometry, target_ids, entries).await?;
                    state.chunks_sent += sent;
                    state.bytes_sent += bytes;
                }
                Message::FailbackDone { root, finalize } => {
                    self.volume_done(&mut state, current, root, finalize)
                        .await?;
                }
                other => {
                    return Err(Reject::new(
                        ErrorCode::UnexpectedMessage,
                        format!("unexpected {} during failback", other.name()),
                    )
                    .into());
                }
            }
            self.touch();
        }
    }

    /// Starts volume `index`'s pass of `launch` (`volume` names it in a
    /// machine): flushes the launch's volume, checks it fits the disk,
    /// records `failing_back` and sends the plan.
    async fn start_pass(
        &mut self,
        state: &mut Failback,
        replica: &Replica,
        volume: Option<&VolumeName>,
        index: usize,
        launch: String,
    ) -> Result<(), Outcome> {
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let lifecycle = self
            .shared
            .ledger
            .sources
            .update(&self.source, |r| r.lifecycle.clone());
        let name = launch.clone();
        let volume_name = volume.map(|v| v.as_str().to_owned());
        let cutover_root = lifecycle.as_ref().map(|l| l.root);
        let plan = tokio::task::spawn_blocking(move || -> Result<_, Reject> {
            let store_err =
                |e: blockrep_store::Error| Reject::new(ErrorCode::Internal, e.to_string());
            let info = store.launch(&name).map_err(store_err)?.ok_or_else(|| {
                Reject::new(ErrorCode::NotFound, format!("no launch named {name:?}"))
            })?;
            if info.source != source {
                // Told as a name that does not exist: the answer must not
                // let one source find another's launches or their owners.
                tracing::warn!(%source, launch = %name, owner = %info.source, "failback asked for another source's launch");
                return Err(Reject::new(
                    ErrorCode::NotFound,
                    format!("no launch named {name:?}"),
                ));
            }
            let not_found = |e: blockrep_store::Error| match e.kind() {
                blockrep_store::ErrorKind::NotFound | blockrep_store::ErrorKind::Invalid => {
                    Reject::new(ErrorCode::NotFound, e.to_string())
                }
                _ => store_err(e),
            };
            // The target is the launch's durable content: flush writes made over NBD.
            let opened = store
                .open_launch_volume(&name, volume_name.as_deref())
                .map_err(not_found)?;
            opened
                .flush(blockrep_core::clock::now_unix_ms())
                .map_err(|e| {
                    Reject::new(ErrorCode::Internal, format!("flushing launch {name}: {e}"))
                })?;
            let target = opened.flushed_root();
            let target_ids = store.chunk_ids(&target).map_err(store_err)?;
            // Changes to the disk are judged against what it held at cutover.
            let base_point = cutover_root.unwrap_or(info.base_root);
            let base_root = store
                .volume_root(&base_point, volume_name.as_deref())
                .map_err(not_found)?;
            let base = store.read_root(&base_root).map_err(store_err)?;
            Ok((info, target, target_ids, base))
        })
        .await
        .map_err(internal)??;
        let (info, target, target_ids, base) = plan;
        if target.geometry() != replica.geometry || base.geometry() != replica.geometry {
            let of = volume.map_or(String::new(), |v| format!("volume {v} of "));
            return Err(Reject::new(
                ErrorCode::GeometryMismatch,
                format!(
                    "{of}launch {launch} has {} bytes, the disk has {}",
                    target.geometry().disk_size_bytes(),
                    replica.geometry.disk_size_bytes()
                ),
            )
            .into());
        }
        // Before the source's stage changes: a plan that cannot be sent
        // must not leave it failing back.
        let plan = failback_plan(&target, &base)?;
        // The record this failback last saw (or wrote): its own writes go
        // through only while the record is still that, so an operator's
        // reset in the middle is not undone.
        let mut record = lifecycle.clone().unwrap_or(Lifecycle {
            stage: LifecycleStage::FailingBack,
            epoch: info.base_epoch,
            root: info.base_root,
            snapshot: info.snapshot.clone(),
            launch: info.name.clone(),
            cutover_unix_ms: 0,
            downtime: Downtime::default(),
        });
        state.seen = lifecycle;
        if record.stage != LifecycleStage::FailingBack {
            record.stage = LifecycleStage::FailingBack;
            self.persist_lifecycle_if(state.seen.as_ref(), &record)
                .await?;
            state.seen = Some(record.clone());
            info!(source = %self.source, launch = %launch, "failback started");
        }
        state.record = Some(record);
        self.connection
            .send(&plan)
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        state.passes[index] = Some(VolumePass {
            launch,
            target_id: target.id(),
            target,
            target_ids,
            base,
            finished: false,
        });
        Ok(())
    }

    /// Volume `index`'s `FailbackDone`: the agent's rescan gave `root`. The
    /// source is `failed_back` once every volume finished (matched, with
    /// finishing asked for by the agent or an operator).
    async fn volume_done(
        &mut self,
        state: &mut Failback,
        index: usize,
        root: ChunkId,
        finalize: bool,
    ) -> Result<(), Outcome> {
        let pass = state.pass(index)?;
        let matches = root == pass.target_id;
        let launch = pass.launch.clone();
        let finalize_requested = self
            .shared
            .ledger
            .sources
            .update(&self.source, |r| r.failback_finalize_requested);
        let finished = matches && (finalize || finalize_requested);
        if let Some(Some(pass)) = state.passes.get_mut(index) {
            pass.finished = finished;
        }
        let all_finished = state
            .passes
            .iter()
            .all(|p| p.as_ref().is_some_and(|p| p.finished));
        let (chunks_sent, bytes_sent) = (state.chunks_sent, state.bytes_sent);
        match state.record.clone() {
            Some(mut record) if all_finished => {
                record.stage = LifecycleStage::FailedBack;
                self.persist_lifecycle_if(state.seen.as_ref(), &record)
                    .await?;
                state.seen = Some(record.clone());
                state.record = Some(record);
                self.shared
                    .ledger
                    .sources
                    .update(&self.source, |r| r.failback_finalize_requested = false);
                info!(source = %self.source, launch = %launch, root = %root, chunks_sent, bytes_sent, "failback complete");
            }
            _ => {
                info!(source = %self.source, launch = %launch, volume = index, matches, chunks_sent, bytes_sent, "failback pass done");
            }
        }
        self.connection
            .send(&Message::FailbackAck {
                matches,
                finalize_requested,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))
    }

    pub(super) async fn send_root_pages(
        &mut self,
        root: &Root,
        indices: &[u32],
    ) -> Result<(), Outcome> {
        for batch in indices.chunks(self.pages_per_batch()) {
            self.send_root_page_batch(root, batch).await?;
        }
        Ok(())
    }

    pub(super) async fn send_root_page_batch(
        &mut self,
        root: &Root,
        indices: &[u32],
    ) -> Result<(), Outcome> {
        let store = Arc::clone(&self.shared.store);
        let (root_copy, wanted) = (root.clone(), indices.to_vec());
        let pages = tokio::task::spawn_blocking(move || -> Result<Vec<(u32, Vec<u8>)>, Reject> {
            let mut out = Vec::with_capacity(wanted.len());
            for index in wanted {
                if index as usize >= root_copy.page_ids().len() {
                    return Err(Reject::new(
                        ErrorCode::BadFrame,
                        format!("page {index} does not exist"),
                    ));
                }
                let page = store
                    .read_page(&root_copy, index as usize)
                    .map_err(|e| Reject::new(ErrorCode::Internal, e.to_string()))?;
                out.push((index, page.encode()));
            }
            Ok(out)
        })
        .await
        .map_err(internal)??;
        for (index, ids) in pages {
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

    /// Sends the target's data for `indices`; returns chunks and bytes sent.
    pub(super) async fn send_chunks(
        &mut self,
        geometry: Geometry,
        target_ids: &[ChunkId],
        indices: &[u64],
    ) -> Result<(u64, u64), Outcome> {
        let mut wanted = Vec::with_capacity(indices.len());
        for &index in indices {
            let (id, raw_len) = failback_patches::target_chunk(geometry, target_ids, index)?;
            wanted.push((index, id, raw_len));
        }
        let store = Arc::clone(&self.shared.store);
        let chunks = tokio::task::spawn_blocking(move || -> Result<Vec<Message>, Reject> {
            wanted
                .into_iter()
                .map(|(index, id, raw_len)| {
                    failback_patches::whole_chunk(&store, index, id, raw_len)
                })
                .collect()
        })
        .await
        .map_err(internal)??;
        let before = self.connection.bytes_written;
        let count = chunks.len() as u64;
        for chunk in &chunks {
            self.connection.queue(chunk);
        }
        self.connection
            .flush()
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        Ok((count, self.connection.bytes_written - before))
    }

    /// Writes `lifecycle` only if the source's record is still `expected`;
    /// ends the session when it has moved (an operator's reset meanwhile).
    pub(super) async fn persist_lifecycle_if(
        &self,
        expected: Option<&Lifecycle>,
        lifecycle: &Lifecycle,
    ) -> Result<(), Outcome> {
        let wrote = crate::lifecycle::write_if(&self.shared, &self.source, expected, lifecycle)
            .await
            .map_err(internal)?;
        if wrote {
            return Ok(());
        }
        Err(Reject::new(
            ErrorCode::Fenced,
            "the source's lifecycle changed during this failback (an operator's reset?); \
             nothing was recorded: start the failback again if it is still wanted",
        )
        .into())
    }
}

/// A volume's plan: both roots in one frame. A disk with more index pages
/// than a frame holds twice is refused with its limit, not sent oversized.
fn failback_plan(target: &Root, base: &Root) -> Result<Message, Reject> {
    let (target_root, base_root) = (target.encode(), base.encode());
    if !blockrep_proto::failback_plan_fits(target_root.len(), base_root.len()) {
        return Err(Reject::new(
            ErrorCode::GeometryMismatch,
            format!(
                "a failback sends the disk's two roots in one frame: its {} index pages \
                 need {} bytes, over the protocol's limit of {FRAME_LEN_MAX}; a disk \
                 replicated with a larger chunk size has fewer pages",
                target.page_ids().len(),
                target_root.len() + base_root.len()
            ),
        ));
    }
    Ok(Message::FailbackPlan {
        target_root: Bytes::from(target_root),
        base_root: Bytes::from(base_root),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_too_large_for_one_frame_is_refused_with_its_limit() {
        // 64 KiB chunks: 100,000 pages fit twice in a frame, 140,000 do not.
        let fits = Geometry::new(100_000 * 1024 * 65_536, 65_536).unwrap();
        let plan = failback_plan(&Root::zero(fits), &Root::zero(fits)).unwrap();
        let mut frame = bytes::BytesMut::new();
        blockrep_proto::encode(&plan, &mut frame);
        assert!(blockrep_proto::decode(&mut frame).unwrap().is_some());
        let over = Geometry::new(140_000 * 1024 * 65_536, 65_536).unwrap();
        let refused = failback_plan(&Root::zero(over), &Root::zero(over)).unwrap_err();
        assert!(
            refused.to_string().contains("140000 index pages"),
            "{refused}"
        );
    }
}

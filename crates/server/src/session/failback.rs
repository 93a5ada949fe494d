//! Failback: the agent's original disk is brought to a launch volume's
//! content, one pass per `FailbackStart`, until the agent leaves.
//!
//! A pass flushes the launch (its durable content is the target), sends the
//! target's and the base's roots, then answers `GetPages`, `GetBasePages`,
//! `Want` and `WantPatched` until `FailbackDone`. The source's lifecycle
//! becomes `failing_back` at the first pass and `failed_back` only when the
//! agent's rescanned disk matches the target and finishing was asked for;
//! every lifecycle write goes through only if an operator's reset has not
//! moved the record meanwhile.

use std::sync::Arc;

use blockrep_core::{ChunkId, Geometry, Root};
use blockrep_proto::{ErrorCode, Message};
use blockrep_store::{Downtime, Lifecycle, LifecycleStage};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::failback_patches;
use super::{End, Outcome, Reject, Replica, Session, internal};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Failback: brings the agent's disk to a launch volume's content, one pass per
    /// `FailbackStart`, until the agent leaves.
    pub(super) async fn failback(
        &mut self,
        replica: &Replica,
        launch: String,
    ) -> Result<(), Outcome> {
        let mut next = Some(launch);
        while let Some(launch) = next.take() {
            next = self.failback_pass(replica, launch).await?;
        }
        Err(Outcome::End(End::Closed))
    }

    /// One failback pass; returns the launch of the next pass, if the agent asks.
    pub(super) async fn failback_pass(
        &mut self,
        replica: &Replica,
        launch: String,
    ) -> Result<Option<String>, Outcome> {
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let lifecycle = self
            .shared
            .ledger
            .sources
            .update(&self.source, |r| r.lifecycle.clone());
        let name = launch.clone();
        let cutover_root = lifecycle.as_ref().map(|l| l.root);
        let plan = tokio::task::spawn_blocking(move || -> Result<_, Reject> {
            let store_err =
                |e: blockrep_store::Error| Reject::new(ErrorCode::Internal, e.to_string());
            let info = store.launch(&name).map_err(store_err)?.ok_or_else(|| {
                Reject::new(ErrorCode::NotFound, format!("no launch named {name:?}"))
            })?;
            if info.source != source {
                return Err(Reject::new(
                    ErrorCode::Unauthorized,
                    format!("launch {name} belongs to source {}", info.source),
                ));
            }
            // The target is the launch's durable content: flush writes made over NBD.
            let volume = store.open_launch(&name).map_err(store_err)?;
            volume
                .flush(blockrep_core::clock::now_unix_ms())
                .map_err(|e| {
                    Reject::new(ErrorCode::Internal, format!("flushing launch {name}: {e}"))
                })?;
            let info = volume.info();
            let target = store.read_root(&info.root).map_err(store_err)?;
            let target_ids = store.chunk_ids(&target).map_err(store_err)?;
            // Changes to the disk are judged against what it held at cutover.
            let base_root = cutover_root.unwrap_or(info.base_root);
            let base = store.read_root(&base_root).map_err(store_err)?;
            Ok((info, target, target_ids, base))
        })
        .await
        .map_err(internal)??;
        let (info, target, target_ids, base) = plan;
        if target.geometry() != replica.geometry || base.geometry() != replica.geometry {
            return Err(Reject::new(
                ErrorCode::GeometryMismatch,
                format!(
                    "launch {launch} has {} bytes, the disk has {}",
                    target.geometry().disk_size_bytes(),
                    replica.geometry.disk_size_bytes()
                ),
            )
            .into());
        }
        // The record this failback last saw (or wrote): its own writes go
        // through only while the record is still that, so an operator's
        // reset in the middle is not undone.
        let mut seen = lifecycle.clone();
        let mut record = lifecycle.unwrap_or(Lifecycle {
            stage: LifecycleStage::FailingBack,
            epoch: info.base_epoch,
            root: info.base_root,
            snapshot: info.snapshot.clone(),
            launch: info.name.clone(),
            cutover_unix_ms: 0,
            downtime: Downtime::default(),
        });
        if record.stage != LifecycleStage::FailingBack {
            record.stage = LifecycleStage::FailingBack;
            self.persist_lifecycle_if(seen.as_ref(), &record).await?;
            seen = Some(record.clone());
            info!(source = %self.source, launch = %launch, "failback started");
        }
        let target_id = target.id();
        self.connection
            .send(&Message::FailbackPlan {
                target_root: Bytes::from(target.encode()),
                base_root: Bytes::from(base.encode()),
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        let (mut chunks_sent, mut bytes_sent) = (0u64, 0u64);
        loop {
            match self.read(self.shared.config.idle_timeout).await? {
                Message::GetPages { indices } => self.send_root_pages(&target, &indices).await?,
                Message::GetBasePages { indices } => self.send_root_pages(&base, &indices).await?,
                Message::Want { indices } => {
                    // Read, written out and flushed a few MiB at a time, so a
                    // Want of the most chunks of the largest size does not
                    // gather them all in memory first.
                    for batch in indices.chunks(self.chunks_per_batch(replica.geometry)) {
                        let (sent, bytes) = self
                            .send_chunks(replica.geometry, &target_ids, batch)
                            .await?;
                        chunks_sent += sent;
                        bytes_sent += bytes;
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
                    let (sent, bytes) = self
                        .send_patched(replica.geometry, &target_ids, entries)
                        .await?;
                    chunks_sent += sent;
                    bytes_sent += bytes;
                }
                Message::FailbackDone { root, finalize } => {
                    let matches = root == target_id;
                    let finalize_requested = self
                        .shared
                        .ledger
                        .sources
                        .update(&self.source, |r| r.failback_finalize_requested);
                    if matches && (finalize || finalize_requested) {
                        record.stage = LifecycleStage::FailedBack;
                        self.persist_lifecycle_if(seen.as_ref(), &record).await?;
                        seen = Some(record.clone());
                        self.shared
                            .ledger
                            .sources
                            .update(&self.source, |r| r.failback_finalize_requested = false);
                        info!(source = %self.source, launch = %launch, root = %root, chunks_sent, bytes_sent, "failback complete");
                    } else {
                        info!(source = %self.source, launch = %launch, matches, chunks_sent, bytes_sent, "failback pass done");
                    }
                    self.connection
                        .send(&Message::FailbackAck {
                            matches,
                            finalize_requested,
                        })
                        .await
                        .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
                }
                Message::FailbackStart { launch } => return Ok(Some(launch)),
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

//! One agent's session: `Hello` -> `Welcome`, then epochs of `GetPages`, `Chunk`s
//! and `Commit` until the agent leaves.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{CHUNKS_PER_PAGE, ChunkId, Consistency, Geometry, Page, Root, SourceId};
use blockrep_proto::{
    Codec, ErrorCode, Message, PROGRESS_INTERVAL, PROTOCOL_VERSION, negotiate_version,
};
use blockrep_store::{Downtime, LaunchKind, Lifecycle, LifecycleStage, SnapshotKind};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

mod failback_patches;
mod labels;
pub(crate) mod patches;
mod references;

use labels::commit_label;
use references::{References, new_nonce};

use crate::connection::{Connection, ReadError};
use crate::reject::Reject;
use crate::shared::{ActiveSession, Shared, SourceSlot};
use crate::verify::{Job, Verifier};

/// How a session ended without a protocol error.
enum End {
    /// The agent closed the connection between frames.
    Closed,
    /// The connection failed (reset, time-out); nothing to tell the agent.
    Lost(String),
}

impl From<ReadError> for Outcome {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Closed => Outcome::End(End::Closed),
            ReadError::Io(e) => Outcome::End(End::Lost(e.to_string())),
            ReadError::Proto(e) => Outcome::Reject(Reject::new(ErrorCode::BadFrame, e.to_string())),
        }
    }
}

enum Outcome {
    End(End),
    Reject(Reject),
}

impl From<Reject> for Outcome {
    fn from(r: Reject) -> Self {
        Outcome::Reject(r)
    }
}

fn internal(e: impl fmt::Display) -> Outcome {
    Outcome::Reject(Reject::new(ErrorCode::Internal, e.to_string()))
}

/// The replica as this session knows it: the committed ids plus this epoch's changes.
struct Replica {
    geometry: Geometry,
    head_epoch: u64,
    ids: Vec<ChunkId>,
    page_ids: Vec<ChunkId>,
    dirty_pages: BTreeSet<usize>,
    /// What the agent may send as references; the chunks sent this epoch.
    references: References,
    /// Timings of a final (cutover) epoch, for its downtime breakdown.
    cutover_backlog_unix_ms: u64,
    cutover_scan_started_unix_ms: u64,
    cutover_transfer_ms: u64,
    cutover_commit_ms: u64,
}

impl Replica {
    fn build_root(&self) -> (Root, Vec<Page>) {
        let mut page_ids = self.page_ids.clone();
        let mut pages = Vec::with_capacity(self.dirty_pages.len());
        for &page_index in &self.dirty_pages {
            let start = page_index * CHUNKS_PER_PAGE;
            let end = (start + CHUNKS_PER_PAGE).min(self.ids.len());
            let page = Page::new(self.ids[start..end].to_vec());
            page_ids[page_index] = page.id();
            pages.push(page);
        }
        let root =
            Root::from_page_ids(self.geometry, page_ids).expect("page count follows geometry");
        (root, pages)
    }
}

/// Counters of the epoch in progress.
#[derive(Default)]
struct EpochCounters {
    chunks_received: u64,
    zero_chunks: u64,
    ref_chunks: u64,
    ref_bytes: u64,
    bytes_at_start: u64,
    started: Option<Instant>,
    /// Chunks received with data that were not the source's own: what the
    /// agent is told was stored. Whether the store already held one for
    /// another source is never told (that would say the data exists).
    chunks_new: u64,
}

/// How long a new session waits for the silent session it supersedes to end.
const SUPERSEDE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct Session<S> {
    shared: Arc<Shared>,
    connection: Connection<S>,
    source: SourceId,
    /// The source's tenant, from its certificate: the sources it may share
    /// deduplicated data with (itself alone by default).
    tenant: Option<SourceId>,
    peer: SocketAddr,
    /// This session's entry in the table of active sources, once claimed.
    active: Option<Arc<ActiveSession>>,
    /// Ends the session when its certificate is revoked while it runs.
    revocation: Option<crate::revocation::Registration>,
    /// The agent has sent a `Capture` report in this session (capture mode).
    capture_reported: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        connection: Connection<S>,
        source: SourceId,
        peer: SocketAddr,
    ) -> Self {
        Self {
            shared,
            connection,
            tenant: None,
            source,
            peer,
            active: None,
            revocation: None,
            capture_reported: false,
        }
    }

    /// Ends the session, with `Unauthorized`, at its next wait for a frame
    /// after `registration` reports its certificate revoked.
    pub(crate) fn watch_revocation(
        mut self,
        registration: Option<crate::revocation::Registration>,
    ) -> Self {
        self.revocation = registration;
        self
    }

    /// Sets the tenant the source's certificate names (`None`: its own).
    pub(crate) fn with_tenant(mut self, tenant: Option<SourceId>) -> Self {
        self.tenant = tenant;
        self
    }

    pub(crate) async fn run(mut self) {
        match self.serve().await {
            Outcome::End(End::Closed) => {
                info!(source = %self.source, peer = %self.peer, "session ended");
            }
            Outcome::End(End::Lost(reason)) => {
                warn!(source = %self.source, peer = %self.peer, %reason, "session lost");
            }
            Outcome::Reject(r) => {
                let message = format!("source {}: {}", self.source, r.message);
                reject(
                    &self.shared,
                    &mut self.connection,
                    self.peer,
                    r.code,
                    message,
                )
                .await;
            }
        }
    }

    async fn read(&mut self, timeout: std::time::Duration) -> Result<Message, Outcome> {
        let active = self.active.clone();
        let superseded = async {
            match &active {
                Some(active) => active.superseded.notified().await,
                None => std::future::pending().await,
            }
        };
        let revoked = self.revocation.as_ref().map(|r| r.revoked());
        let revoked = async {
            match revoked {
                Some(revoked) => revoked.await,
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            () = revoked => {
                return Err(Reject::new(
                    ErrorCode::Unauthorized,
                    "the client certificate of this session has been revoked",
                )
                .into());
            }
            read = tokio::time::timeout(timeout, self.connection.read_message()) => match read {
                Ok(result) => result?,
                Err(_) => return Err(Outcome::End(End::Lost(format!("no frame for {timeout:?}")))),
            },
            () = superseded => {
                return Err(Outcome::End(End::Lost(
                    "superseded by a new session of the same source".into(),
                )));
            }
        };
        if let Some(active) = &active {
            active
                .last_frame_unix_ms
                .store(now_unix_ms(), Ordering::Relaxed);
        }
        Ok(message)
    }

    /// Takes the source's slot. A session that holds it but has received
    /// nothing for `--supersede-after` is most likely on a dead path (its agent
    /// has given up on it and is the one reconnecting now): it is asked to end,
    /// rather than refusing the agent as `Busy` until the old session's idle
    /// time-out. A session that is still talking keeps its slot.
    async fn claim_slot(&self) -> Result<SourceSlot, Outcome> {
        let deadline = Instant::now() + SUPERSEDE_WAIT;
        let mut asked = false;
        loop {
            let held = match self.shared.claim_source(&self.source) {
                Ok(slot) => return Ok(slot),
                Err(held) => held,
            };
            if !asked {
                let silent_ms =
                    now_unix_ms().saturating_sub(held.last_frame_unix_ms.load(Ordering::Relaxed));
                if u128::from(silent_ms) < self.shared.config.supersede_after.as_millis() {
                    return Err(Reject::new(
                        ErrorCode::Busy,
                        "another session for this source is active; one at a time",
                    )
                    .into());
                }
                info!(source = %self.source, peer = %self.peer, silent_ms,
                      "superseding the session of this source that has gone silent");
                held.superseded.notify_one();
                asked = true;
            }
            if Instant::now() >= deadline {
                return Err(Reject::new(
                    ErrorCode::Busy,
                    format!(
                        "the silent session of this source did not end within {SUPERSEDE_WAIT:?}"
                    ),
                )
                .into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn serve(&mut self) -> Outcome {
        match self.serve_inner().await {
            Ok(never) => match never {},
            Err(outcome) => outcome,
        }
    }

    async fn serve_inner(&mut self) -> Result<std::convert::Infallible, Outcome> {
        let hello = self.read(self.shared.config.handshake_timeout).await?;
        let Message::Hello {
            version_min,
            version_max,
            source,
            disk_size_bytes,
            chunk_size_bytes,
        } = hello
        else {
            return Err(Reject::new(
                ErrorCode::UnexpectedMessage,
                format!("expected Hello, got {}", hello.name()),
            )
            .into());
        };
        let version = negotiate_version(version_min, version_max).ok_or_else(|| {
            Reject::new(
                ErrorCode::UnsupportedVersion,
                format!("agent speaks protocol versions {version_min}..={version_max}, server speaks {PROTOCOL_VERSION}"),
            )
        })?;
        if source != self.source {
            return Err(Reject::new(
                ErrorCode::SourceMismatch,
                format!(
                    "agent claims source {source:?} but its certificate is for {:?}",
                    self.source.as_str()
                ),
            )
            .into());
        }
        let geometry = Geometry::new(disk_size_bytes, chunk_size_bytes)
            .map_err(|e| Reject::new(ErrorCode::BadFrame, format!("invalid geometry: {e}")))?;
        let _ids = self.shared.reserve_ids(geometry)?;
        let slot = self.claim_slot().await?;
        self.active = Some(Arc::clone(&slot.session));
        let _slot = slot;
        self.check_tenant().await?;
        let mut replica = self.load_replica(geometry).await?;
        let head_root = if replica.head_epoch == 0 {
            Bytes::new()
        } else {
            Bytes::from(replica.build_root().0.encode())
        };
        self.connection
            .send(&Message::Welcome {
                version,
                nonce: replica.references.nonce(),
                head_epoch: replica.head_epoch,
                head_root,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        // From here the agent waits for answers while its frames drain.
        self.connection.progress_every = Some(PROGRESS_INTERVAL);
        let now = now_unix_ms();
        self.shared.sources.update(&self.source, |record| {
            record.connected = true;
            record.last_contact_unix_ms = now;
            record.disk_size_bytes = disk_size_bytes;
            record.chunk_size_bytes = chunk_size_bytes;
        });
        info!(source = %self.source, peer = %self.peer, head_epoch = replica.head_epoch,
              disk_size_bytes, chunk_size_bytes, "session started");
        loop {
            self.epoch(&mut replica).await?;
        }
    }

    async fn load_replica(&self, geometry: Geometry) -> Result<Replica, Outcome> {
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<_, blockrep_store::Error> {
            let Some(head) = store.head(&source)? else {
                return Ok(None);
            };
            let root = store.read_root(&head.root)?;
            let ids = if root.geometry() == geometry {
                store.chunk_ids(&root)?
            } else {
                Vec::new()
            };
            Ok(Some((head, root, ids)))
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        let nonce = new_nonce()?;
        match loaded {
            None => Ok(Replica {
                geometry,
                head_epoch: 0,
                ids: vec![ChunkId::ZERO; geometry.chunk_count() as usize],
                page_ids: vec![ChunkId::ZERO; geometry.page_count() as usize],
                dirty_pages: BTreeSet::new(),
                references: References::new(nonce, geometry, &[]),
                cutover_backlog_unix_ms: 0,
                cutover_scan_started_unix_ms: 0,
                cutover_transfer_ms: 0,
                cutover_commit_ms: 0,
            }),
            Some((_, root, _)) if root.geometry() != geometry => Err(Reject::new(
                ErrorCode::GeometryMismatch,
                format!(
                    "replica has {} bytes in {}-byte chunks, disk has {} bytes in {}-byte chunks; \
                     a resized disk or a new chunk size needs a new source id",
                    root.geometry().disk_size_bytes(),
                    root.geometry().chunk_size_bytes(),
                    geometry.disk_size_bytes(),
                    geometry.chunk_size_bytes(),
                ),
            )
            .into()),
            Some((head, root, ids)) => Ok(Replica {
                geometry,
                head_epoch: head.epoch,
                references: References::new(nonce, geometry, &ids),
                ids,
                page_ids: root.page_ids().to_vec(),
                dirty_pages: BTreeSet::new(),
                cutover_backlog_unix_ms: 0,
                cutover_scan_started_unix_ms: 0,
                cutover_transfer_ms: 0,
                cutover_commit_ms: 0,
            }),
        }
    }

    /// Serves one epoch, up to and including its `Committed`.
    async fn epoch(&mut self, replica: &mut Replica) -> Result<(), Outcome> {
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
            if let Message::FailbackStart { launch } = message {
                if !replica.dirty_pages.is_empty() {
                    return Err(Reject::new(
                        ErrorCode::UnexpectedMessage,
                        "FailbackStart in the middle of an epoch",
                    )
                    .into());
                }
                return self.failback(replica, launch).await;
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
                    replica.ids[index as usize] = id;
                    replica.dirty_pages.insert(index as usize / CHUNKS_PER_PAGE);
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
                    replica.ids[index as usize] = id;
                    replica.dirty_pages.insert(index as usize / CHUNKS_PER_PAGE);
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
                    replica.cutover_backlog_unix_ms = now_unix_ms();
                    self.shared.sources.update(&self.source, |record| {
                        record.chunks_pending = chunks_pending;
                        record.bytes_pending = bytes_pending;
                    });
                }
                report @ Message::Capture { .. } => {
                    self.capture_reported = true;
                    crate::capture::received(&self.shared.sources, &self.source, &report);
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
                    if last {
                        self.shared
                            .sources
                            .update(&self.source, |r| r.cutting_over = true);
                    }
                    let result = self
                        .commit(
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
                        .await;
                    self.shared
                        .sources
                        .update(&self.source, |r| r.cutting_over = false);
                    self.touch();
                    result?;
                    if last {
                        return self.finish_cutover(replica).await;
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

    /// Records agent contact (for the `stalled` state).
    fn touch(&self) {
        let now = now_unix_ms();
        self.shared
            .sources
            .update(&self.source, |record| record.last_contact_unix_ms = now);
    }

    /// Checks one `Chunk` frame and queues its data for verification; returns the
    /// id the replica now has at `index`.
    #[allow(clippy::too_many_arguments)]
    async fn chunk(
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
                let verifier = verifier.get_or_insert_with(|| {
                    Verifier::spawn(
                        Arc::clone(&self.shared.store),
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
                        patch: None,
                    })
                    .await?;
                // Counted on arrival rather than at the commit, so that data a
                // broken connection makes the agent send again shows up.
                self.shared
                    .stats
                    .chunk_bytes_arrived_total
                    .fetch_add(data_len, Ordering::Relaxed);
                counters.chunks_received += 1;
                if !replica.references.is_own(&id) {
                    counters.chunks_new += 1;
                }
                replica.references.received(id);
                Ok(id)
            }
        }
    }

    async fn send_pages(&mut self, replica: &Replica, indices: &[u32]) -> Result<(), Outcome> {
        let per_batch = self.pages_per_batch();
        for (n, &index) in indices.iter().enumerate() {
            if n > 0 && n % per_batch == 0 {
                self.connection
                    .flush()
                    .await
                    .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
            }
            let page_index = index as usize;
            if page_index >= replica.page_ids.len() {
                return Err(Reject::new(
                    ErrorCode::BadFrame,
                    format!("page {index} does not exist"),
                )
                .into());
            }
            let start = page_index * CHUNKS_PER_PAGE;
            let end = (start + CHUNKS_PER_PAGE).min(replica.ids.len());
            let ids = Page::new(replica.ids[start..end].to_vec()).encode();
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
    async fn commit(
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
        let unchanged =
            replica.dirty_pages.is_empty() && replica.head_epoch > 0 && epoch == replica.head_epoch;
        if !unchanged && epoch != replica.head_epoch + 1 {
            return Err(Reject::new(
                ErrorCode::EpochMismatch,
                format!(
                    "commit of epoch {epoch}, but the replica's head is epoch {}",
                    replica.head_epoch
                ),
            )
            .into());
        }
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
                )
            });
            let stats = self
                .connection
                .working(committing)
                .await
                .map_err(internal)?
                .map_err(|e| match e.kind() {
                    blockrep_store::ErrorKind::EpochMismatch => {
                        Outcome::Reject(Reject::new(ErrorCode::EpochMismatch, e.to_string()))
                    }
                    _ => internal(format!("commit failed, nothing committed: {e}")),
                })?;
            pages_stored = stats.pages_stored;
            replica.head_epoch = epoch;
            replica.page_ids = committed_page_ids;
            replica.dirty_pages.clear();
        }
        replica.references.committed(&replica.ids);
        let bytes_received = self.connection.bytes_read - counters.bytes_at_start;
        let now = now_unix_ms();
        let elapsed = counters.started.map_or(started.elapsed(), |t| t.elapsed());
        self.shared.sources.update(&self.source, |record| {
            record.epoch = replica.head_epoch;
            record.root = Some(root_id.to_hex());
            if label.is_some() {
                record.consistency = label;
            }
            if complete && !self.capture_reported {
                crate::capture::scanned(record);
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
            record.bytes_received_total += bytes_received;
            record.chunks_received_total += counters.chunks_received;
            record.chunks_deduplicated_total +=
                counters.ref_chunks + (verified.chunks_verified - verified.chunks_stored);
            record.bytes_deduplicated_total += counters.ref_bytes;
        });
        let server_stats = &self.shared.stats;
        if !unchanged {
            server_stats
                .epochs_committed_total
                .fetch_add(1, Ordering::Relaxed);
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
                .metrics
                .epoch_committed(started.elapsed(), bytes_received);
        }
        server_stats
            .chunks_received_total
            .fetch_add(counters.chunks_received, Ordering::Relaxed);
        if last {
            // The cutover snapshot and launch follow; `finish_cutover` answers.
            replica.cutover_commit_ms = started.elapsed().as_millis() as u64;
            replica.cutover_transfer_ms = counters
                .started
                .map_or(0, |t| t.elapsed().as_millis() as u64);
            replica.cutover_scan_started_unix_ms = scan_started_unix_ms;
            return Ok(());
        }
        let cutover_requested = self
            .shared
            .sources
            .update(&self.source, |r| r.cutover_requested);
        self.connection
            .send(&Message::Committed {
                epoch: replica.head_epoch,
                root: root_id,
                chunks_received: counters.chunks_received,
                bytes_received,
                chunks_stored: counters.chunks_new,
                cutover_requested,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))
    }

    /// Failback: brings the agent's disk to a launch volume's content, one pass per
    /// `FailbackStart`, until the agent leaves.
    async fn failback(&mut self, replica: &Replica, launch: String) -> Result<(), Outcome> {
        let mut next = Some(launch);
        while let Some(launch) = next.take() {
            next = self.failback_pass(replica, launch).await?;
        }
        Err(Outcome::End(End::Closed))
    }

    /// One failback pass; returns the launch of the next pass, if the agent asks.
    async fn failback_pass(
        &mut self,
        replica: &Replica,
        launch: String,
    ) -> Result<Option<String>, Outcome> {
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let lifecycle = self
            .shared
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
            volume.flush().map_err(|e| {
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
                    let per_batch = (self.shared.config.send_buffer_max_bytes
                        / u64::from(replica.geometry.chunk_size_bytes()))
                    .max(1) as usize;
                    for batch in indices.chunks(per_batch) {
                        let (sent, bytes) = self
                            .send_chunks(replica.geometry, &target_ids, batch)
                            .await?;
                        chunks_sent += sent;
                        bytes_sent += bytes;
                        self.shared.sources.update(&self.source, |r| {
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
                        .sources
                        .update(&self.source, |r| r.failback_finalize_requested);
                    if matches && (finalize || finalize_requested) {
                        record.stage = LifecycleStage::FailedBack;
                        self.persist_lifecycle_if(seen.as_ref(), &record).await?;
                        seen = Some(record.clone());
                        self.shared
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

    async fn send_root_pages(&mut self, root: &Root, indices: &[u32]) -> Result<(), Outcome> {
        for batch in indices.chunks(self.pages_per_batch()) {
            self.send_root_page_batch(root, batch).await?;
        }
        Ok(())
    }

    /// Pages sent between flushes: `--session-send-buffer-max` of them.
    fn pages_per_batch(&self) -> usize {
        let page_bytes = (CHUNKS_PER_PAGE * 32) as u64;
        (self.shared.config.send_buffer_max_bytes / page_bytes).max(1) as usize
    }

    async fn send_root_page_batch(&mut self, root: &Root, indices: &[u32]) -> Result<(), Outcome> {
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
    async fn send_chunks(
        &mut self,
        geometry: Geometry,
        target_ids: &[ChunkId],
        indices: &[u64],
    ) -> Result<(u64, u64), Outcome> {
        let mut wanted = Vec::with_capacity(indices.len());
        for &index in indices {
            let id = *target_ids.get(index as usize).ok_or_else(|| {
                Reject::new(
                    ErrorCode::BadFrame,
                    format!("chunk {index} is beyond the end of the disk"),
                )
            })?;
            let raw_len = geometry
                .chunk_len(index)
                .expect("index checked against the ids");
            wanted.push((index, id, raw_len));
        }
        let store = Arc::clone(&self.shared.store);
        let chunks = tokio::task::spawn_blocking(move || -> Result<Vec<Message>, Reject> {
            wanted
                .into_iter()
                .map(|(index, id, raw_len)| {
                    if id.is_zero() {
                        return Ok(Message::Chunk {
                            index,
                            id,
                            codec: Codec::Zero,
                            raw_len,
                            data: Bytes::new(),
                        });
                    }
                    let data = failback_patches::read_target_chunk(&store, index, id, raw_len)?;
                    Ok(Message::Chunk {
                        index,
                        id,
                        codec: Codec::Raw,
                        raw_len,
                        data: Bytes::from(data),
                    })
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

    /// Refuses replication of a source that has been cut over.
    fn check_fence(&self) -> Result<(), Outcome> {
        let fenced = self
            .shared
            .sources
            .update(&self.source, |r| r.lifecycle.clone());
        match fenced {
            None => Ok(()),
            Some(lifecycle) => Err(Reject::new(
                ErrorCode::Fenced,
                format!(
                    "cut over at epoch {} (launch {}); replication is fenced until the operator \
                     resets it with `blockrep cutover --reset --source {}`",
                    lifecycle.epoch, lifecycle.launch, self.source
                ),
            )
            .into()),
        }
    }

    /// After the final commit: cutover snapshot, cutover launch, fence, answer.
    async fn finish_cutover(&mut self, replica: &mut Replica) -> Result<(), Outcome> {
        let started = Instant::now();
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let epoch = replica.head_epoch;
        let (root, _) = replica.build_root();
        let root_id = root.id();
        let now = now_unix_ms();
        let preparing = tokio::task::spawn_blocking(move || -> Result<_, blockrep_store::Error> {
            let snapshot =
                store.create_snapshot_of_kind(&source, SnapshotKind::Cutover, None, None, now)?;
            let base = format!(
                "{}-cutover",
                &source.as_str()[..source.as_str().len().min(48)]
            );
            let mut name = base.clone();
            let mut n = 2;
            while store.launch(&name)?.is_some() {
                name = format!("{base}-{n}");
                n += 1;
            }
            let launch =
                store.create_launch(&source, &snapshot.name, &name, LaunchKind::Cutover)?;
            Ok((snapshot, launch))
        });
        let (snapshot, launch) = self
            .connection
            .working(preparing)
            .await
            .map_err(internal)?
            .map_err(|e| {
                internal(format!(
                    "cutover snapshot or launch failed (the final epoch is committed): {e}"
                ))
            })?;
        let launch_ms = started.elapsed().as_millis() as u64;
        let scan_ms = replica
            .cutover_backlog_unix_ms
            .saturating_sub(replica.cutover_scan_started_unix_ms);
        let mut lifecycle = Lifecycle {
            stage: LifecycleStage::CutOver,
            epoch,
            root: root_id,
            snapshot: snapshot.name.clone(),
            launch: launch.name.clone(),
            cutover_unix_ms: now,
            downtime: Downtime {
                scan_ms,
                transfer_ms: replica.cutover_transfer_ms,
                commit_ms: replica.cutover_commit_ms,
                launch_ms,
                ..Downtime::default()
            },
        };
        self.persist_lifecycle(&lifecycle).await?;
        info!(source = %self.source, epoch, root = %root_id, snapshot = %snapshot.name, launch = %launch.name,
              commit_ms = replica.cutover_commit_ms, launch_ms, "cutover ready; source fenced");
        self.connection
            .send(&Message::CutoverReady {
                epoch,
                root: root_id,
                snapshot: snapshot.name,
                launch: launch.name,
                commit_ms: replica.cutover_commit_ms,
                launch_ms,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        // The agent reports its side of the downtime, then leaves.
        if let Ok(Message::CutoverReport {
            hook_ms,
            scan_ms,
            transfer_ms,
            total_ms,
        }) = self.read(self.shared.config.handshake_timeout).await
        {
            lifecycle.downtime.hook_ms = hook_ms;
            lifecycle.downtime.scan_ms = scan_ms;
            lifecycle.downtime.transfer_ms = transfer_ms;
            lifecycle.downtime.total_ms = total_ms;
            self.persist_lifecycle(&lifecycle).await?;
            info!(source = %self.source, hook_ms, scan_ms, transfer_ms, commit_ms = lifecycle.downtime.commit_ms,
                  launch_ms, downtime_ms = total_ms, "cutover downtime");
        }
        Err(Outcome::End(End::Closed))
    }

    /// Writes `lifecycle` only if the source's record is still `expected`;
    /// ends the session when it has moved (an operator's reset meanwhile).
    async fn persist_lifecycle_if(
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

    /// Writes the lifecycle record durably and mirrors it in the status table,
    /// serialized with the operator's reset.
    async fn persist_lifecycle(&self, lifecycle: &Lifecycle) -> Result<(), Outcome> {
        crate::lifecycle::write(&self.shared, &self.source, lifecycle)
            .await
            .map_err(internal)
    }
}

/// Ends a session (or a connection before one) with `code`: counts it, logs
/// it, and sends the agent an `Error` frame.
pub(crate) async fn reject<S>(
    shared: &Shared,
    connection: &mut Connection<S>,
    peer: SocketAddr,
    code: ErrorCode,
    message: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    shared
        .stats
        .sessions_rejected_total
        .fetch_add(1, Ordering::Relaxed);
    shared.metrics.session_rejected(code);
    warn!(%peer, %code, reason = %message, "session rejected");
    connection
        .close_with_error(Message::Error { code, message })
        .await;
}

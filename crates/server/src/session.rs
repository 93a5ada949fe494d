//! One agent's session: `Hello` -> `Welcome`, then epochs of `GetPages`, `Chunk`s
//! and `Commit` until the agent leaves.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use blockrep_core::{CHUNKS_PER_PAGE, ChunkId, Geometry, Page, Root, SourceId};
use blockrep_proto::{Codec, ErrorCode, Message, PROTOCOL_VERSION, negotiate_version};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::connection::{Connection, ReadError};
use crate::listener::{Shared, reject};
use crate::status::now_unix_ms;
use crate::verify::{Job, Verifier};

/// A reason to end a session, sent to the agent as an `Error` frame.
#[derive(Debug)]
pub(crate) struct Reject {
    pub code: ErrorCode,
    pub message: String,
}

impl Reject {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

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
    /// Ids received with data in this epoch (not yet in the store's index until
    /// the verifier has stored them): later references to them are valid.
    received_ids: std::collections::HashSet<ChunkId>,
}

pub(crate) struct Session<S> {
    shared: Arc<Shared>,
    connection: Connection<S>,
    source: SourceId,
    peer: SocketAddr,
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
            source,
            peer,
        }
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
        match tokio::time::timeout(timeout, self.connection.read_message()).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(Outcome::End(End::Lost(format!("no frame for {timeout:?}")))),
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
        let Some(_slot) = self.shared.claim_source(&self.source) else {
            return Err(Reject::new(
                ErrorCode::Busy,
                "another session for this source is active; one at a time",
            )
            .into());
        };
        let mut replica = self.load_replica(geometry).await?;
        let head_root = if replica.head_epoch == 0 {
            Bytes::new()
        } else {
            Bytes::from(replica.build_root().0.encode())
        };
        self.connection
            .send(&Message::Welcome {
                version,
                head_epoch: replica.head_epoch,
                head_root,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
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
        match loaded {
            None => Ok(Replica {
                geometry,
                head_epoch: 0,
                ids: vec![ChunkId::ZERO; geometry.chunk_count() as usize],
                page_ids: vec![ChunkId::ZERO; geometry.page_count() as usize],
                dirty_pages: BTreeSet::new(),
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
                ids,
                page_ids: root.page_ids().to_vec(),
                dirty_pages: BTreeSet::new(),
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
                    self.shared.sources.update(&self.source, |record| {
                        record.chunks_pending = chunks_pending;
                        record.bytes_pending = bytes_pending;
                    });
                }
                Message::Offer { ids } => {
                    let mut bits = vec![0u8; ids.len().div_ceil(8)];
                    for (i, id) in ids.iter().enumerate() {
                        if self.shared.store.contains(id) || counters.received_ids.contains(id) {
                            bits[i / 8] |= 1 << (i % 8);
                        }
                    }
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
                    last: _,
                } => {
                    let result = self
                        .commit(
                            replica,
                            verifier,
                            counters,
                            epoch,
                            root,
                            scan_started_unix_ms,
                            complete,
                        )
                        .await;
                    self.touch();
                    return result;
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
        replica: &Replica,
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
        match codec {
            Codec::Zero => {
                counters.zero_chunks += 1;
                Ok(ChunkId::ZERO)
            }
            Codec::Ref => {
                if id.is_zero()
                    || !(counters.received_ids.contains(&id) || self.shared.store.contains(&id))
                {
                    return Err(Reject::new(
                        ErrorCode::BadChunk,
                        format!("chunk {index} refers to {id}, which the server does not hold"),
                    )
                    .into());
                }
                counters.ref_chunks += 1;
                counters.ref_bytes += u64::from(raw_len);
                Ok(id)
            }
            Codec::Raw | Codec::Zstd => {
                let verifier =
                    verifier.get_or_insert_with(|| Verifier::spawn(Arc::clone(&self.shared.store)));
                verifier
                    .submit(Job {
                        index,
                        id,
                        codec,
                        raw_len,
                        data,
                    })
                    .await?;
                counters.chunks_received += 1;
                counters.received_ids.insert(id);
                Ok(id)
            }
        }
    }

    async fn send_pages(&mut self, replica: &Replica, indices: &[u32]) -> Result<(), Outcome> {
        for &index in indices {
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
    ) -> Result<(), Outcome> {
        let started = Instant::now();
        let verified = match verifier {
            Some(verifier) => verifier.finish().await?,
            None => Default::default(),
        };
        let (root, pages) = replica.build_root();
        let root_id = root.id();
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
        if !unchanged {
            let store = Arc::clone(&self.shared.store);
            let source = self.source.clone();
            let stats = tokio::task::spawn_blocking(move || {
                store.commit_with(
                    &source,
                    epoch,
                    &root,
                    &pages,
                    scan_started_unix_ms,
                    complete,
                )
            })
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
            replica.page_ids = replica.build_root().0.page_ids().to_vec();
            replica.dirty_pages.clear();
        }
        let bytes_received = self.connection.bytes_read - counters.bytes_at_start;
        let now = now_unix_ms();
        let elapsed = counters.started.map_or(started.elapsed(), |t| t.elapsed());
        self.shared.sources.update(&self.source, |record| {
            record.epoch = replica.head_epoch;
            record.root = Some(root_id.to_hex());
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
        self.connection
            .send(&Message::Committed {
                epoch: replica.head_epoch,
                root: root_id,
                chunks_received: counters.chunks_received,
                bytes_received,
                chunks_stored: verified.chunks_stored,
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))
    }
}

//! One agent's session: `Hello` -> `Welcome`, then epochs of `GetPages`, `Chunk`s
//! and `Commit` until the agent leaves.
//!
//! This room holds the session itself (its identity, its slot, reading frames
//! with their time-outs, `Hello`) and how a session ends; its parts are
//! `epoch` (one epoch up to `Committed`), `cutover` (the final epoch's
//! snapshot, launch and fence), `failback` (bringing the original disk to a
//! launch) and, beside them, the replica, references and patches.
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{CHUNKS_PER_PAGE, Geometry, SourceId};
use blockrep_proto::{ErrorCode, Message, PROGRESS_INTERVAL, PROTOCOL_VERSION, negotiate_version};
use blockrep_store::StoredRoot;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

mod cutover;
mod epoch;
mod failback;
mod failback_patches;
mod labels;
mod machine;
pub(crate) mod patches;
mod references;
mod replica;

use epoch::EpochCounters;
use references::{References, new_nonce};
use replica::Replica;

use crate::connection::{Connection, ReadError};
use crate::reject::Reject;
use crate::shared::{ActiveSession, Shared, SourceSlot};

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
    /// A machine's session: the root its head names (`None` before the
    /// first commit), to tell an epoch that changed nothing from one that
    /// added a volume.
    machine_head: Option<blockrep_core::ChunkId>,
    /// Timings of the final (cutover) epoch, for its downtime breakdown.
    cutover_times: cutover::CutoverTimes,
    /// A source encrypted at rest: its current data key and its id space.
    /// Its chunks are checked against stored ids and sealed, and its agent
    /// is given the id space.
    sealing: Option<crate::encryption::Sealing>,
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
            machine_head: None,
            cutover_times: cutover::CutoverTimes::default(),
            sealing: None,
        }
    }

    /// Finds (or, for a new source on a server that encrypts new sources,
    /// makes) the source's data key, before its replica is read.
    async fn open_keys(&mut self) -> Result<(), Outcome> {
        let (shared, source) = (Arc::clone(&self.shared), self.source.clone());
        self.sealing = tokio::task::spawn_blocking(move || {
            crate::encryption::sealing_for(&shared.store, shared.keys.as_ref(), &source)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        Ok(())
    }

    /// The key of the source's id space, for its `Welcome`.
    fn id_key(&self) -> Option<[u8; blockrep_core::ID_KEY_LEN]> {
        self.sealing.as_ref()?.1.key().copied()
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
                Ok(slot) => {
                    // One server at a time among those sharing a bucket.
                    crate::leases::claim(&self.shared, &self.source).await?;
                    return Ok(slot);
                }
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
        let (version_min, version_max, source, disk_size_bytes, chunk_size_bytes) = match hello {
            Message::Hello {
                version_min,
                version_max,
                source,
                disk_size_bytes,
                chunk_size_bytes,
            } => (
                version_min,
                version_max,
                source,
                disk_size_bytes,
                chunk_size_bytes,
            ),
            Message::MachineHello {
                version_min,
                version_max,
                source,
                chunk_size_bytes,
                volumes,
                allow_volume_removal,
            } => {
                let version = self.check_hello(version_min, version_max, &source)?;
                return self
                    .serve_machine(version, chunk_size_bytes, volumes, allow_volume_removal)
                    .await;
            }
            other => {
                return Err(Reject::new(
                    ErrorCode::UnexpectedMessage,
                    format!("expected Hello, got {}", other.name()),
                )
                .into());
            }
        };
        let version = self.check_hello(version_min, version_max, &source)?;
        let geometry = Geometry::new(disk_size_bytes, chunk_size_bytes)
            .map_err(|e| Reject::new(ErrorCode::BadFrame, format!("invalid geometry: {e}")))?;
        let _ids = self.shared.ids_budget.reserve_ids(geometry)?;
        let slot = self.claim_slot().await?;
        self.active = Some(Arc::clone(&slot.session));
        let _slot = slot;
        self.check_tenant().await?;
        self.open_keys().await?;
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
                id_key: self.id_key(),
            })
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        // From here the agent waits for answers while its frames drain.
        self.connection.progress_every = Some(PROGRESS_INTERVAL);
        let now = now_unix_ms();
        self.shared.ledger.sources.update(&self.source, |record| {
            record.connected = true;
            record.last_contact_unix_ms = now;
            record.disk_size_bytes = disk_size_bytes;
            record.chunk_size_bytes = chunk_size_bytes;
            record.volumes.clear();
        });
        info!(source = %self.source, peer = %self.peer, head_epoch = replica.head_epoch,
              disk_size_bytes, chunk_size_bytes, "session started");
        loop {
            self.epoch(std::slice::from_mut(&mut replica), None).await?;
        }
    }

    /// The version both sides speak, and that the source the agent claims is
    /// its certificate's.
    fn check_hello(
        &self,
        version_min: u16,
        version_max: u16,
        source: &SourceId,
    ) -> Result<u16, Reject> {
        let version = negotiate_version(version_min, version_max).ok_or_else(|| {
            Reject::new(
                ErrorCode::UnsupportedVersion,
                format!("agent speaks protocol versions {version_min}..={version_max}, server speaks {PROTOCOL_VERSION}"),
            )
        })?;
        if *source != self.source {
            return Err(Reject::new(
                ErrorCode::SourceMismatch,
                format!(
                    "agent claims source {source:?} but its certificate is for {:?}",
                    self.source.as_str()
                ),
            ));
        }
        Ok(version)
    }

    async fn load_replica(&self, geometry: Geometry) -> Result<Replica, Outcome> {
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<_, blockrep_store::Error> {
            let Some(head) = store.head(&source)? else {
                return Ok(Ok(None));
            };
            let root = match store.read_stored_root(&head.root)? {
                StoredRoot::Disk(root) => root,
                StoredRoot::Machine(machine) => return Ok(Err(machine)),
            };
            let ids = if root.geometry() == geometry {
                store.chunk_ids(&root)?
            } else {
                Vec::new()
            };
            Ok(Ok(Some((head, root, ids))))
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        // A machine's replica cannot be continued one disk at a time: its
        // recovery points hold every volume at one instant.
        let loaded = loaded.map_err(|machine| {
            let names: Vec<&str> = machine.volumes().iter().map(|(n, _)| n.as_str()).collect();
            Reject::new(
                ErrorCode::GeometryMismatch,
                format!(
                    "source {} is a machine of {} volumes ({}); this agent sends one disk",
                    self.source,
                    names.len(),
                    names.join(", ")
                ),
            )
        })?;
        let nonce = new_nonce()?;
        match loaded {
            None => Ok(Replica::empty(
                geometry,
                References::new(nonce, geometry, &[]),
            )),
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
            Some((head, root, ids)) => {
                let references = References::new(nonce, geometry, &ids);
                let page_ids = root.page_ids().to_vec();
                Ok(Replica::from_head(
                    geometry, head.epoch, ids, page_ids, references,
                ))
            }
        }
    }

    /// Records agent contact (for the `stalled` state).
    fn touch(&self) {
        let now = now_unix_ms();
        self.shared
            .ledger
            .sources
            .update(&self.source, |record| record.last_contact_unix_ms = now);
    }

    /// Pages sent between flushes: `--session-send-buffer-max` of them.
    fn pages_per_batch(&self) -> usize {
        batch_len(self.shared.config.send_buffer_max_bytes, PAGE_BYTES)
    }

    /// Chunks of a disk of `geometry` read, sent and flushed at a time:
    /// `--session-send-buffer-max` of them, so that a request of the most
    /// chunks of the largest size is never gathered in memory.
    fn chunks_per_batch(&self, geometry: Geometry) -> usize {
        batch_len(
            self.shared.config.send_buffer_max_bytes,
            u64::from(geometry.chunk_size_bytes()),
        )
    }
}

/// Bytes of one encoded page of chunk ids.
const PAGE_BYTES: u64 = (CHUNKS_PER_PAGE * 32) as u64;

/// How many items of `item_bytes` fit in `buffer_bytes`; at least one, so a
/// buffer smaller than one item still makes progress.
fn batch_len(buffer_bytes: u64, item_bytes: u64) -> usize {
    (buffer_bytes / item_bytes.max(1)).max(1) as usize
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
    shared.ledger.session_rejected(code);
    warn!(%peer, %code, reason = %message, "session rejected");
    connection
        .close_with_error(Message::Error { code, message })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_batch_holds_what_fits_in_the_buffer_and_at_least_one() {
        assert_eq!(batch_len(4 << 20, 65_536), 64);
        assert_eq!(batch_len(4 << 20, 4 << 20), 1);
        assert_eq!(batch_len(1 << 20, 4 << 20), 1);
        assert_eq!(
            batch_len(4 << 20, PAGE_BYTES),
            (4 << 20) / PAGE_BYTES as usize
        );
    }

    #[test]
    fn read_errors_end_or_reject_the_session() {
        assert!(matches!(
            Outcome::from(ReadError::Closed),
            Outcome::End(End::Closed)
        ));
        let lost = ReadError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(matches!(Outcome::from(lost), Outcome::End(End::Lost(_))));
    }
}

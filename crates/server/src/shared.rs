//! The state every connection, background task and admin request shares: the
//! store, the configuration, the figures of every source, and the source slots
//! that keep one session per source.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use blockrep_core::SourceId;
use blockrep_core::clock::now_unix_ms;
use blockrep_store::Store;

use crate::ServerConfig;
use crate::alerts::Alerts;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::status::{SourceTable, StateThresholds};

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections_total: AtomicU64,
    /// Connections refused because the connection limit was reached (the
    /// listener's or their address's).
    pub connections_refused_total: AtomicU64,
    /// Connections refused because their address held its share of the slots.
    pub connections_refused_per_address_total: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub handshake_failures_total: AtomicU64,
    /// Sessions ended with an error sent to the agent.
    pub sessions_rejected_total: AtomicU64,
    /// Epochs committed.
    pub epochs_committed_total: AtomicU64,
    /// Data chunks received and verified.
    pub chunks_received_total: AtomicU64,
    /// Bytes of chunk data (as sent: compressed or raw) in `Chunk` frames,
    /// counted on arrival, whether or not their epoch ever commits.
    pub chunk_bytes_arrived_total: AtomicU64,
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Arc<Store>,
    pub config: ServerConfig,
    pub stats: ServerStats,
    /// Per-source lag, backlog and counters.
    pub sources: SourceTable,
    /// Labelled counters and histograms for `/metrics`.
    pub metrics: Metrics,
    /// Store probe and listener state for `/health`.
    pub health: Health,
    /// RPO breach state per source.
    pub alerts: Alerts,
    /// Bound address of the NBD listener.
    pub(crate) nbd_addr: Option<SocketAddr>,
    /// Sources with a session in progress: one session per source at a time.
    active_sources: Mutex<HashMap<SourceId, Arc<ActiveSession>>>,
    /// Memory sessions have reserved for chunk ids.
    pub ids_budget: crate::budget::IdsBudget,
    /// Held around every lifecycle change (see the `lifecycle` module).
    pub lifecycle_lock: tokio::sync::Mutex<()>,
    /// The revocation lists in force and the sessions they may end; `None`
    /// where no TLS is set up (the fuzz harness).
    pub revocation: Option<Arc<crate::revocation::Revocation>>,
    /// Block values cache and patch counters.
    pub patches: crate::session::patches::PatchShared,
}

/// A session in progress, as a new connection of the same source sees it.
#[derive(Debug)]
pub(crate) struct ActiveSession {
    /// When the session last received a frame (its `Hello` at first), Unix ms.
    pub last_frame_unix_ms: AtomicU64,
    /// Asks the session to end at its next wait for a frame: a new session of
    /// the same source supersedes it.
    pub superseded: tokio::sync::Notify,
}

/// Proof that a source's session slot is held; frees it when dropped.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    shared: Arc<Shared>,
    source: SourceId,
    pub session: Arc<ActiveSession>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let now = now_unix_ms();
        self.shared.sources.update(&self.source, |record| {
            record.connected = false;
            record.last_contact_unix_ms = now;
        });
        self.shared
            .active_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.source);
    }
}

impl Shared {
    pub(crate) fn new(
        store: Arc<Store>,
        config: ServerConfig,
        sources: SourceTable,
        nbd_addr: Option<SocketAddr>,
    ) -> Self {
        Self {
            store,
            config,
            stats: ServerStats::default(),
            sources,
            metrics: Metrics::default(),
            health: Health::default(),
            alerts: Alerts::default(),
            nbd_addr,
            active_sources: Mutex::new(HashMap::new()),
            ids_budget: crate::budget::IdsBudget::default(),
            lifecycle_lock: tokio::sync::Mutex::new(()),
            revocation: None,
            patches: Default::default(),
        }
    }

    /// Where the NBD listener serving launch volumes is, and whether it
    /// speaks TLS, if enabled.
    pub(crate) fn nbd_addr(&self) -> Option<crate::nbd_export::NbdEndpoint> {
        self.nbd_addr.map(|addr| crate::nbd_export::NbdEndpoint {
            addr,
            tls: self.config.nbd_tls,
        })
    }

    pub(crate) fn thresholds(&self) -> StateThresholds {
        StateThresholds {
            rpo_target: self.config.rpo_target,
            stall_after: self.config.stall_after,
        }
    }

    /// Takes the source's session slot, or returns the session that holds it.
    pub(crate) fn claim_source(
        self: &Arc<Self>,
        source: &SourceId,
    ) -> Result<SourceSlot, Arc<ActiveSession>> {
        let mut active = self
            .active_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match active.entry(source.clone()) {
            Entry::Occupied(held) => Err(Arc::clone(held.get())),
            Entry::Vacant(free) => {
                let session = Arc::new(ActiveSession {
                    last_frame_unix_ms: AtomicU64::new(now_unix_ms()),
                    superseded: tokio::sync::Notify::new(),
                });
                free.insert(Arc::clone(&session));
                Ok(SourceSlot {
                    shared: Arc::clone(self),
                    source: source.clone(),
                    session,
                })
            }
        }
    }
}

//! The state every connection, background task and admin request shares: the
//! store, the configuration, the figures of every source, and the source slots
//! that keep one session per source.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use blockrep_core::SourceId;
use blockrep_core::clock::now_unix_ms;
use blockrep_store::Store;

use crate::ServerConfig;
use crate::block_values::BlockValues;
use crate::breaches::RpoBreaches;
use crate::budget::IdsBudget;
use crate::health::Health;
use crate::ledger::Ledger;
use crate::status::{SourceTable, StateThresholds};

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Arc<Store>,
    pub config: ServerConfig,
    /// Every counted event, and the per-source records (lag, backlog, state).
    pub ledger: Ledger,
    /// Store probe and listener state for `/health`.
    pub health: Health,
    /// RPO breach state per source.
    pub rpo_breaches: RpoBreaches,
    /// Bound address of the NBD listener.
    pub(crate) nbd_addr: Option<SocketAddr>,
    /// Sources with a session in progress: one session per source at a time.
    active_sources: Mutex<HashMap<SourceId, Arc<ActiveSession>>>,
    /// Memory sessions have reserved for chunk ids.
    pub ids_budget: IdsBudget,
    /// Held around every lifecycle change (see the `lifecycle` module).
    pub lifecycle_lock: tokio::sync::Mutex<()>,
    /// The revocation lists in force and the sessions they may end; `None`
    /// where no TLS is set up (the fuzz harness).
    pub revocation: Option<Arc<crate::revocation::Revocation>>,
    /// Block values of recently checked chunks, the bases of patches.
    pub block_values: BlockValues,
    /// With the store in a shared bucket: every source's lease as last read
    /// from the bucket (by the lease task, every third of a lease time), so
    /// status names the server of sources this one does not serve.
    /// `None` until the lease task read them once.
    pub bucket_leases:
        std::sync::Mutex<Option<Vec<(blockrep_core::SourceId, blockrep_store::LeaseRecord)>>>,
    /// The KEK and key directory of encryption at rest, if configured.
    pub keys: Option<crate::encryption::ServerKeys>,
    /// Serializes migration steps (`migration.rs`).
    pub migration_lock: tokio::sync::Mutex<()>,
    /// Counters of the migration workflow and its launches.
    pub workflow: crate::closers::WorkflowCounters,
    /// The close signals of launches served over NBD.
    pub closers: Arc<crate::closers::Closers>,
    /// Sources whose commits move standby launches.
    pub followed: crate::closers::Followed,
    /// The background copiers of launch materializations.
    pub copiers: Arc<crate::materializing::Copiers>,
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
        self.shared.ledger.sources.update(&self.source, |record| {
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
        let ids_budget = IdsBudget::new(
            config.session_memory_max_bytes,
            config.session_memory_per_source_max_bytes,
        );
        Self {
            store,
            config,
            ledger: Ledger::new(sources),
            health: Health::default(),
            rpo_breaches: RpoBreaches::default(),
            nbd_addr,
            active_sources: Mutex::new(HashMap::new()),
            ids_budget,
            lifecycle_lock: tokio::sync::Mutex::new(()),
            revocation: None,
            block_values: BlockValues::default(),
            bucket_leases: std::sync::Mutex::default(),
            keys: None,
            migration_lock: tokio::sync::Mutex::new(()),
            workflow: crate::closers::WorkflowCounters::default(),
            closers: Arc::default(),
            followed: crate::closers::Followed::default(),
            copiers: Arc::default(),
        }
    }

    /// The sources another server of the shared bucket serves now: their
    /// leases live, held by another server, as this server last read the
    /// bucket's leases. What this server knows of them is as it last saw
    /// it, so their RPO is watched, and their lag and state reported, where
    /// they are served. Empty for a local store. Until the leases were read
    /// once, every source whose lease this server does not hold counts: a
    /// server that just started raises no alarm for sources it knows only
    /// from the bucket.
    pub(crate) fn served_elsewhere(&self, now_unix_ms: u64) -> HashSet<SourceId> {
        let Some(bucket) = &self.config.bucket else {
            return HashSet::new();
        };
        let own = |source: &SourceId| self.store.serves(source, now_unix_ms);
        let read = self.bucket_leases.lock().unwrap_or_else(|p| p.into_inner());
        match &*read {
            None => self
                .ledger
                .sources
                .records()
                .into_iter()
                .map(|(source, _)| source)
                .filter(|source| !own(source))
                .collect(),
            Some(leases) => leases
                .iter()
                .filter(|(source, lease)| {
                    lease.holder != bucket.holder
                        && lease.expires_unix_ms > now_unix_ms
                        && !own(source)
                })
                .map(|(source, _)| source.clone())
                .collect(),
        }
    }

    /// The records of the sources this server watches: all of them but
    /// those [`Shared::served_elsewhere`].
    pub(crate) fn watched_records(&self) -> Vec<(SourceId, crate::status::SourceRecord)> {
        let elsewhere = self.served_elsewhere(now_unix_ms());
        let mut records = self.ledger.sources.records();
        records.retain(|(source, _)| !elsewhere.contains(source));
        records
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

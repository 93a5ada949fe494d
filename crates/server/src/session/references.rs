//! Which chunks an agent may send as references, so that a reference is never
//! a way to read, or to learn of, data its source does not hold.
//!
//! A `Ref` chunk (and a `Have` bit, which invites one) is admitted only for:
//! - the source's own data: an id of its committed head (as loaded when the
//!   session started, plus every id received or admitted since), or an id it
//!   sent with data in this epoch: no proof is needed, the source had the bytes;
//! - data of another source of its *tenant* (bound into the certificates), and
//!   then only with a proof of possession: blake3 keyed with this session's
//!   random nonce over the chunk's bytes, checked against the stored chunk;
//!   and only while its kind and length are those of a chunk at the position.
//!
//! Anything else (another tenant's chunk, a page or a root named as a chunk, a
//! proof that does not match) is refused with `BadChunk`, and nothing of the
//! epoch is committed. `Have` answers with the same rules, so it never tells
//! whether another tenant's data exists.
//!
//! The ids of the tenant's other sources are the ids of their heads, read from
//! the store when the session first needs them (its first `Offer` or foreign
//! `Ref`), kept sorted, and counted against the session memory budget; when
//! they do not fit, the session goes on without cross-source deduplication.
//! Sources that change later are not seen until the next session: the agent
//! then sends data it could have referenced, which is safe.
//!
//! Each chunk index may be sent once per uncommitted epoch: data received and
//! pack space used by one epoch are bounded by the disk's size, however long
//! the agent goes on.

use std::collections::HashSet;
use std::sync::Arc;

use blockrep_core::{ChunkId, Geometry, SourceId};
use blockrep_proto::{ErrorCode, NONCE_LEN, REF_PROOF_LEN, ref_proof};
use blockrep_store::{BlobKind, Store};
use tracing::{info, warn};

use super::{Outcome, Reject, Session, internal};
use crate::budget::IdsReservation;

/// The ids a session may reference, and the chunks sent in its epoch.
pub(super) struct References {
    nonce: [u8; NONCE_LEN],
    geometry: Geometry,
    /// The source's own ids: the committed head's when last built, and every
    /// id committed since (a superset of the head's ids).
    own: HashSet<ChunkId>,
    /// Ids received with data, or admitted as references, in this epoch.
    epoch: HashSet<ChunkId>,
    /// One bit per chunk index: sent in this epoch.
    sent: Vec<u64>,
    tenant: TenantIds,
}

/// The ids of the heads of the tenant's other sources.
enum TenantIds {
    /// Not needed yet.
    NotLoaded,
    /// Sorted and deduplicated, with their share of the memory budget
    /// (returned when the session ends).
    Loaded {
        ids: Vec<ChunkId>,
        _reservation: Option<IdsReservation>,
    },
}

/// A fresh random session nonce, from the TLS provider's generator.
pub(super) fn new_nonce() -> Result<[u8; NONCE_LEN], Reject> {
    let mut nonce = [0u8; NONCE_LEN];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut nonce)
        .map_err(|_| Reject::new(ErrorCode::Internal, "no random bytes for the session nonce"))?;
    Ok(nonce)
}

impl References {
    /// Rules for a session whose source's committed head has `head_ids`.
    pub(super) fn new(nonce: [u8; NONCE_LEN], geometry: Geometry, head_ids: &[ChunkId]) -> Self {
        let words = geometry.chunk_count().div_ceil(64) as usize;
        Self {
            nonce,
            geometry,
            own: own_ids(head_ids),
            epoch: HashSet::new(),
            sent: vec![0; words],
            tenant: TenantIds::NotLoaded,
        }
    }

    pub(super) fn nonce(&self) -> [u8; NONCE_LEN] {
        self.nonce
    }

    /// Notes that chunk `index` (on the disk) arrived; a second frame for it
    /// in the same epoch is refused.
    pub(super) fn mark_sent(&mut self, index: u64) -> Result<(), Reject> {
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        let Some(slot) = self.sent.get_mut(word) else {
            return Err(Reject::new(
                ErrorCode::BadChunk,
                format!("chunk {index} is beyond the end of the disk"),
            ));
        };
        if *slot & bit != 0 {
            return Err(Reject::new(
                ErrorCode::BadChunk,
                format!(
                    "chunk {index} sent twice in one epoch; each chunk travels at most once \
                     between commits (nothing of this epoch is committed)"
                ),
            ));
        }
        *slot |= bit;
        Ok(())
    }

    /// Notes an id received with data (or admitted) in this epoch.
    pub(super) fn received(&mut self, id: ChunkId) {
        self.epoch.insert(id);
    }

    /// Whether `id` is the source's own: in its head or sent in this epoch.
    pub(super) fn is_own(&self, id: &ChunkId) -> bool {
        self.epoch.contains(id) || self.own.contains(id)
    }

    /// Whether `id` is one of the source's own committed chunks: in the store
    /// for certain (unlike an id received in this epoch, which may still wait
    /// for the verifier), and readable by this source without a proof.
    pub(super) fn is_committed_own(&self, id: &ChunkId) -> bool {
        self.own.contains(id)
    }

    fn tenant_contains(&self, id: &ChunkId) -> bool {
        match &self.tenant {
            TenantIds::Loaded { ids, .. } => ids.binary_search(id).is_ok(),
            TenantIds::NotLoaded => false,
        }
    }

    /// After a commit whose head has `head_ids`: the epoch's ids become the
    /// source's own, and the set is rebuilt from the head once it holds a
    /// quarter more ids than the disk has chunks (ids since overwritten), so
    /// it stays within its share of the budget.
    pub(super) fn committed(&mut self, head_ids: &[ChunkId]) {
        self.own.extend(self.epoch.drain());
        self.sent.fill(0);
        let chunks = self.geometry.chunk_count() as usize;
        if self.own.len() > chunks + chunks / 4 {
            self.own = HashSet::new();
            self.own = own_ids(head_ids);
        }
    }

    /// Whether a chunk of `info` may stand at a position of this disk.
    fn chunk_shaped(&self, kind: BlobKind, raw_len: u32) -> bool {
        let chunk_size = self.geometry.chunk_size_bytes();
        let last = self
            .geometry
            .chunk_count()
            .checked_sub(1)
            .and_then(|last| self.geometry.chunk_len(last));
        kind == BlobKind::Chunk && (raw_len == chunk_size || Some(raw_len) == last)
    }
}

fn own_ids(head_ids: &[ChunkId]) -> HashSet<ChunkId> {
    head_ids
        .iter()
        .filter(|id| !id.is_zero())
        .copied()
        .collect()
}

/// What loading the tenant's ids found.
enum TenantLoad {
    /// The source has no peers in its tenant.
    Alone,
    /// The peers' ids do not fit in the memory budget: nothing loaded.
    NoRoom { peers: usize, bytes: u64 },
    /// The peers' ids, sorted and distinct, and their reservation.
    Loaded {
        peers: usize,
        ids: Vec<ChunkId>,
        reservation: IdsReservation,
    },
}

/// The chunk ids of the heads of `source`'s tenant peers, within `reserve`
/// (called with the bytes they need; `None` when they do not fit).
fn load_tenant_ids(
    store: &Store,
    source: &SourceId,
    tenant: &SourceId,
    reserve: impl FnOnce(u64) -> Option<IdsReservation>,
) -> Result<TenantLoad, blockrep_store::Error> {
    let mut roots = Vec::new();
    for peer in store.tenant_peers(source, tenant)? {
        // One peer whose head cannot be read (damaged, or collected since it
        // was listed) costs its deduplication, not every peer's session.
        // Every volume of a peer that is a machine.
        let volumes = store.head(&peer).and_then(|head| match head {
            Some(head) => store
                .volume_roots(&head.root)?
                .iter()
                .map(|(_, root)| store.read_root(root))
                .collect(),
            None => Ok(Vec::new()),
        });
        match volumes {
            Ok(volumes) => roots.extend(volumes.into_iter().map(|root| (peer.clone(), root))),
            Err(e) => warn!(source = %source, peer = %peer, error = %e,
                            "skipping a tenant peer whose head cannot be read"),
        }
    }
    if roots.is_empty() {
        return Ok(TenantLoad::Alone);
    }
    // Peers, not volumes: a machine's volumes come one after another.
    let mut named: Vec<&SourceId> = roots.iter().map(|(peer, _)| peer).collect();
    named.dedup();
    let peers = named.len();
    let chunks: u64 = roots.iter().map(|(_, r)| r.geometry().chunk_count()).sum();
    let bytes = chunks.saturating_mul(32);
    let Some(reservation) = reserve(bytes) else {
        return Ok(TenantLoad::NoRoom { peers, bytes });
    };
    let mut ids = Vec::with_capacity(chunks as usize);
    for (peer, root) in &roots {
        match store.chunk_ids(root) {
            Ok(peer_ids) => ids.extend(peer_ids.into_iter().filter(|id| !id.is_zero())),
            Err(e) => warn!(source = %source, peer = %peer, error = %e,
                            "skipping a tenant peer whose pages cannot be read"),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(TenantLoad::Loaded {
        peers,
        ids,
        reservation,
    })
}

/// Checks a proof of possession against the stored chunk: read, decoded,
/// hashed with the nonce. Blocking.
fn proof_holds(
    store: &Store,
    id: &ChunkId,
    raw_len: u32,
    nonce: &[u8; NONCE_LEN],
    proof: &[u8],
) -> Result<bool, Reject> {
    let bytes = store
        .read_blob(id)
        .map_err(|e| Reject::new(ErrorCode::Internal, format!("reading {id}: {e}")))?;
    if bytes.len() != raw_len as usize || proof.len() != REF_PROOF_LEN {
        return Ok(false);
    }
    let expected = blake3::Hash::from(ref_proof(nonce, &bytes));
    let mut sent = [0u8; REF_PROOF_LEN];
    sent.copy_from_slice(proof);
    // blake3::Hash compares in constant time.
    Ok(expected == blake3::Hash::from(sent))
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Session<S> {
    /// Records the source's tenant at its first session; refuses a certificate
    /// that names another tenant than the one recorded. A source does not move
    /// between tenants: its data would become visible to the new tenant's
    /// sources (and the old tenant's would have been referenced by it).
    pub(super) async fn check_tenant(&self) -> Result<(), Outcome> {
        let store = Arc::clone(&self.shared.store);
        let (source, tenant) = (self.source.clone(), self.tenant.clone());
        let recorded = tokio::task::spawn_blocking(move || {
            let recorded = store.source_tenant(&source)?;
            if recorded.is_none() {
                store.set_source_tenant(&source, tenant.as_ref())?;
            }
            Ok::<_, blockrep_store::Error>(recorded)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        let describe = |tenant: &Option<SourceId>| match tenant {
            Some(tenant) => format!("tenant {tenant}"),
            None => "no tenant (the source is its own)".to_owned(),
        };
        match recorded {
            Some(recorded) if recorded != self.tenant => Err(Reject::new(
                ErrorCode::Unauthorized,
                format!(
                    "source {} belongs to {}, but its certificate names {}; a source cannot \
                     change tenants (issue its certificate as it was, or replicate under a \
                     new source id)",
                    self.source,
                    describe(&recorded),
                    describe(&self.tenant)
                ),
            )
            .into()),
            _ => Ok(()),
        }
    }

    /// Loads the tenant's ids the first time they are needed.
    async fn tenant_ids(&mut self, references: &mut References) -> Result<(), Outcome> {
        if !matches!(references.tenant, TenantIds::NotLoaded) {
            return Ok(());
        }
        let Some(tenant) = self.tenant.clone() else {
            // Its own tenant: no other source's data is in reach.
            references.tenant = TenantIds::Loaded {
                ids: Vec::new(),
                _reservation: None,
            };
            return Ok(());
        };
        let store = Arc::clone(&self.shared.store);
        let shared = Arc::clone(&self.shared);
        let source = self.source.clone();
        // The peers' ids count against this source's share as well as the
        // server's budget: one source must not take, through its tenant, the
        // memory its `Hello` could not.
        let own_bytes = crate::budget::ids_bytes(references.geometry);
        let loading = tokio::task::spawn_blocking(move || {
            load_tenant_ids(&store, &source, &tenant, |bytes| {
                let per_source_max = shared.ids_budget.per_source_max_bytes();
                if own_bytes.saturating_add(bytes) > per_source_max {
                    return None;
                }
                shared.ids_budget.reserve_bytes(bytes).ok()
            })
        });
        let loaded = self
            .connection
            .working(loading)
            .await
            .map_err(internal)?
            .map_err(internal)?;
        references.tenant = match loaded {
            TenantLoad::Alone => TenantIds::Loaded {
                ids: Vec::new(),
                _reservation: None,
            },
            TenantLoad::NoRoom { peers, bytes } => {
                warn!(source = %self.source, tenant = ?self.tenant, peers, bytes,
                      "the chunk ids of the tenant's other sources do not fit in \
                       --session-memory-max or --session-memory-per-source-max; this session \
                       does not deduplicate against them");
                TenantIds::Loaded {
                    ids: Vec::new(),
                    _reservation: None,
                }
            }
            TenantLoad::Loaded {
                peers,
                ids,
                reservation,
            } => {
                info!(source = %self.source, tenant = ?self.tenant, peers, ids = ids.len(),
                      "loaded the chunk ids of the tenant's other sources");
                TenantIds::Loaded {
                    ids,
                    _reservation: Some(reservation),
                }
            }
        };
        Ok(())
    }

    /// The `Have` bits for `ids`: set only where a reference would be admitted.
    pub(super) async fn have_bits(
        &mut self,
        references: &mut References,
        ids: &[ChunkId],
    ) -> Result<Vec<u8>, Outcome> {
        if ids.iter().any(|id| !id.is_zero() && !references.is_own(id)) {
            self.tenant_ids(references).await?;
        }
        let mut bits = vec![0u8; ids.len().div_ceil(8)];
        for (i, id) in ids.iter().enumerate() {
            if id.is_zero() {
                continue;
            }
            let admitted = if references.epoch.contains(id) {
                true // received in this epoch, not yet in the store's index
            } else if references.own.contains(id) || references.tenant_contains(id) {
                self.shared
                    .store
                    .blob_info(id)
                    .is_some_and(|info| references.chunk_shaped(info.kind, info.raw_len))
            } else {
                false
            };
            if admitted {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        Ok(bits)
    }

    /// Admits a `Ref` chunk at `index` (of `raw_len` bytes) with `proof`, or
    /// says why not.
    pub(super) async fn admit_reference(
        &mut self,
        references: &mut References,
        index: u64,
        id: ChunkId,
        raw_len: u32,
        proof: &[u8],
    ) -> Result<(), Outcome> {
        let refused = |why: String| -> Outcome {
            Reject::new(
                ErrorCode::BadChunk,
                format!("chunk {index} refers to {id}, {why}; nothing of this epoch is committed"),
            )
            .into()
        };
        if id.is_zero() {
            return Err(refused("the zero id (a zero chunk is sent as such)".into()));
        }
        // Sent with data in this epoch: its length is checked at the commit,
        // once the verifier has stored it.
        if references.epoch.contains(&id) {
            return Ok(());
        }
        let own = references.own.contains(&id);
        if !own {
            self.tenant_ids(references).await?;
            if !references.tenant_contains(&id) {
                return Err(refused("which this source does not hold".into()));
            }
        }
        match self.shared.store.blob_info(&id) {
            Some(info) if info.kind == BlobKind::Chunk && info.raw_len == raw_len => {}
            Some(info) => {
                return Err(refused(format!(
                    "a {:?} blob of {} bytes, not a chunk of {raw_len} bytes",
                    info.kind, info.raw_len
                )));
            }
            None => return Err(refused("which the server does not hold".into())),
        }
        if !own {
            let store = Arc::clone(&self.shared.store);
            let (nonce, proof) = (references.nonce, proof.to_vec());
            let holds = tokio::task::spawn_blocking(move || {
                proof_holds(&store, &id, raw_len, &nonce, &proof)
            })
            .await
            .map_err(internal)??;
            if !holds {
                return Err(refused(
                    "another source's chunk, and its proof of possession does not match \
                     (keyed blake3 of the chunk under this session's nonce)"
                        .into(),
                ));
            }
        }
        references.received(id);
        Ok(())
    }

    /// Before a commit: every chunk sent in this epoch names a stored chunk
    /// of the length its position needs (not a page, a root, or a chunk of
    /// another length). Runs once the verifier has stored the epoch's data.
    pub(super) async fn check_epoch_chunks(
        &self,
        references: &References,
        ids: &[ChunkId],
    ) -> Result<(), Outcome> {
        let store = Arc::clone(&self.shared.store);
        let geometry = references.geometry;
        let mut sent = Vec::new();
        for (word_index, word) in references.sent.iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let index = word_index * 64 + word.trailing_zeros() as usize;
                word &= word - 1;
                if let Some(id) = ids.get(index).filter(|id| !id.is_zero()) {
                    sent.push((index as u64, *id));
                }
            }
        }
        tokio::task::spawn_blocking(move || {
            for (index, id) in sent {
                let expected = geometry.chunk_len(index);
                match store.blob_info(&id) {
                    Some(info)
                        if info.kind == BlobKind::Chunk && Some(info.raw_len) == expected => {}
                    other => {
                        return Err(Reject::new(
                            ErrorCode::BadChunk,
                            format!(
                                "chunk {index} names {id}, which is {}, not a chunk of {} \
                                 bytes; nothing committed",
                                other.map_or("not stored".to_owned(), |info| format!(
                                    "a {:?} blob of {} bytes",
                                    info.kind, info.raw_len
                                )),
                                expected.unwrap_or(0)
                            ),
                        ));
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(internal)?
        .map_err(Outcome::from)
    }
}

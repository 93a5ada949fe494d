//! A machine's session: an agent of several disks opens with `MachineHello`,
//! the server answers `MachineWelcome` and one `VolumeHead` per volume, and
//! every epoch sends each volume's frames after a `SelectVolume`, then one
//! `Commit` naming the machine root of all volumes, which the store commits
//! at once (every volume or none).
//!
//! A volume the head has and the agent does not is refused unless the agent
//! allows its removal (`--allow-volume-removal`; a disk is never dropped
//! silently); a volume the agent has and the head
//! does not starts empty, so only it is synced in full; a volume whose size
//! changed is refused with both sizes. A single-disk head continues as a
//! machine whose volume is called `disk`. A `Commit` with `last` cuts the
//! whole machine over: one cutover launch of every volume.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{ChunkId, Consistency, Geometry, MachineRoot, Root, VolumeName};
use blockrep_proto::{ErrorCode, Message, PROGRESS_INTERVAL};
use blockrep_store::VolumeCommit;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::epoch::{EpochCounters, commit_failed, commit_is_unchanged};
use super::labels::commit_label;
use super::references::{References, new_nonce};
use super::replica::Replica;
use super::{End, Outcome, Reject, Session, internal};
use crate::status::VolumeRecord;
use crate::verify::Verifier;

/// What a machine's `Commit` says.
pub(super) struct MachineCommit {
    pub epoch: u64,
    pub agent_root: ChunkId,
    pub scan_started_unix_ms: u64,
    pub complete: bool,
    /// The final epoch of a cutover: `finish_cutover` answers, not `Committed`.
    pub last: bool,
    pub consistency: Consistency,
}

/// A volume of the head as the session starts: its root and chunk ids.
type VolumeHead = Option<(Root, Vec<ChunkId>)>;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Serves a machine's session after its `MachineHello` (version and
    /// source already checked).
    pub(super) async fn serve_machine(
        &mut self,
        version: u16,
        chunk_size_bytes: u32,
        volumes: Vec<(VolumeName, u64)>,
        allow_volume_removal: bool,
    ) -> Result<Infallible, Outcome> {
        let mut geometries = Vec::with_capacity(volumes.len());
        for (name, size) in &volumes {
            let geometry = Geometry::new(*size, chunk_size_bytes).map_err(|e| {
                Reject::new(
                    ErrorCode::BadFrame,
                    format!("volume {name}: invalid geometry: {e}"),
                )
            })?;
            geometries.push(geometry);
        }
        let names: Vec<VolumeName> = volumes.iter().map(|(name, _)| name.clone()).collect();
        // Names unique, between 1 and the limit: what a machine root allows.
        MachineRoot::check_names(&names)
            .map_err(|e| Reject::new(ErrorCode::BadFrame, e.to_string()))?;
        let _ids = geometries
            .iter()
            .map(|g| self.shared.ids_budget.reserve_ids(*g))
            .collect::<Result<Vec<_>, _>>()?;
        let slot = self.claim_slot().await?;
        self.active = Some(Arc::clone(&slot.session));
        let _slot = slot;
        self.check_tenant().await?;
        self.open_keys().await?;
        let (head_epoch, head_root, heads) = self
            .load_machine(&names, &geometries, allow_volume_removal)
            .await?;
        self.machine_head = head_root;
        let nonce = new_nonce()?;
        let mut replicas = Vec::with_capacity(heads.len());
        let mut head_roots = Vec::with_capacity(heads.len());
        for (geometry, head) in geometries.iter().zip(heads) {
            let replica = match head {
                Some((root, ids)) => {
                    head_roots.push(Bytes::from(root.encode()));
                    let references = References::new(nonce, *geometry, &ids);
                    let page_ids = root.page_ids().to_vec();
                    Replica::from_head(*geometry, head_epoch, ids, page_ids, references)
                }
                None => {
                    head_roots.push(Bytes::new());
                    let mut replica =
                        Replica::empty(*geometry, References::new(nonce, *geometry, &[]));
                    replica.head_epoch = head_epoch;
                    replica
                }
            };
            replicas.push(replica);
        }
        self.connection.queue(&Message::MachineWelcome {
            version,
            nonce,
            head_epoch,
            head_root: head_root.unwrap_or(ChunkId::ZERO),
            id_key: self.id_key(),
        });
        for (index, root) in head_roots.into_iter().enumerate() {
            // At most VOLUMES_MAX volumes, checked above: the index fits.
            let index = index as u16;
            self.connection.queue(&Message::VolumeHead { index, root });
        }
        self.connection
            .flush()
            .await
            .map_err(|e| Outcome::End(End::Lost(e.to_string())))?;
        self.connection.progress_every = Some(PROGRESS_INTERVAL);
        let now = now_unix_ms();
        let disk_size_bytes = geometries.iter().map(|g| g.disk_size_bytes()).sum();
        self.shared.ledger.sources.update(&self.source, |record| {
            record.connected = true;
            record.last_contact_unix_ms = now;
            record.disk_size_bytes = disk_size_bytes;
            record.chunk_size_bytes = chunk_size_bytes;
            record.volumes = names
                .iter()
                .zip(&geometries)
                .map(|(name, g)| VolumeRecord {
                    name: name.to_string(),
                    disk_size_bytes: g.disk_size_bytes(),
                    ..VolumeRecord::default()
                })
                .collect();
        });
        info!(source = %self.source, peer = %self.peer, head_epoch, volumes = names.len(),
              disk_size_bytes, chunk_size_bytes, "machine session started");
        loop {
            self.epoch(&mut replicas, Some(&names)).await?;
        }
    }

    /// The head's epoch and root, and each of the agent's volumes as the head
    /// has it (`None`: new). Refuses a head volume the agent lacks and a
    /// volume whose size changed.
    async fn load_machine(
        &self,
        names: &[VolumeName],
        geometries: &[Geometry],
        allow_volume_removal: bool,
    ) -> Result<(u64, Option<ChunkId>, Vec<VolumeHead>), Outcome> {
        let store = Arc::clone(&self.shared.store);
        let source = self.source.clone();
        let wanted: Vec<(VolumeName, Geometry)> = names
            .iter()
            .cloned()
            .zip(geometries.iter().copied())
            .collect();
        let loading = tokio::task::spawn_blocking(move || {
            let Some(head) = store.head(&source)? else {
                return Ok(Ok((0, None, vec![None; wanted.len()])));
            };
            // A single disk's head reads as a machine of one volume, `disk`.
            let volumes = store.volume_roots(&head.root)?;
            let listed = || {
                wanted
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let gone = volumes
                .iter()
                .find(|(n, _)| !wanted.iter().any(|(w, _)| w == n));
            if let Some((gone, _)) = gone.filter(|_| !allow_volume_removal) {
                return Ok(Err(Reject::new(
                    ErrorCode::GeometryMismatch,
                    format!(
                        "volume {gone} of source {source} is not among the agent's disks ({}): \
                         removing a volume from a machine is refused without --allow-volume-removal",
                        listed()
                    ),
                )));
            }
            let mut out = Vec::with_capacity(wanted.len());
            for (name, geometry) in &wanted {
                let Some((_, root_id)) = volumes.iter().find(|(n, _)| n == name) else {
                    out.push(None);
                    continue;
                };
                let root = store.read_root(root_id)?;
                if root.geometry() != *geometry {
                    return Ok(Err(Reject::new(
                        ErrorCode::GeometryMismatch,
                        format!(
                            "volume {name} has {} bytes in {}-byte chunks in the replica, the disk has {} bytes in {}-byte chunks; \
                             a resized disk or a new chunk size needs a new source id",
                            root.geometry().disk_size_bytes(),
                            root.geometry().chunk_size_bytes(),
                            geometry.disk_size_bytes(),
                            geometry.chunk_size_bytes(),
                        ),
                    )));
                }
                let ids = store.chunk_ids(&root)?;
                out.push(Some((root, ids)));
            }
            Ok::<_, blockrep_store::Error>(Ok((head.epoch, Some(head.root), out)))
        });
        let loaded = loading.await.map_err(internal)?.map_err(internal)?;
        Ok(loaded?)
    }

    /// Commits a machine's epoch: every volume's chunks checked, every root
    /// rebuilt, the machine root compared with the agent's, then all volumes
    /// committed at once and `Committed` sent.
    pub(super) async fn commit_machine(
        &mut self,
        replicas: &mut [Replica],
        names: &[VolumeName],
        verifier: Option<Verifier>,
        counters: EpochCounters,
        commit: MachineCommit,
    ) -> Result<(), Outcome> {
        let started = Instant::now();
        let verified = match verifier {
            Some(verifier) => self.connection.working(verifier.finish()).await?,
            None => Default::default(),
        };
        let mut unchanged = true;
        for replica in replicas.iter() {
            self.check_epoch_chunks(&replica.references, &replica.ids)
                .await?;
            unchanged &= commit_is_unchanged(replica, commit.epoch)?;
        }
        let built: Vec<_> = replicas.iter().map(Replica::build_root).collect();
        let machine = MachineRoot::new(
            names
                .iter()
                .zip(&built)
                .map(|(name, (root, _))| (name.clone(), root.id()))
                .collect(),
        )
        .map_err(internal)?;
        let root_id = machine.id();
        if root_id != commit.agent_root {
            return Err(Reject::new(
                ErrorCode::RootMismatch,
                format!(
                    "agent expects machine root {}, the received chunks give {root_id}; nothing committed",
                    commit.agent_root
                ),
            )
            .into());
        }
        // Nothing dirty and the same volumes: the head is still current.
        unchanged &= self.machine_head == Some(root_id);
        let label = if unchanged {
            self.confirm_head(commit.epoch, root_id, commit.complete, commit.consistency)
                .await?
        } else {
            let store = Arc::clone(&self.shared.store);
            let source = self.source.clone();
            let names = names.to_vec();
            let (epoch, scan_started, complete, consistency) = (
                commit.epoch,
                commit.scan_started_unix_ms,
                commit.complete,
                commit.consistency,
            );
            // The roots and pages go to the blocking task and come back
            // with its result: no copy of the pages.
            let committing = tokio::task::spawn_blocking(move || {
                let volumes: Vec<VolumeCommit<'_>> = names
                    .iter()
                    .zip(&built)
                    .map(|(name, (root, pages))| VolumeCommit { name, root, pages })
                    .collect();
                let result = store.commit_machine(
                    &source,
                    epoch,
                    &volumes,
                    scan_started,
                    complete,
                    consistency,
                    now_unix_ms(),
                );
                (result, built)
            });
            let (result, built) = self
                .connection
                .working(committing)
                .await
                .map_err(internal)?;
            result.map_err(commit_failed)?;
            for (replica, (root, _)) in replicas.iter_mut().zip(&built) {
                replica.committed(commit.epoch, root.page_ids().to_vec());
            }
            self.machine_head = Some(root_id);
            Some(commit_label(commit.complete, commit.consistency))
        };
        for replica in replicas.iter_mut() {
            replica.references.committed(&replica.ids);
        }
        let bytes_received = self.connection.bytes_read - counters.bytes_at_start;
        let head_epoch = replicas.first().map_or(0, |r| r.head_epoch);
        let now = now_unix_ms();
        self.shared.ledger.sources.update(&self.source, |record| {
            record.epoch = head_epoch;
            record.root = Some(root_id.to_hex());
            if label.is_some() {
                record.consistency = label;
            }
            if commit.complete {
                record.synced_scan_started_unix_ms = commit.scan_started_unix_ms.max(1);
                record.bytes_pending = 0;
                record.chunks_pending = 0;
                for volume in &mut record.volumes {
                    volume.bytes_pending = 0;
                    volume.chunks_pending = 0;
                }
            }
            if !unchanged {
                record.last_commit_unix_ms = now;
                record.epochs_committed_total += 1;
            }
            counters.add_totals(record, bytes_received, &verified);
        });
        if commit.complete {
            crate::migration::complete_pass_committed(&self.shared, &self.source);
            crate::drills::source_committed(&self.shared, &self.source);
        }
        if !unchanged {
            info!(source = %self.source, epoch = commit.epoch, root = %root_id,
                  volumes = names.len(), complete = commit.complete,
                  consistency = %commit_label(commit.complete, commit.consistency),
                  chunks_received = counters.chunks_received, bytes_received,
                  commit_ms = started.elapsed().as_millis() as u64,
                  "machine epoch committed");
            self.shared
                .ledger
                .epoch_committed(started.elapsed(), bytes_received);
        }
        if commit.last {
            self.cutover_times.final_commit(
                started,
                &counters,
                commit.scan_started_unix_ms,
                head_epoch,
                root_id,
            );
            return Ok(());
        }
        self.send_committed(head_epoch, root_id, &counters, bytes_received)
            .await
    }
}

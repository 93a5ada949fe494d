//! A machine of several disks, replicated in one session with one recovery
//! point for all of them: `MachineHello` names every volume, each epoch sends
//! each volume's changes after a `SelectVolume`, and one `Commit` names the
//! machine root, which the server commits whole or not at all.
//!
//! The volumes' views are of one instant only when taken inside one run of
//! the quiesce command (`view::scan_together`): a machine's recovery point
//! is then `quiesced`, else `live` whatever each disk's view was, never
//! called consistent across disks. The cutover's final epoch is one such
//! point of every volume, answered with one cutover launch of them all.
//! A large epoch is committed in steps, each a machine root of what the
//! server holds so far (labelled live, never a recovery point to launch as
//! consistent), so an interrupted initial sync resumes where it stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use blockrep_core::{ChunkId, Consistency, Geometry, MachineRoot, Root, VolumeName};
use blockrep_proto::{Message, PROTOCOL_VERSION};

use crate::connection::certificate_rejected;
use crate::connection::{Connection, TlsTransport, Transport};
use crate::epoch::{CutoverReady, Session, VolumeHead};
use crate::machine_step::MachineStep;
use crate::view::Scan;
use crate::{AgentConfig, EpochReport, Error};

/// A session replicating a machine's volumes.
pub(crate) struct MachineSession<S = TlsTransport> {
    /// Works on the current volume; the others wait in `volumes`.
    session: Session<S>,
    names: Vec<VolumeName>,
    /// Every volume's head, but the current one's slot, whose state is in
    /// `session` (the slot holds whatever was swapped out last).
    volumes: Vec<VolumeHead>,
    current: usize,
    /// The machine root of the head, once every volume has one.
    head: Option<ChunkId>,
}

impl MachineSession<TlsTransport> {
    /// Connects and says `MachineHello` for volumes `names` of `geometries`.
    pub(crate) async fn open(
        config: &AgentConfig,
        names: &[VolumeName],
        geometries: &[Geometry],
    ) -> Result<Self, Error> {
        Self::start(
            Connection::connect(config).await?,
            config,
            names,
            geometries,
        )
        .await
    }
}

impl<S: Transport> MachineSession<S> {
    /// Says `MachineHello` on an established connection and learns every
    /// volume's head from the `MachineWelcome` and its `VolumeHead`s.
    pub(crate) async fn start(
        mut connection: Connection<S>,
        config: &AgentConfig,
        names: &[VolumeName],
        geometries: &[Geometry],
    ) -> Result<Self, Error> {
        let hello = Message::MachineHello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            source: config.source.clone(),
            chunk_size_bytes: geometries[0].chunk_size_bytes(),
            volumes: names
                .iter()
                .zip(geometries)
                .map(|(name, g)| (name.clone(), g.disk_size_bytes()))
                .collect(),
            allow_volume_removal: config.allow_volume_removal,
        };
        let welcome = async {
            connection.send(&hello).await?;
            connection.flush().await?;
            connection.recv().await
        };
        let (head_epoch, nonce, head, space) = match welcome.await {
            Ok(Message::MachineWelcome {
                version,
                nonce,
                head_epoch,
                head_root,
                id_key,
            }) if version == PROTOCOL_VERSION => (
                head_epoch,
                nonce,
                Some(head_root).filter(|r| !r.is_zero()),
                id_key.map_or(blockrep_core::IdSpace::PLAIN, blockrep_core::IdSpace::keyed),
            ),
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "expected MachineWelcome of version {PROTOCOL_VERSION}, got {}",
                    other.name()
                )));
            }
            Err(Error::Alert(alert)) => {
                return Err(Error::CertificateRejected(certificate_rejected(alert)));
            }
            Err(e) => return Err(e),
        };
        crate::connection::check_head_epoch(head_epoch)?;
        let mut volumes = Vec::with_capacity(names.len());
        for (expected, (name, geometry)) in names.iter().zip(geometries).enumerate() {
            let root = match connection.recv().await? {
                Message::VolumeHead { index, root } if usize::from(index) == expected => root,
                other => {
                    return Err(Error::Protocol(format!(
                        "expected VolumeHead {expected}, got {}",
                        other.name()
                    )));
                }
            };
            let head_root = if root.is_empty() {
                None
            } else {
                let root = Root::decode(&root)
                    .map_err(|e| Error::Protocol(format!("head root of volume {name}: {e}")))?;
                if root.geometry() != *geometry {
                    return Err(Error::Protocol(format!(
                        "server sent a head of {} bytes for volume {name} of {} bytes",
                        root.geometry().disk_size_bytes(),
                        geometry.disk_size_bytes()
                    )));
                }
                Some(root)
            };
            let head_ids = head_root
                .is_none()
                .then(|| vec![ChunkId::ZERO; geometry.chunk_count() as usize]);
            volumes.push(VolumeHead {
                geometry: *geometry,
                head_ids,
                head_root,
            });
        }
        // The first volume starts as the session's own.
        let first = &mut volumes[0];
        let session = Session::for_machine(
            connection,
            config,
            nonce,
            head_epoch,
            first.geometry,
            first.head_root.take(),
            space,
        );
        first.head_ids = None;
        Ok(Self {
            session,
            names: names.to_vec(),
            volumes,
            current: 0,
            head,
        })
    }

    /// Where the source's chunk ids live (see [`Session::space`]).
    pub(crate) fn space(&self) -> blockrep_core::IdSpace {
        self.session.space()
    }

    /// The machine root of the head, when every volume has one.
    pub(crate) fn head_root_id(&self) -> Option<ChunkId> {
        self.head
    }

    /// Makes volume `index` the session's current one, on both sides.
    async fn select(&mut self, index: usize) -> Result<(), Error> {
        if index != self.current {
            self.session.swap_volume(&mut self.volumes[self.current]);
            self.session.swap_volume(&mut self.volumes[index]);
            self.current = index;
        }
        // At most VOLUMES_MAX volumes: the index fits.
        let index = index as u16;
        self.session
            .connection()
            .send(&Message::SelectVolume { index })
            .await?;
        Ok(())
    }

    /// Sends every volume's changes and commits them as one recovery point
    /// labelled `consistency` (what the set of views may claim, see
    /// `view::scan_together`).
    pub(crate) async fn epoch(
        &mut self,
        config: &AgentConfig,
        scans: Vec<Scan>,
        consistency: Consistency,
    ) -> Result<EpochReport, Error> {
        self.commit_epoch(config, scans, consistency, false).await
    }

    /// The cutover's final epoch: every volume's changes committed as one
    /// point, which the server answers with the cutover launch of every
    /// volume (`cutover_ready`).
    pub(crate) async fn final_epoch(
        &mut self,
        config: &AgentConfig,
        scans: Vec<Scan>,
        consistency: Consistency,
    ) -> Result<EpochReport, Error> {
        self.commit_epoch(config, scans, consistency, true).await
    }

    async fn commit_epoch(
        &mut self,
        config: &AgentConfig,
        scans: Vec<Scan>,
        consistency: Consistency,
        last: bool,
    ) -> Result<EpochReport, Error> {
        let started = Instant::now();
        let scan_started_unix_ms = scans.iter().map(|s| s.started_unix_ms).min().unwrap_or(0);
        let mut total = EpochReport::nothing_yet(0, Duration::ZERO, consistency);
        let mut views = Vec::with_capacity(scans.len());
        let mut roots: Vec<Root> = Vec::with_capacity(scans.len());
        for (index, scan) in scans.into_iter().enumerate() {
            let geometry = scan.geometry;
            self.select(index).await?;
            // A large volume's changes are committed in steps, each a
            // machine root: the volumes sent so far as sent, this one as far
            // as it got, the rest as in the head. Not in the final epoch of
            // a cutover, which commits once.
            self.session.machine_step = match last {
                true => None,
                false => Some(self.step_roots(index, &roots)),
            };
            let report = self.session.epoch(config, scan, true).await;
            self.session.machine_step = None;
            if let Some(step) = self.session.step_roots.drain(..).next_back() {
                // An intermediate commit moved the machine's head.
                self.head = Some(step);
            }
            let report = report?
                .ok_or_else(|| Error::Protocol("a machine's volume epoch gave no report".into()))?;
            let view = self
                .session
                .take_deferred()
                .ok_or_else(|| Error::Protocol("a machine's volume epoch left no ids".into()))?;
            roots.push(Root::build(geometry, &view).0);
            total.add_volume(&report);
            views.push((geometry, view));
        }
        let machine = MachineRoot::new(
            self.names
                .iter()
                .cloned()
                .zip(roots.iter().map(Root::id))
                .collect(),
        )
        .map_err(|e| Error::Protocol(e.to_string()))?;
        let root_id = machine.id();
        // The head again: the server only confirms it (and says whether a
        // cutover is asked for); anything else is the next epoch.
        let epoch = match self.head == Some(root_id) {
            true => self.session.head_epoch(),
            false => self.session.head_epoch() + 1,
        };
        let connection = self.session.connection();
        if !config.volume_captures.is_empty() {
            total.bytes_sent += connection
                .send(&machine_capture_report(&config.volume_captures))
                .await?;
        }
        total.bytes_sent += connection
            .send(&Message::Commit {
                epoch,
                root: root_id,
                scan_started_unix_ms,
                complete: true,
                last,
                consistency,
            })
            .await?;
        connection.flush().await?;
        match connection.recv().await? {
            Message::Committed {
                epoch: got,
                root,
                chunks_received,
                chunks_stored,
                cutover_requested,
                ..
            } if !last && got == epoch && root == root_id => {
                total.server_chunks_received = chunks_received;
                total.server_chunks_stored = chunks_stored;
                self.session.cutover_requested |= cutover_requested;
            }
            Message::CutoverReady {
                epoch: got,
                root,
                snapshot,
                launch,
                commit_ms,
                launch_ms,
            } if last && got == epoch && root == root_id => {
                self.session.cutover_ready = Some(CutoverReady {
                    snapshot,
                    launch,
                    commit_ms,
                    launch_ms,
                });
            }
            other => {
                return Err(Error::Protocol(format!(
                    "expected Committed of epoch {epoch} root {root_id}, got {}",
                    other.name()
                )));
            }
        }
        if let Some(log) = &config.ack_log {
            log.record(epoch, &root_id, true, scan_started_unix_ms);
        }
        // Every volume's head is now what was sent.
        for (index, ((geometry, view), root)) in views.into_iter().zip(roots).enumerate() {
            let mut head = VolumeHead {
                geometry,
                head_ids: Some(view),
                head_root: Some(root),
            };
            if index == self.current {
                // Into the session; what comes out is the old head, dropped.
                self.session.swap_volume(&mut head);
            } else {
                self.volumes[index] = head;
            }
        }
        self.session.set_head_epoch(epoch);
        self.head = Some(root_id);
        total.epoch = epoch;
        total.root = root_id;
        // Started after every view was taken and scanned: all of it is transfer.
        total.transfer_duration = started.elapsed();
        total.note_compression(config);
        Ok(total)
    }

    /// The geometry of each volume.
    pub(crate) fn geometries(&self) -> Vec<Geometry> {
        (0..self.volumes.len())
            .map(|i| match i == self.current {
                true => self.session.geometry(),
                false => self.volumes[i].geometry,
            })
            .collect()
    }

    /// The root id of each volume in the head (`None`: a volume the head
    /// does not have yet).
    pub(crate) fn volume_root_ids(&self) -> Vec<Option<ChunkId>> {
        (0..self.volumes.len())
            .map(|i| match i == self.current {
                true => self.session.head_root_id(),
                false => self.volumes[i].head_root.as_ref().map(Root::id),
            })
            .collect()
    }

    /// The chunk ids of volume `index` in the head, fetched from the server
    /// the first time.
    pub(crate) async fn volume_head_ids(&mut self, index: usize) -> Result<Vec<ChunkId>, Error> {
        // Known here: no need to select the volume on the server.
        if let Some(ids) = self.volumes[index]
            .head_ids
            .as_ref()
            .filter(|_| index != self.current)
        {
            return Ok(ids.clone());
        }
        self.select(index).await?;
        self.session.head_ids().await
    }

    /// What an intermediate commit while volume `index` is sent names: the
    /// `done` volumes (those before it) at their new roots, the later ones
    /// at their roots in the head (all zeros for a volume the head lacks).
    fn step_roots(&self, index: usize, done: &[Root]) -> MachineStep {
        let roots = (0..self.volumes.len())
            .map(|i| match done.get(i) {
                Some(root) => root.id(),
                None if i == index => ChunkId::ZERO, // replaced by the step
                None => match &self.volumes[i].head_root {
                    Some(root) => root.id(),
                    None => Root::zero(self.volumes[i].geometry).id(),
                },
            })
            .collect();
        MachineStep {
            names: self.names.clone(),
            roots,
            current: index,
        }
    }

    /// Whether the server asked for the cutover (`blockrep cutover`).
    pub(crate) fn cutover_requested(&self) -> bool {
        self.session.cutover_requested
    }

    /// The single-disk session underneath, for what a machine does as one
    /// disk would (the cutover's report, its `CutoverReady`).
    pub(crate) fn session(&mut self) -> &mut Session<S> {
        &mut self.session
    }

    /// Closes the session cleanly.
    pub(crate) async fn close(self) {
        self.session.close().await;
    }

    /// The connection, for a session that leaves the replication protocol
    /// (failback) after `MachineWelcome`.
    pub(crate) fn into_connection(self) -> Connection<S> {
        self.session.into_connection()
    }
}

/// Write capture's report for a machine: its disks' dirty, preserved and
/// written figures summed, their cuts (taken together: one count), and the
/// slowest disk's write latencies.
fn machine_capture_report(captures: &[std::sync::Arc<crate::capture::Capture>]) -> Message {
    let stats: Vec<_> = captures.iter().map(|c| c.stats()).collect();
    Message::Capture {
        dirty_bytes: stats.iter().map(|s| s.dirty_bytes).sum(),
        preserved_bytes: stats.iter().map(|s| s.preserved_bytes).sum(),
        cuts: stats.iter().map(|s| s.cuts).max().unwrap_or(0),
        writes: stats.iter().map(|s| s.writes).sum(),
        write_p50_us: stats.iter().map(|s| s.write_p50_us).max().unwrap_or(0),
        write_p99_us: stats.iter().map(|s| s.write_p99_us).max().unwrap_or(0),
    }
}

/// The geometry of each scan.
pub(crate) fn geometries(scans: &[Scan]) -> Vec<Geometry> {
    scans.iter().map(|s| s.geometry).collect()
}

/// The configuration of one volume: the machine's, with that volume's disk
/// and view options of its own (what a view learns is about one disk). Made
/// once per run, so that what it learns lasts.
pub(crate) fn volume_config(config: &AgentConfig, path: &Path) -> AgentConfig {
    let mut config = config.clone();
    config.disk = path.to_owned();
    config.view = config.view.for_another_disk();
    config
}

/// Every volume's configuration (see [`volume_config`]).
pub(crate) fn volume_configs(config: &AgentConfig) -> Vec<AgentConfig> {
    config
        .volumes
        .iter()
        .map(|(_, path)| volume_config(config, path))
        .collect()
}

/// The machine root of `names` with these roots, when every volume has one.
pub(crate) fn machine_root_of(
    names: &[VolumeName],
    roots: impl Iterator<Item = Option<ChunkId>>,
) -> Option<ChunkId> {
    let roots: Option<Vec<ChunkId>> = roots.collect();
    MachineRoot::new(names.iter().cloned().zip(roots?).collect())
        .ok()
        .map(|m| m.id())
}

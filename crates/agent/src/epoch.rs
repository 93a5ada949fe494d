//! One session with the server: connect, learn the head, then run epochs.

use std::sync::Arc;
use std::time::Instant;

use blockrep_core::{ChunkId, Consistency, Geometry, IdSpace, Root, changed_chunks, changed_pages};
use std::collections::HashSet;

use blockrep_proto::{
    CHUNK_HEADER_LEN, Codec, Message, OFFER_IDS_MAX, PROTOCOL_VERSION, REF_PROOF_LEN, chunk_header,
};
use bytes::Bytes;
use tracing::debug;

use crate::connection::{Connection, TlsTransport, Transport, certificate_rejected, names_tenant};
use crate::machine_step::MachineStep;
use crate::pages::{PagesOf, fetch_pages};
use crate::progress::progress_bar;
use crate::send::{References, spawn_encoders};
use crate::view::Scan;
use crate::{AgentConfig, EpochReport, Error};

/// The server's answer to a final (cutover) commit.
#[derive(Debug, Clone)]
pub(crate) struct CutoverReady {
    pub snapshot: String,
    pub launch: String,
    pub commit_ms: u64,
    pub launch_ms: u64,
}

/// One volume's head as the agent knows it, while another volume is the
/// session's current one.
pub(crate) struct VolumeHead {
    pub geometry: Geometry,
    pub head_ids: Option<Vec<ChunkId>>,
    pub head_root: Option<Root>,
}

/// A connected session over a transport `S` (TLS in production) that knows
/// the server's committed head.
pub(crate) struct Session<S = TlsTransport> {
    /// The next complete commit is the cutover's final one.
    pub final_epoch: bool,
    /// The server asked (in a `Committed`) for a cutover.
    pub cutover_requested: bool,
    /// Set by the final commit.
    pub cutover_ready: Option<CutoverReady>,
    connection: Connection<S>,
    geometry: Geometry,
    head_epoch: u64,
    /// The server's committed chunk ids, where known; `None` until learned.
    head_ids: Option<Vec<ChunkId>>,
    head_root: Option<Root>,
    /// The session's nonce from `Welcome`: the key of reference proofs.
    nonce: [u8; blockrep_proto::NONCE_LEN],
    /// Where acknowledged commits are recorded (`AgentConfig::ack_log`).
    ack_log: Option<Arc<crate::AckLog>>,
    /// Changed chunks may travel as patches (`AgentConfig::patches`, turned
    /// off for a session after the server refused a patch).
    pub patches: bool,
    /// Capture mode: its state goes to the server before every complete commit.
    capture: Option<Arc<crate::capture::Capture>>,
    /// Roots of the intermediate commits this session made: a head the
    /// capture can still continue from incrementally.
    pub(crate) step_roots: Vec<ChunkId>,
    /// A volume of a machine (`crate::machine`): an epoch sends the volume's
    /// changes but leaves its complete commit to the machine, in `deferred`;
    /// its intermediate commits name the machine root `machine_step` gives.
    volume_of_machine: bool,
    /// In a machine's epoch: the other volumes' roots as the server now
    /// holds them, for an intermediate commit of the current volume (`None`:
    /// no intermediate commit, as in a cutover's final epoch).
    pub(crate) machine_step: Option<MachineStep>,
    /// The chunk ids an epoch of a machine's volume ends with, for the
    /// machine's one commit.
    deferred: Option<Vec<ChunkId>>,
    /// Where the source's chunk ids live: keyed for a source the server
    /// encrypts at rest (its `Welcome` gives the key), plain otherwise.
    space: IdSpace,
}

impl Session<TlsTransport> {
    /// Connects over TLS and says `Hello` for a disk of this geometry.
    pub(crate) async fn open(config: &AgentConfig, geometry: Geometry) -> Result<Self, Error> {
        Self::start(Connection::connect(config).await?, config, geometry).await
    }
}

impl<S: Transport> Session<S> {
    /// Says `Hello` for a disk of this geometry on an established
    /// connection and learns the server's head from its `Welcome`.
    pub(crate) async fn start(
        mut connection: Connection<S>,
        config: &AgentConfig,
        geometry: Geometry,
    ) -> Result<Self, Error> {
        let hello = Message::Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            source: config.source.clone(),
            disk_size_bytes: geometry.disk_size_bytes(),
            chunk_size_bytes: geometry.chunk_size_bytes(),
        };
        let welcome = async {
            connection.send(&hello).await?;
            connection.flush().await?;
            connection.recv().await
        };
        let (head_epoch, head_root, nonce, id_key) = match welcome.await {
            Ok(Message::Welcome {
                version,
                head_epoch,
                head_root,
                nonce,
                id_key,
            }) => {
                if version != PROTOCOL_VERSION {
                    return Err(Error::Protocol(format!(
                        "server chose protocol version {version}, this agent speaks only {PROTOCOL_VERSION}"
                    )));
                }
                crate::connection::check_head_epoch(head_epoch)?;
                (head_epoch, head_root, nonce, id_key)
            }
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "expected Welcome, got {}",
                    other.name()
                )));
            }
            // In TLS 1.3 the server checks the client certificate after the
            // client's side of the handshake is done, so a rejection arrives here
            // as the alert the server's verifier chose.
            Err(Error::Alert(alert)) => {
                return Err(Error::CertificateRejected(certificate_rejected(alert)));
            }
            Err(e) => return Err(e),
        };
        let head_root = if head_epoch == 0 {
            None
        } else {
            let root =
                Root::decode(&head_root).map_err(|e| Error::Protocol(format!("head root: {e}")))?;
            if root.geometry() != geometry {
                return Err(Error::Protocol(format!(
                    "server sent a head of {} bytes in {}-byte chunks for a disk of {} bytes in {}-byte chunks",
                    root.geometry().disk_size_bytes(),
                    root.geometry().chunk_size_bytes(),
                    geometry.disk_size_bytes(),
                    geometry.chunk_size_bytes()
                )));
            }
            Some(root)
        };
        let space = id_key.map_or(IdSpace::PLAIN, IdSpace::keyed);
        Ok(Self::assemble(
            connection, config, nonce, head_epoch, geometry, head_root, space,
        ))
    }

    /// A session on a connection past its welcome, for one disk of
    /// `geometry` whose head root (if any) is `head_root`.
    fn assemble(
        connection: Connection<S>,
        config: &AgentConfig,
        nonce: [u8; blockrep_proto::NONCE_LEN],
        head_epoch: u64,
        geometry: Geometry,
        head_root: Option<Root>,
        space: IdSpace,
    ) -> Self {
        let head_ids = head_root
            .is_none()
            .then(|| vec![ChunkId::ZERO; geometry.chunk_count() as usize]);
        Self {
            final_epoch: false,
            cutover_requested: false,
            cutover_ready: None,
            connection,
            geometry,
            head_epoch,
            head_ids,
            head_root,
            nonce,
            ack_log: config.ack_log.clone(),
            patches: config.patches,
            capture: config.capture.clone(),
            step_roots: Vec::new(),
            machine_step: None,
            volume_of_machine: false,
            deferred: None,
            space,
        }
    }

    /// A session of a machine's volumes on a connection past its
    /// `MachineWelcome`: `geometry` and `head_root` are the first volume's;
    /// the machine swaps in the others' ([`Session::swap_volume`]).
    pub(crate) fn for_machine(
        connection: Connection<S>,
        config: &AgentConfig,
        nonce: [u8; blockrep_proto::NONCE_LEN],
        head_epoch: u64,
        geometry: Geometry,
        head_root: Option<Root>,
        space: IdSpace,
    ) -> Self {
        let mut session = Self::assemble(
            connection, config, nonce, head_epoch, geometry, head_root, space,
        );
        // A machine in capture mode sends one report for all its disks
        // before its commit (`crate::machine`), not one per volume.
        session.capture = None;
        session.volume_of_machine = true;
        session
    }

    /// Swaps the volume this session works on with the one in `volume`
    /// (geometry, head root and the head's ids where known).
    pub(crate) fn swap_volume(&mut self, volume: &mut VolumeHead) {
        std::mem::swap(&mut self.geometry, &mut volume.geometry);
        std::mem::swap(&mut self.head_ids, &mut volume.head_ids);
        std::mem::swap(&mut self.head_root, &mut volume.head_root);
    }

    /// The ids the last epoch of a machine's volume ended with.
    pub(crate) fn take_deferred(&mut self) -> Option<Vec<ChunkId>> {
        self.deferred.take()
    }

    /// The connection, for the machine's own frames.
    pub(crate) fn connection(&mut self) -> &mut Connection<S> {
        &mut self.connection
    }

    /// After a machine's commit: the head epoch of every volume.
    pub(crate) fn set_head_epoch(&mut self, epoch: u64) {
        self.head_epoch = epoch;
    }

    /// The head epoch.
    pub(crate) fn head_epoch(&self) -> u64 {
        self.head_epoch
    }

    /// A `Chunk` frame that refers to a chunk of this source's own: one its
    /// replica names, or one sent with its data earlier in this session. The
    /// server checks no proof for those (it has the bytes from this agent), so
    /// the proof field is left zero.
    fn reference(&self, index: u64, id: &ChunkId) -> Bytes {
        let raw_len = self
            .geometry
            .chunk_len(index)
            .expect("changed chunks lie on the disk");
        let proof = [0u8; REF_PROOF_LEN];
        let mut frame = Vec::with_capacity(CHUNK_HEADER_LEN + REF_PROOF_LEN);
        frame.extend_from_slice(&chunk_header(index, id, Codec::Ref, raw_len, &proof));
        frame.extend_from_slice(&proof);
        Bytes::from(frame)
    }

    /// Sends the agent's side of the cutover downtime.
    pub(crate) async fn report_cutover(
        &mut self,
        report: &crate::CutoverReport,
    ) -> Result<(), Error> {
        self.connection
            .send(&Message::CutoverReport {
                hook_ms: report.hook.as_millis() as u64,
                scan_ms: report.scan.as_millis() as u64,
                transfer_ms: report.transfer.as_millis() as u64,
                total_ms: report.downtime.as_millis() as u64,
            })
            .await?;
        self.connection.flush().await
    }

    /// The connection, for a session that leaves the replication protocol
    /// (failback) after `Welcome`.
    pub(crate) fn into_connection(self) -> Connection<S> {
        self.connection
    }

    /// Ends the session cleanly.
    pub(crate) async fn close(self) {
        self.connection.close().await;
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Where the source's chunk ids live.
    pub(crate) fn space(&self) -> IdSpace {
        self.space
    }

    /// Whether this session's next epoch may hash chunks as it sends them,
    /// without a scan first: a first sync (no head to compare with) of one
    /// disk read by a scan, whose source has no tenant (whose other sources'
    /// chunks an `Offer` of the scan's ids would find).
    fn streams(&self, config: &AgentConfig) -> bool {
        self.head_root.is_none()
            && self.capture.is_none()
            && !self.volume_of_machine
            && self.machine_step.is_none()
            && !self.final_epoch
            && !names_tenant(&config.cert_path)
    }

    /// The server's committed root id, if any.
    pub(crate) fn head_root_id(&self) -> Option<ChunkId> {
        self.head_root.as_ref().map(Root::id)
    }

    /// Chunks of `scan` that differ from the server's head. The first time, only
    /// the index pages whose ids differ are fetched from the server.
    async fn changed(&mut self, scan: &Scan) -> Result<Vec<u64>, Error> {
        if let Some(head_ids) = &self.head_ids {
            return changed_chunks(head_ids, &scan.ids, 0).map_err(diff_error);
        }
        let head_root = self
            .head_root
            .as_ref()
            .expect("head root known when ids are not");
        let mine = Root::from_chunk_ids(self.geometry, &scan.ids);
        let pages = changed_pages(head_root, &mine).map_err(diff_error)?;
        let mut head_ids = scan.ids.clone();
        self.fetch_pages(&pages, &mut head_ids).await?;
        let changed = changed_chunks(&head_ids, &scan.ids, 0).map_err(diff_error)?;
        self.head_ids = Some(head_ids);
        Ok(changed)
    }

    /// Fills `head_ids` from the head's index pages `pages`, checked against
    /// the head root.
    async fn fetch_pages(
        &mut self,
        pages: &[usize],
        head_ids: &mut [ChunkId],
    ) -> Result<(), Error> {
        let Some(head_root) = self.head_root.as_ref() else {
            return Ok(()); // no head: no pages
        };
        fetch_pages(
            &mut self.connection,
            head_root,
            PagesOf::Head,
            pages,
            head_ids,
        )
        .await
    }

    /// The head's every chunk id (zeros without a head), fetched page by page
    /// the first time: capture mode knows what changed without scanning, so
    /// it needs the ids of the rest from the server.
    pub(crate) async fn head_ids(&mut self) -> Result<Vec<ChunkId>, Error> {
        if let Some(ids) = &self.head_ids {
            return Ok(ids.clone());
        }
        let pages = self
            .head_root
            .as_ref()
            .map_or(0, |root| root.page_ids().len());
        let all: Vec<usize> = (0..pages).collect();
        let mut ids = vec![ChunkId::ZERO; self.geometry.chunk_count() as usize];
        self.fetch_pages(&all, &mut ids).await?;
        self.head_ids = Some(ids.clone());
        Ok(ids)
    }

    /// Asks which of `ids` the server already holds (pipelined `Offer`s, then
    /// their `Have`s in order).
    async fn offer(&mut self, ids: &[ChunkId]) -> Result<HashSet<ChunkId>, Error> {
        let batches: Vec<&[ChunkId]> = ids.chunks(OFFER_IDS_MAX).collect();
        for batch in &batches {
            self.connection
                .send(&Message::Offer {
                    ids: batch.to_vec(),
                })
                .await?;
        }
        self.connection.flush().await?;
        let mut held = HashSet::new();
        for batch in &batches {
            let Message::Have { bits } = self.connection.recv().await? else {
                return Err(Error::Protocol("expected Have".into()));
            };
            if bits.len() != batch.len().div_ceil(8) {
                return Err(Error::Protocol("Have does not match its Offer".into()));
            }
            for (i, id) in batch.iter().enumerate() {
                if bits[i / 8] & (1 << (i % 8)) != 0 {
                    held.insert(*id);
                }
            }
        }
        Ok(held)
    }

    /// Commits `view` (the head plus what was sent so far) labelled
    /// `consistency`, and waits for the server to make it durable.
    async fn commit(
        &mut self,
        epoch: u64,
        view: &[ChunkId],
        scan_started_unix_ms: u64,
        complete: bool,
        consistency: Consistency,
    ) -> Result<(ChunkId, u64, u64, u64), Error> {
        let (root, _) = Root::build(self.geometry, view);
        // A machine's intermediate commit names the machine's root.
        let root_id = match &self.machine_step {
            Some(step) => step.root_with(root.id())?,
            None => root.id(),
        };
        let last = complete && self.final_epoch;
        let mut bytes = 0;
        if let Some(capture) = self.capture.as_ref().filter(|_| complete) {
            let stats = capture.stats();
            bytes += self
                .connection
                .send(&Message::Capture {
                    dirty_bytes: stats.dirty_bytes,
                    preserved_bytes: stats.preserved_bytes,
                    cuts: stats.cuts,
                    writes: stats.writes,
                    write_p50_us: stats.write_p50_us,
                    write_p99_us: stats.write_p99_us,
                })
                .await?;
        }
        bytes += self
            .connection
            .send(&Message::Commit {
                epoch,
                root: root_id,
                scan_started_unix_ms,
                complete,
                last,
                consistency,
            })
            .await?;
        self.connection.flush().await?;
        let (committed_epoch, committed, chunks_received, chunks_stored) =
            match self.connection.recv().await? {
                Message::Committed {
                    epoch,
                    root,
                    chunks_received,
                    chunks_stored,
                    cutover_requested,
                    ..
                } if !last => {
                    self.cutover_requested |= cutover_requested;
                    (epoch, root, chunks_received, chunks_stored)
                }
                Message::CutoverReady {
                    epoch,
                    root,
                    snapshot,
                    launch,
                    commit_ms,
                    launch_ms,
                } if last => {
                    self.cutover_ready = Some(CutoverReady {
                        snapshot,
                        launch,
                        commit_ms,
                        launch_ms,
                    });
                    (epoch, root, 0, 0)
                }
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {} in answer to Commit",
                        other.name()
                    )));
                }
            };
        if committed_epoch != epoch || committed != root_id {
            return Err(Error::Protocol(format!(
                "server committed epoch {committed_epoch} root {committed}, expected epoch {epoch} root {root_id}"
            )));
        }
        if let Some(log) = &self.ack_log {
            log.record(epoch, &root_id, complete, scan_started_unix_ms);
        }
        if !complete {
            self.step_roots.push(root_id);
        }
        if let Some(step) = &self.machine_step {
            // The server starts its next epoch at the first volume: the
            // rest of this one's frames are about the current volume.
            // At most VOLUMES_MAX volumes: the index fits.
            let index = step.current as u16;
            self.connection
                .send(&Message::SelectVolume { index })
                .await?;
        }
        self.head_epoch = epoch;
        self.head_ids = Some(view.to_vec());
        self.head_root = Some(root);
        Ok((committed, chunks_received, chunks_stored, bytes))
    }

    /// Sends what differs between `scan` and the head, and commits it (in steps
    /// when there is much to send). Returns `None` when the replica already equals
    /// the scan and `commit_unchanged` is false.
    pub(crate) async fn epoch(
        &mut self,
        config: &AgentConfig,
        scan: Scan,
        commit_unchanged: bool,
    ) -> Result<Option<EpochReport>, Error> {
        // A first sync hashes each chunk as it sends it; any other epoch
        // compares the scan's ids with the head's first.
        let streaming = scan.pending && self.streams(config);
        let scan = if streaming {
            scan
        } else {
            scan.hashed().await?
        };
        let scan = scan.into_space(self.space)?;
        if scan.geometry != self.geometry {
            return Err(Error::DiskChanged(format!(
                "{} is now {} bytes, the replica has {}: a resized disk needs a new source id",
                config.disk.display(),
                scan.geometry.disk_size_bytes(),
                self.geometry.disk_size_bytes()
            )));
        }
        let transfer_started = Instant::now();
        let changed = if streaming {
            (0..self.geometry.chunk_count()).collect()
        } else {
            self.changed(&scan).await?
        };
        if changed.is_empty() && !commit_unchanged && self.head_root.is_some() {
            return Ok(None);
        }
        let bytes_pending: u64 = changed
            .iter()
            .filter_map(|&i| self.geometry.chunk_len(i))
            .map(u64::from)
            .sum();
        self.connection
            .send(&Message::Backlog {
                scan_started_unix_ms: scan.started_unix_ms,
                chunks_pending: changed.len() as u64,
                bytes_pending,
            })
            .await?;
        let mut report = EpochReport::nothing_yet(self.head_epoch, scan.duration, scan.consistency);
        if changed.is_empty() && self.head_root.is_some() {
            // Idle: the server acknowledges without writing; the epoch stays.
            let view = self.head_ids.clone().unwrap_or_default();
            if self.volume_of_machine {
                self.deferred = Some(view);
                report.transfer_duration = transfer_started.elapsed();
                return Ok(Some(report));
            }
            let (root, ..) = self
                .commit(
                    self.head_epoch,
                    &view,
                    scan.started_unix_ms,
                    true,
                    scan.consistency,
                )
                .await?;
            report.root = root;
            report.transfer_duration = transfer_started.elapsed();
            return Ok(Some(report));
        }

        // Chunks the server admits to holding for this source (or its tenant)
        // travel as references. Streaming, nothing is offered: the source has
        // no head, and no tenant whose other sources' chunks it could
        // reference (and the scan has no ids yet).
        let offered: Vec<ChunkId> = if streaming {
            Vec::new()
        } else {
            let mut seen = HashSet::new();
            changed
                .iter()
                .map(|&i| scan.ids[i as usize])
                .filter(|id| !id.is_zero() && seen.insert(*id))
                .collect()
        };
        let held = if offered.is_empty() {
            HashSet::new()
        } else {
            self.offer(&offered).await?
        };
        let mut view = self
            .head_ids
            .clone()
            .expect("head ids are known after the diff");
        // A held chunk the replica already names is the source's own: the
        // server asks no proof for it, so it travels as a reference without
        // being read. The others (the tenant's) are read too: their reference
        // carries the proof that this agent holds the bytes, and a chunk that
        // changed since the scan is sent as data instead.
        let own: HashSet<ChunkId> = view
            .iter()
            .filter(|id| held.contains(id))
            .copied()
            .collect();
        let changed = if own.is_empty() {
            changed
        } else {
            let mut to_encode = Vec::with_capacity(changed.len());
            for &index in &changed {
                let id = scan.ids[index as usize];
                if id.is_zero() || !own.contains(&id) {
                    to_encode.push(index);
                    continue;
                }
                let frame = self.reference(index, &id);
                config.rate_limiter.acquire(frame.len() as u64).await;
                self.connection.write_raw(&frame).await?;
                report.bytes_sent += frame.len() as u64;
                report.ref_chunks_sent += 1;
                view[index as usize] = id;
            }
            to_encode
        };
        let changed_count = changed.len() as u64;
        // The bases' values are asked for now and read while frames go out.
        // A capture cut knows what was written since the head: its patches
        // need no block values.
        let written_known = scan.disk.capture_cut().is_some_and(|cut| !cut.full());
        let mut fetch = if self.patches && written_known {
            crate::patch::BaseFetch::known(&view, &changed)
        } else {
            crate::patch::BaseFetch::new(&view, &changed, self.patches)
        };
        fetch.ask(&mut self.connection).await?;
        let references = References {
            held: Arc::new(held),
            nonce: self.nonce,
            space: self.space,
        };
        debug!(
            changed = changed.len(),
            held = references.held.len(),
            "sending"
        );
        let progress = progress_bar(config, bytes_pending);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (mut frames, pool) = spawn_encoders(
            Arc::clone(&scan.disk),
            self.geometry,
            Arc::new(changed),
            config.compression,
            Arc::clone(&config.adaptive),
            references,
            fetch.bases(),
        );
        let mut sent_ids: HashSet<ChunkId> = HashSet::new();
        let mut step_bytes = 0u64;
        let mut step_started = Instant::now();
        let mut stored = (0u64, 0u64);
        // What is left to read: a streamed first sync tells the server again
        // at each step (its first `Backlog` had to count every chunk).
        let mut left = (changed_count, bytes_pending);
        while let Some(encoded) = fetch.next_frame(&mut self.connection, &mut frames).await? {
            let mut encoded = encoded?;
            let chunk_len = u64::from(self.geometry.chunk_len(encoded.index).unwrap_or(0));
            left = (left.0.saturating_sub(1), left.1.saturating_sub(chunk_len));
            if streaming && encoded.id.is_zero() {
                // Zero where the replica is zero too: nothing to send.
                if let Some(bar) = &progress {
                    bar.inc(chunk_len);
                }
                continue;
            }
            view[encoded.index as usize] = encoded.id;
            let frame = if encoded.id.is_zero() {
                report.zero_chunks_sent += 1;
                encoded.frame
            } else if encoded.reference {
                report.ref_chunks_sent += 1;
                encoded.frame
            } else if !sent_ids.insert(encoded.id) {
                // A duplicate of a chunk sent earlier in this epoch: a reference
                // does, and the data's buffer serves the next chunk.
                report.ref_chunks_sent += 1;
                pool.give(std::mem::take(&mut encoded.frame));
                self.reference(encoded.index, &encoded.id)
            } else if encoded.patch {
                report.patches_sent += 1;
                report.compressed_chunks_sent += u64::from(encoded.compressed);
                report.patch_bytes_sent += encoded.frame.len() as u64;
                report.raw_bytes_sent += encoded.raw_len;
                encoded.frame
            } else {
                report.chunks_sent += 1;
                report.compressed_chunks_sent += u64::from(encoded.compressed);
                report.raw_bytes_sent += encoded.raw_len;
                encoded.frame
            };
            // The link's speed as the sender sees it: throttling included, time
            // spent waiting for the workers excluded.
            let write_started = Instant::now();
            config.rate_limiter.acquire(frame.len() as u64).await;
            report.bytes_sent += frame.len() as u64;
            step_bytes += frame.len() as u64;
            self.connection.write_raw(&frame).await?;
            config.adaptive.record_write(
                frame.len(),
                encoded.raw_len,
                write_started.elapsed(),
                workers,
            );
            pool.give(frame);
            if let Some(bar) = &progress {
                bar.inc(chunk_len);
            }
            // The final epoch of a cutover commits once: the application is down.
            let step_due =
                step_bytes >= config.step_bytes || step_started.elapsed() >= config.step_interval;
            let may_step = !self.volume_of_machine || self.machine_step.is_some();
            if step_due && !self.final_epoch && may_step {
                // An intermediate commit of a large epoch: a crash loses one step.
                // It mixes the head with part of the scan, so it is never more
                // than live, whatever view the scan read.
                fetch.finish(&mut self.connection).await?;
                let (_, received, new, bytes) = self
                    .commit(
                        self.head_epoch + 1,
                        &view,
                        scan.started_unix_ms,
                        false,
                        Consistency::Live,
                    )
                    .await?;
                report.bytes_sent += bytes;
                // The server's counts: summed without trusting their size.
                stored.0 = stored.0.saturating_add(received);
                stored.1 = stored.1.saturating_add(new);
                if streaming {
                    let (chunks_pending, bytes_pending) = left;
                    let backlog = Message::Backlog {
                        scan_started_unix_ms: scan.started_unix_ms,
                        chunks_pending,
                        bytes_pending,
                    };
                    report.bytes_sent += self.connection.send(&backlog).await?;
                }
                step_bytes = 0;
                step_started = Instant::now();
            }
        }
        if let Some(bar) = progress {
            bar.finish_and_clear();
        }
        fetch.finish(&mut self.connection).await?;
        report.bytes_sent += fetch.bytes_sent;
        report.block_values_bytes_received = fetch.values_bytes_received;
        // A cut's label is read only now: it falls to live if a write could
        // not be preserved while the epoch was sent.
        let consistency = scan.disk.consistency_now(scan.consistency);
        report.consistency = consistency;
        if self.volume_of_machine {
            self.deferred = Some(view);
            report.transfer_duration = transfer_started.elapsed();
            return Ok(Some(report));
        }
        let (root, received, new, bytes) = self
            .commit(
                self.head_epoch + 1,
                &view,
                scan.started_unix_ms,
                true,
                consistency,
            )
            .await?;
        report.bytes_sent += bytes;
        report.epoch = self.head_epoch;
        report.root = root;
        report.server_chunks_received = stored.0.saturating_add(received);
        report.server_chunks_stored = stored.1.saturating_add(new);
        report.transfer_duration = transfer_started.elapsed();
        report.note_compression(config);
        Ok(Some(report))
    }
}

/// A diff between the server's head and the scan that cannot be made: the
/// head's geometry is the server's word, so a mismatch is its protocol error.
fn diff_error(error: blockrep_core::Error) -> Error {
    Error::Protocol(format!("the server's head does not fit the disk: {error}"))
}

//! One session with the server: connect, learn the head, then run epochs.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockrep_core::{
    CHUNKS_PER_PAGE, ChunkId, DiskImage, Geometry, Page, Root, changed_chunks, changed_pages,
    scan_buffer,
};
use blockrep_proto::{GET_PAGES_MAX, Message, PROTOCOL_VERSION};
use tracing::debug;

use crate::connection::Connection;
use crate::send::spawn_encoders;
use crate::{AgentConfig, EpochReport, Error};

/// A scan of the disk.
pub(crate) struct Scan {
    pub disk: Arc<DiskImage>,
    pub geometry: Geometry,
    pub ids: Vec<ChunkId>,
    pub started_unix_ms: u64,
    pub duration: Duration,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Opens the disk afresh (a replaced file or a resized disk is seen) and scans it.
pub(crate) async fn scan(config: &AgentConfig, chunk_size_bytes: u32) -> Result<Scan, Error> {
    let path = config.disk.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let started_unix_ms = now_unix_ms();
        let disk = DiskImage::open(&path)?;
        let geometry = Geometry::new(disk.size_bytes(), chunk_size_bytes)?;
        let ids = scan_buffer(disk.bytes(), geometry);
        if disk.current_size_bytes()? != disk.size_bytes() {
            return Err(Error::DiskChanged(format!(
                "{} changed size while it was scanned",
                path.display()
            )));
        }
        Ok(Scan {
            disk: Arc::new(disk),
            geometry,
            ids,
            started_unix_ms,
            duration: started.elapsed(),
        })
    })
    .await
    .map_err(|e| Error::Protocol(format!("scan task failed: {e}")))?
}

/// A connected session that knows the server's committed head.
pub(crate) struct Session {
    connection: Connection,
    geometry: Geometry,
    head_epoch: u64,
    /// The server's committed chunk ids, where known; `None` until learned.
    head_ids: Option<Vec<ChunkId>>,
    head_root: Option<Root>,
}

impl Session {
    /// Connects and says `Hello` for a disk of this geometry.
    pub(crate) async fn open(config: &AgentConfig, geometry: Geometry) -> Result<Self, Error> {
        let mut connection = Connection::connect(config).await?;
        connection
            .send(&Message::Hello {
                version_min: PROTOCOL_VERSION,
                version_max: PROTOCOL_VERSION,
                source: config.source.clone(),
                disk_size_bytes: geometry.disk_size_bytes(),
                chunk_size_bytes: geometry.chunk_size_bytes(),
            })
            .await?;
        connection.flush().await?;
        let (head_epoch, head_root) = match connection.recv().await {
            Ok(Message::Welcome {
                head_epoch,
                head_root,
                ..
            }) => (head_epoch, head_root),
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "expected Welcome, got {}",
                    other.name()
                )));
            }
            Err(Error::Lost(reason)) => {
                return Err(Error::Lost(format!(
                    "server closed the session before Welcome ({reason}); a certificate the server \
                     does not accept is reported this way"
                )));
            }
            Err(e) => return Err(e),
        };
        let head_root = if head_epoch == 0 {
            None
        } else {
            let root =
                Root::decode(&head_root).map_err(|e| Error::Protocol(format!("head root: {e}")))?;
            if root.geometry() != geometry {
                return Err(Error::Protocol(
                    "server sent a head of another geometry".into(),
                ));
            }
            Some(root)
        };
        let head_ids = head_root
            .is_none()
            .then(|| vec![ChunkId::ZERO; geometry.chunk_count() as usize]);
        Ok(Self {
            connection,
            geometry,
            head_epoch,
            head_ids,
            head_root,
        })
    }

    /// Ends the session cleanly.
    pub(crate) async fn close(self) {
        self.connection.close().await;
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The server's committed root id, if any.
    pub(crate) fn head_root_id(&self) -> Option<ChunkId> {
        self.head_root.as_ref().map(Root::id)
    }

    /// Chunks of `scan` that differ from the server's head. The first time, only
    /// the index pages whose ids differ are fetched from the server.
    async fn changed(&mut self, scan: &Scan) -> Result<Vec<u64>, Error> {
        if let Some(head_ids) = &self.head_ids {
            return Ok(changed_chunks(head_ids, &scan.ids, 0));
        }
        let head_root = self
            .head_root
            .as_ref()
            .expect("head root known when ids are not");
        let mine = Root::from_chunk_ids(self.geometry, &scan.ids);
        let pages = changed_pages(head_root, &mine);
        let mut head_ids = scan.ids.clone();
        for batch in pages.chunks(GET_PAGES_MAX) {
            let indices = batch.iter().map(|&p| p as u32).collect();
            self.connection.send(&Message::GetPages { indices }).await?;
            self.connection.flush().await?;
            for &page_index in batch {
                let Message::Page { index, ids } = self.connection.recv().await? else {
                    return Err(Error::Protocol("expected Page".into()));
                };
                if index as usize != page_index {
                    return Err(Error::Protocol(format!(
                        "asked for page {page_index}, got {index}"
                    )));
                }
                let page = Page::decode(&ids, head_root.page_len(page_index))
                    .map_err(|e| Error::Protocol(format!("page {index}: {e}")))?;
                if page.id() != head_root.page_ids()[page_index] {
                    return Err(Error::Protocol(format!(
                        "page {index} does not match the head root"
                    )));
                }
                let start = page_index * CHUNKS_PER_PAGE;
                head_ids[start..start + page.ids().len()].copy_from_slice(page.ids());
            }
        }
        let changed = changed_chunks(&head_ids, &scan.ids, 0);
        self.head_ids = Some(head_ids);
        Ok(changed)
    }

    /// Sends what differs between `scan` and the head, and commits it. Returns
    /// `None` when the replica already equals the scan and `commit_unchanged` is false.
    pub(crate) async fn epoch(
        &mut self,
        config: &AgentConfig,
        scan: Scan,
        commit_unchanged: bool,
    ) -> Result<Option<EpochReport>, Error> {
        if scan.geometry != self.geometry {
            return Err(Error::DiskChanged(format!(
                "{} is now {} bytes, the replica has {}: a resized disk needs a new source id",
                config.disk.display(),
                scan.geometry.disk_size_bytes(),
                self.geometry.disk_size_bytes()
            )));
        }
        let transfer_started = Instant::now();
        let changed = self.changed(&scan).await?;
        if changed.is_empty() && !commit_unchanged && self.head_root.is_some() {
            return Ok(None);
        }
        let mut ids = scan.ids;
        let mut report = EpochReport {
            epoch: self.head_epoch + 1,
            root: ChunkId::ZERO,
            chunks_sent: 0,
            zero_chunks_sent: 0,
            bytes_sent: 0,
            raw_bytes_sent: 0,
            server_chunks_received: 0,
            server_chunks_stored: 0,
            scan_duration: scan.duration,
            transfer_duration: Duration::ZERO,
        };
        debug!(epoch = report.epoch, changed = changed.len(), "sending");
        let mut frames = spawn_encoders(
            Arc::clone(&scan.disk),
            self.geometry,
            Arc::new(changed),
            config.compression,
        );
        while let Some(encoded) = frames.recv().await {
            ids[encoded.index as usize] = encoded.id;
            if encoded.id.is_zero() {
                report.zero_chunks_sent += 1;
            } else {
                report.chunks_sent += 1;
                report.raw_bytes_sent += encoded.raw_len;
            }
            report.bytes_sent += encoded.frame.len() as u64;
            self.connection.write_raw(&encoded.frame).await?;
        }
        let (root, _) = Root::build(self.geometry, &ids);
        let root_id = root.id();
        report.bytes_sent += self
            .connection
            .send(&Message::Commit {
                epoch: report.epoch,
                root: root_id,
                scan_started_unix_ms: scan.started_unix_ms,
                last: false,
            })
            .await?;
        self.connection.flush().await?;
        let Message::Committed {
            epoch,
            root: committed,
            chunks_received,
            chunks_stored,
            ..
        } = self.connection.recv().await?
        else {
            return Err(Error::Protocol("expected Committed".into()));
        };
        if epoch != report.epoch || committed != root_id {
            return Err(Error::Protocol(format!(
                "server committed epoch {epoch} root {committed}, expected epoch {} root {root_id}",
                report.epoch
            )));
        }
        self.head_epoch = epoch;
        self.head_ids = Some(ids);
        self.head_root = Some(root);
        report.root = committed;
        report.server_chunks_received = chunks_received;
        report.server_chunks_stored = chunks_stored;
        report.transfer_duration = transfer_started.elapsed();
        Ok(Some(report))
    }
}

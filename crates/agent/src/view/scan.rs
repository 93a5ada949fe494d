//! A scan of one view of the disk: every chunk's id, hashed on every core,
//! and what the view's root may claim. What an epoch sends and a failback
//! compares starts from one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{ChunkId, Consistency, DiskImage, Geometry, IdSpace};

use super::View;
use crate::{AgentConfig, Error};

/// A scan of the disk.
pub(crate) struct Scan {
    /// What the epoch reads, the scan and the send alike: a frozen view where
    /// there is one, released once the last reader lets go of it.
    pub disk: Arc<View>,
    pub geometry: Geometry,
    pub ids: Vec<ChunkId>,
    pub started_unix_ms: u64,
    pub duration: Duration,
    /// How the scanned view was taken: what the committed root may claim.
    pub consistency: Consistency,
    /// The space `ids` are in: plain from a scan, the session's from a
    /// capture cut (built over the head's ids).
    pub space: IdSpace,
    /// The view is taken but not hashed yet: `ids` is empty. Every scan
    /// starts so: a first sync hashes each chunk as it sends it (one read,
    /// one hash), any other epoch completes it with [`Scan::hashed`].
    pub pending: bool,
}

impl Scan {
    /// Maps the ids into `space` (a source encrypted at rest names its
    /// chunks by stored ids) unless they are there already.
    pub(crate) fn into_space(mut self, space: IdSpace) -> Result<Self, Error> {
        if self.space == space {
            return Ok(self);
        }
        if self.space.is_keyed() {
            return Err(Error::Protocol(
                "a scan of one id space given to a session of another".into(),
            ));
        }
        space.map_all(&mut self.ids);
        self.space = space;
        Ok(self)
    }

    /// This scan with every chunk's id: hashed now if it was taken pending.
    pub(crate) async fn hashed(self) -> Result<Self, Error> {
        if !self.pending {
            return Ok(self);
        }
        let Scan {
            disk,
            geometry,
            started_unix_ms,
            duration,
            consistency,
            space,
            ..
        } = self;
        let scan = tokio::task::spawn_blocking(move || {
            hash_view(disk, geometry, started_unix_ms, duration, consistency)
        })
        .await
        .map_err(|e| Error::Protocol(format!("scan task failed: {e}")))??;
        scan.into_space(space)
    }

    /// The ids in `space` (copied and mapped when the scan is plain).
    pub(crate) fn ids_in(&self, space: IdSpace) -> std::borrow::Cow<'_, [ChunkId]> {
        if self.space == space {
            std::borrow::Cow::Borrowed(&self.ids)
        } else {
            let mut ids = self.ids.clone();
            space.map_all(&mut ids);
            std::borrow::Cow::Owned(ids)
        }
    }
}

/// Opens the disk afresh (a replaced file or a resized disk is seen) and scans it
/// live: no frozen view (failback, `--snapshot none`, or a disk that cannot
/// give one).
pub(crate) async fn scan_live(config: &AgentConfig, chunk_size_bytes: u32) -> Result<Scan, Error> {
    take_live(config, chunk_size_bytes).await?.hashed().await
}

/// [`scan_live`] without the hashing: a [`Scan::pending`].
pub(crate) async fn take_live(config: &AgentConfig, chunk_size_bytes: u32) -> Result<Scan, Error> {
    let path = config.disk.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let started_unix_ms = now_unix_ms();
        let disk = View::live(DiskImage::open(&path)?);
        pending_scan(
            disk,
            chunk_size_bytes,
            started,
            started_unix_ms,
            Consistency::Live,
        )
    })
    .await
    .map_err(|e| Error::Protocol(format!("scan task failed: {e}")))?
}

/// `disk`, a view taken at `started_unix_ms`, as a scan not hashed yet: a
/// [`Scan::pending`], which [`Scan::hashed`] completes.
pub(crate) fn pending_scan(
    disk: View,
    chunk_size_bytes: u32,
    started: Instant,
    started_unix_ms: u64,
    consistency: Consistency,
) -> Result<Scan, Error> {
    Ok(Scan {
        geometry: Geometry::new(disk.size_bytes(), chunk_size_bytes)?,
        disk: Arc::new(disk),
        ids: Vec::new(),
        started_unix_ms,
        duration: started.elapsed(),
        consistency,
        space: IdSpace::PLAIN,
        pending: true,
    })
}

/// Hashes every chunk of `disk` (blocking): the rest of a scan whose view
/// was taken `before` ago.
fn hash_view(
    disk: Arc<View>,
    geometry: Geometry,
    started_unix_ms: u64,
    before: Duration,
    consistency: Consistency,
) -> Result<Scan, Error> {
    let started = Instant::now();
    let path = disk.path().to_owned();
    let ids = disk.scan(geometry).map_err(|e| match e.kind() {
        blockrep_core::ErrorKind::DiskShrank => Error::DiskUnsteady(e.to_string()),
        _ => Error::Disk(e),
    })?;
    let size_after = disk.current_size_bytes()?;
    if size_after != disk.size_bytes() {
        return Err(Error::DiskUnsteady(format!(
            "{} changed size from {} to {size_after} bytes during the scan",
            path.display(),
            disk.size_bytes()
        )));
    }
    Ok(Scan {
        disk,
        geometry,
        ids,
        started_unix_ms,
        duration: before + started.elapsed(),
        consistency,
        space: IdSpace::PLAIN,
        pending: false,
    })
}

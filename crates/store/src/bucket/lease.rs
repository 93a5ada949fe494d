//! Sources served by one server at a time among those sharing a bucket.
//!
//! A server takes a source's lease (`leases/SOURCE`: holder, expiry,
//! generation, changed only by conditional writes) before it serves the
//! source, and renews it while it does. Taking it, the server first reads
//! again what others wrote meanwhile: the source's records, and the packs
//! published since. Then it *claims the head*: it writes the head record
//! again, unchanged, which gives it a new version. A server that lost the
//! lease (paused past its expiry, cut off) still knows only the old version,
//! so its late head write fails its condition: it can never replace a newer
//! head. Every commit also checks, before and after its uploads, that this
//! server's lease has not lapsed.

use std::sync::Arc;

use blockrep_core::SourceId;
use blockrep_objects::LeaseRecord;

use super::{BucketRecords, bucket_error};
use crate::error::{Error, ErrorKind};
use crate::store::Store;
use crate::vfs::RealFs;

/// Times a claim is retried when another server wrote the head between this
/// server's read of it and its claim.
const CLAIM_ATTEMPTS: usize = 3;

impl Store {
    /// For a store in a bucket: makes this server (`holder`) the one serving
    /// `source` until `now_unix_ms + ttl_ms`, as the module says, and returns
    /// the lease. A lease still held is kept (renewals extend it). Fails with
    /// [`ErrorKind::Leased`] naming the holder when another server holds it.
    /// `None` for a local store, which needs no lease.
    pub fn claim_source(
        &self,
        source: &SourceId,
        holder: &str,
        ttl_ms: u64,
        now_unix_ms: u64,
    ) -> Result<Option<LeaseRecord>, Error> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        if let Some(record) = remote.lease(source)
            && record.expires_unix_ms > now_unix_ms
        {
            return Ok(Some(record));
        }
        remote.drop_lease(source);
        let lease = remote
            .bucket
            .take_lease(source.as_str(), holder, ttl_ms, now_unix_ms)
            .map_err(|e| match e {
                blockrep_objects::Error::Held { .. } => {
                    Error::new(ErrorKind::Leased, format!("source {e}"))
                }
                e => bucket_error(format!("cannot take the lease of {source}"), e),
            })?;
        let records = BucketRecords::new(
            Arc::new(RealFs),
            self.data_dir().to_owned(),
            Arc::clone(remote),
        );
        let dir = format!("sources/{}", source.as_str());
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.blobs.refresh()?;
            records.restore_under(&dir)?;
            if !self.source_dir(source).join("head").exists() {
                break;
            }
            match records.republish(&format!("{dir}/head")) {
                Ok(()) => break,
                Err(e) if attempt < CLAIM_ATTEMPTS => {
                    tracing_retry(source, &e);
                }
                Err(e) => {
                    return Err(Error::io(format!("cannot claim the head of {source}"), e));
                }
            }
        }
        let record = lease.record().clone();
        remote.keep_lease(source, lease);
        Ok(Some(record))
    }

    /// Renews every lease this server holds until `now_unix_ms + ttl_ms`.
    /// Returns the sources whose lease is lost (another server took it, or
    /// the bucket refused), with why; they are no longer held.
    pub fn renew_leases(&self, ttl_ms: u64, now_unix_ms: u64) -> Vec<(SourceId, Error)> {
        let Some(remote) = &self.remote else {
            return Vec::new();
        };
        let mut lost = Vec::new();
        for (source, _) in remote.leases() {
            let Some(lease) = remote.drop_lease(&source) else {
                continue;
            };
            match remote.bucket.renew_lease(lease, ttl_ms, now_unix_ms) {
                Ok(lease) => remote.keep_lease(&source, lease),
                Err(e) => {
                    let why = bucket_error(format!("the lease of {source} is lost"), e);
                    lost.push((source, why));
                }
            }
        }
        lost
    }

    /// Gives up every lease this server holds (a clean stop), so that another
    /// server may take its sources at once rather than after expiry.
    pub fn release_leases(&self) -> Result<(), Error> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        for (source, _) in remote.leases() {
            if let Some(lease) = remote.drop_lease(&source) {
                remote.bucket.release_lease(lease).map_err(|e| {
                    bucket_error(format!("cannot release the lease of {source}"), e)
                })?;
            }
        }
        Ok(())
    }

    /// The leases this server holds, by source.
    pub fn leases(&self) -> Vec<(SourceId, LeaseRecord)> {
        self.remote
            .as_ref()
            .map_or_else(Vec::new, |remote| remote.leases())
    }
}

fn tracing_retry(source: &SourceId, e: &std::io::Error) {
    eprintln!("blockrep-store: claiming the head of {source} again: {e}");
}

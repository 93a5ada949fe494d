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
use crate::remote::{GC_LEASE, PRESENCE_PREFIX};
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
        let _one = crate::mutex::lock(&remote.claiming);
        if let Some(record) = remote.lease(source)
            && record.expires_unix_ms > now_unix_ms
        {
            return Ok(Some(record));
        }
        remote.drop_lease(source.as_str());
        // No session starts beside another server's collection: its sweep
        // does not see this server's open epochs.
        let collecting = remote
            .bucket
            .read_leases(GC_LEASE.split('/').next().unwrap_or_default())
            .map_err(|e| bucket_error("cannot read the collection lease", e))?
            .into_iter()
            .map(|(_, lease)| lease)
            .find(|l| l.holder != holder && l.expires_unix_ms > now_unix_ms);
        if let Some(gc) = collecting {
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "server {} is collecting garbage in this bucket (lease until {} unix ms)",
                    gc.holder, gc.expires_unix_ms
                ),
            ));
        }
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
            // The records first, then the packs: a record is published only
            // once the packs it names are, so a listing made after the
            // records holds every pack they name (a late commit of the
            // previous holder included).
            records.restore_under(&dir)?;
            self.blobs.refresh()?;
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
        remote.keep_lease(source.as_str(), lease);
        Ok(Some(record))
    }

    /// Renews every lease this server holds (its sources' and its presence)
    /// until `now_unix_ms + ttl_ms`. Returns the leases lost (another server
    /// took them, or the bucket refused), by name, with why; they are no
    /// longer held.
    pub fn renew_leases(&self, ttl_ms: u64, now_unix_ms: u64) -> Vec<(String, Error)> {
        let Some(remote) = &self.remote else {
            return Vec::new();
        };
        let mut lost = Vec::new();
        for (name, _) in remote.leases() {
            // Renewed from a copy: the lease stays held (and its expiry
            // checked) while the request runs.
            let Some(lease) = remote.held(&name) else {
                continue;
            };
            if lease.record().expires_unix_ms <= now_unix_ms {
                // Lapsed while this server was paused or cut off: though
                // nobody took it, a collection may have run without this
                // server, so its view of the packs is stale. Given up; the
                // next claim reads the bucket again, and without its
                // announcement this server publishes nothing until
                // `rejoin` has. Unless a claim took it again meanwhile.
                if !remote.replace_lease(&name, &lease, None) {
                    continue;
                }
                if name.starts_with(PRESENCE_PREFIX) {
                    self.unsettle(|unsettled| unsettled.rejoin = true);
                }
                let why = Error::new(
                    ErrorKind::Leased,
                    format!(
                        "the lease {name} lapsed at {} unix ms before it was renewed",
                        lease.record().expires_unix_ms
                    ),
                );
                lost.push((name, why));
                continue;
            }
            match remote
                .bucket
                .renew_lease(lease.clone(), ttl_ms, now_unix_ms)
            {
                Ok(renewed) => {
                    if !remote.replace_lease(&name, &lease, Some(renewed.clone()))
                        && remote.held(&name).is_none()
                    {
                        // Released or dropped while the renewal ran (a
                        // collection ended, the server stops, a claim is
                        // taking it again): a release found this write
                        // and was refused, so this write is released
                        // instead (a claim's take retries on the change).
                        // Best effort: it expires by itself.
                        let _ = remote.bucket.release_lease(renewed);
                    }
                }
                // Taken by another: lost for good, unless this server took
                // it again meanwhile (the refusal is its own claim's write).
                Err(
                    e @ (blockrep_objects::Error::Conflict(_)
                    | blockrep_objects::Error::Exists(_)
                    | blockrep_objects::Error::Held { .. }),
                ) => {
                    if remote.replace_lease(&name, &lease, None) {
                        let why = bucket_error(format!("the lease {name} is lost"), e);
                        lost.push((name, why));
                    }
                }
                // The bucket did not answer: kept, to be renewed at the next
                // tick; it lapses by its own expiry if the bucket stays away.
                Err(e) => {
                    let why = bucket_error(format!("cannot renew the lease {name}"), e);
                    eprintln!("blockrep-store: {why}");
                }
            }
        }
        lost
    }

    /// Announces this server (`holder`) among those sharing the bucket, until
    /// `now_unix_ms + ttl_ms` (renewed by [`Store::renew_leases`]): a
    /// collection waits for every server present to take part in its round
    /// (`round.rs`). Nothing for a local store.
    pub fn claim_presence(&self, holder: &str, ttl_ms: u64, now_unix_ms: u64) -> Result<(), Error> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let name = format!("{PRESENCE_PREFIX}{holder}");
        // Announced again (after a lapse): nothing is published until
        // `rejoin` has read the packs and the rounds.
        self.unsettle(|unsettled| {
            if unsettled.announced_as.is_some() {
                unsettled.rejoin = true;
            }
        });
        let lease = remote
            .bucket
            .take_lease(&name, holder, ttl_ms, now_unix_ms)
            .map_err(|e| bucket_error(format!("cannot announce {holder} in the bucket"), e))?;
        remote.keep_lease(&name, lease);
        self.unsettle(|unsettled| unsettled.announced_as = Some(holder.to_owned()));
        Ok(())
    }

    /// Takes the bucket's collection lease for `holder` and notes the other
    /// servers present, which the collection then brings in (`round.rs`):
    /// their open epochs and launches are fenced in their own memory.
    /// Returns those servers. Fails with `Busy` when another collection
    /// holds the lease. Nothing for a local store.
    pub fn claim_gc(
        &self,
        holder: &str,
        ttl_ms: u64,
        now_unix_ms: u64,
    ) -> Result<Vec<String>, Error> {
        let Some(remote) = &self.remote else {
            return Ok(Vec::new());
        };
        // Taking it again would start a new round under the one running:
        // its servers would take the old round for ended and drop their
        // fences.
        if remote.lease_named(GC_LEASE).is_some() || crate::mutex::lock(&remote.round).is_some() {
            return Err(Error::new(
                ErrorKind::Busy,
                "a collection of this server runs on this bucket already",
            ));
        }
        let lease = remote
            .bucket
            .take_lease(GC_LEASE, holder, ttl_ms, now_unix_ms)
            .map_err(|e| match e {
                blockrep_objects::Error::Held { .. } => Error::new(
                    ErrorKind::Busy,
                    format!("another collection runs on this bucket: {e}"),
                ),
                e => bucket_error("cannot take the collection lease", e),
            })?;
        let generation = lease.record().generation;
        remote.keep_lease(GC_LEASE, lease);
        let present = remote
            .bucket
            .read_leases(PRESENCE_PREFIX.trim_end_matches('/'))
            .map_err(|e| bucket_error("cannot list the servers of the bucket", e));
        let present = match present {
            Ok(present) => present,
            Err(e) => {
                self.release_gc();
                return Err(e);
            }
        };
        // A server whose presence lapsed less than a lease time ago may
        // still hold a source's lease taken just before: it is waited for
        // too (`round.rs`). One that stopped cleanly released it (expiry 0).
        let mut peers: Vec<String> = present
            .into_iter()
            .map(|(_, lease)| lease)
            .filter(|l| {
                l.holder != holder && l.expires_unix_ms.saturating_add(ttl_ms) > now_unix_ms
            })
            .map(|l| l.holder)
            .collect();
        peers.sort();
        peers.dedup();
        *crate::mutex::lock(&remote.round) = Some(crate::remote::Collecting {
            generation,
            holder: holder.to_owned(),
            peers: peers.clone(),
            ttl_ms,
            claimed_unix_ms: now_unix_ms,
            claimed_at: std::time::Instant::now(),
        });
        Ok(peers)
    }

    /// Gives up the collection lease, if held.
    pub fn release_gc(&self) {
        // A round not ended by its collection ends here, as aborted.
        self.close_round(false);
        if let Some(remote) = &self.remote
            && let Some(lease) = remote.drop_lease(GC_LEASE)
        {
            // An unreleased lease only delays the next collection until it expires.
            let _ = remote.bucket.release_lease(lease);
        }
    }

    /// Fails unless this store may collect now: always for a local store,
    /// for a bucket only under the collection lease ([`Store::claim_gc`]).
    pub(crate) fn check_gc_allowed(&self) -> Result<(), Error> {
        match &self.remote {
            Some(remote) if remote.lease_named(GC_LEASE).is_none() => Err(Error::new(
                ErrorKind::Busy,
                "a store in a bucket collects garbage only under the bucket's collection \
                 lease (claim_gc)",
            )),
            _ => Ok(()),
        }
    }

    /// Whether this server (`holder`) holds its presence in the bucket (true
    /// for a local store).
    pub fn is_announced(&self, holder: &str) -> bool {
        self.remote.as_ref().is_none_or(|remote| {
            remote
                .lease_named(&format!("{PRESENCE_PREFIX}{holder}"))
                .is_some()
        })
    }

    /// Reads the bucket's listing of packs again: packs other servers
    /// published, and packs a collection deleted (whose entries go).
    pub fn reload_packs(&self) -> Result<(), Error> {
        self.blobs.refresh()
    }

    /// After this server (`holder`) announced itself again (its announcement
    /// had lapsed): reads the bucket's packs again, and lets it publish
    /// unless another server's round is open, which did not count it in:
    /// then publishing waits until that round ended
    /// ([`Store::settle_round`]).
    pub fn rejoin(&self, holder: &str, now_unix_ms: u64) -> Result<(), Error> {
        if self.remote.is_none() {
            return Ok(());
        }
        // The round first, then the packs: a round that did not count this
        // server in and ends between the two reads has deleted its packs
        // before the listing, which then drops their entries. Read the
        // other way, its deletions would be missed while the round reads
        // as ended, and this server would publish names of deleted blobs.
        let open = self.gc_round()?.filter(|round| {
            round.holder != holder
                && matches!(
                    round.phase,
                    super::RoundPhase::Track | super::RoundPhase::Sweep
                )
        });
        self.blobs.refresh()?;
        self.unsettle(|unsettled| {
            unsettled.rejoin = false;
            if let Some(round) = &open {
                unsettled.round = Some(round.generation);
            }
        });
        if open.is_some() {
            // Lets it publish at once if that round ended meanwhile.
            self.settle_round(now_unix_ms)?;
        }
        Ok(())
    }

    /// Gives up every lease this server holds (a clean stop), so that another
    /// server may take its sources at once rather than after expiry. For
    /// good: a lease this store takes afterwards (a claim that was still
    /// running) is released as soon as it is taken.
    pub fn release_leases(&self) -> Result<(), Error> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        // Every lease is tried: one that cannot be released (a renewal's
        // write changed it) does not keep the others held. A claim still
        // running releases what it takes (`Remote::keep_lease`).
        let mut first_error = None;
        for (name, lease) in remote.release_all() {
            if let Err(e) = remote.bucket.release_lease(lease) {
                first_error.get_or_insert_with(|| {
                    bucket_error(format!("cannot release the lease {name}"), e)
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Every source's lease in the bucket as it reads now, whoever holds
    /// it (one GET per source); empty for a local store.
    pub fn bucket_leases(&self) -> Result<Vec<(SourceId, LeaseRecord)>, Error> {
        let Some(remote) = &self.remote else {
            return Ok(Vec::new());
        };
        Ok(remote
            .bucket
            .read_leases("")
            .map_err(|e| bucket_error("cannot read the leases of the bucket", e))?
            .into_iter()
            .filter_map(|(name, lease)| Some((SourceId::new(&name).ok()?, lease)))
            .collect())
    }

    /// Whether this server serves `source` at `now_unix_ms`: it holds the
    /// source's lease, not lapsed by its own clock. Always false for a
    /// local store, which has no leases.
    pub fn serves(&self, source: &SourceId, now_unix_ms: u64) -> bool {
        self.remote.as_ref().is_some_and(|remote| {
            remote
                .lease(source)
                .is_some_and(|lease| lease.expires_unix_ms > now_unix_ms)
        })
    }

    /// The sources' leases this server holds, by source.
    pub fn leases(&self) -> Vec<(SourceId, LeaseRecord)> {
        let Some(remote) = &self.remote else {
            return Vec::new();
        };
        remote
            .leases()
            .into_iter()
            .filter_map(|(name, record)| Some((SourceId::new(&name).ok()?, record)))
            .collect()
    }
}

fn tracing_retry(source: &SourceId, e: &std::io::Error) {
    eprintln!("blockrep-store: claiming the head of {source} again: {e}");
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;

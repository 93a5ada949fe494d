//! Sources of a store kept in a bucket shared by several servers: a session
//! starts only once this server holds the source's lease, and the leases
//! held are renewed while the server runs (see the store's `bucket/lease.rs`
//! for what taking one involves).

use std::sync::Arc;
use std::time::Duration;

use blockrep_core::SourceId;
use blockrep_core::clock::now_unix_ms;
use blockrep_proto::ErrorCode;
use tracing::{info, warn};

use crate::reject::Reject;
use crate::shared::Shared;
use crate::source_records::SourceRecords;

/// Makes this server the one serving `source`; a refusal tells the agent
/// to try its next server when another one holds the source.
pub(crate) async fn claim(shared: &Arc<Shared>, source: &SourceId) -> Result<(), Reject> {
    let Some(bucket) = &shared.config.bucket else {
        return Ok(());
    };
    let (store, claiming, holder) = (
        Arc::clone(&shared.store),
        source.clone(),
        bucket.holder.clone(),
    );
    let ttl_ms = bucket.lease_ttl.as_millis() as u64;
    let claimed = tokio::task::spawn_blocking(move || {
        let now = now_unix_ms();
        let held = store.serves(&claiming, now);
        let lease = store.claim_source(&claiming, &holder, ttl_ms, now)?;
        if held {
            // Served here all along: its figures here are the newest, and
            // a session of it may be changing them right now.
            return Ok((lease, None));
        }
        // What the source's records say now: another server may have
        // committed, cut it over or reset it since this one started.
        Ok::<_, blockrep_store::Error>((lease, Some(SourceRecords::read(&store, &claiming)?)))
    })
    .await
    .map_err(|e| Reject::new(ErrorCode::Internal, format!("lease task failed: {e}")))?;
    match claimed {
        Ok((Some(lease), Some(records))) => {
            info!(
                generation = lease.generation,
                expires_unix_ms = lease.expires_unix_ms,
                "serving the source under its lease"
            );
            // Not under a step being recorded here.
            let _serial = shared.migration_lock.lock().await;
            adopt(shared, source, records);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == blockrep_store::ErrorKind::Leased => {
            Err(Reject::new(ErrorCode::ServedElsewhere, e.to_string()))
        }
        Err(e) if e.kind() == blockrep_store::ErrorKind::Busy => {
            Err(Reject::new(ErrorCode::Busy, e.to_string()))
        }
        Err(e) => Err(Reject::new(
            ErrorCode::Internal,
            format!("cannot take the source's lease: {e}"),
        )),
    }
}

/// Takes what the source's records say now into its figures here. The
/// caller holds the workflow's lock.
fn adopt(shared: &Shared, source: &SourceId, records: SourceRecords) {
    let now = now_unix_ms();
    shared
        .ledger
        .sources
        .update(source, |record| records.apply(record, now));
}

/// Before this server reports on sources: those another server serves, as
/// the bucket has them now (their records read again, as far as they
/// changed, and taken into their figures here). A bucket that does not
/// answer leaves them as they were, with a warning: a report must not fail
/// for it.
pub(crate) async fn refresh_elsewhere(shared: &Arc<Shared>) {
    if shared.config.bucket.is_none() {
        return;
    }
    let now = now_unix_ms();
    let elsewhere: Vec<SourceId> = shared.served_elsewhere(now).into_iter().collect();
    if elsewhere.is_empty() {
        return;
    }
    let store = Arc::clone(&shared.store);
    let read = tokio::task::spawn_blocking(move || {
        store.refresh_sources(&elsewhere, now)?;
        let mut read = Vec::with_capacity(elsewhere.len());
        for source in elsewhere {
            let records = SourceRecords::read(&store, &source)?;
            read.push((source, records));
        }
        Ok::<_, blockrep_store::Error>(read)
    })
    .await;
    match read {
        Ok(Ok(read)) => {
            let _serial = shared.migration_lock.lock().await;
            // A source this server took meanwhile has its own, newer figures
            // (taken under this lock when it took the lease).
            let still = shared.served_elsewhere(now_unix_ms());
            for (source, records) in read {
                if still.contains(&source) {
                    adopt(shared, &source, records);
                }
            }
        }
        Ok(Err(e)) => warn!(error = %e, "cannot read the records of sources served elsewhere"),
        Err(e) => warn!(error = %e, "reading the records of sources served elsewhere failed"),
    }
}

/// Renews the leases this server holds, three times per lease time, until
/// aborted. A lease that is lost is logged: the next session of that source
/// here finds it held elsewhere, and a late commit is refused.
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(bucket) = &shared.config.bucket else {
        return;
    };
    let ttl = bucket.lease_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = Arc::clone(&shared.store);
        let ttl_ms = ttl.as_millis() as u64;
        let renewed = tokio::task::spawn_blocking(move || {
            let lost = store.renew_leases(ttl_ms, now_unix_ms());
            (lost, store.bucket_leases())
        })
        .await;
        let Ok((lost, read)) = renewed else {
            continue;
        };
        for (name, why) in &lost {
            warn!(lease = %name, error = %why, "lease lost: another server took it");
        }
        if !shared.store.is_announced(&bucket.holder) {
            // This server's announcement lapsed (a long pause) or could not
            // be made again: announce it, so that collections wait for it.
            let (store, bucket) = (Arc::clone(&shared.store), bucket.clone());
            // A collection may have run without this server meanwhile: it
            // publishes nothing until it has read the packs again, and
            // until any round that did not count it in has ended.
            let again = tokio::task::spawn_blocking(move || {
                announce(&store, &bucket)?;
                store.rejoin(&bucket.holder, now_unix_ms())
            })
            .await;
            if let Ok(Err(e)) = again {
                warn!(error = %e, "cannot announce this server in the bucket again");
            }
        }
        match read {
            Ok(leases) => {
                *shared
                    .bucket_leases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(leases);
            }
            Err(e) => warn!(error = %e, "cannot read the sources' leases"),
        }
    }
}

/// How often a server of a bucket looks for another server's collection
/// round to take part in.
const ROUND_POLL: Duration = Duration::from_millis(500);

/// Takes part in the collection rounds other servers of the bucket run
/// (`Store::take_part_in_round`), one at a time, until aborted. While this
/// server holds its fence for a round, its commits and launch flushes wait.
pub(crate) async fn take_part(shared: Arc<Shared>) {
    let Some(bucket) = &shared.config.bucket else {
        return;
    };
    let mut last = None;
    let mut warned: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(ROUND_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = Arc::clone(&shared.store);
        let seen = tokio::task::spawn_blocking(move || {
            // A round whose end could not be read: publishing waits for it.
            // New rounds are joined meanwhile.
            let settled = store.settle_round(now_unix_ms());
            (settled, store.gc_round())
        })
        .await;
        let Ok((settled, round)) = seen else {
            continue;
        };
        if let Err(e) = settled
            && warned.is_none_or(|at| at.elapsed() > Duration::from_secs(30))
        {
            warn!(error = %e, "cannot settle a collection round; nothing is published until it is");
            warned = Some(std::time::Instant::now());
        }
        let Ok(Some(round)) = round else {
            continue;
        };
        if round.holder == bucket.holder
            || round.phase != blockrep_store::RoundPhase::Track
            || last == Some(round.generation)
        {
            continue;
        }
        last = Some(round.generation);
        info!(generation = round.generation, collector = %round.holder, "taking part in a collection");
        let (store, holder) = (Arc::clone(&shared.store), bucket.holder.clone());
        let poll = ROUND_POLL / 5;
        let ended = tokio::task::spawn_blocking(move || {
            store.take_part_in_round(&holder, &round, now_unix_ms(), poll)
        })
        .await;
        match ended {
            Ok(Ok((end, fenced))) => info!(
                ?end,
                fenced_ms = fenced.as_millis() as u64,
                "collection round ended (commits here waited while fenced)"
            ),
            Ok(Err(e)) => warn!(error = %e, "could not take part in a collection"),
            Err(e) => warn!(error = %e, "collection round task failed"),
        }
    }
}

/// Runs `store.gc` as the one collection on a shared bucket: under the
/// collection lease, with the other servers present taking part (see
/// `Store::claim_gc`). A local store just collects.
pub(crate) fn collect(
    shared: &Shared,
    options: &blockrep_store::GcOptions,
) -> Result<blockrep_store::GcReport, blockrep_store::Error> {
    let store = &shared.store;
    let Some(bucket) = shared.config.bucket.as_ref().filter(|_| !options.dry_run) else {
        return store.gc(options);
    };
    let ttl_ms = bucket.lease_ttl.as_millis() as u64;
    store.claim_gc(&bucket.holder, ttl_ms, now_unix_ms())?;
    /// Releases the collection lease however the collection ends (a panic
    /// included), so that the servers taking part let their fences go.
    struct Release<'a>(&'a blockrep_store::Store);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.release_gc();
        }
    }
    let _release = Release(store);
    store.gc(options)
}

/// Announces this server among those sharing the bucket (before it serves
/// anything: a collection elsewhere must see it).
pub(crate) fn announce(
    store: &blockrep_store::Store,
    bucket: &crate::BucketConfig,
) -> Result<(), blockrep_store::Error> {
    store.claim_presence(
        &bucket.holder,
        bucket.lease_ttl.as_millis() as u64,
        now_unix_ms(),
    )
}

/// Gives up this server's leases at a clean stop, so that the servers
/// sharing the bucket may take its sources at once.
pub(crate) async fn release(shared: &Arc<Shared>) {
    if shared.config.bucket.is_none() {
        return;
    }
    let store = Arc::clone(&shared.store);
    match tokio::task::spawn_blocking(move || store.release_leases()).await {
        Ok(Ok(())) => info!("leases released"),
        Ok(Err(e)) => warn!(error = %e, "cannot release the leases; they expire by themselves"),
        Err(e) => warn!(error = %e, "lease release task failed"),
    }
}

//! blockrep's metrics on the admin listener (`GET /metrics`): which families
//! exist, what they mean, and where each figure comes from.
//!
//! Per source (label `source`), after S3 Replication Time Control and MGN:
//! pending bytes and chunks, lag, max replication time, RPO target and
//! breaches, bytes received and deduplicated, epochs, state, snapshots,
//! launches, whether an agent is connected. Server-wide: store bytes,
//! connections, handshake failures by reason, sessions rejected by code,
//! collector runs, availability, and histograms of epoch commit time and size.
//!
//! Every figure comes from the ledger (`crate::ledger`), the per-source records
//! included, copied under its locks and formatted without them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use blockrep_core::SourceId;
use blockrep_core::clock::now_unix_ms;
use tracing::warn;

use super::exposition::{CONTENT_TYPE_TEXT, Exposition, HistogramCounts, Value};
use crate::capture::CaptureRecord;
use crate::ledger::HistogramState;
use crate::shared::Shared;
use crate::status::{SourceRecord, SourceState, StateThresholds, VolumeRecord};

/// How much the store holds on disk. `live_bytes` and `garbage_bytes` are filled
/// in when a space report that knows them is available (the garbage collector's
/// mark phase); until then only the total of the pack files is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StoreSpace {
    pub packs_bytes: u64,
    pub live_bytes: Option<u64>,
    pub garbage_bytes: Option<u64>,
}

impl StoreSpace {
    /// Sums the sizes of the pack files in `DATA/packs`. Read from the directory
    /// rather than asked of the store so that this needs nothing of the store's
    /// interface; a pack is one file, so this is one `stat` per 256 MiB.
    pub(crate) fn measure(data_dir: &Path) -> std::io::Result<Self> {
        let mut packs_bytes = 0;
        for entry in std::fs::read_dir(data_dir.join("packs"))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(".pack") {
                packs_bytes += entry.metadata()?.len();
            }
        }
        Ok(Self {
            packs_bytes,
            ..Self::default()
        })
    }
}

/// Everything one scrape reports, gathered first so that formatting holds no lock.
#[derive(Debug, Default)]
pub(crate) struct Scrape {
    pub now_unix_ms: u64,
    pub thresholds: Option<StateThresholds>,
    pub sources: Vec<(SourceId, SourceRecord)>,
    pub rpo_breaches_total: BTreeMap<SourceId, u64>,
    /// Snapshots and launches per source; `None` when the store could not list them.
    pub snapshots: Option<BTreeMap<SourceId, u64>>,
    pub launches: Option<BTreeMap<SourceId, u64>>,
    pub store_space: Option<StoreSpace>,
    pub availability: bool,
    pub connections_open: u64,
    pub connections_total: u64,
    pub connections_refused_total: u64,
    pub handshake_failures_total: Vec<(&'static str, u64)>,
    pub sessions_rejected_total: BTreeMap<String, u64>,
    pub admin_requests_refused_total: Vec<(&'static str, u64)>,
    pub chunks_received_total: u64,
    pub chunk_bytes_arrived_total: u64,
    pub gc_runs_total: u64,
    epoch_commit_duration: Option<HistogramState>,
    epoch_size: Option<HistogramState>,
}

/// `GET /metrics`.
pub(crate) async fn handler(State(shared): State<Arc<Shared>>) -> Response {
    let availability = shared
        .health
        .check(&shared.config.data_dir, &shared.store)
        .await
        .available();
    let store = Arc::clone(&shared.store);
    let data_dir = shared.config.data_dir.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let per_source = |sources: Vec<SourceId>| {
            let mut counts = BTreeMap::new();
            for source in sources {
                *counts.entry(source).or_insert(0u64) += 1;
            }
            counts
        };
        let snapshots = store
            .list_snapshots(None)
            .map(|list| per_source(list.into_iter().map(|s| s.source).collect()))
            .inspect_err(|e| warn!(error = %e, "metrics: cannot list snapshots"))
            .ok();
        let launches = store
            .list_launches(None)
            .map(|list| per_source(list.into_iter().map(|l| l.source).collect()))
            .inspect_err(|e| warn!(error = %e, "metrics: cannot list launches"))
            .ok();
        let space = StoreSpace::measure(&data_dir)
            .inspect_err(|e| warn!(error = %e, "metrics: cannot measure the store"))
            .ok();
        (snapshots, launches, space)
    })
    .await;
    let (snapshots, launches, store_space) = listed.unwrap_or_else(|e| {
        warn!(error = %e, "metrics: store listing task failed");
        (None, None, None)
    });
    let ledger = &shared.ledger;
    let stats = ledger.stats();
    let (epoch_commit_duration, epoch_size) = ledger.epoch_histograms();
    let scrape = Scrape {
        now_unix_ms: now_unix_ms(),
        thresholds: Some(shared.thresholds()),
        sources: shared.watched_records(),
        rpo_breaches_total: shared.rpo_breaches.breaches_total(),
        snapshots,
        launches,
        store_space,
        availability,
        connections_open: ledger.connections_open(),
        connections_total: stats.connections_total,
        connections_refused_total: stats.connections_refused_total,
        handshake_failures_total: ledger.handshake_failures(),
        sessions_rejected_total: ledger.sessions_rejected(),
        admin_requests_refused_total: ledger.admin_refusals(),
        chunks_received_total: stats.chunks_received_total,
        chunk_bytes_arrived_total: stats.chunk_bytes_arrived_total,
        gc_runs_total: ledger.gc_runs_total(),
        epoch_commit_duration: Some(epoch_commit_duration),
        epoch_size: Some(epoch_size),
    };
    let mut text = render(&scrape);
    text.push_str(&capture_text(&scrape.sources));
    text.push_str(&revocation_text(&shared));
    text.push_str(&patches_text(&shared));
    text.push_str(&super::upload::upload_text(&shared.store));
    text.push_str(&super::workflow::workflow_text(&shared));
    text.push_str(&super::launches::launches_text(
        &shared.store,
        shared
            .copiers
            .copied_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
    ));
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], text).into_response()
}

/// A metric family of a capture figure: name, type, help, value.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&CaptureRecord) -> u64,
);

/// The `blockrep_capture_*` families, one sample per source in capture mode,
/// with `# HELP` and `# TYPE` even when no source is (as the other families).
fn capture_text(sources: &[(SourceId, SourceRecord)]) -> String {
    let captured: Vec<(&SourceId, &CaptureRecord)> = sources
        .iter()
        .filter_map(|(source, record)| record.capture.as_ref().map(|c| (source, c)))
        .collect();
    let mut x = Exposition::default();
    let families: [Family; 4] = [
        (
            "blockrep_capture_dirty_bytes",
            "gauge",
            "Bytes the workload wrote through the agent's export that are not yet in a committed epoch, as last reported.",
            |c| c.last.dirty_bytes,
        ),
        (
            "blockrep_capture_preserved_bytes",
            "gauge",
            "Bytes of old content the agent held so that the epoch in flight reads as of its cut, as last reported.",
            |c| c.last.preserved_bytes,
        ),
        (
            "blockrep_capture_cuts_total",
            "counter",
            "Epochs cut by the source's capture agents, added up across agent restarts since the server started.",
            |c| c.cuts_total,
        ),
        (
            "blockrep_capture_writes_total",
            "counter",
            "Writes the workload made through the agent's export, added up across agent restarts since the server started.",
            |c| c.writes_total,
        ),
    ];
    for (name, kind, help, value) in families {
        x.labelled(
            name,
            kind,
            help,
            "source",
            captured
                .iter()
                .map(|(source, capture)| (source.to_string(), Value::Int(value(capture)))),
        );
    }
    // A summary with quantiles only: the agent reports the quantiles of the
    // writes since its previous report, not a sum or a count to rate().
    let name = "blockrep_capture_write_latency_seconds";
    x.family(
        name,
        "summary",
        "Latency of the workload's writes through the agent's export, over the interval before the last report.",
    );
    for (source, capture) in &captured {
        for (quantile, us) in [
            ("0.5", capture.last.write_p50_us),
            ("0.99", capture.last.write_p99_us),
        ] {
            let labels = [("source", source.as_str()), ("quantile", quantile)];
            x.sample(name, &labels, Value::Float(us as f64 / 1e6));
        }
    }
    x.finish()
}

/// The revocation and per-address families of `/metrics`, appended to the rest.
fn revocation_text(shared: &Shared) -> String {
    let mut x = Exposition::default();
    let mut counter = |name: &str, kind: &str, help: &str, samples: &[(&[(&str, &str)], u64)]| {
        x.family(name, kind, help);
        for (labels, value) in samples {
            x.sample(name, labels, Value::Int(*value));
        }
    };
    counter(
        "blockrep_connections_refused_per_address_total",
        "counter",
        "Replication connections closed at once because their address held --connections-per-address (also counted in blockrep_connections_refused_total).",
        &[(&[], shared.ledger.connections_refused_per_address())],
    );
    let Some(revocation) = &shared.revocation else {
        return x.finish();
    };
    counter(
        "blockrep_crl_reloads_total",
        "counter",
        "Reloads of the --crl revocation list after start, by result (a failed one leaves the list in force).",
        &[
            (
                &[("result", "ok")],
                revocation.reloads_total.load(Ordering::Relaxed),
            ),
            (
                &[("result", "failed")],
                revocation.reload_failures_total.load(Ordering::Relaxed),
            ),
        ],
    );
    counter(
        "blockrep_crl_revoked_certificates",
        "gauge",
        "Certificates the revocation list in force revokes.",
        &[(&[], revocation.revoked_count() as u64)],
    );
    counter(
        "blockrep_sessions_revoked_total",
        "counter",
        "Open sessions ended because a reloaded revocation list revoked their certificate.",
        &[(
            &[],
            revocation.sessions_revoked_total.load(Ordering::Relaxed),
        )],
    );
    x.finish()
}

/// The patch counters in the Prometheus text format.
fn patches_text(shared: &Shared) -> String {
    let patches = shared.ledger.patch_stats();
    let mut x = Exposition::default();
    let families = [
        (
            "blockrep_patches_received_total",
            "Sub-chunk patches applied (changed chunks sent as the blocks that differ from their base), all sources.",
            patches.patches_received_total,
        ),
        (
            "blockrep_patch_bytes_received_total",
            "Bytes of patch data (as sent: raw or compressed), all sources, counted as patches are applied.",
            patches.patch_bytes_received_total,
        ),
        (
            "blockrep_patch_bytes_saved_total",
            "Chunk bytes patches did not carry: the patched chunks' lengths less their patch data.",
            patches.patch_bytes_saved_total,
        ),
        (
            "blockrep_block_values_served_total",
            "Chunks whose block values were sent to an agent (GetBlockValues entries not empty).",
            patches.block_values_served_total,
        ),
    ];
    for (name, help, value) in families {
        x.scalar(name, "counter", help, Value::Int(value));
    }
    x.finish()
}

fn seconds(ms: u64) -> Value {
    Value::Float(ms as f64 / 1000.0)
}

/// One family with one sample per source (label `source`).
fn per_source(
    x: &mut Exposition,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, Value)>,
) {
    x.labelled(name, kind, help, "source", samples);
}

/// A gauge with one sample per volume of every machine, labelled `source`
/// and `volume`.
fn per_volume(
    x: &mut Exposition,
    sources: &[(SourceId, SourceRecord)],
    name: &str,
    help: &str,
    value: impl Fn(&VolumeRecord) -> u64,
) {
    x.family(name, "gauge", help);
    for (source, record) in sources {
        for volume in &record.volumes {
            let labels = [
                ("source", source.as_str()),
                ("volume", volume.name.as_str()),
            ];
            x.sample(name, &labels, Value::Int(value(volume)));
        }
    }
}

/// A histogram's figures as the exposition writes them.
fn histogram_counts(state: &HistogramState) -> HistogramCounts<'_> {
    HistogramCounts {
        bounds: state.bounds,
        buckets: &state.buckets,
        sum: state.sum,
        count: state.count,
    }
}

/// Formats a scrape. Pure, so the format is tested without a server.
pub(crate) fn render(scrape: &Scrape) -> String {
    let mut x = Exposition::default();
    let now = scrape.now_unix_ms;
    let thresholds = scrape.thresholds.unwrap_or(StateThresholds {
        rpo_target: Duration::ZERO,
        stall_after: Duration::ZERO,
    });
    let sources = &scrape.sources;
    let each = |f: &dyn Fn(&SourceRecord) -> Value| -> Vec<(String, Value)> {
        sources
            .iter()
            .map(|(source, record)| (source.to_string(), f(record)))
            .collect()
    };

    per_source(
        &mut x,
        "blockrep_bytes_pending_replication",
        "gauge",
        "Bytes of changed chunks the agent reported for the epoch in progress and not yet committed.",
        each(&|r| Value::Int(r.bytes_pending)),
    );
    per_source(
        &mut x,
        "blockrep_operations_pending_replication",
        "gauge",
        "Changed chunks the agent reported for the epoch in progress and not yet committed.",
        each(&|r| Value::Int(r.chunks_pending)),
    );
    // Omitted during the initial sync: there is no consistent replica yet, so
    // there is no lag to report (blockrep_source_state says initial_sync).
    x.family(
        "blockrep_replication_lag_seconds",
        "gauge",
        "Seconds since the scan start of the last complete commit: the recovery point now. Absent during the initial sync.",
    );
    for (source, record) in sources {
        if let Some(lag) = record.lag_ms(now) {
            x.sample(
                "blockrep_replication_lag_seconds",
                &[("source", source.as_str())],
                seconds(lag),
            );
        }
    }
    per_source(
        &mut x,
        "blockrep_max_replication_time_seconds",
        "gauge",
        "Longest time from a scan start to the commit that completed it, since the server started.",
        each(&|r| seconds(r.max_replication_time_ms)),
    );
    per_source(
        &mut x,
        "blockrep_rpo_target_seconds",
        "gauge",
        "Recovery point objective of the source: replication lag above it is a breach.",
        each(&|r| Value::Float(r.rpo_target(thresholds).as_secs_f64())),
    );
    per_source(
        &mut x,
        "blockrep_rpo_breaches_total",
        "counter",
        "Times the replication lag crossed above the RPO target.",
        sources.iter().map(|(source, _)| {
            let count = scrape.rpo_breaches_total.get(source).copied().unwrap_or(0);
            (source.to_string(), Value::Int(count))
        }),
    );
    per_source(
        &mut x,
        "blockrep_bytes_received_total",
        "counter",
        "Frame bytes received from the source's agents.",
        each(&|r| Value::Int(r.bytes_received_total)),
    );
    per_source(
        &mut x,
        "blockrep_bytes_deduplicated_total",
        "counter",
        "Chunk bytes the agent did not send because the server already held them.",
        each(&|r| Value::Int(r.bytes_deduplicated_total)),
    );
    per_source(
        &mut x,
        "blockrep_chunks_compressed_total",
        "counter",
        "Chunks received zstd-compressed since the server started.",
        each(&|r| Value::Int(r.chunks_compressed_total)),
    );
    per_source(
        &mut x,
        "blockrep_compressed_chunk_share",
        "gauge",
        "Share of the data chunks of the last epoch with data that came compressed.",
        scrape.sources.iter().filter_map(|(source, r)| {
            r.compressed_chunk_share
                .map(|share| (source.to_string(), Value::Float(share)))
        }),
    );
    per_source(
        &mut x,
        "blockrep_epochs_committed_total",
        "counter",
        "Epochs committed for the source.",
        each(&|r| Value::Int(r.epochs_committed_total)),
    );
    per_volume(
        &mut x,
        sources,
        "blockrep_volume_size_bytes",
        "Size of each volume of a machine (a source of several disks), as its agent last said.",
        |v| v.disk_size_bytes,
    );
    per_volume(
        &mut x,
        sources,
        "blockrep_volume_bytes_pending",
        "Bytes of a machine's volume found changed and not yet committed in the epoch under way.",
        |v| v.bytes_pending,
    );
    x.family(
        "blockrep_source_state",
        "gauge",
        "Replication state of the source: 1 for the current state, 0 for the others.",
    );
    for (source, record) in sources {
        let current = record.state(thresholds, now);
        for state in SourceState::ALL {
            x.sample(
                "blockrep_source_state",
                &[("source", source.as_str()), ("state", state.as_str())],
                Value::Int(u64::from(state == current)),
            );
        }
    }
    // One series per source with a head, carrying its current label: a query
    // such as `blockrep_head_consistency{consistency="live"} == 1` finds the
    // sources whose latest recovery point may be torn.
    x.family(
        "blockrep_head_consistency",
        "gauge",
        "Consistency of the source's latest recovery point (crash-consistent, quiesced or live); always 1.",
    );
    for (source, record) in sources {
        if let Some(label) = record.consistency {
            let labels = [("source", source.as_str()), ("consistency", label.as_str())];
            x.sample("blockrep_head_consistency", &labels, Value::Int(1));
        }
    }
    for (name, help, counts) in [
        (
            "blockrep_snapshots",
            "Snapshots of the source (manual, automatic and cutover).",
            &scrape.snapshots,
        ),
        (
            "blockrep_launches",
            "Launch volumes made from the source's snapshots.",
            &scrape.launches,
        ),
    ] {
        if let Some(counts) = counts {
            per_source(
                &mut x,
                name,
                "gauge",
                help,
                sources.iter().map(|(source, _)| {
                    let count = counts.get(source).copied().unwrap_or(0);
                    (source.to_string(), Value::Int(count))
                }),
            );
        }
    }
    per_source(
        &mut x,
        "blockrep_source_connected",
        "gauge",
        "1 while an agent of the source has a session, else 0.",
        each(&|r| Value::Int(u64::from(r.connected))),
    );

    if let Some(space) = scrape.store_space {
        x.family(
            "blockrep_store_bytes",
            "gauge",
            "Bytes in the store: kind=packs is all pack files; live and garbage appear when known.",
        );
        let kinds = [
            ("packs", Some(space.packs_bytes)),
            ("live", space.live_bytes),
            ("garbage", space.garbage_bytes),
        ];
        for (kind, bytes) in kinds {
            if let Some(bytes) = bytes {
                x.sample("blockrep_store_bytes", &[("kind", kind)], Value::Int(bytes));
            }
        }
    }
    x.family(
        "blockrep_availability",
        "gauge",
        "1 when the store is writable and the replication listener accepts (as GET /health), else 0.",
    );
    x.sample(
        "blockrep_availability",
        &[],
        Value::Int(u64::from(scrape.availability)),
    );
    x.family(
        "blockrep_connections",
        "gauge",
        "Replication connections open (handshaking or in session).",
    );
    x.sample(
        "blockrep_connections",
        &[],
        Value::Int(scrape.connections_open),
    );
    x.family(
        "blockrep_connections_total",
        "counter",
        "Replication connections accepted.",
    );
    x.sample(
        "blockrep_connections_total",
        &[],
        Value::Int(scrape.connections_total),
    );
    x.family(
        "blockrep_connections_refused_total",
        "counter",
        "Replication connections closed at once because the connection limit was reached.",
    );
    x.sample(
        "blockrep_connections_refused_total",
        &[],
        Value::Int(scrape.connections_refused_total),
    );
    x.family(
        "blockrep_handshake_failures_total",
        "counter",
        "TLS handshakes that failed, by reason (timeout, certificate, protocol, other).",
    );
    for (reason, count) in &scrape.handshake_failures_total {
        x.sample(
            "blockrep_handshake_failures_total",
            &[("reason", reason)],
            Value::Int(*count),
        );
    }
    x.family(
        "blockrep_sessions_rejected_total",
        "counter",
        "Sessions ended with an error sent to the agent, by error code.",
    );
    for (code, count) in &scrape.sessions_rejected_total {
        x.sample(
            "blockrep_sessions_rejected_total",
            &[("code", code)],
            Value::Int(*count),
        );
    }
    x.family(
        "blockrep_admin_requests_refused_total",
        "counter",
        "Admin API requests refused, by reason (source_certificate, no_identity, foreign_host, \
         foreign_origin, no_token, wrong_token, not_json).",
    );
    for (reason, count) in &scrape.admin_requests_refused_total {
        x.sample(
            "blockrep_admin_requests_refused_total",
            &[("reason", reason)],
            Value::Int(*count),
        );
    }
    x.scalar(
        "blockrep_chunks_received_total",
        "counter",
        "Data chunks received and verified, all sources.",
        Value::Int(scrape.chunks_received_total),
    );
    x.scalar(
        "blockrep_chunk_bytes_arrived_total",
        "counter",
        "Chunk data bytes (as sent) received in Chunk frames, all sources, counted on arrival, including epochs that never commit.",
        Value::Int(scrape.chunk_bytes_arrived_total),
    );
    x.scalar(
        "blockrep_gc_runs_total",
        "counter",
        "Garbage collector runs.",
        Value::Int(scrape.gc_runs_total),
    );
    if let Some(state) = &scrape.epoch_commit_duration {
        x.histogram(
            "blockrep_epoch_commit_duration_seconds",
            "Time from an epoch's Commit to its durable head (verification, pages, root, fsyncs).",
            &histogram_counts(state),
        );
    }
    if let Some(state) = &scrape.epoch_size {
        x.histogram(
            "blockrep_epoch_size_bytes",
            "Frame bytes received per committed epoch.",
            &histogram_counts(state),
        );
    }
    x.family(
        "blockrep_build_info",
        "gauge",
        "Always 1; the label carries the server's version.",
    );
    x.sample(
        "blockrep_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        Value::Int(1),
    );
    x.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CaptureView;
    use crate::ledger::Histogram;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let histogram = Histogram::new(&[1.0, 10.0]);
        for value in [0.5, 1.0, 5.0, 50.0] {
            histogram.observe(value);
        }
        let mut x = Exposition::default();
        histogram_render(&mut x, &histogram);
        assert_eq!(
            x.finish(),
            "# HELP h_seconds help\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{le=\"1\"} 2\nh_seconds_bucket{le=\"10\"} 3\n\
             h_seconds_bucket{le=\"+Inf\"} 4\nh_seconds_sum 56.5\nh_seconds_count 4\n"
        );
    }

    fn histogram_render(x: &mut Exposition, histogram: &Histogram) {
        x.histogram("h_seconds", "help", &histogram_counts(&histogram.counts()));
    }

    #[test]
    fn lag_is_omitted_during_the_initial_sync() {
        let now = 10_000_000;
        let syncing = SourceRecord {
            last_contact_unix_ms: now,
            ..SourceRecord::default()
        };
        let synced = SourceRecord {
            last_contact_unix_ms: now,
            synced_scan_started_unix_ms: now - 2_500,
            consistency: Some(blockrep_core::Consistency::CrashConsistent),
            ..SourceRecord::default()
        };
        let scrape = Scrape {
            now_unix_ms: now,
            thresholds: Some(StateThresholds {
                rpo_target: Duration::from_secs(1),
                stall_after: Duration::from_secs(60),
            }),
            sources: vec![
                (
                    SourceId::new("new").unwrap_or_else(|e| panic!("{e}")),
                    syncing,
                ),
                (
                    SourceId::new("old").unwrap_or_else(|e| panic!("{e}")),
                    synced,
                ),
            ],
            ..Scrape::default()
        };
        let text = render(&scrape);
        assert!(text.contains("blockrep_replication_lag_seconds{source=\"old\"} 2.5\n"));
        assert!(!text.contains("blockrep_replication_lag_seconds{source=\"new\"}"));
        assert!(text.contains("blockrep_source_state{source=\"new\",state=\"initial_sync\"} 1\n"));
        assert!(text.contains("blockrep_source_state{source=\"old\",state=\"lagging\"} 1\n"));
        assert!(text.contains("blockrep_source_state{source=\"old\",state=\"healthy\"} 0\n"));
        assert!(text.contains(
            "blockrep_head_consistency{source=\"old\",consistency=\"crash-consistent\"} 1\n"
        ));
        assert!(!text.contains("blockrep_head_consistency{source=\"new\""));
    }

    #[test]
    fn metrics_have_one_sample_per_capture_source() {
        let captured = SourceRecord {
            capture: Some(CaptureRecord::reported(
                None,
                CaptureView {
                    dirty_bytes: 8192,
                    preserved_bytes: 4096,
                    cuts: 2,
                    writes: 9,
                    write_p50_us: 250,
                    write_p99_us: 1500,
                },
            )),
            ..SourceRecord::default()
        };
        let sources = vec![
            (SourceId::new("cap").unwrap(), captured),
            (SourceId::new("scan").unwrap(), SourceRecord::default()),
        ];
        let text = capture_text(&sources);
        for line in [
            "blockrep_capture_dirty_bytes{source=\"cap\"} 8192\n",
            "blockrep_capture_preserved_bytes{source=\"cap\"} 4096\n",
            "blockrep_capture_cuts_total{source=\"cap\"} 2\n",
            "blockrep_capture_writes_total{source=\"cap\"} 9\n",
            "blockrep_capture_write_latency_seconds{source=\"cap\",quantile=\"0.5\"} 0.00025\n",
            "blockrep_capture_write_latency_seconds{source=\"cap\",quantile=\"0.99\"} 0.0015\n",
            "# TYPE blockrep_capture_write_latency_seconds summary\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("source=\"scan\""), "{text}");
    }
}

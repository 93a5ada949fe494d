//! The ledger: every event the server counts, recorded once, in one place.
//! `/v1/sources` and `status` (per-source figures), [`ServerStats`] and
//! `/metrics` all read it; none keeps a count of its own.
//!
//! Per-source events (epochs committed, chunks and bytes received,
//! deduplication, failback traffic) are counted in the source's record in
//! [`Ledger::sources`], beside the source's state. The server-wide totals of
//! them that [`ServerStats`] reports are kept by that table beside the
//! records, changed under the same lock by the same update that bumps a
//! record, so reading them is O(1) and they always equal the sum over the
//! records. Events that belong to no source yet (a connection, a handshake, a
//! rejection before `Hello`, an admin request) and the hot-path counters that
//! must not take the records' lock per chunk are counted here. Totals by kind
//! (handshake failures, rejections) are sums of their per-reason counters.
//!
//! Counters only ever grow within a process and count events since it
//! started: records are never removed and are only ever added to.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_proto::ErrorCode;

use crate::status::SourceTable;

/// Server-wide counters, as read from the [`Ledger`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections_total: u64,
    /// Connections refused because the connection limit was reached (the
    /// listener's or their address's).
    pub connections_refused_total: u64,
    /// Connections refused because their address held its share of the slots.
    pub connections_refused_per_address_total: u64,
    /// TLS handshakes that failed or timed out, on every listener.
    pub handshake_failures_total: u64,
    /// Sessions ended with an error sent to the agent.
    pub sessions_rejected_total: u64,
    /// Epochs committed.
    pub epochs_committed_total: u64,
    /// Data chunks received and verified.
    pub chunks_received_total: u64,
    /// Bytes of chunk data (as sent: compressed or raw) in `Chunk` frames,
    /// counted on arrival, whether or not their epoch ever commits.
    pub chunk_bytes_arrived_total: u64,
}

/// Why a TLS handshake failed, as counted in `blockrep_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    /// No finished handshake within the handshake time-out.
    Timeout,
    /// A certificate was missing, unknown, expired or refused by either side.
    Certificate,
    /// Not TLS, or TLS the server does not speak (e.g. only TLS 1.2 offered).
    Protocol,
    /// Anything else, typically the peer closing or resetting the connection.
    Other,
}

impl HandshakeFailure {
    pub(crate) const ALL: [HandshakeFailure; 4] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Certificate,
        HandshakeFailure::Protocol,
        HandshakeFailure::Other,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Certificate => "certificate",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Other => "other",
        }
    }

    /// Classifies a failed handshake by the error's text. The text, not the
    /// variant, because the error reaches us as an `io::Error` that may wrap a
    /// rustls error, an alert from the peer, or a plain socket error; the unit
    /// tests pin the texts of the rustls version in use.
    pub(crate) fn classify(error_text: &str) -> Self {
        let text = error_text.to_ascii_lowercase();
        let any = |needles: &[&str]| needles.iter().any(|needle| text.contains(needle));
        if any(&["certificate", "unknownca", "unknown ca", "badcert"]) {
            HandshakeFailure::Certificate
        } else if any(&["timed out", "timeout"]) {
            HandshakeFailure::Timeout
        } else if any(&[
            "corrupt message",
            "unexpected message",
            "peer is incompatible",
            "peer misbehaved",
            "protocolversion",
            "handshakefailure",
        ]) {
            HandshakeFailure::Protocol
        } else {
            HandshakeFailure::Other
        }
    }
}

/// Why a request to the admin API was refused, as counted in
/// `blockrep_admin_requests_refused_total`. (Handshake failures on the admin
/// listener count in `blockrep_handshake_failures_total` like any other.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminRefusal {
    /// A valid certificate of a source: agents may not operate the server.
    SourceCertificate,
    /// A certificate from the CA that carries no valid blockrep identity.
    NoIdentity,
    /// A `Host` that does not name this listener (DNS rebinding).
    ForeignHost,
    /// A foreign `Origin` or a cross-site browser request (CSRF).
    ForeignOrigin,
    /// No admin token where one is needed.
    NoToken,
    /// A token that is not the admin token.
    WrongToken,
    /// A state change without `Content-Type: application/json`.
    NotJson,
}

impl AdminRefusal {
    pub(crate) const ALL: [AdminRefusal; 7] = [
        AdminRefusal::SourceCertificate,
        AdminRefusal::NoIdentity,
        AdminRefusal::ForeignHost,
        AdminRefusal::ForeignOrigin,
        AdminRefusal::NoToken,
        AdminRefusal::WrongToken,
        AdminRefusal::NotJson,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AdminRefusal::SourceCertificate => "source_certificate",
            AdminRefusal::NoIdentity => "no_identity",
            AdminRefusal::ForeignHost => "foreign_host",
            AdminRefusal::ForeignOrigin => "foreign_origin",
            AdminRefusal::NoToken => "no_token",
            AdminRefusal::WrongToken => "wrong_token",
            AdminRefusal::NotJson => "not_json",
        }
    }
}

/// Bucket upper bounds of `blockrep_epoch_commit_duration_seconds`: from a
/// cached fsync to a slow disk under load.
const COMMIT_DURATION_BUCKETS_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Bucket upper bounds of `blockrep_epoch_size_bytes`: powers of four from one
/// default chunk (64 KiB) to 64 GiB (an initial sync step).
const EPOCH_SIZE_BUCKETS_BYTES: [f64; 11] = [
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
    4_294_967_296.0,
    17_179_869_184.0,
    68_719_476_736.0,
];

/// A histogram with fixed buckets. Observed once per epoch commit, so a lock is
/// cheap enough and keeps sum and counts consistent with each other.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramState>,
}

/// A histogram's figures at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct HistogramState {
    /// Bucket upper bounds.
    pub bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more than `bounds` for +Inf.
    pub buckets: Vec<u64>,
    /// Sum of every observation.
    pub sum: f64,
    /// Observations.
    pub count: u64,
}

impl Histogram {
    /// A histogram of no observation yet, with these bucket upper bounds.
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            inner: Mutex::new(HistogramState {
                bounds,
                buckets: vec![0; bounds.len() + 1],
                ..HistogramState::default()
            }),
        }
    }

    /// Counts `value` in the first bucket whose bound it does not pass.
    pub(crate) fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.buckets[bucket] += 1;
        inner.sum += value;
        inner.count += 1;
    }

    /// The figures now, consistent with each other.
    pub(crate) fn counts(&self) -> HistogramState {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Every counted event of the server.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Per-source state, figures and counters.
    pub sources: SourceTable,
    connections_open: Arc<AtomicU64>,
    connections_total: AtomicU64,
    /// Refused for the listener's limit, and for their address's share.
    connections_refused_at_limit: AtomicU64,
    connections_refused_per_address: AtomicU64,
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Rejected sessions by error code label (codes appear as they happen, so a
    /// code added to the protocol is counted without a change here).
    sessions_rejected: Mutex<BTreeMap<String, u64>>,
    /// Admin API requests refused, by [`AdminRefusal`].
    admin_refused: [AtomicU64; AdminRefusal::ALL.len()],
    /// Chunk data bytes as they arrive (the hot path: no lock per chunk).
    chunk_bytes_arrived: AtomicU64,
    gc_runs: AtomicU64,
    epoch_commit_duration: Histogram,
    epoch_size: Histogram,
    patches_received: AtomicU64,
    patch_bytes_received: AtomicU64,
    patch_bytes_saved: AtomicU64,
    block_values_served: AtomicU64,
}

/// Counts an open connection until dropped.
#[derive(Debug)]
pub(crate) struct OpenConnection(Arc<AtomicU64>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The patch counters (protocol 4), as read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PatchStats {
    /// Patches applied and queued for storage.
    pub patches_received_total: u64,
    /// Bytes of patch data, as sent (raw or compressed).
    pub patch_bytes_received_total: u64,
    /// Chunk bytes that patches did not have to carry: each patched chunk's
    /// length less the patch data sent for it.
    pub patch_bytes_saved_total: u64,
    /// `GetBlockValues` entries answered with values (not empty).
    pub block_values_served_total: u64,
}

impl Ledger {
    /// A ledger over the records of the sources known at start.
    pub(crate) fn new(sources: SourceTable) -> Self {
        Self {
            sources,
            connections_open: Arc::new(AtomicU64::new(0)),
            connections_total: AtomicU64::new(0),
            connections_refused_at_limit: AtomicU64::new(0),
            connections_refused_per_address: AtomicU64::new(0),
            handshake_failures: Default::default(),
            sessions_rejected: Mutex::new(known_codes_at_zero()),
            admin_refused: Default::default(),
            chunk_bytes_arrived: AtomicU64::new(0),
            gc_runs: AtomicU64::new(0),
            epoch_commit_duration: Histogram::new(&COMMIT_DURATION_BUCKETS_SECONDS),
            epoch_size: Histogram::new(&EPOCH_SIZE_BUCKETS_BYTES),
            patches_received: AtomicU64::new(0),
            patch_bytes_received: AtomicU64::new(0),
            patch_bytes_saved: AtomicU64::new(0),
            block_values_served: AtomicU64::new(0),
        }
    }

    /// A replication connection was accepted; it counts as open for as long
    /// as the guard lives.
    pub(crate) fn connection_accepted(&self) -> OpenConnection {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(&self.connections_open))
    }

    /// A replication connection was closed at once: the listener was full,
    /// or (`per_address`) its address held its share of the slots.
    pub(crate) fn connection_refused(&self, per_address: bool) {
        let counter = if per_address {
            &self.connections_refused_per_address
        } else {
            &self.connections_refused_at_limit
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A TLS handshake failed, on any listener.
    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure) {
        let index = HandshakeFailure::ALL
            .iter()
            .position(|&r| r == reason)
            .unwrap_or(HandshakeFailure::ALL.len() - 1);
        self.handshake_failures[index].fetch_add(1, Ordering::Relaxed);
    }

    /// An admin API request was refused.
    pub(crate) fn admin_refused(&self, reason: AdminRefusal) {
        let index = AdminRefusal::ALL
            .iter()
            .position(|&r| r == reason)
            .unwrap_or(AdminRefusal::ALL.len() - 1);
        self.admin_refused[index].fetch_add(1, Ordering::Relaxed);
    }

    /// A session (or a connection before its session) ended with `code` sent
    /// to the agent.
    pub(crate) fn session_rejected(&self, code: ErrorCode) {
        let mut rejected = self
            .sessions_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *rejected.entry(code_label(code)).or_default() += 1;
    }

    /// Chunk data arrived in a `Chunk` frame (`bytes` as sent).
    pub(crate) fn chunk_arrived(&self, bytes: u64) {
        self.chunk_bytes_arrived.fetch_add(bytes, Ordering::Relaxed);
    }

    /// An epoch was committed: time from `Commit` to durable, and bytes
    /// received for it. (The source's record counts the epoch itself.)
    pub(crate) fn epoch_committed(&self, commit_duration: Duration, bytes_received: u64) {
        self.epoch_commit_duration
            .observe(commit_duration.as_secs_f64());
        self.epoch_size.observe(bytes_received as f64);
    }

    /// The garbage collector ran.
    pub(crate) fn gc_ran(&self) {
        self.gc_runs.fetch_add(1, Ordering::Relaxed);
    }

    /// A patch of `data_bytes` (as sent) rebuilding a chunk of `chunk_bytes`
    /// was applied and queued for storage.
    pub(crate) fn patch_received(&self, data_bytes: u64, chunk_bytes: u64) {
        self.patches_received.fetch_add(1, Ordering::Relaxed);
        self.patch_bytes_received
            .fetch_add(data_bytes, Ordering::Relaxed);
        self.patch_bytes_saved
            .fetch_add(chunk_bytes.saturating_sub(data_bytes), Ordering::Relaxed);
    }

    /// `chunks` entries of a `GetBlockValues` were answered with values.
    pub(crate) fn block_values_served(&self, chunks: u64) {
        self.block_values_served
            .fetch_add(chunks, Ordering::Relaxed);
    }

    /// The server-wide counters now; O(1), however many sources there are
    /// (no record is copied).
    pub(crate) fn stats(&self) -> ServerStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let per_address = self.connections_refused_per_address();
        let totals = self.sources.totals();
        ServerStats {
            connections_total: load(&self.connections_total),
            connections_refused_total: load(&self.connections_refused_at_limit) + per_address,
            connections_refused_per_address_total: per_address,
            handshake_failures_total: self.handshake_failures.iter().map(load).sum(),
            sessions_rejected_total: self.sessions_rejected().values().sum(),
            epochs_committed_total: totals.epochs_committed_total,
            chunks_received_total: totals.chunks_received_total,
            chunk_bytes_arrived_total: load(&self.chunk_bytes_arrived),
        }
    }

    /// Connections refused for their address's share.
    pub(crate) fn connections_refused_per_address(&self) -> u64 {
        self.connections_refused_per_address.load(Ordering::Relaxed)
    }

    /// Replication connections open now.
    pub(crate) fn connections_open(&self) -> u64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// Handshake failures by reason, every reason listed.
    pub(crate) fn handshake_failures(&self) -> Vec<(&'static str, u64)> {
        HandshakeFailure::ALL
            .iter()
            .zip(&self.handshake_failures)
            .map(|(reason, count)| (reason.as_str(), count.load(Ordering::Relaxed)))
            .collect()
    }

    /// Rejected sessions by error code label, every known code listed.
    pub(crate) fn sessions_rejected(&self) -> BTreeMap<String, u64> {
        self.sessions_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refused admin requests by reason, every reason listed.
    pub(crate) fn admin_refusals(&self) -> Vec<(&'static str, u64)> {
        AdminRefusal::ALL
            .iter()
            .zip(&self.admin_refused)
            .map(|(reason, count)| (reason.as_str(), count.load(Ordering::Relaxed)))
            .collect()
    }

    /// Garbage collector runs.
    pub(crate) fn gc_runs_total(&self) -> u64 {
        self.gc_runs.load(Ordering::Relaxed)
    }

    /// The commit time and epoch size histograms now.
    pub(crate) fn epoch_histograms(&self) -> (HistogramState, HistogramState) {
        (
            self.epoch_commit_duration.counts(),
            self.epoch_size.counts(),
        )
    }

    /// The patch counters now.
    pub(crate) fn patch_stats(&self) -> PatchStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PatchStats {
            patches_received_total: load(&self.patches_received),
            patch_bytes_received_total: load(&self.patch_bytes_received),
            patch_bytes_saved_total: load(&self.patch_bytes_saved),
            block_values_served_total: load(&self.block_values_served),
        }
    }
}

/// Every error code the protocol knows, counted at 0: a series that exists
/// before its first increment lets `increase()` see that increment. Codes are
/// numbered from 1 without gaps, so this needs no list of its own.
fn known_codes_at_zero() -> BTreeMap<String, u64> {
    (1..=u16::MAX)
        .map(ErrorCode::from_u16)
        .take_while(|code| !matches!(code, ErrorCode::Unknown(_)))
        .map(|code| (code_label(code), 0))
        .collect()
}

/// `SourceMismatch` -> `source_mismatch`; `Unknown(12)` -> `unknown`.
pub(crate) fn code_label(code: ErrorCode) -> String {
    let debug = format!("{code:?}");
    let name = debug.split('(').next().unwrap_or_default();
    let mut label = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            label.push('_');
        }
        label.push(c.to_ascii_lowercase());
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::SourceRecord;

    #[test]
    fn rustls_error_texts_are_classified() {
        use rustls::{AlertDescription, CertificateError, Error, PeerIncompatible};
        let cases = [
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer).to_string(),
                HandshakeFailure::Certificate,
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired).to_string(),
                HandshakeFailure::Certificate,
            ),
            (
                Error::NoCertificatesPresented.to_string(),
                HandshakeFailure::Certificate,
            ),
            (
                Error::AlertReceived(AlertDescription::UnknownCA).to_string(),
                HandshakeFailure::Certificate,
            ),
            (
                Error::AlertReceived(AlertDescription::BadCertificate).to_string(),
                HandshakeFailure::Certificate,
            ),
            (
                Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType).to_string(),
                HandshakeFailure::Protocol,
            ),
            (
                Error::PeerIncompatible(PeerIncompatible::Tls13RequiredForQuic).to_string(),
                HandshakeFailure::Protocol,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::TimedOut).to_string(),
                HandshakeFailure::Timeout,
            ),
            ("tls handshake eof".to_owned(), HandshakeFailure::Other),
            (
                std::io::Error::from(std::io::ErrorKind::ConnectionReset).to_string(),
                HandshakeFailure::Other,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(HandshakeFailure::classify(&text), expected, "{text}");
        }
    }

    #[test]
    fn error_codes_become_snake_case_labels() {
        assert_eq!(code_label(ErrorCode::SourceMismatch), "source_mismatch");
        assert_eq!(code_label(ErrorCode::Busy), "busy");
        assert_eq!(code_label(ErrorCode::Unknown(99)), "unknown");
        let known = known_codes_at_zero();
        assert!(known.contains_key("busy") && known.contains_key("internal"));
        assert!(!known.contains_key("unknown"));
    }

    #[test]
    fn totals_are_sums_of_the_events_counted_once() {
        let ledger = Ledger::new(SourceTable::default());
        let open = ledger.connection_accepted();
        ledger.connection_accepted();
        ledger.connection_refused(false);
        ledger.connection_refused(true);
        ledger.handshake_failed(HandshakeFailure::Timeout);
        ledger.handshake_failed(HandshakeFailure::Certificate);
        ledger.session_rejected(ErrorCode::Busy);
        ledger.chunk_arrived(4096);
        for (name, epochs, chunks) in [("a", 2, 10), ("b", 1, 5)] {
            let source = blockrep_core::SourceId::new(name).unwrap();
            ledger.sources.insert(
                source,
                SourceRecord {
                    epochs_committed_total: epochs,
                    chunks_received_total: chunks,
                    ..SourceRecord::default()
                },
            );
        }
        let stats = ledger.stats();
        assert_eq!(
            stats,
            ServerStats {
                connections_total: 2,
                connections_refused_total: 2,
                connections_refused_per_address_total: 1,
                handshake_failures_total: 2,
                sessions_rejected_total: 1,
                epochs_committed_total: 3,
                chunks_received_total: 15,
                chunk_bytes_arrived_total: 4096,
            }
        );
        assert_eq!(ledger.connections_open(), 1, "one guard was dropped");
        drop(open);
        assert_eq!(ledger.connections_open(), 0);
        assert_eq!(ledger.sessions_rejected()["busy"], 1);
    }

    #[test]
    fn source_totals_equal_the_sum_over_sources_after_any_mix_of_events() {
        let ledger = Ledger::new(SourceTable::default());
        let id = |name| blockrep_core::SourceId::new(name).unwrap();
        // A source found in the store at start, with counts.
        ledger.sources.insert(
            id("found"),
            SourceRecord {
                epochs_committed_total: 4,
                chunks_received_total: 40,
                ..SourceRecord::default()
            },
        );
        // Commits of a known and a new source, as the session counts them.
        for (name, epochs, chunks) in [
            ("found", 1, 7),
            ("new", 1, 3),
            ("new", 0, 2),
            ("found", 2, 0),
        ] {
            ledger.sources.update(&id(name), |record| {
                record.epochs_committed_total += epochs;
                record.chunks_received_total += chunks;
            });
        }
        // Changes that count nothing: state only, and an unknown source.
        ledger
            .sources
            .update(&id("found"), |record| record.connected = true);
        assert!(
            ledger
                .sources
                .update_known(&id("ghost"), |record| record.epochs_committed_total += 9)
                .is_none()
        );
        ledger
            .sources
            .update_known(&id("new"), |record| record.chunks_received_total += 5)
            .unwrap();
        let stats = ledger.stats();
        let totals = (stats.epochs_committed_total, stats.chunks_received_total);
        let summed = ledger
            .sources
            .records()
            .iter()
            .fold((0, 0), |(epochs, chunks), (_, r)| {
                (
                    epochs + r.epochs_committed_total,
                    chunks + r.chunks_received_total,
                )
            });
        assert_eq!(totals, summed);
        assert_eq!(totals, (8, 57));
    }

    #[test]
    fn a_patch_saves_what_it_did_not_carry() {
        let ledger = Ledger::new(SourceTable::default());
        ledger.patch_received(1000, 65_536);
        ledger.patch_received(70_000, 65_536);
        ledger.block_values_served(3);
        let patches = ledger.patch_stats();
        assert_eq!(patches.patches_received_total, 2);
        assert_eq!(patches.patch_bytes_received_total, 71_000);
        assert_eq!(patches.patch_bytes_saved_total, 64_536);
        assert_eq!(patches.block_values_served_total, 3);
    }
}

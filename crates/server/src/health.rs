//! Health: whether this server can take replication now (`GET /health`, and
//! `blockrep_availability` in `/metrics`).
//!
//! Available means both:
//! - the store is writable: a small probe file in the data directory is
//!   written, fsynced and removed (at most once per [`PROBE_INTERVAL`]; answers
//!   in between reuse the last result, so a load balancer polling often costs
//!   nothing), within [`PROBE_TIMEOUT`];
//! - the replication listener accepts: its accept loop runs and no accept has
//!   failed (e.g. out of file descriptors) within [`ACCEPT_ERROR_WINDOW`].
//!
//! The answer is 200 with `"availability": 1`, or 503 with `"availability": 0`
//! and the reason. `blockrep_availability` in `/metrics` is the same figure.

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockrep_core::clock::now_unix_ms;
use blockrep_store::Store;
use serde_json::json;
use tracing::{info, warn};

/// The store probe runs at most this often.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe still running after this long counts as a failure: a data disk that
/// hangs is as unavailable as one that errors.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// An accept error this recent makes the listener count as not accepting.
pub(crate) const ACCEPT_ERROR_WINDOW: Duration = Duration::from_secs(5);
/// Name of the probe file in the data directory.
const PROBE_FILE: &str = ".health-probe";

#[derive(Debug, Clone)]
struct StoreProbe {
    at: Instant,
    checked_unix_ms: u64,
    result: Result<(), String>,
}

/// Health state shared by the listener (which reports on its accept loop) and
/// the admin API (which asks).
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// The last store probe. An async lock: concurrent requests wait for the one
    /// probe in progress instead of starting their own.
    last_probe: tokio::sync::Mutex<Option<StoreProbe>>,
    /// Set while a probe's blocking task runs, so a hung probe is not joined by
    /// more of them.
    probe_running: Arc<AtomicBool>,
    /// Set while the replication accept loop runs.
    accepting: AtomicBool,
    /// Unix ms of the last failed accept (0 = never) and its error.
    accept_failed_unix_ms: AtomicU64,
    accept_error: Mutex<String>,
    /// Whether the last answer was unavailable, to log each change once.
    was_unavailable: AtomicBool,
}

/// The outcome of one health check.
#[derive(Debug, Clone)]
pub(crate) struct HealthReport {
    store: Result<(), String>,
    store_checked_unix_ms: u64,
    listener: Result<(), String>,
}

impl HealthReport {
    pub(crate) fn available(&self) -> bool {
        self.store.is_ok() && self.listener.is_ok()
    }

    fn reason(&self) -> Option<String> {
        let reasons: Vec<&str> = [&self.store, &self.listener]
            .into_iter()
            .filter_map(|r| r.as_ref().err().map(String::as_str))
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// The body of `GET /health`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let check = |result: &Result<(), String>| match result {
            Ok(()) => json!({ "ok": true }),
            Err(e) => json!({ "ok": false, "error": e }),
        };
        let mut store = check(&self.store);
        store["checked_unix_ms"] = json!(self.store_checked_unix_ms);
        json!({
            "status": if self.available() { "ok" } else { "unavailable" },
            "availability": u8::from(self.available()),
            "reason": self.reason(),
            "checks": {
                "store": store,
                "replication_listener": check(&self.listener),
            },
        })
    }
}

impl Health {
    /// Called by the listener when its accept loop starts and stops.
    pub(crate) fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }

    /// Called by the listener when an accept fails.
    pub(crate) fn accept_failed(&self, error: &std::io::Error) {
        *self.accept_error.lock().unwrap_or_else(|p| p.into_inner()) = error.to_string();
        self.accept_failed_unix_ms
            .store(now_unix_ms().max(1), Ordering::SeqCst);
    }

    fn listener_status(&self) -> Result<(), String> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err("replication listener is not accepting connections".to_owned());
        }
        let failed = self.accept_failed_unix_ms.load(Ordering::SeqCst);
        if failed != 0
            && now_unix_ms().saturating_sub(failed) < ACCEPT_ERROR_WINDOW.as_millis() as u64
        {
            let error = self
                .accept_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(format!("replication listener cannot accept: {error}"));
        }
        Ok(())
    }

    /// Checks health, probing the store if the last probe is older than
    /// [`PROBE_INTERVAL`].
    /// The store's data directory is `data_dir`; `store` says whether an
    /// fsync has failed.
    pub(crate) async fn check(&self, data_dir: &Path, store: &Arc<Store>) -> HealthReport {
        let probe = {
            let mut last = self.last_probe.lock().await;
            match last.as_ref() {
                Some(probe) if probe.at.elapsed() < PROBE_INTERVAL => probe.clone(),
                _ => {
                    let probe = self.probe(data_dir, store).await;
                    *last = Some(probe.clone());
                    probe
                }
            }
        };
        let report = HealthReport {
            store: probe.result,
            store_checked_unix_ms: probe.checked_unix_ms,
            listener: self.listener_status(),
        };
        let unavailable = !report.available();
        if self.was_unavailable.swap(unavailable, Ordering::SeqCst) != unavailable {
            match report.reason() {
                Some(reason) => warn!(%reason, "server unavailable"),
                None => info!("server available"),
            }
        }
        report
    }

    async fn probe(&self, data_dir: &Path, store: &Arc<Store>) -> StoreProbe {
        let checked_unix_ms = now_unix_ms();
        let result = if self.probe_running.swap(true, Ordering::SeqCst) {
            Err(format!(
                "data directory {}: the previous write probe has not finished",
                data_dir.display()
            ))
        } else {
            let running = Arc::clone(&self.probe_running);
            let dir = data_dir.to_owned();
            let store = Arc::clone(store);
            let task = tokio::task::spawn_blocking(move || {
                // The data directory, and a bucket the store is kept in: a
                // store that is away makes commits fail, so the server is
                // unavailable until it is back.
                let result = probe_data_dir(&dir)
                    .and_then(|()| store.check_backend().map_err(|e| e.to_string()));
                running.store(false, Ordering::SeqCst);
                result
            });
            match tokio::time::timeout(PROBE_TIMEOUT, task).await {
                Ok(Ok(result)) => result,
                Ok(Err(e)) => Err(format!("store probe failed: {e}")),
                Err(_) => Err(format!(
                    "data directory {}: write probe still running after {PROBE_TIMEOUT:?}",
                    data_dir.display()
                )),
            }
        };
        // A failed fsync poisons the store until it is reopened: commits would be
        // refused, so the service is not available whatever the probe says.
        let result = if store.sync_failed() {
            Err(
                "an fsync in the data directory failed; commits are refused until the server restarts"
                    .to_owned(),
            )
        } else {
            result
        };
        StoreProbe {
            at: Instant::now(),
            checked_unix_ms,
            result,
        }
    }
}

/// Where the store is kept and, for a bucket, what is waiting to be uploaded.
pub(crate) fn backend_json(store: &Store) -> serde_json::Value {
    let mut backend = json!({ "location": store.backend() });
    if let Some(stats) = store.upload_stats() {
        backend["upload"] = json!({
            "bytes_pending": stats.bytes_pending,
            "operations_pending": stats.objects_pending,
            "errors_total": stats.errors_total,
            "uploaded_bytes_total": stats.uploaded_bytes_total,
        });
        // Commits and flushes are refused while another server's collection
        // round is unsettled here, or while this server must announce
        // itself again.
        backend["publishing"] = match store.publishing_blocked(now_unix_ms()) {
            None => json!("ok"),
            Some(why) => json!(why),
        };
    }
    backend
}

/// Writes, fsyncs and removes a small file in `dir`. The payload is a full page
/// so that a full filesystem fails the write (an empty file needs no block).
fn probe_data_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::io::Write as _;
    let path = dir.join(PROBE_FILE);
    let fail =
        |what: &str, e: std::io::Error| format!("data directory {}: {what}: {e}", dir.display());
    let write = || -> std::io::Result<()> {
        // Owner-only like every file of the data directory, whatever the umask.
        let mut file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(&path)?;
        file.write_all(&[0x5a; 4096])?;
        file.sync_all()
    };
    let written = write().map_err(|e| fail("cannot write a probe file", e));
    // Removed even after a failed write, so a half-written probe does not stay.
    let removed = match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(fail("cannot remove the probe file", e))
        }
        _ => Ok(()),
    };
    written.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_writes_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        probe_data_dir(dir.path()).unwrap();
        assert!(!dir.path().join(PROBE_FILE).exists());
        let missing = dir.path().join("missing");
        let error = probe_data_dir(&missing).unwrap_err();
        assert!(error.contains("cannot write a probe file"), "{error}");
    }

    #[test]
    fn reasons_of_both_checks_are_reported() {
        let report = HealthReport {
            store: Err("disk full".into()),
            store_checked_unix_ms: 5,
            listener: Err("not accepting".into()),
        };
        assert!(!report.available());
        let body = report.to_json();
        assert_eq!(body["availability"], 0);
        assert_eq!(body["reason"], "disk full; not accepting");
        assert_eq!(body["checks"]["store"]["checked_unix_ms"], 5);
    }
}

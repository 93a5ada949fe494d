//! RPO breach alerts: a background task compares every source's replication lag
//! with its RPO target, on a tick, whether or not an agent is connected (a silent
//! agent's lag keeps growing from the scan start of its last complete commit).
//!
//! On each crossing, exactly once: a breach logs a warning, counts in
//! `blockrep_rpo_breaches_total` and runs the `--on-rpo-breach` hook with
//! `BLOCKREP_EVENT=breach`; the recovery logs at info and runs the hook with
//! `BLOCKREP_EVENT=recovered` (or `served_elsewhere`, when another server of a
//! shared bucket took the source over). A source in its initial sync has no lag yet and
//! never breaches. Breach state is kept in memory: after a restart a source that
//! is still past its target breaches again.
//!
//! Per-source targets are set with `PUT /v1/sources/{id}/rpo-target` and
//! cleared with `DELETE`; they are kept in memory only.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use blockrep_core::clock::now_unix_ms;
use serde::Deserialize;
use tracing::{info, warn};

use crate::api_error::{ApiError, blocking, error};
use crate::breaches::{BreachEvent, Transition};
use crate::shared::Shared;
use crate::workflow_api::known_for_step;

/// Hook runs queued at most; further events are logged and dropped rather than
/// piling up behind a hook that hangs.
const HOOK_QUEUE_LEN: usize = 256;
/// A hook still running after this long is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest per-source RPO target accepted (ten years): keeps `Duration`
/// arithmetic far from overflow.
const RPO_TARGET_MAX_SECONDS: f64 = 10.0 * 365.0 * 86_400.0;

/// Ticks forever (the task is aborted when the server stops).
pub(crate) async fn run(shared: Arc<Shared>) {
    let hook = shared
        .config
        .on_rpo_breach
        .clone()
        .and_then(HookRunner::spawn);
    // A zero period would make `interval` panic; 10 ms is already far finer
    // than lag is worth watching.
    let period = shared.config.alert_interval.max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // A source another server serves is watched there: its lag here
        // is as this server last saw it.
        let now = now_unix_ms();
        let elsewhere = shared.served_elsewhere(now);
        let records = shared.ledger.sources.records();
        let breaches = &shared.rpo_breaches;
        let transitions = breaches.evaluate(&records, &elsewhere, shared.thresholds(), now);
        for transition in transitions {
            let Transition {
                source,
                lag_seconds,
                rpo_target_seconds,
                ..
            } = &transition;
            match transition.event {
                BreachEvent::Breach => {
                    warn!(source = %source, lag_seconds, rpo_target_seconds, "RPO target breached");
                }
                BreachEvent::Recovered => {
                    info!(source = %source, lag_seconds, rpo_target_seconds, "RPO target met again");
                }
                BreachEvent::ServedElsewhere => {
                    info!(source = %source, lag_seconds, rpo_target_seconds,
                          "RPO breach closed here: another server serves the source and watches it");
                }
            }
            if let Some(hook) = &hook {
                hook.submit(transition);
            }
        }
    }
}

/// Runs the hook command on a thread of its own, one event at a time and in
/// order, so a slow hook never holds up the async runtime or the evaluation.
#[derive(Debug)]
struct HookRunner {
    queue: SyncSender<Transition>,
}

impl HookRunner {
    /// Starts the hook thread; it ends when the runner is dropped.
    fn spawn(command: String) -> Option<Self> {
        let (queue, events) = std::sync::mpsc::sync_channel(HOOK_QUEUE_LEN);
        let started = std::thread::Builder::new()
            .name("rpo-breach-hook".into())
            .spawn(move || run_hooks(&command, &events));
        match started {
            Ok(_) => Some(Self { queue }),
            Err(e) => {
                warn!(error = %e, "cannot start the RPO breach hook thread; hooks disabled");
                None
            }
        }
    }

    fn submit(&self, transition: Transition) {
        match self.queue.try_send(transition) {
            Ok(()) => {}
            Err(TrySendError::Full(t)) => {
                warn!(source = %t.source, event = t.event.as_str(), "RPO breach hook queue full; hook not run");
            }
            Err(TrySendError::Disconnected(t)) => {
                warn!(source = %t.source, event = t.event.as_str(), "RPO breach hook thread gone; hook not run");
            }
        }
    }
}

fn run_hooks(command: &str, events: &Receiver<Transition>) {
    while let Ok(transition) = events.recv() {
        run_hook(command, &transition);
    }
}

/// Runs `sh -c COMMAND` with the event in its environment. Its stdout is
/// discarded and its stderr goes to the server's stderr.
fn run_hook(command: &str, transition: &Transition) {
    let source = transition.source.as_str();
    let event = transition.event.as_str();
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("BLOCKREP_SOURCE", source)
        .env("BLOCKREP_EVENT", event)
        .env(
            "BLOCKREP_LAG_SECONDS",
            format!("{:.3}", transition.lag_seconds),
        )
        .env(
            "BLOCKREP_RPO_TARGET_SECONDS",
            format!("{:.3}", transition.rpo_target_seconds),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            warn!(source, event, error = %e, "cannot run the RPO breach hook");
            return;
        }
    };
    let deadline = Instant::now() + HOOK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("killed after {HOOK_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(e.to_string()),
        }
    };
    match status {
        Ok(status) if status.success() => {
            info!(source, event, "RPO breach hook ran");
        }
        Ok(status) => warn!(source, event, %status, "RPO breach hook failed"),
        Err(e) => warn!(source, event, error = %e, "RPO breach hook failed"),
    }
}

/// Body of `PUT /v1/sources/{source}/rpo-target`.
#[derive(Debug, Deserialize)]
pub(crate) struct RpoTarget {
    seconds: f64,
}

/// `PUT /v1/sources/{source}/rpo-target`: sets the source's RPO target,
/// durably in the store beside its other records (so a restarted server,
/// and every server of a bucket, applies it). Answers with the source's view.
pub(crate) async fn set_rpo_target(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
    Json(body): Json<RpoTarget>,
) -> Result<Response, ApiError> {
    if !(body.seconds >= 0.001 && body.seconds <= RPO_TARGET_MAX_SECONDS) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "seconds must be at least 0.001 and at most {RPO_TARGET_MAX_SECONDS}, got {}",
                body.seconds
            ),
        )
        .into());
    }
    change_rpo_target(
        &shared,
        &source,
        Some(Duration::from_secs_f64(body.seconds)),
    )
    .await
}

/// `DELETE /v1/sources/{source}/rpo-target`: back to the server-wide target.
pub(crate) async fn clear_rpo_target(
    State(shared): State<Arc<Shared>>,
    Path(source): Path<String>,
) -> Result<Response, ApiError> {
    change_rpo_target(&shared, &source, None).await
}

/// Records the target of a known source in the store, then applies it here.
/// The serving server makes the change (`409` naming it elsewhere), under
/// the workflow's lock, which also orders it with a refresh of the source's
/// records from the bucket.
async fn change_rpo_target(
    shared: &Arc<Shared>,
    source: &str,
    target: Option<Duration>,
) -> Result<Response, ApiError> {
    let id = known_for_step(shared, source).await?;
    let _serial = shared.migration_lock.lock().await;
    let stored = id.clone();
    blocking(shared, move |store| store.set_rpo_target(&stored, target)).await?;
    let thresholds = shared.thresholds();
    let now = now_unix_ms();
    let view = shared.ledger.sources.update(&id, |record| {
        record.rpo_target_override = target;
        record.view(&id, thresholds, now)
    });
    info!(source = %id, rpo_target_seconds = view.rpo_target_seconds,
          overridden = target.is_some(), "RPO target set");
    Ok(Json(view).into_response())
}

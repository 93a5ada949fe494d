//! The background copiers of live materializations (`blockrep launch
//! materialize`, `POST /v1/launches/NAME/materialize`): one thread per
//! volume being copied, which calls [`LaunchVolume::materialize_step`] until
//! the copy is complete, at most [`crate::ServerConfig::launch_materialize_rate`]
//! bytes a second. Materializations left unfinished by a stop are resumed at
//! start. A launch being released or deleted stops its copiers first.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blockrep_store::{LaunchVolume, Store};
use tracing::{info, warn};

use crate::closers::Closers;

/// Chunks a copier copies between two records of its progress (each record
/// syncs the target): 64 MiB at 64 KiB chunks; less under a rate, so that
/// the pace is even (a quarter of a second's worth).
const STEP_CHUNKS_MAX: u64 = 1024;
/// How long a copier waits after a step that copied nothing (every chunk
/// left was being written) or failed.
const IDLE_PAUSE: Duration = Duration::from_millis(20);
const ERROR_PAUSE: Duration = Duration::from_secs(2);
/// How long a stop waits for copiers to let their volumes go.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The running copiers, by `LAUNCH` or `LAUNCH/VOLUME`.
#[derive(Debug, Default)]
pub(crate) struct Copiers {
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Bytes the copiers copied since the server started.
    pub copied_bytes: AtomicU64,
}

impl Copiers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts copying `volume` (of launch `launch`, volume `name` for a
    /// machine's) in the background, unless a copier of it runs.
    pub(crate) fn start(
        self: &Arc<Self>,
        closers: &Arc<Closers>,
        rate: Option<u64>,
        launch: &str,
        name: Option<&str>,
        volume: Arc<LaunchVolume>,
    ) {
        let key = match name {
            Some(name) => format!("{launch}/{name}"),
            None => launch.to_owned(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        {
            let mut running = self.lock();
            if running.contains_key(&key) {
                return;
            }
            running.insert(key.clone(), Arc::clone(&stop));
        }
        let (copiers, closers, launch) = (Arc::clone(self), Arc::clone(closers), launch.to_owned());
        let spawned = std::thread::Builder::new()
            .name("materialize".into())
            .spawn({
                let key = key.clone();
                move || {
                    // Gone from the running ones however the copy ends (a
                    // panic included), after the volume is let go.
                    let _running = Running {
                        copiers: Arc::clone(&copiers),
                        key: key.clone(),
                    };
                    copy(&copiers, &volume, rate, &key, &|| {
                        stop.load(Ordering::Relaxed) || closers.is_closing(&launch)
                    });
                    drop(volume);
                }
            });
        if let Err(e) = spawned {
            warn!(volume = %key, error = %e, "cannot start the materialization's copier");
            self.lock().remove(&key);
        }
    }

    /// Stops the copiers of launch `launch` and waits until they let their
    /// volumes go (so that the launch can be deleted).
    pub(crate) async fn stop(&self, launch: &str) {
        let prefix = format!("{launch}/");
        let mine = |key: &String| key == launch || key.starts_with(&prefix);
        for (_, stop) in self.lock().iter().filter(|(key, _)| mine(key)) {
            stop.store(true, Ordering::Relaxed);
        }
        let deadline = Instant::now() + STOP_WAIT;
        while self.lock().keys().any(mine) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every copier (the server is stopping); does not wait.
    pub(crate) fn stop_all(&self) {
        for stop in self.lock().values() {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Removes a copier from the running ones when dropped.
struct Running {
    copiers: Arc<Copiers>,
    key: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.copiers.lock().remove(&self.key);
    }
}

/// Copies until the copy is complete or `stopped` says so.
fn copy(
    copiers: &Copiers,
    volume: &LaunchVolume,
    rate: Option<u64>,
    key: &str,
    stopped: &dyn Fn() -> bool,
) {
    let started = Instant::now();
    let mut copied = 0u64;
    let chunk_size = u64::from(volume.geometry().chunk_size_bytes());
    let step_chunks = rate.map_or(STEP_CHUNKS_MAX, |rate| {
        (rate / 4 / chunk_size).clamp(1, STEP_CHUNKS_MAX)
    });
    while !stopped() {
        match volume.materialize_step(step_chunks) {
            Ok(step) => {
                copied += step.copied_bytes;
                copiers
                    .copied_bytes
                    .fetch_add(step.copied_bytes, Ordering::Relaxed);
                if step.done {
                    let target = volume.materialize_progress().map(|p| p.target);
                    info!(volume = %key, target = ?target, "launch volume materialized: \
                        served from its target from now on");
                    return;
                }
                if step.copied_bytes == 0 {
                    std::thread::sleep(IDLE_PAUSE);
                }
            }
            Err(e) => {
                warn!(volume = %key, error = %e, "materialization step failed; retrying");
                std::thread::sleep(ERROR_PAUSE);
            }
        }
        if let Some(rate) = rate.filter(|rate| *rate > 0) {
            // Paced over the whole copy, a second at most at a time so that
            // a stop is seen.
            let due = Duration::from_secs_f64(copied as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead.min(Duration::from_secs(1)));
            }
        }
    }
}

/// Resumes the materializations a stop left unfinished.
pub(crate) fn resume(
    store: &Arc<Store>,
    copiers: &Arc<Copiers>,
    closers: &Arc<Closers>,
    rate: Option<u64>,
) {
    let list = match store.launch_materializations() {
        Ok(list) => list,
        Err(e) => {
            warn!(error = %e, "cannot list launch materializations");
            return;
        }
    };
    for m in list.into_iter().filter(|m| !m.progress.done) {
        match store.open_launch_volume(&m.launch, m.volume.as_deref()) {
            Ok(volume) => {
                info!(launch = %m.launch, volume = ?m.volume, copied_bytes = m.progress.copied_bytes,
                    remote_bytes = m.progress.remote_bytes, "resuming a launch materialization");
                copiers.start(closers, rate, &m.launch, m.volume.as_deref(), volume);
            }
            Err(e) => warn!(launch = %m.launch, error = %e, "cannot resume a materialization"),
        }
    }
}

/// Where a materialization asked for as `to` may go: inside `dir` (the
/// server's `--launch-materialize-dir`), as a name in it or a path under it,
/// never through `..`. Without the rule the admin API could create a file of
/// a launch's bytes (which a source chooses) anywhere the server can write.
/// A block device is allowed through a link the operator put in `dir`.
/// Creates `dir` (owner-only) if it is missing.
pub(crate) fn confine(dir: &Path, to: &str) -> Result<PathBuf, String> {
    let asked = Path::new(to);
    if asked
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("materialize target {to:?} may not contain `..`"));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let root = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let path = match asked.is_absolute() {
        true => asked.to_owned(),
        false => root.join(asked),
    };
    let outside = || {
        format!(
            "materialize target {to} is outside {} (the server's --launch-materialize-dir): \
             give a file name in it; for a block device, link it there first \
             (ln -s /dev/DEVICE {}/NAME)",
            root.display(),
            root.display()
        )
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(outside());
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", parent.display()))?;
    if !parent.starts_with(&root) {
        return Err(outside());
    }
    Ok(parent.join(name))
}

//! Revocation while the server runs.
//!
//! The `--crl` file is read again when it changes (polled every
//! `--crl-poll-interval`: its length, modification time and inode) and on
//! SIGHUP. A list that reads and verifies (PEM, DER, signed by the CA) replaces
//! the one in force:
//! - every later TLS handshake, on every listener, is checked against it (the
//!   listeners' rustls configurations share one [`ReloadableClientVerifier`]);
//! - every open replication session whose client certificate it revokes is
//!   told to end, and ends with `Unauthorized` at its next wait for a frame
//!   (within a poll interval of the change, since agents send frames steadily).
//!
//! A list that does not load (missing, torn, garbage, another CA's) is logged
//! as an error and changes nothing: the list in force stays in force. Nothing
//! here fails open, and nothing stops the server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockrep_pki::{CrlFingerprint, ReloadableClientVerifier, RevocationLists};
use tokio::signal::unix::Signal;
use tokio::sync::watch;
use tracing::{error, info};

/// A session's certificate serial and the flag that tells it to end.
#[derive(Debug)]
struct Watched {
    serial: Vec<u8>,
    revoked: watch::Sender<bool>,
}

#[derive(Debug)]
struct State {
    lists: RevocationLists,
    /// The file as last read (whether or not it loaded): a broken file is
    /// reported once per change, not once per poll.
    seen: Option<CrlFingerprint>,
    sessions: HashMap<u64, Watched>,
}

/// The revocation lists in force, and the open sessions they may end.
#[derive(Debug)]
pub(crate) struct Revocation {
    /// The `--crl` file; `None`: nothing is revoked and nothing reloads.
    path: Option<PathBuf>,
    ca_path: PathBuf,
    verifier: Arc<ReloadableClientVerifier>,
    state: Mutex<State>,
    next_session: AtomicU64,
    /// Lists loaded after start.
    pub reloads_total: AtomicU64,
    /// Reloads that failed (the previous list stayed in force).
    pub reload_failures_total: AtomicU64,
    /// Open sessions told to end because their certificate was revoked.
    pub sessions_revoked_total: AtomicU64,
}

impl Revocation {
    /// The lists loaded at start (`lists`, read from `path`) and the verifier
    /// the server's TLS configuration holds.
    pub(crate) fn new(
        path: Option<PathBuf>,
        ca_path: PathBuf,
        lists: RevocationLists,
        verifier: Arc<ReloadableClientVerifier>,
    ) -> Self {
        let seen = path.as_deref().and_then(CrlFingerprint::of);
        Self {
            path,
            ca_path,
            verifier,
            state: Mutex::new(State {
                lists,
                seen,
                sessions: HashMap::new(),
            }),
            next_session: AtomicU64::new(0),
            reloads_total: AtomicU64::new(0),
            reload_failures_total: AtomicU64::new(0),
            sessions_revoked_total: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many certificates the lists in force revoke.
    pub(crate) fn revoked_count(&self) -> usize {
        self.state().lists.revoked_count()
    }

    /// Watches a session of the certificate with `serial`. Its receiver turns
    /// true when a reload revokes the certificate, or at once if the lists in
    /// force already do (a reload between the handshake and this call).
    pub(crate) fn register(self: &Arc<Self>, serial: Vec<u8>) -> Registration {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        let (revoked, receiver) = watch::channel(state.lists.revokes(&serial));
        state.sessions.insert(id, Watched { serial, revoked });
        Registration {
            owner: Arc::clone(self),
            id,
            receiver,
        }
    }

    /// Whether the file differs from when it was last read.
    fn changed(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        CrlFingerprint::of(path) != self.state().seen
    }

    /// Reads the file again; on success the new lists are in force and the
    /// sessions they revoke are told to end. `why` is logged.
    pub(crate) fn reload(&self, why: &str) {
        let Some(path) = &self.path else {
            info!(why, "no --crl list to reload");
            return;
        };
        let seen = CrlFingerprint::of(path);
        let loaded = RevocationLists::load(path, &self.ca_path)
            .and_then(|lists| self.verifier.replace(&lists).map(|()| lists));
        let mut state = self.state();
        state.seen = seen;
        let lists = match loaded {
            Ok(lists) => lists,
            Err(e) => {
                self.reload_failures_total.fetch_add(1, Ordering::Relaxed);
                error!(crl = %path.display(), why, error = %e,
                       "revocation list not reloaded; the list in force stays in force");
                return;
            }
        };
        let mut ended = 0u64;
        for watched in state.sessions.values() {
            if lists.revokes(&watched.serial) && !*watched.revoked.borrow() {
                watched.revoked.send_replace(true);
                ended += 1;
            }
        }
        self.reloads_total.fetch_add(1, Ordering::Relaxed);
        self.sessions_revoked_total
            .fetch_add(ended, Ordering::Relaxed);
        info!(crl = %path.display(), why, revoked = lists.revoked_count(),
              sessions_ended = ended, "revocation list reloaded");
        state.lists = lists;
    }
}

/// A session's watch on its certificate; unregisters when dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    owner: Arc<Revocation>,
    id: u64,
    receiver: watch::Receiver<bool>,
}

impl Registration {
    /// Whether the certificate has been revoked since it was registered.
    pub(crate) fn is_revoked(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Completes when the session's certificate is revoked; never otherwise.
    pub(crate) fn revoked(&self) -> impl std::future::Future<Output = ()> + use<> {
        let mut receiver = self.receiver.clone();
        async move {
            if receiver.wait_for(|revoked| *revoked).await.is_err() {
                // The sender lives as long as this registration does.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner.state().sessions.remove(&self.id);
    }
}

/// Subscribes to SIGHUP, before the server says it is listening: from then on
/// a SIGHUP reloads the list rather than ending the process.
pub(crate) fn hangups() -> Option<Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            error!(error = %e, "cannot handle SIGHUP; the revocation list reloads on change only");
            None
        }
    }
}

/// The shortest poll of the list file.
const POLL_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// Reloads the list when its file changes (checked every `poll_interval`) and
/// on SIGHUP, until aborted.
pub(crate) async fn run(
    revocation: Arc<Revocation>,
    mut hangups: Option<Signal>,
    poll_interval: Duration,
) {
    // `interval` panics on zero; a poll more often than this buys nothing.
    let mut tick = tokio::time::interval(poll_interval.max(POLL_INTERVAL_MIN));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = tick.tick() => {
                if !revocation.changed() {
                    continue;
                }
                "file changed"
            }
            () = hangup(&mut hangups) => "SIGHUP",
        };
        let worker = Arc::clone(&revocation);
        if let Err(e) = tokio::task::spawn_blocking(move || worker.reload(why)).await {
            error!(error = %e, "revocation list reload task failed");
        }
    }
}

async fn hangup(hangups: &mut Option<Signal>) {
    match hangups {
        Some(signal) => {
            if signal.recv().await.is_none() {
                // The signal driver is gone; changes of the file still reload.
                *hangups = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

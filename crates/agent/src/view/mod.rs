//! Frozen views: the agent scans and sends a disk frozen at one instant, not the
//! live disk read over a span of time.
//!
//! A scan of a live disk takes hundreds of milliseconds or more, and the encoders
//! read each changed chunk again when they send it, so one root would mix moments
//! (a directory block from before a split, its sibling from after). A view is
//! taken once per epoch, just before the scan, and every read of that epoch (the
//! scan, the encoders, the intermediate commits) goes to it:
//!
//! - reflink: `FICLONE` of the image into a sibling temporary file
//!   (`.<image>.blockrep-view-<pid>-<n>`, mode 0600), removed when the epoch ends
//!   (success, error, or a dropped epoch); clones a killed agent left behind are
//!   removed at its next start.
//! - command: the operator's `--snapshot-cmd` makes the view (an LVM snapshot, a
//!   ZFS clone, ...) and prints its path; `--release-cmd` runs once the epoch is
//!   done with it, whatever the outcome.
//! - live: the disk itself (`--snapshot none`, or `auto` where the file system
//!   cannot clone, or a block device without a command).
//!
//! The view is released when the last reference to it is dropped: the scan and
//! the send workers each hold one, so nothing is released while it is read.

use std::fs::OpenOptions;
use std::ops::Deref;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{Consistency, DiskImage};
use tracing::{info, warn};

use crate::capture::Cut;
use crate::{AgentConfig, Error};
use command::{run, run_blocking};

mod command;
mod scan;

pub(crate) use scan::{Scan, pending_scan, scan_live, take_live};

/// Default longest run of each view command (snapshot, release, quiesce, thaw).
pub const VIEW_COMMAND_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5 * 60);
/// Marks the agent's temporary clones, after `.<image>`.
const CLONE_MARK: &str = ".blockrep-view-";

/// How the agent takes the view it scans each epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SnapshotMode {
    /// A reflink clone where the image's file system supports it, else the live
    /// disk (with a warning at start saying why).
    #[default]
    Auto,
    /// A reflink clone, or an error: for an operator who wants no live reads.
    Reflink,
    /// The live disk (recovery points may be torn; labelled `live`).
    None,
    /// An operator's command makes the view and prints its path.
    Command {
        /// Run with `sh -c`; its last non-empty line of output is the view's path.
        snapshot_cmd: String,
        /// Run with `sh -c` once the epoch is done with the view.
        release_cmd: Option<String>,
    },
}

/// The frozen-view settings, and what the agent learned about the disk.
#[derive(Debug, Clone, Default)]
pub struct ViewOptions {
    /// How the view is taken.
    pub mode: SnapshotMode,
    /// Run (with `sh -c`) before a view is made, e.g. `fsfreeze -f /mnt`.
    pub quiesce_cmd: Option<String>,
    /// Run after the view is made, or failed to be, e.g. `fsfreeze -u /mnt`.
    pub thaw_cmd: Option<String>,
    /// Longest run of each command; a command still running then is killed.
    /// `None` means [`VIEW_COMMAND_TIMEOUT_DEFAULT`].
    pub command_timeout: Option<Duration>,
    learned: Arc<Learned>,
}

/// Facts about the disk learned once per agent process.
#[derive(Debug, Default)]
struct Learned {
    /// `auto` found that this disk can only be read live (warned once).
    live_only: AtomicBool,
    /// Numbers this process's clones; before the first (number 0), clones an
    /// earlier, killed agent left are swept.
    clones: AtomicU64,
}

impl ViewOptions {
    /// The same options for another disk (a machine's volume), which learns
    /// its own facts: one disk that can only be read live does not make the
    /// others live, and each disk's stale clones are swept.
    pub(crate) fn for_another_disk(&self) -> Self {
        Self {
            learned: Arc::default(),
            ..self.clone()
        }
    }

    fn timeout(&self) -> Duration {
        self.command_timeout.unwrap_or(VIEW_COMMAND_TIMEOUT_DEFAULT)
    }
}

/// The disk an epoch reads: a frozen view, or the live disk. Released on drop.
pub(crate) struct View {
    disk: DiskImage,
    release: Release,
    /// In capture mode: the epoch's cut, through which every read goes (the
    /// disk as of the cut's instant, not as it is now).
    cut: Option<Arc<Cut>>,
}

/// What ends a view.
enum Release {
    Nothing,
    /// Remove the temporary reflink clone.
    RemoveClone(PathBuf),
    /// Run the operator's release command.
    Command {
        command: String,
        env: Vec<(&'static str, String)>,
        timeout: Duration,
    },
}

impl View {
    /// The live disk: nothing to release.
    pub(crate) fn live(disk: DiskImage) -> Self {
        Self {
            disk,
            release: Release::Nothing,
            cut: None,
        }
    }

    /// The disk as of `cut` (capture mode): reads go through the cut.
    pub(crate) fn cut(disk: DiskImage, cut: Arc<Cut>) -> Self {
        Self {
            disk,
            release: Release::Nothing,
            cut: Some(cut),
        }
    }

    /// The cut this view reads through, in capture mode.
    pub(crate) fn capture_cut(&self) -> Option<&Arc<Cut>> {
        self.cut.as_ref()
    }

    /// Reads `buf.len()` bytes at `offset`: through the cut in capture mode,
    /// else from the view's disk.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match &self.cut {
            Some(cut) => cut.read_at(offset, buf),
            None => self.disk.read_at(offset, buf),
        }
    }

    /// Whether bytes `start..end` lie in a hole of the view's file, and so
    /// read as zeros unread. Never through a cut: it reads what it preserved.
    pub(crate) fn is_hole(&self, start: u64, end: u64) -> bool {
        self.cut.is_none() && self.disk.is_hole(start, end)
    }

    /// In capture mode with a cut that is not full: the blocks of chunk
    /// `index` written since the head, as byte ranges of the chunk. `None`
    /// when they are not known (a scan, or a full cut).
    pub(crate) fn written_ranges(
        &self,
        geometry: blockrep_core::Geometry,
        index: u64,
    ) -> Option<Vec<(u32, u32)>> {
        let cut = self.cut.as_ref().filter(|cut| !cut.full())?;
        Some(cut.written_ranges(geometry, index))
    }

    /// The epoch has read chunk `index` for the last time: a cut stops
    /// preserving it (nothing to do for other views).
    pub(crate) fn done_with(&self, geometry: blockrep_core::Geometry, index: u64) {
        if let Some(cut) = &self.cut {
            cut.release(geometry, index);
        }
    }

    /// What a commit of this view may claim now: a cut's label can fall to
    /// `live` while the epoch runs (its preserve budget ran out).
    pub(crate) fn consistency_now(&self, scanned: Consistency) -> Consistency {
        match &self.cut {
            Some(cut) if cut.consistency() == Consistency::Live => Consistency::Live,
            _ => scanned,
        }
    }
}

impl Deref for View {
    type Target = DiskImage;
    fn deref(&self) -> &DiskImage {
        &self.disk
    }
}

impl Drop for View {
    fn drop(&mut self) {
        release(std::mem::replace(&mut self.release, Release::Nothing));
    }
}

/// Ends a view. Synchronous on purpose: the release has run before the process
/// exits (a shutdown drops the epoch, then the runtime waits for the blocking
/// threads that may hold the last reference to the view).
fn release(release: Release) {
    match release {
        Release::Nothing => {}
        Release::RemoveClone(path) => {
            if let Err(error) = std::fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %path.display(), %error, "cannot remove the view's clone");
            }
        }
        Release::Command {
            command,
            env,
            timeout,
        } => match without_stalling_the_runtime(|| run_blocking(&command, &env, timeout)) {
            Ok(()) => info!("view released"),
            Err(error) => {
                warn!(%error, "the release command failed; the view may be left behind")
            }
        },
    }
}

/// Runs `work`, which blocks, where it may be called from an async task: on a
/// multi-threaded runtime the worker hands its other tasks (the network, the
/// shutdown signal) to another thread first.
fn without_stalling_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    let multi_threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_threaded {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// Takes this epoch's view of the disk as `config.view` says and scans it.
pub(crate) async fn scan(config: &AgentConfig, chunk_size_bytes: u32) -> Result<Scan, Error> {
    take(config, chunk_size_bytes).await?.hashed().await
}

/// Takes this epoch's view of the disk as [`scan`] does, without hashing it:
/// a [`Scan::pending`] that a first sync hashes as it sends, and any other
/// epoch hashes first ([`Scan::hashed`]).
pub(crate) async fn take(config: &AgentConfig, chunk_size_bytes: u32) -> Result<Scan, Error> {
    let started = Instant::now();
    let taken = take_view(config).await?;
    scan_taken(config, taken, chunk_size_bytes, started).await
}

/// A view of the disk as `config.view` says, or `None` to read it live.
async fn take_view(config: &AgentConfig) -> Result<Option<(View, u64, Consistency)>, Error> {
    let options = &config.view;
    Ok(match &options.mode {
        SnapshotMode::None => {
            if !options.learned.live_only.swap(true, Ordering::Relaxed) {
                info!(
                    disk = %config.disk.display(),
                    "reading the disk live (--snapshot none): recovery points are labelled live and may be torn"
                );
            }
            None
        }
        SnapshotMode::Auto if options.learned.live_only.load(Ordering::Relaxed) => None,
        SnapshotMode::Auto | SnapshotMode::Reflink => reflink_view(config).await?,
        SnapshotMode::Command {
            snapshot_cmd,
            release_cmd,
        } => Some(command_view(config, snapshot_cmd, release_cmd.as_deref()).await?),
    })
}

/// A view taken by [`take_view`] (the live disk for `None`) as a scan not
/// hashed yet.
async fn scan_taken(
    config: &AgentConfig,
    taken: Option<(View, u64, Consistency)>,
    chunk_size_bytes: u32,
    started: Instant,
) -> Result<Scan, Error> {
    match taken {
        None => take_live(config, chunk_size_bytes).await,
        Some((view, started_unix_ms, consistency)) => pending_scan(
            view,
            chunk_size_bytes,
            started,
            started_unix_ms,
            consistency,
        ),
    }
}

/// Views of several disks (`configs`, one per disk, with the same view
/// options) taken at one instant, then scanned, and what the set of them
/// may claim. Views of several files or devices are not of one instant by
/// themselves: only inside one run of the quiesce command, which must stop
/// every write to all of the disks (each file system frozen, or the
/// workload paused), are they one point in time; each view is then made
/// without a quiesce of its own and the set is `quiesced`. Without a quiesce
/// command, when it fails, or when a disk has to be read live, the views are
/// taken one after the other and the set is `live`: never called consistent.
pub(crate) async fn scan_together(
    configs: &[AgentConfig],
    chunk_size_bytes: u32,
) -> Result<(Vec<Scan>, Consistency), Error> {
    let Some(options) = configs.first().map(|c| &c.view) else {
        return Ok((Vec::new(), Consistency::Live));
    };
    let started = Instant::now();
    let unquiesced: Vec<AgentConfig> = configs
        .iter()
        .map(|config| {
            let mut config = config.clone();
            config.view.quiesce_cmd = None;
            config.view.thaw_cmd = None;
            config
        })
        .collect();
    let one_instant = options.quiesce_cmd.is_some() && options.mode != SnapshotMode::None;
    let (taken, quiesced) = if one_instant {
        let (taken, quiesced) = with_quiesce(options, || async {
            let mut taken = Vec::with_capacity(unquiesced.len());
            for config in &unquiesced {
                taken.push(take_view(config).await?);
            }
            Ok::<_, Error>(taken)
        })
        .await;
        (taken?, quiesced)
    } else {
        let mut taken = Vec::with_capacity(configs.len());
        for config in &unquiesced {
            taken.push(take_view(config).await?);
        }
        (taken, false)
    };
    let label = if quiesced && taken.iter().all(Option::is_some) {
        Consistency::Quiesced
    } else {
        Consistency::Live
    };
    let mut scans = Vec::with_capacity(taken.len());
    for (config, view) in configs.iter().zip(taken) {
        let taken = scan_taken(config, view, chunk_size_bytes, started).await?;
        scans.push(taken.hashed().await?);
    }
    Ok((scans, label))
}

/// A reflink view, or `None` where `auto` has to read live.
async fn reflink_view(config: &AgentConfig) -> Result<Option<(View, u64, Consistency)>, Error> {
    let options = &config.view;
    let auto = options.mode == SnapshotMode::Auto;
    let image = config.disk.clone();
    let is_block_device = std::fs::metadata(&image)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_block_device {
        let why = format!(
            "{} is a block device, which cannot be reflinked: give --snapshot-cmd to make a \
             frozen view (an LVM snapshot or a ZFS clone, see \"Frozen views\" in docs/architecture.md)",
            image.display()
        );
        if !auto {
            return Err(Error::ViewConfig(why));
        }
        return Ok(live_from_now_on(options, &image, &why));
    }
    let number = options.learned.clones.fetch_add(1, Ordering::Relaxed);
    if number == 0 {
        sweep_stale_clones(&image);
    }
    let timeout = options.timeout();
    // Bounded like a snapshot command: a clone that hangs (a file system frozen
    // by the quiesce command) must not keep the workload frozen. A clone that
    // finishes after the timeout is dropped, which removes it.
    let made = with_quiesce(options, move || async move {
        tokio::time::timeout(
            timeout,
            tokio::task::spawn_blocking(move || make_clone(&image, number)),
        )
        .await
    })
    .await;
    let (result, quiesced) = made;
    let result = result
        .map_err(|_| {
            Error::View(format!(
                "the reflink clone was not made within {timeout:?} (--snapshot-cmd-timeout); \
                 a --quiesce-cmd must not freeze the file system that holds the image"
            ))
        })?
        .map_err(|e| Error::View(format!("the clone task failed: {e}")))?;
    match result {
        Ok((view, started_unix_ms)) => {
            if auto && number == 0 {
                info!(disk = %config.disk.display(), "scanning reflink clones of the disk: every recovery point is crash-consistent");
            }
            Ok(Some((view, started_unix_ms, label(quiesced))))
        }
        Err(CloneError::Unsupported(why)) if auto => {
            Ok(live_from_now_on(options, &config.disk, &why))
        }
        Err(CloneError::Unsupported(why)) => Err(Error::ViewConfig(format!(
            "{why}; use --snapshot auto or none to read the disk live, or --snapshot-cmd to make views another way"
        ))),
        Err(CloneError::Failed(why)) => Err(Error::View(why)),
    }
}

/// `auto` on a disk that cannot be cloned: warn once, read live from now on.
fn live_from_now_on(
    options: &ViewOptions,
    image: &Path,
    why: &str,
) -> Option<(View, u64, Consistency)> {
    if !options.learned.live_only.swap(true, Ordering::Relaxed) {
        warn!(
            disk = %image.display(),
            "this disk can only be read live, so its recovery points are labelled live and may be torn: {why}"
        );
    }
    None
}

fn label(quiesced: bool) -> Consistency {
    if quiesced {
        Consistency::Quiesced
    } else {
        Consistency::CrashConsistent
    }
}

enum CloneError {
    /// The file system cannot clone this file (`auto` reads live instead).
    Unsupported(String),
    /// Anything else: the epoch fails.
    Failed(String),
}

/// Clones `image` into its sibling temporary file and opens the clone.
/// Returns the view and the wall-clock instant just before the clone was made.
fn make_clone(image: &Path, number: u64) -> Result<(View, u64), CloneError> {
    let source = std::fs::File::open(image)
        .map_err(|e| CloneError::Failed(format!("cannot open disk {}: {e}", image.display())))?;
    let (clone, path) = create_clone_file(image, number)?;
    // From here on the clone file exists: this release removes it, on failure
    // here or, once handed to the view, when the epoch is done with it.
    let pending = PendingRelease(Some(Release::RemoveClone(path.clone())));
    let started_unix_ms = now_unix_ms();
    if let Err(error) = rustix::fs::ioctl_ficlone(&clone, &source) {
        let error = std::io::Error::from(error);
        let unsupported = matches!(
            error.raw_os_error(),
            Some(errno::EOPNOTSUPP | errno::EXDEV | errno::EINVAL | errno::ENOTTY)
        );
        let why = format!(
            "the {} file system holding {} cannot make a reflink clone of it ({error})",
            file_system_name(image),
            image.display()
        );
        return Err(if unsupported {
            CloneError::Unsupported(why)
        } else {
            CloneError::Failed(why)
        });
    }
    drop(clone);
    let disk = DiskImage::open(&path).map_err(|e| CloneError::Failed(e.to_string()))?;
    let view = View {
        disk,
        release: pending.take(),
        cut: None,
    };
    Ok((view, started_unix_ms))
}

/// Names of clones tried before giving up on names already taken.
const CLONE_NAME_TRIES: u64 = 64;

/// Creates the empty clone file: `.<image>.blockrep-view-<pid>-<n>`, or the next
/// free `<n>` where that name is taken (a file of another process that had this
/// pid, e.g. an agent restarted as pid 1 in a container, that no sweep may
/// remove while it could be in use).
fn create_clone_file(image: &Path, number: u64) -> Result<(std::fs::File, PathBuf), CloneError> {
    let pid = std::process::id();
    let mut last = None;
    for attempt in 0..CLONE_NAME_TRIES {
        let n = number
            .saturating_mul(CLONE_NAME_TRIES)
            .saturating_add(attempt);
        let path = clone_path(image, pid, n)
            .ok_or_else(|| CloneError::Failed(format!("{} has no file name", image.display())))?;
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((path, e)),
            // No room for a clone beside the image: `auto` reads live.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                return Err(CloneError::Unsupported(format!(
                    "no clone can be made beside the image: cannot create {}: {e}",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(CloneError::Failed(format!(
                    "cannot create the clone {}: {e}",
                    path.display()
                )));
            }
        }
    }
    let (path, e) = last.unzip();
    Err(CloneError::Failed(format!(
        "cannot create a clone beside {}: {CLONE_NAME_TRIES} names up to {} are taken ({})",
        image.display(),
        path.map_or_else(String::new, |p| p.display().to_string()),
        e.map_or_else(String::new, |e| e.to_string())
    )))
}

/// Errno values `FICLONE` returns where the file system cannot clone.
mod errno {
    pub const EXDEV: i32 = 18;
    pub const EINVAL: i32 = 22;
    pub const ENOTTY: i32 = 25;
    pub const EOPNOTSUPP: i32 = 95;
}

/// `.<image>.blockrep-view-<pid>-<n>` beside the image.
fn clone_path(image: &Path, pid: u32, number: u64) -> Option<PathBuf> {
    // Built from the OS string: an image name that is not UTF-8 still gets one.
    let mut name = clone_prefix(image)?;
    name.push(format!("{pid}-{number}"));
    Some(image.with_file_name(name))
}

/// `.<image>.blockrep-view-`, the start of every clone name of `image`.
fn clone_prefix(image: &Path) -> Option<std::ffi::OsString> {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(image.file_name()?);
    prefix.push(CLONE_MARK);
    Some(prefix)
}

/// Removes clones of `image` whose agent is gone (killed before it could).
fn sweep_stale_clones(image: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let (Some(directory), Some(prefix)) = (image.parent(), clone_prefix(image)) else {
        return;
    };
    let directory = if directory.as_os_str().is_empty() {
        Path::new(".")
    } else {
        directory
    };
    let own_pid = std::process::id();
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .as_bytes()
            .strip_prefix(prefix.as_bytes())
            .and_then(|rest| std::str::from_utf8(rest).ok())
        else {
            continue;
        };
        // The pid in the name: a clone of a running agent (another agent on the
        // same image) is left alone. This process has made no clone yet when it
        // sweeps, so one with its own pid is from an earlier process that had
        // the same pid (pid 1 in a container, restarted).
        let alive = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| pid != own_pid && Path::new(&format!("/proc/{pid}")).exists());
        if alive {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                info!(path = %path.display(), "removed a view clone left by an earlier agent")
            }
            Err(error) => warn!(path = %path.display(), %error, "cannot remove a stale view clone"),
        }
    }
}

/// A name for the file system holding `path`, for error messages.
fn file_system_name(path: &Path) -> String {
    let Ok(stat) = rustix::fs::statfs(path) else {
        return "unknown".into();
    };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between targets
    let magic = stat.f_type as u64 & 0xffff_ffff;
    match magic {
        0xef53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlay".into(),
        0x6969 => "nfs".into(),
        0x2fc1_2fc1 => "zfs".into(),
        0xf2f5_2010 => "f2fs".into(),
        other => format!("type {other:#x}"),
    }
}

/// Runs the quiesce command, `make`, then the thaw command (also when `make`
/// or the quiesce command failed). Returns `make`'s result and whether the
/// quiesce command succeeded.
async fn with_quiesce<F, T>(options: &ViewOptions, make: impl FnOnce() -> F) -> (T, bool)
where
    F: std::future::Future<Output = T>,
{
    let env: Vec<(&'static str, String)> = Vec::new();
    // From before the quiesce command starts until the thaw has run: should
    // this future be dropped (a shutdown mid-epoch), the guard thaws.
    let mut thaw_guard = ThawGuard(options.thaw_cmd.clone().map(|command| Release::Command {
        command,
        env: env.clone(),
        timeout: options.timeout(),
    }));
    let quiesced = match &options.quiesce_cmd {
        Some(command) => match run(command, &env, options.timeout(), false).await {
            Ok(_) => true,
            Err(error) => {
                warn!(%error, "the quiesce command failed; the view is crash-consistent only");
                false
            }
        },
        None => false,
    };
    let result = make().await;
    if let Some(command) = &options.thaw_cmd {
        let thawed = run(command, &env, options.timeout(), false).await;
        // The thaw finished (had this future been dropped while it ran, the
        // guard would have run it again to completion).
        thaw_guard.0 = None;
        if let Err(error) = thawed {
            warn!(%error, "the thaw command failed: the workload may still be frozen");
        }
    }
    (result, quiesced)
}

/// Runs the thaw command, synchronously, when dropped armed: the epoch was
/// dropped between the quiesce command and the thaw.
struct ThawGuard(Option<Release>);

impl Drop for ThawGuard {
    fn drop(&mut self) {
        if let Some(Release::Command {
            command,
            env,
            timeout,
        }) = self.0.take()
        {
            match without_stalling_the_runtime(|| run_blocking(&command, &env, timeout)) {
                Ok(()) => info!("thawed after the epoch was stopped"),
                Err(error) => {
                    warn!(%error, "the thaw command failed: the workload may still be frozen")
                }
            }
        }
    }
}

/// Runs the operator's snapshot command and opens the view it printed.
async fn command_view(
    config: &AgentConfig,
    snapshot_cmd: &str,
    release_cmd: Option<&str>,
) -> Result<(View, u64, Consistency), Error> {
    let options = &config.view;
    let live = DiskImage::open(&config.disk)?;
    let env = vec![
        ("BLOCKREP_DISK", config.disk.display().to_string()),
        ("BLOCKREP_SOURCE", config.source.to_string()),
    ];
    let timeout = options.timeout();
    let ((output, started_unix_ms), quiesced) = with_quiesce(options, || async {
        let started_unix_ms = now_unix_ms();
        (
            run(snapshot_cmd, &env, timeout, true).await,
            started_unix_ms,
        )
    })
    .await;
    let output = output.map_err(|e| Error::View(format!("the snapshot command {e}")))?;
    let Some(line) = output.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        return Err(Error::ViewConfig(
            "the snapshot command printed no path: its last non-empty line of output must be the view's path".into(),
        ));
    };
    let path = PathBuf::from(line);
    // From here on a view exists: whatever happens, it is released.
    let release = match release_cmd {
        Some(command) => {
            let mut env = env.clone();
            env.push(("BLOCKREP_VIEW", path.display().to_string()));
            Release::Command {
                command: command.to_owned(),
                env,
                timeout,
            }
        }
        None => Release::Nothing,
    };
    let pending = PendingRelease(Some(release));
    let disk = DiskImage::open(&path).map_err(|e| {
        Error::View(format!(
            "the snapshot command printed {:?}, which cannot be opened: {e}",
            path.display().to_string()
        ))
    })?;
    if disk.size_bytes() != live.size_bytes() {
        return Err(Error::ViewConfig(format!(
            "the view {} the snapshot command made is {} bytes, the disk {} is {} bytes",
            path.display(),
            disk.size_bytes(),
            config.disk.display(),
            live.size_bytes()
        )));
    }
    let view = View {
        disk,
        release: pending.take(),
        cut: None,
    };
    Ok((view, started_unix_ms, label(quiesced)))
}

/// A release that runs on drop unless handed to the view.
struct PendingRelease(Option<Release>);

impl PendingRelease {
    fn take(mut self) -> Release {
        self.0.take().unwrap_or(Release::Nothing)
    }
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            release(pending);
        }
    }
}

#[cfg(test)]
mod tests;

//! The delta rows of `blockrep bench`: the same random 4 KiB change sent as
//! patches (the agent's default), as whole changed chunks (`--no-patches`),
//! and by `rsync -B 4096 --no-whole-file` as the reference, in one run.
//!
//! Whole chunks go to a second source synced from the same disk before the
//! change, so both blockrep rows (and rsync's basis, a copy of that disk) see
//! exactly the same change.
//!
//! Loopback on the bench's machine is not a link: agent and server share its
//! cores, and bytes cost only the CPU that moves them. So the same change is
//! also sent, both ways, by two more sources whose agents are capped at
//! [`LINK_BYTES_PER_SECOND`] (`--max-rate 1Gbit/s`): a LAN between the source
//! machine and the replication server, the fastest link such a pair commonly
//! has.
//!
//! A machine of several disks has no comparison rows (`delta_compare` is
//! null): rsync compares one file, and the comparison sources are single
//! disks. Its delta (patches, as a disk's) is still measured after a warm-up
//! delta.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use blockrep_agent::{AdaptiveCompression, AgentConfig, EpochReport, RateLimiter};
use blockrep_core::SourceId;
use serde_json::{Value, json};

/// The second source, replicated with whole chunks.
const WHOLE_SOURCE: &str = "bench-whole";
/// The sources of the link rows: patches and whole chunks at the link's rate.
const LINK_PATCH_SOURCE: &str = "bench-link-patches";
const LINK_WHOLE_SOURCE: &str = "bench-link-whole";
/// A source whose delta runs first and is not measured (see [`warm_up`]).
const WARM_UP_SOURCE: &str = "bench-warm-up";
/// The link rows' rate: 1 Gbit/s.
pub(crate) const LINK_BYTES_PER_SECOND: u64 = 125_000_000;

/// What the delta needs from before the change: the warm-up source, and
/// the comparison's sources for a single disk.
pub(crate) struct Reference {
    warm_up: AgentConfig,
    compare: Option<Compare>,
}

/// The sources and the basis of the comparison rows.
struct Compare {
    whole: AgentConfig,
    link_patches: AgentConfig,
    link_whole: AgentConfig,
    /// A copy of the disk before the change, for rsync to update.
    basis: PathBuf,
}

/// Syncs the disk to a second source that sends whole chunks, and keeps a copy
/// of it for rsync; call after the initial sync, before the change.
pub(crate) async fn prepare(
    agent: &AgentConfig,
    tls: &Path,
    disk: &Path,
    workdir: &Path,
) -> Result<Reference> {
    let whole = synced_source(agent, tls, WHOLE_SOURCE, false).await?;
    let link_patches = synced_source(agent, tls, LINK_PATCH_SOURCE, true).await?;
    let link_whole = synced_source(agent, tls, LINK_WHOLE_SOURCE, false).await?;
    let warm_up = synced_source(agent, tls, WARM_UP_SOURCE, false).await?;
    // The cap applies from the delta on: the initial syncs above ran at full
    // speed, and only the deltas are compared.
    for config in [&link_patches, &link_whole] {
        config.rate_limiter.set_rate(LINK_BYTES_PER_SECOND);
    }
    let basis = workdir.join("rsync-basis.raw");
    fs::copy(disk, &basis)
        .with_context(|| format!("cannot copy the disk to {}", basis.display()))?;
    // Written back now, not during the first delta measured: a gigabyte of
    // writeback would slow whichever row came first.
    fs::File::open(&basis)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot sync {}", basis.display()))?;
    Ok(Reference {
        warm_up,
        compare: Some(Compare {
            whole,
            link_patches,
            link_whole,
            basis,
        }),
    })
}

/// For a machine (whose `agent` names its disks): only the warm-up source,
/// synced; call after the initial sync, before the change.
pub(crate) async fn prepare_machine(agent: &AgentConfig, tls: &Path) -> Result<Reference> {
    Ok(Reference {
        warm_up: synced_source(agent, tls, WARM_UP_SOURCE, false).await?,
        compare: None,
    })
}

/// A source `name` replicating the bench's disk (as `agent` does, sending
/// patches or not), with its own rate limiter and compression measurements,
/// after its initial sync.
async fn synced_source(
    agent: &AgentConfig,
    tls: &Path,
    name: &str,
    patches: bool,
) -> Result<AgentConfig> {
    let source = SourceId::new(name)?;
    let (cert, key) = blockrep_pki::issue_source(tls, &source)?;
    let mut config = agent.clone();
    config.source = source;
    config.cert_path = cert;
    config.key_path = key;
    config.patches = patches;
    config.ack_log = None;
    config.rate_limiter = Arc::new(RateLimiter::unlimited());
    config.adaptive = Arc::new(AdaptiveCompression::default());
    blockrep_agent::run_once(&config, |_| {})
        .await
        .with_context(|| format!("initial sync of the bench's source {name}"))?;
    Ok(config)
}

/// The first delta after the change, which is not measured: whichever way it
/// is sent, the first delta run after the change takes about 0.2 s longer
/// on a 1 GiB disk than the same delta run later (measured by sending a
/// whole-chunk delta first: the patched one then took 0.22 s of transfer
/// instead of 0.43 s). Every measured row comes after it, so none pays that.
pub(crate) async fn warm_up(reference: &Reference) -> Result<()> {
    delta(&reference.warm_up, "warm-up delta").await.map(drop)
}

/// One sync of `config`'s source (`what` names it in an error), with its
/// wall time.
pub(crate) async fn delta(
    config: &AgentConfig,
    what: &str,
) -> Result<(Vec<EpochReport>, Duration)> {
    noting_epochs(config, what, |_| {}).await
}

/// [`delta`], telling `on_epoch` the time since the start of each commit.
async fn noting_epochs(
    config: &AgentConfig,
    what: &str,
    mut on_epoch: impl FnMut(Duration),
) -> Result<(Vec<EpochReport>, Duration)> {
    let started = Instant::now();
    let epochs = blockrep_agent::run_once(config, |_| on_epoch(started.elapsed()))
        .await
        .with_context(|| format!("the {what}"))?
        .epochs;
    Ok((epochs, started.elapsed()))
}

/// Where the first epoch of a sync stood when it committed: its wall time
/// and both processes' CPU seconds since the sync began.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AtCommit {
    pub wall: Duration,
    pub agent_cpu: f64,
    pub server_cpu: f64,
}

/// The initial sync as [`delta`] runs it (`--once`: after the first commit
/// the agent reads the disk once more, to see that it did not change), and
/// where it stood at its first commit, the full sync itself: that second
/// pass is `--once`'s, and a running agent's next epoch, not the copy's.
/// CPU is counted from `cpu_before` (agent, server), read just before.
pub(crate) async fn initial(
    config: &AgentConfig,
    pids: (&str, &str),
    cpu_before: (f64, f64),
) -> Result<(Vec<EpochReport>, Duration, Option<AtCommit>)> {
    let mut at_commit = None;
    let (epochs, wall) = noting_epochs(config, "initial sync", |wall| {
        if at_commit.is_none() {
            at_commit = Some(AtCommit {
                wall,
                agent_cpu: crate::measure::cpu_seconds(pids.0) - cpu_before.0,
                server_cpu: crate::measure::cpu_seconds(pids.1) - cpu_before.1,
            });
        }
    })
    .await?;
    Ok((epochs, wall, at_commit))
}

/// One delta sync, measured.
fn row(epochs: &[EpochReport], wall: Duration, changed_bytes: u64) -> Value {
    let wire: u64 = epochs.iter().map(|r| r.bytes_sent).sum();
    // The scan reads the whole disk either way; the transfer is where the
    // two ways of sending differ.
    let transfer: Duration = epochs.iter().map(|r| r.transfer_duration).sum();
    let scan: Duration = epochs.iter().map(|r| r.scan_duration).sum();
    json!({
        "seconds": wall.as_secs_f64(),
        "scan_seconds": scan.as_secs_f64(),
        "transfer_seconds": transfer.as_secs_f64(),
        "bytes_on_wire": wire,
        "wire_to_changed": wire as f64 / changed_bytes.max(1) as f64,
        "chunks_sent": epochs.iter().map(|r| r.chunks_sent).sum::<u64>(),
        "patches_sent": epochs.iter().map(|r| r.patches_sent).sum::<u64>(),
    })
}

/// After the patched delta (`patched`, taking `patched_wall`) of a change of
/// `blocks_changed` 4 KiB blocks: the same change as whole chunks and through
/// rsync. Returns the `delta_compare` figures (null for a machine).
pub(crate) async fn measure(
    reference: Reference,
    disk: &Path,
    blocks_changed: u64,
    patched: &[EpochReport],
    patched_wall: Duration,
) -> Result<Value> {
    let Some(reference) = reference.compare else {
        return Ok(Value::Null);
    };
    let changed_bytes = blocks_changed * 4096;
    let (whole, whole_wall) = delta(&reference.whole, "whole-chunk delta").await?;
    let (link_patches, link_patches_wall) =
        delta(&reference.link_patches, "patched delta at 1 Gbit/s").await?;
    let (link_whole, link_whole_wall) =
        delta(&reference.link_whole, "whole-chunk delta at 1 Gbit/s").await?;
    let rsync = rsync_4k(disk, &reference.basis, changed_bytes);
    let _ = fs::remove_file(&reference.basis);
    Ok(json!({
        "changed_bytes": changed_bytes,
        "patches": row(patched, patched_wall, changed_bytes),
        "whole_chunks": row(&whole, whole_wall, changed_bytes),
        "link_bytes_per_second": LINK_BYTES_PER_SECOND,
        "link_patches": row(&link_patches, link_patches_wall, changed_bytes),
        "link_whole_chunks": row(&link_whole, link_whole_wall, changed_bytes),
        "rsync_4k": rsync.unwrap_or_else(|e| {
            eprintln!("rsync reference skipped: {e:#}");
            Value::Null
        }),
    }))
}

/// `rsync --inplace --no-whole-file -B 4096` from the disk onto its old copy
/// (local: rsync's sender and receiver over a pipe, its delta algorithm
/// forced). `--ignore-times`: the copy may have the same size and second.
fn rsync_4k(disk: &Path, basis: &Path, changed_bytes: u64) -> Result<Value> {
    let started = Instant::now();
    let output = Command::new("rsync")
        .args([
            "--inplace",
            "--ignore-times",
            "--no-whole-file",
            "-B",
            "4096",
            "--stats",
        ])
        .arg(disk)
        .arg(basis)
        .output()
        .context("cannot run rsync (is it installed?)")?;
    let wall = started.elapsed();
    ensure!(
        output.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let sent = stdout
        .lines()
        .find_map(|line| line.strip_prefix("Total bytes sent: "))
        .map(|n| n.replace(',', ""))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .context("rsync --stats printed no 'Total bytes sent'")?;
    Ok(json!({
        "seconds": wall.as_secs_f64(),
        "bytes_on_wire": sent,
        "wire_to_changed": sent as f64 / changed_bytes.max(1) as f64,
    }))
}

/// Lines of the bench's table for the `delta_compare` figures.
pub(crate) fn table_rows(f: &Value) -> Vec<(&'static str, String)> {
    let d = &f["delta_compare"];
    if d.is_null() {
        return vec![(
            "  patches, whole chunks, rsync compared",
            "one disk only".into(),
        )];
    }
    let cell = |key: &str| -> String {
        let r = &d[key];
        if r.is_null() {
            return "n/a".into();
        }
        let transfer = r["transfer_seconds"]
            .as_f64()
            .map_or(String::new(), |t| format!(" (transfer {t:.3} s)"));
        format!(
            "{:.3} s{transfer}, {:.1} MiB, {:.2}x",
            r["seconds"].as_f64().unwrap_or(f64::NAN),
            r["bytes_on_wire"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
            r["wire_to_changed"].as_f64().unwrap_or(f64::NAN)
        )
    };
    vec![
        (
            "random 4 KiB writes: changed (MiB)",
            format!(
                "{:.1}",
                d["changed_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0
            ),
        ),
        ("  patches: time, wire, wire/changed", cell("patches")),
        ("  whole chunks (--no-patches)", cell("whole_chunks")),
        (
            "  patches, 1 Gbit/s link (--max-rate)",
            cell("link_patches"),
        ),
        ("  whole chunks, 1 Gbit/s link", cell("link_whole_chunks")),
        ("  rsync -B 4096 --no-whole-file", cell("rsync_4k")),
    ]
}

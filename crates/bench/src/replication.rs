//! The main bench: initial sync, delta sync, continuous replication under
//! churn, then a cutover whose volume is verified against the disk (for a
//! machine of several disks: every volume against its disk).

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use blockrep_agent::{AgentConfig, EpochReport};
use blockrep_core::{Geometry, SourceId};
use serde_json::json;

use crate::disks::BenchDisk;
use crate::measure::{
    Sample, blake3_floor, cpu_seconds, mib, mib_per_s, nonzero_bytes, percentile, rss_bytes,
};
use crate::server::ServerChild;
use crate::synthetic::{churn_blocks, spawn_churn};
use crate::verify::{
    CutoverMachine, CutoverVolume, Verification, VolumeVerification, verify_cutover,
    verify_machine_cutover,
};
use crate::{Options, disks, plot, table};

fn source_view(body: &str) -> Option<blockrep_server::SourceView> {
    serde_json::from_str(body).ok()
}

/// Runs the main bench (see the crate's doc).
pub(crate) async fn run(args: Options) -> Result<()> {
    let chunk_size = u32::try_from(args.chunk_size).context("chunk size too large")?;
    Geometry::new(args.size, chunk_size)?;
    ensure!(args.size >= 1 << 20, "--size must be at least 1MiB");
    ensure!(
        (0.0..=100.0).contains(&args.change_percent),
        "--change-percent must be within 0..=100"
    );
    let temp;
    let workdir = match &args.workdir {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("blockrep-bench-")
                .tempdir()?;
            temp.path().to_owned()
        }
    };
    let disks = disks::plan(&workdir, args.disks, args.size, args.seed)?;
    for each in &disks {
        Geometry::new(each.size_bytes, chunk_size)?;
    }
    // A machine of several disks, or the single disk of `--disks 1`.
    let machine = disks.len() > 1;
    let disk = disks[0].path.clone();
    let disk_sizes: Vec<u64> = disks.iter().map(|d| d.size_bytes).collect();
    let total_size: u64 = disk_sizes.iter().sum();
    let tls = workdir.join("tls");
    let data = workdir.join("data");
    let keys_dir = workdir.join("keys");
    for stale in [&data, &tls, &keys_dir] {
        if stale.exists() {
            fs::remove_dir_all(stale)?;
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "blockrep bench: {} {}, seed {}, {cores} cores",
        args.disk_kind.name(),
        disks::describe(&disk_sizes),
        args.seed
    );
    let layout = disks::make(&disks, args.disk_kind)?;
    let layout_text: Vec<String> = layout
        .iter()
        .map(|(name, bytes)| format!("{name} {:.0}%", 100.0 * *bytes as f64 / total_size as f64))
        .collect();
    eprintln!("  layout: {}", layout_text.join(", "));
    let source = SourceId::new("bench")?;
    blockrep_pki::init_ca(&tls, &["localhost".into(), "127.0.0.1".into()], true)?;
    blockrep_pki::issue_source(&tls, &source)?;
    let mut server_args = args.server_args.clone();
    let keys = if args.encrypt_at_rest {
        let keys = crate::verify::Keys {
            key_dir: keys_dir.join("keys"),
            kek_file: keys_dir.join("kek"),
        };
        fs::create_dir_all(&keys_dir)?;
        blockrep_keys::init_kek_file(&keys.kek_file)?;
        server_args.extend(["--encrypt-at-rest".to_owned(), "--key-dir".to_owned()]);
        server_args.push(keys.key_dir.display().to_string());
        server_args.push("--kek-file".to_owned());
        server_args.push(keys.kek_file.display().to_string());
        eprintln!("  encrypted at rest");
        Some(keys)
    } else {
        None
    };
    let mut server = ServerChild::start(&args.server_exe, &data, &tls, &server_args)?;
    let server_pid = server.pid();
    let self_pid = std::process::id().to_string();

    let mut nonzero = 0;
    let mut floor = Duration::ZERO;
    for each in &disks {
        nonzero += nonzero_bytes(&each.path, chunk_size as usize)?;
        floor += blake3_floor(&each.path)?;
    }

    let stop_file = workdir.join("churn.stop");
    let stopped_file = workdir.join("churn.stopped");
    let _ = fs::remove_file(&stop_file);
    let _ = fs::remove_file(&stopped_file);
    let mut agent = AgentConfig::new(
        disk.clone(),
        server.addr.clone(),
        source.clone(),
        tls.join("ca.crt"),
        tls.join("bench.crt"),
        tls.join("bench.key"),
    );
    if machine {
        agent.volumes = disks
            .iter()
            .map(|d| (d.name.clone(), d.path.clone()))
            .collect();
    }
    agent.chunk_size_bytes = chunk_size;
    agent.interval = args.interval;
    agent.compression = args.compression;
    agent.pre_cutover_cmd = Some(format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.005; done",
        stop_file.display(),
        stopped_file.display()
    ));

    // Memory of agent (this process) and server, sampled through the run.
    let sampling = Arc::new(AtomicBool::new(true));
    let memory_sampler = {
        let (sampling, self_pid, server_pid) =
            (Arc::clone(&sampling), self_pid.clone(), server_pid.clone());
        std::thread::spawn(move || {
            let (mut agent_peak, mut server_peak) = (0u64, 0u64);
            while sampling.load(Ordering::Relaxed) {
                agent_peak = agent_peak.max(rss_bytes(&self_pid));
                server_peak = server_peak.max(rss_bytes(&server_pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (agent_peak, server_peak)
        })
    };

    eprintln!("initial sync...");
    let (cpu_agent_0, cpu_server_0) = (cpu_seconds(&self_pid), cpu_seconds(&server_pid));
    let (initial, initial_wall, at_commit) = crate::delta::initial(
        &agent,
        (&self_pid, &server_pid),
        (cpu_agent_0, cpu_server_0),
    )
    .await?;
    let (cpu_agent, cpu_server) = (
        cpu_seconds(&self_pid) - cpu_agent_0,
        cpu_seconds(&server_pid) - cpu_server_0,
    );
    let initial_bytes: u64 = initial.iter().map(|r| r.bytes_sent).sum();
    let reference = if machine {
        crate::delta::prepare_machine(&agent, &tls).await?
    } else {
        crate::delta::prepare(&agent, &tls, &disk, &workdir).await?
    };

    let blocks_changed = change(&disks, args.change_percent / 100.0)?;
    eprintln!("delta sync after {blocks_changed} random 4 KiB writes...");
    crate::delta::warm_up(&reference).await?;
    let (delta, delta_wall) = crate::delta::delta(&agent, "patched delta").await?;
    let delta_bytes: u64 = delta.iter().map(|r| r.bytes_sent).sum();
    let delta_chunks: u64 = delta.iter().map(|r| r.chunks_sent).sum();
    let delta_scan: Duration = delta.iter().map(|r| r.scan_duration).sum();
    let delta_compare =
        crate::delta::measure(reference, &disk, blocks_changed, &delta, delta_wall).await?;

    eprintln!(
        "continuous replication under churn at {:.1} MiB/s for {:?}...",
        mib(args.churn_rate),
        args.duration
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let epochs: Arc<std::sync::Mutex<Vec<EpochReport>>> = Arc::default();
    let agent_task = {
        let (agent, epochs) = (agent.clone(), Arc::clone(&epochs));
        tokio::spawn(async move {
            blockrep_agent::run(&agent, stop_rx, move |r| {
                epochs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(r.clone())
            })
            .await
        })
    };
    let writer = spawn_churn(
        disks.iter().map(|d| d.path.clone()).collect(),
        args.churn_rate,
        args.seed,
        stop_file.clone(),
        stopped_file.clone(),
    );
    let phase_start = Instant::now();
    let mut samples = Vec::new();
    let mut cutover_window = None;
    let cutover_requested_at;
    // The lag figures count from the phase's first commit: before it, the
    // lag is the age of the delta rows' point, which says how long the bench
    // took between them, not how replication keeps up. The plot shows all.
    let mut first_committed_sample = None;
    loop {
        let elapsed = phase_start.elapsed();
        if first_committed_sample.is_none()
            && !epochs.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
        {
            first_committed_sample = Some(samples.len());
        }
        if let Ok((200, body)) = server.admin_request("GET", "/v1/sources/bench").await
            && let Some(view) = source_view(&body)
        {
            samples.push(Sample {
                seconds: elapsed.as_secs_f64(),
                lag_seconds: view.lag_seconds.unwrap_or(0.0),
                bytes_pending: view.bytes_pending,
                bytes_received_total: view.bytes_received_total,
            });
        }
        if elapsed >= args.duration {
            cutover_requested_at = phase_start.elapsed();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let churn_samples = samples.len();
    eprintln!("cutover...");
    // Forced: the bench measures the cutover itself, not a migration
    // team's test step before it (recorded as forced in the history).
    let (code, body) = server
        .admin_post("/v1/sources/bench/cutover", r#"{"force":true}"#)
        .await?;
    ensure!(code == 202, "cutover request refused: {code} {body}");
    let cutover = loop {
        if agent_task.is_finished() {
            break agent_task.await.context("agent task")??;
        }
        if let Ok((200, body)) = server.admin_request("GET", "/v1/sources/bench").await
            && let Some(view) = source_view(&body)
        {
            samples.push(Sample {
                seconds: phase_start.elapsed().as_secs_f64(),
                lag_seconds: view.lag_seconds.unwrap_or(0.0),
                bytes_pending: view.bytes_pending,
                bytes_received_total: view.bytes_received_total,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop_tx.send(true);
    let churn_bytes = writer
        .join()
        .map_err(|_| anyhow::anyhow!("churn writer panicked"))??;
    let cutover = cutover.context("the agent ended without a cutover")?;
    cutover_window = cutover_window.or(Some((
        cutover_requested_at.as_secs_f64(),
        phase_start.elapsed().as_secs_f64(),
    )));
    sampling.store(false, Ordering::Relaxed);
    let (agent_peak, server_peak) = memory_sampler.join().unwrap_or((0, 0));
    server.stop();

    let (verification, volumes) = if machine {
        eprintln!("verifying every volume of the cutover launch against its disk...");
        verify_machine_cutover(&CutoverMachine {
            data: data.clone(),
            keys: keys.clone(),
            source: source.clone(),
            disks: agent.volumes.clone(),
            chunk_size_bytes: chunk_size,
            root: cutover.root,
            launch: cutover.launch.clone(),
            scratch: workdir.join("cutover-volume.raw"),
        })?
    } else {
        eprintln!("verifying the cutover volume against the disk...");
        let verification = verify_cutover(&CutoverVolume {
            data: data.clone(),
            keys: keys.clone(),
            disk: disk.clone(),
            source: source.clone(),
            chunk_size_bytes: chunk_size,
            root: cutover.root,
            launch: cutover.launch.clone(),
            scratch: workdir.join("cutover-volume.raw"),
        })?;
        let volume = VolumeVerification {
            name: disks[0].name.clone(),
            size_bytes: disks[0].size_bytes,
            verification,
        };
        (verification, vec![volume])
    };
    let Verification {
        roots_equal,
        bytes_equal,
    } = verification;
    let verified = verification.equal();

    // Figures.
    let churn: Vec<Sample> = samples[..churn_samples].to_vec();
    let first = first_committed_sample.unwrap_or(churn_samples);
    let mut lags: Vec<f64> = churn[first..].iter().map(|s| s.lag_seconds).collect();
    lags.sort_by(f64::total_cmp);
    let epochs = epochs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let scans: Vec<f64> = epochs
        .iter()
        .map(|e| e.scan_duration.as_secs_f64())
        .collect();
    let scan_mean = if scans.is_empty() {
        0.0
    } else {
        scans.iter().sum::<f64>() / scans.len() as f64
    };
    let loopback_rate = initial_bytes as f64 / initial_wall.as_secs_f64().max(1e-9);
    let last_epoch_bytes = cutover.bytes_sent as f64;
    let cutover_floor = floor.as_secs_f64() + last_epoch_bytes / loopback_rate;
    let delta_floor = floor.as_secs_f64() + delta_bytes as f64 / loopback_rate;
    let nonzero_gib = nonzero.max(1) as f64 / 1073741824.0;
    let figures = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "cores": cores,
        "seed": args.seed,
        "disk_size_bytes": total_size,
        "disks": disks.len(),
        "disk_sizes_bytes": disk_sizes,
        "chunk_size_bytes": chunk_size,
        "disk_kind": args.disk_kind.name(),
        "layout_bytes": layout.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "nonzero_bytes": nonzero,
        "blake3_all_cores_seconds": floor.as_secs_f64(),
        "initial_sync": {
            "seconds": initial_wall.as_secs_f64(),
            "disk_mib_per_second": mib_per_s(total_size, initial_wall),
            "nonzero_mib_per_second": mib_per_s(nonzero, initial_wall),
            "bytes_on_wire": initial_bytes,
            "agent_cpu_seconds": cpu_agent,
            "server_cpu_seconds": cpu_server,
            // Both ends' CPU per GiB of the data there is to move: zeros
            // cost next to nothing, so this is the figure across disk kinds.
            "cpu_seconds_per_nonzero_gib": (cpu_agent + cpu_server) / nonzero_gib,
            // The full sync itself, to its first commit: `--once` then reads
            // the disk once more to see that it did not change.
            "to_commit": at_commit.map(|at| json!({
                "seconds": at.wall.as_secs_f64(),
                "agent_cpu_seconds": at.agent_cpu,
                "server_cpu_seconds": at.server_cpu,
                "cpu_seconds_per_nonzero_gib": (at.agent_cpu + at.server_cpu) / nonzero_gib,
            })),
            "compression": format!("{:?}", args.compression).to_lowercase(),
            "compression_choice_changes": agent.adaptive.changes(),
        },
        "delta_sync": {
            "blocks_changed": blocks_changed,
            "seconds": delta_wall.as_secs_f64(),
            "scan_seconds": delta_scan.as_secs_f64(),
            "chunks_sent": delta_chunks,
            "bytes_on_wire": delta_bytes,
            "floor_seconds": delta_floor,
            "ratio_to_floor": delta_wall.as_secs_f64() / delta_floor.max(1e-9),
        },
        "delta_compare": delta_compare,
        "continuous": {
            "seconds": args.duration.as_secs_f64(),
            "interval_seconds": args.interval.as_secs_f64(),
            "churn_bytes_per_second": args.churn_rate,
            "churn_bytes_written": churn_bytes,
            "epochs": epochs.len(),
            "scan_seconds_mean": scan_mean,
            "lag_seconds_p50": percentile(&lags, 0.5),
            "lag_seconds_p99": percentile(&lags, 0.99),
            "lag_seconds_max": lags.last().copied().unwrap_or(0.0),
            "lag_target_seconds": args.interval.as_secs_f64() + 2.0 * scan_mean,
            "bytes_pending_max": churn.iter().map(|s| s.bytes_pending).max().unwrap_or(0),
            "samples": churn.len(),
            "lag_samples": lags.len(),
        },
        "cutover": {
            "downtime_seconds": cutover.downtime.as_secs_f64(),
            "hook_seconds": cutover.hook.as_secs_f64(),
            "final_scan_seconds": cutover.scan.as_secs_f64(),
            "transfer_seconds": cutover.transfer.as_secs_f64(),
            "commit_seconds": cutover.commit.as_secs_f64(),
            "launch_ready_seconds": cutover.launch_ready.as_secs_f64(),
            "final_epoch_bytes": cutover.bytes_sent,
            "floor_seconds": cutover_floor,
            "ratio_to_floor": cutover.downtime.as_secs_f64() / cutover_floor.max(1e-9),
            "launch": cutover.launch,
        },
        "memory": {
            "agent_peak_rss_bytes": agent_peak,
            "server_peak_rss_bytes": server_peak,
            "total_peak_rss_bytes": agent_peak + server_peak,
        },
        "verified_equal": verified,
        "roots_equal": roots_equal,
        "bytes_equal": bytes_equal,
        "volumes": volumes.iter().map(|v| json!({
            "name": v.name.as_str(),
            "size_bytes": v.size_bytes,
            "roots_equal": v.verification.roots_equal,
            "bytes_equal": v.verification.bytes_equal,
        })).collect::<Vec<_>>(),
    });
    table::print_table(&figures);
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_string_pretty(&figures)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot::plot(
            path,
            &samples,
            cutover_window,
            &disks::describe(&disk_sizes),
        )
        .with_context(|| format!("cannot draw {}", path.display()))?;
    }
    verification.ensure_equal()
}

/// Rewrites `share` of each disk's 4 KiB blocks (each disk with its own
/// seed) and syncs them, so the change is on the disks, not in flight,
/// before any delta is timed. Returns the blocks written.
fn change(disks: &[BenchDisk], share: f64) -> Result<u64> {
    let mut blocks_changed = 0;
    for disk in disks {
        blocks_changed += churn_blocks(&disk.path, share, disk.seed)?;
        fs::File::open(&disk.path)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("cannot sync {}", disk.path.display()))?;
    }
    Ok(blocks_changed)
}

//! `blockrep bench`: replication measured end to end on a synthetic disk, over real
//! TLS on loopback, through the same server and agent code as production.
//!
//! The server runs as a child process (this same binary), the agent in this
//! process, so each side's CPU time and memory are measured on its own. Every
//! figure is reported next to a reference measured in the same run (blake3 of
//! the whole disk on every core), because absolute numbers drift between
//! machines. The run ends with a cutover whose volume is verified against the
//! disk byte for byte; a mismatch makes the bench fail.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use blockrep_agent::{AgentConfig, EpochReport, parse_rate};
use blockrep_core::{DiskImage, Geometry, Root, SourceId};
use clap::Args;
use serde_json::json;

use crate::admin_client;
use crate::units::{parse_duration, parse_size};

/// Options of `blockrep bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Size of the synthetic disk.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Chunk size.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Rate of the churn writer during continuous replication (random 4 KiB
    /// writes, plus a sequential append region), e.g. 4MiB/s.
    #[arg(long, default_value = "4MiB/s", value_parser = parse_rate)]
    churn_rate: u64,
    /// How long continuous replication runs under churn before the cutover.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Share of the disk's 4 KiB blocks rewritten before the delta sync, in percent.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Seed of the synthetic disk, the changes and the churn.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Agent interval during continuous replication.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Working directory (default: a temporary directory, removed afterwards).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Also write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw throughput and lag over time, with the cutover marked, as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Instead: the lag of write capture (`agent --serve`) against a rescan
    /// of the disk every epoch, on sparse disks of --capture-sizes under
    /// random 4 KiB writes at --churn-rate, --capture-duration per run.
    #[arg(long)]
    capture: bool,
    /// Sizes of the sparse disks of `--capture` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1GiB,64GiB", value_parser = parse_size)]
    capture_sizes: Vec<u64>,
    /// Measured time of each `--capture` run, after its initial sync.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    capture_duration: Duration,
}

/// splitmix64: a small, seedable generator, good enough for synthetic data.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Kinds of content in the synthetic disk and their share, in percent.
const LAYOUT: [(&str, u64); 5] = [
    ("zero", 30),
    ("text", 25),
    ("structured", 15),
    ("random", 20),
    ("duplicate", 10),
];

const WORDS: [&str; 16] = [
    "block", "replica", "epoch", "kernel", "inode", "journal", "the", "of", "disk", "write",
    "sector", "commit", "server", "agent", "root", "page",
];

/// Writes a seeded, filesystem-like disk image of 1 MiB extents, each zero,
/// text-like, structured records, random, or a copy of an earlier extent.
/// Returns the bytes of each kind written.
pub(crate) fn make_synthetic_disk(
    path: &Path,
    size: u64,
    seed: u64,
) -> Result<Vec<(&'static str, u64)>> {
    const EXTENT: usize = 1 << 20;
    let mut rng = Rng(seed);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size)?;
    let mut written_extents: Vec<u64> = Vec::new();
    let mut shares: Vec<(&'static str, u64)> = LAYOUT.iter().map(|(name, _)| (*name, 0)).collect();
    let mut buf = vec![0u8; EXTENT];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(EXTENT as u64) as usize;
        let roll = rng.below(100);
        let mut acc = 0;
        let mut kind = LAYOUT
            .iter()
            .find(|(_, share)| {
                acc += share;
                roll < acc
            })
            .map_or("random", |(name, _)| *name);
        if kind == "duplicate" && written_extents.is_empty() {
            kind = "random";
        }
        let data = &mut buf[..len];
        match kind {
            "zero" => data.fill(0),
            "text" => {
                let mut i = 0;
                while i < len {
                    let word = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                    for &b in word.iter().chain(b" ") {
                        if i < len {
                            data[i] = b;
                            i += 1;
                        }
                    }
                }
            }
            "structured" => {
                for (n, record) in data.chunks_mut(64).enumerate() {
                    let header = (offset / 64 + n as u64).to_le_bytes();
                    for (i, b) in record.iter_mut().enumerate() {
                        *b = if i < 8 { header[i] } else { (i as u8) ^ 0x5a };
                    }
                    if rng.below(4) == 0 {
                        record[8] = rng.next_u64() as u8;
                    }
                }
            }
            "duplicate" => {
                let source = written_extents[rng.below(written_extents.len() as u64) as usize];
                file.read_exact_at(data, source)?;
            }
            _ => rng.fill(data),
        }
        if kind != "zero" {
            file.write_all_at(data, offset)?;
        }
        if let Some(entry) = shares.iter_mut().find(|(name, _)| *name == kind) {
            entry.1 += len as u64;
        }
        if len == EXTENT && kind != "zero" {
            written_extents.push(offset);
        }
        offset += len as u64;
    }
    file.sync_all()?;
    Ok(shares)
}

/// Rewrites `share` of the disk's 4 KiB blocks at random positions. Returns the
/// number of blocks written.
pub(crate) fn churn_blocks(path: &Path, share: f64, seed: u64) -> Result<u64> {
    let file = OpenOptions::new().write(true).open(path)?;
    let size = file.metadata()?.len();
    let blocks = size / 4096;
    let count = ((blocks as f64) * share).round() as u64;
    let mut rng = Rng(seed ^ 0xC0FF_EE00);
    let mut block = [0u8; 4096];
    for _ in 0..count {
        rng.fill(&mut block);
        file.write_all_at(&block, rng.below(blocks) * 4096)?;
    }
    file.sync_all()?;
    Ok(count)
}

/// CPU seconds (user + system) of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY-free constant: Linux reports these in USER_HZ, 100 on every platform we run.
    ticks / 100.0
}

/// Resident memory of a process in bytes, from `/proc/PID/status`.
fn rss_bytes(pid: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The server under test: this binary's `server` subcommand.
pub(crate) struct ServerChild {
    child: Child,
    pub(crate) addr: String,
    admin: String,
    /// The admin token of this server (its TLS directory's).
    token: blockrep_pki::AdminToken,
}

impl ServerChild {
    pub(crate) fn start(data: &Path, tls: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let token_path = tls.join(blockrep_pki::ADMIN_TOKEN_FILE_NAME);
        let token = admin_client::read_token(&token_path)?;
        let mut child = Command::new(exe)
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--retention",
                "off",
                "--data",
            ])
            .arg(data)
            .arg("--tls-dir")
            .arg(tls)
            // This server's own token, whatever the caller's environment names.
            .arg("--admin-token")
            .arg(&token_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(admin)) = (fields.get(2), fields.get(4)) else {
            bail!("unexpected server output {line:?}");
        };
        let (addr, admin) = (addr.to_string(), admin.to_string());
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        Ok(Self {
            child,
            addr,
            admin,
            token,
        })
    }

    /// An admin API request with this server's token.
    pub(crate) async fn admin_request(&self, method: &str, path: &str) -> Result<(u16, String)> {
        admin_client::request_with_token(&self.admin, method, path, None, Some(&self.token)).await
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub(crate) fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample of the continuous phase.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seconds: f64,
    lag_seconds: f64,
    bytes_pending: u64,
    bytes_received_total: u64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn mib_per_s(bytes: u64, duration: Duration) -> f64 {
    mib(bytes) / duration.as_secs_f64().max(1e-9)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Non-zero bytes of the disk, read with pread (so the bench's own memory does not
/// grow with the disk).
fn nonzero_bytes(path: &Path, chunk_size: usize) -> Result<u64> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; chunk_size];
    let mut total = 0;
    let mut offset = 0u64;
    loop {
        let read = file.read_at(&mut buf, offset)?;
        if read == 0 {
            return Ok(total);
        }
        if buf[..read].iter().any(|&b| b != 0) {
            total += read as u64;
        }
        offset += read as u64;
    }
}

/// blake3 of the whole disk on every core (the file mapped, as `b3sum` does):
/// the floor of a rescan. The bench's own disk is never truncated while
/// mapped, which is what makes a mapping safe here and not in the agent.
fn blake3_floor(path: &Path) -> Result<Duration> {
    let started = Instant::now();
    let _ = blake3::Hasher::new().update_mmap_rayon(path)?.finalize();
    Ok(started.elapsed())
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0;
    loop {
        let (ra, rb) = (fa.read_at(&mut ba, offset)?, fb.read_at(&mut bb, offset)?);
        if ra != rb || ba[..ra] != bb[..rb] {
            return Ok(false);
        }
        if ra == 0 {
            return Ok(true);
        }
        offset += ra as u64;
    }
}

/// A test hook (`BLOCKREP_BENCH_CORRUPT=1`): damage one byte of a chunk the
/// cutover replica uses (found by searching the packs for bytes of the disk that
/// are stored uncompressed), so that verification must fail.
fn corrupt_replica_for_test(data: &Path, disk: &Path, chunk_size: usize) -> Result<()> {
    let disk = fs::read(disk)?;
    let packs: Vec<Vec<u8>> = fs::read_dir(data.join("packs"))?
        .filter_map(|e| e.ok())
        .map(|e| fs::read(e.path()))
        .collect::<std::io::Result<_>>()?;
    let paths: Vec<PathBuf> = fs::read_dir(data.join("packs"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    // A whole chunk of the final disk stored raw is, by its id, the live copy.
    for chunk in disk.chunks_exact(chunk_size) {
        if chunk.iter().all(|&b| b == chunk[0]) {
            continue;
        }
        for (bytes, path) in packs.iter().zip(&paths) {
            let mut from = 0;
            while let Some(found) = bytes[from..].windows(32).position(|w| w == &chunk[..32]) {
                let at = from + found;
                if bytes.len() >= at + chunk.len() && &bytes[at..at + chunk.len()] == chunk {
                    let file = OpenOptions::new().write(true).open(path)?;
                    file.write_all_at(&[bytes[at + 10] ^ 0xff], (at + 10) as u64)?;
                    eprintln!(
                        "test hook: damaged a chunk of the replica in {}",
                        path.display()
                    );
                    return Ok(());
                }
                from = at + 1;
            }
        }
    }
    bail!("test hook: no stored chunk of the disk found to damage")
}

fn source_view(body: &str) -> Option<blockrep_server::SourceView> {
    serde_json::from_str(body).ok()
}

/// Runs the bench.
pub async fn run(args: BenchArgs) -> Result<()> {
    if args.capture {
        return crate::bench_capture::run(crate::bench_capture::CaptureBench {
            sizes: args.capture_sizes,
            duration: args.capture_duration,
            rate: args.churn_rate,
            interval: args.interval,
            chunk_size_bytes: u32::try_from(args.chunk_size).context("chunk size too large")?,
            seed: args.seed,
            workdir: args.workdir,
            json: args.json,
        })
        .await;
    }
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
    let disk = workdir.join("disk.raw");
    let tls = workdir.join("tls");
    let data = workdir.join("data");
    for stale in [&data, &tls] {
        if stale.exists() {
            fs::remove_dir_all(stale)?;
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "blockrep bench: {} MiB synthetic disk, seed {}, {cores} cores",
        args.size >> 20,
        args.seed
    );
    let layout = make_synthetic_disk(&disk, args.size, args.seed)?;
    let layout_text: Vec<String> = layout
        .iter()
        .map(|(name, bytes)| format!("{name} {:.0}%", 100.0 * *bytes as f64 / args.size as f64))
        .collect();
    eprintln!("  layout: {}", layout_text.join(", "));
    let source = SourceId::new("bench")?;
    blockrep_pki::init_ca(&tls, &["localhost".into(), "127.0.0.1".into()], true)?;
    blockrep_pki::issue_source(&tls, &source)?;
    let mut server = ServerChild::start(&data, &tls)?;
    let server_pid = server.pid();
    let self_pid = std::process::id().to_string();

    let nonzero = nonzero_bytes(&disk, chunk_size as usize)?;
    let floor = blake3_floor(&disk)?;

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
    agent.chunk_size_bytes = chunk_size;
    agent.interval = args.interval;
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
    let started = Instant::now();
    let initial = blockrep_agent::run_once(&agent, |_| {}).await?.epochs;
    let initial_wall = started.elapsed();
    let (cpu_agent, cpu_server) = (
        cpu_seconds(&self_pid) - cpu_agent_0,
        cpu_seconds(&server_pid) - cpu_server_0,
    );
    let initial_bytes: u64 = initial.iter().map(|r| r.bytes_sent).sum();
    let reference = crate::bench_delta::prepare(&agent, &tls, &disk, &workdir).await?;

    let blocks_changed = churn_blocks(&disk, args.change_percent / 100.0, args.seed)?;
    eprintln!("delta sync after {blocks_changed} random 4 KiB writes...");
    let started = Instant::now();
    let delta = blockrep_agent::run_once(&agent, |_| {}).await?.epochs;
    let delta_wall = started.elapsed();
    let delta_bytes: u64 = delta.iter().map(|r| r.bytes_sent).sum();
    let delta_chunks: u64 = delta.iter().map(|r| r.chunks_sent).sum();
    let delta_scan: Duration = delta.iter().map(|r| r.scan_duration).sum();
    let delta_compare =
        crate::bench_delta::measure(reference, &disk, blocks_changed, &delta, delta_wall).await?;

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
        disk.clone(),
        args.churn_rate,
        args.seed,
        stop_file.clone(),
        stopped_file.clone(),
    );
    let phase_start = Instant::now();
    let mut samples = Vec::new();
    let mut cutover_window = None;
    let cutover_requested_at;
    loop {
        let elapsed = phase_start.elapsed();
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
    let (code, body) = server
        .admin_request("POST", "/v1/sources/bench/cutover")
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

    eprintln!("verifying the cutover volume against the disk...");
    if std::env::var_os("BLOCKREP_BENCH_CORRUPT").is_some() {
        corrupt_replica_for_test(&data, &disk, chunk_size as usize)?;
    }
    let disk_root = {
        let image = DiskImage::open(&disk)?;
        let geometry = Geometry::new(image.size_bytes(), chunk_size)?;
        Root::from_chunk_ids(geometry, &image.scan(geometry)?).id()
    };
    let replica = workdir.join("cutover-volume.raw");
    let store = blockrep_store::Store::open_read_only(&data)?;
    let launch = store
        .launch(&cutover.launch)?
        .with_context(|| format!("cutover launch {} missing", cutover.launch))?;
    let exported = store.export(&source, &replica);
    let bytes_equal = match exported {
        Ok(_) => files_equal(&disk, &replica)?,
        Err(e) => {
            eprintln!("replica export failed: {e}");
            false
        }
    };
    let roots_equal = disk_root == cutover.root && launch.root == cutover.root;
    let verified = roots_equal && bytes_equal;
    let _ = fs::remove_file(&replica);

    // Figures.
    let churn: Vec<Sample> = samples[..churn_samples].to_vec();
    let mut lags: Vec<f64> = churn.iter().map(|s| s.lag_seconds).collect();
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
    let figures = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "cores": cores,
        "seed": args.seed,
        "disk_size_bytes": args.size,
        "chunk_size_bytes": chunk_size,
        "layout_bytes": layout.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "nonzero_bytes": nonzero,
        "blake3_all_cores_seconds": floor.as_secs_f64(),
        "initial_sync": {
            "seconds": initial_wall.as_secs_f64(),
            "disk_mib_per_second": mib_per_s(args.size, initial_wall),
            "nonzero_mib_per_second": mib_per_s(nonzero, initial_wall),
            "bytes_on_wire": initial_bytes,
            "agent_cpu_seconds": cpu_agent,
            "server_cpu_seconds": cpu_server,
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
    });
    print_table(&figures);
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_string_pretty(&figures)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot(path, &samples, cutover_window)
            .with_context(|| format!("cannot draw {}", path.display()))?;
    }
    if !verified {
        bail!(
            "the cutover volume differs from the disk (roots equal: {roots_equal}, bytes equal: {bytes_equal})"
        );
    }
    Ok(())
}

/// The churn writer: random 4 KiB writes at `rate` bytes per second, one in eight
/// of them appending sequentially to the last tenth of the disk, until the stop
/// file appears (the pre-cutover command); then it fsyncs and says so.
fn spawn_churn(
    disk: PathBuf,
    rate: u64,
    seed: u64,
    stop: PathBuf,
    stopped: PathBuf,
) -> std::thread::JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        let file = OpenOptions::new().write(true).open(&disk)?;
        let blocks = file.metadata()?.len() / 4096;
        let append_start = blocks - blocks / 10;
        let mut append_next = append_start;
        let mut rng = Rng(seed ^ 0x5EED);
        let mut block = [0u8; 4096];
        let started = Instant::now();
        let mut written = 0u64;
        while !stop.exists() {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if written + 4096 > due {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            rng.fill(&mut block);
            let index = if rng.below(8) == 0 {
                let index = append_next;
                append_next = if append_next + 1 >= blocks {
                    append_start
                } else {
                    append_next + 1
                };
                index
            } else {
                rng.below(blocks)
            };
            file.write_all_at(&block, index * 4096)?;
            written += 4096;
        }
        file.sync_all()?;
        fs::write(&stopped, b"")?;
        Ok(written)
    })
}

fn print_table(f: &serde_json::Value) {
    let num = |path: &[&str]| -> f64 {
        path.iter()
            .fold(f, |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let mut rows: Vec<(&str, String)> = vec![
        (
            "disk size (MiB) / non-zero (MiB)",
            format!(
                "{:.0} / {:.0}",
                num(&["disk_size_bytes"]) / 1048576.0,
                num(&["nonzero_bytes"]) / 1048576.0
            ),
        ),
        (
            "blake3 of the disk, all cores (s)",
            format!("{:.3}", num(&["blake3_all_cores_seconds"])),
        ),
        (
            "initial sync (s)",
            format!("{:.2}", num(&["initial_sync", "seconds"])),
        ),
        (
            "  disk MiB/s / non-zero MiB/s",
            format!(
                "{:.0} / {:.0}",
                num(&["initial_sync", "disk_mib_per_second"]),
                num(&["initial_sync", "nonzero_mib_per_second"])
            ),
        ),
        (
            "  bytes on the wire (MiB)",
            format!("{:.1}", num(&["initial_sync", "bytes_on_wire"]) / 1048576.0),
        ),
        (
            "  CPU agent / server (s)",
            format!(
                "{:.2} / {:.2}",
                num(&["initial_sync", "agent_cpu_seconds"]),
                num(&["initial_sync", "server_cpu_seconds"])
            ),
        ),
        (
            "delta sync (s), 4 KiB blocks changed",
            format!(
                "{:.3}, {}",
                num(&["delta_sync", "seconds"]),
                num(&["delta_sync", "blocks_changed"])
            ),
        ),
        (
            "  vs floor (blake3 + bytes / loopback rate)",
            format!("{:.2}x", num(&["delta_sync", "ratio_to_floor"])),
        ),
        ("", String::new()), // the delta comparison goes here
        (
            "continuous: epochs, mean scan (s)",
            format!(
                "{}, {:.3}",
                num(&["continuous", "epochs"]),
                num(&["continuous", "scan_seconds_mean"])
            ),
        ),
        (
            "  lag p50 / p99 / max (s)",
            format!(
                "{:.2} / {:.2} / {:.2}",
                num(&["continuous", "lag_seconds_p50"]),
                num(&["continuous", "lag_seconds_p99"]),
                num(&["continuous", "lag_seconds_max"])
            ),
        ),
        (
            "  lag target: interval + 2 scans (s)",
            format!("{:.2}", num(&["continuous", "lag_target_seconds"])),
        ),
        (
            "cutover downtime (s)",
            format!("{:.3}", num(&["cutover", "downtime_seconds"])),
        ),
        (
            "  final scan / transfer / commit / launch (s)",
            format!(
                "{:.3} / {:.3} / {:.3} / {:.3}",
                num(&["cutover", "final_scan_seconds"]),
                num(&["cutover", "transfer_seconds"]),
                num(&["cutover", "commit_seconds"]),
                num(&["cutover", "launch_ready_seconds"])
            ),
        ),
        (
            "  vs floor (blake3 + last epoch / rate)",
            format!("{:.2}x", num(&["cutover", "ratio_to_floor"])),
        ),
        (
            "peak memory agent / server (MiB)",
            format!(
                "{:.0} / {:.0}",
                num(&["memory", "agent_peak_rss_bytes"]) / 1048576.0,
                num(&["memory", "server_peak_rss_bytes"]) / 1048576.0
            ),
        ),
        (
            "cutover volume verified equal",
            format!("{}", f["verified_equal"]),
        ),
    ];
    if let Some(at) = rows.iter().position(|(name, _)| name.is_empty()) {
        rows.splice(at..=at, crate::bench_delta::table_rows(f));
    }
    println!("blockrep bench: {} cores, seed {}", f["cores"], f["seed"]);
    for (name, value) in rows {
        println!("  {name:<46} {value:>22}");
    }
}

/// Throughput (MiB/s received by the server) and lag over time, cutover shaded.
fn plot(path: &Path, samples: &[Sample], cutover: Option<(f64, f64)>) -> Result<()> {
    use plotters::prelude::*;
    let mut points = Vec::new();
    for pair in samples.windows(2) {
        let dt = (pair[1].seconds - pair[0].seconds).max(1e-3);
        let rate = pair[1]
            .bytes_received_total
            .saturating_sub(pair[0].bytes_received_total) as f64
            / dt
            / 1048576.0;
        points.push((pair[1].seconds, rate, pair[1].lag_seconds));
    }
    let t_max = samples.last().map_or(1.0, |s| s.seconds).max(1.0);
    let rate_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let lag_max = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (upper, lower) = root.split_vertically(300);
    for (area, title, max, pick) in [
        (&upper, "replication throughput (MiB/s)", rate_max, 1usize),
        (&lower, "replication lag (s)", lag_max, 2usize),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max, 0.0..max)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some((start, end)) = cutover {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(start, 0.0), (end, max)],
                    RED.mix(0.2).filled(),
                )))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("cutover");
        }
        let series = points
            .iter()
            .map(|p| (p.0, if pick == 1 { p.1 } else { p.2 }));
        chart
            .draw_series(LineSeries::new(series, &BLUE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

//! `blockrep bench`: replication measured end to end on a synthetic disk, over real
//! TLS on loopback, through the same server and agent code as production.
//!
//! Figures are reported next to a reference measured in the same run (blake3 of the
//! whole disk on every core), because absolute numbers drift between machines.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use blockrep_agent::{AgentConfig, EpochReport};
use blockrep_core::{DiskImage, Geometry, SourceId, scan_buffer};
use clap::Args;

use crate::units::parse_size;

/// Options of `blockrep bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Size of the synthetic disk.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Chunk size.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Share of the disk's 4 KiB blocks rewritten before the delta sync, in percent.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Seed of the synthetic disk and of the changes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Working directory (default: a temporary directory, removed afterwards).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// splitmix64: a small, seedable generator, good enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Share of each kind of content in the synthetic disk, in percent.
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

/// Writes a seeded, filesystem-like disk image: regions of 1 MiB extents, each
/// zero, text-like, structured records, random, or a copy of an earlier extent.
pub(crate) fn make_synthetic_disk(path: &Path, size: u64, seed: u64) -> Result<()> {
    const EXTENT: usize = 1 << 20;
    let mut rng = Rng(seed);
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size)?;
    let mut written_extents: Vec<u64> = Vec::new();
    let mut buf = vec![0u8; EXTENT];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(EXTENT as u64) as usize;
        let roll = rng.below(100);
        let mut acc = 0;
        let kind = LAYOUT.iter().find(|(_, share)| {
            acc += share;
            roll < acc
        });
        let kind = kind.map_or("random", |(name, _)| *name);
        let data = &mut buf[..len];
        match kind {
            "zero" => {
                offset += len as u64;
                continue; // a hole
            }
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
            "duplicate" if !written_extents.is_empty() => {
                let source = written_extents[rng.below(written_extents.len() as u64) as usize];
                let mut reader = File::open(path)?;
                use std::io::{Read, Seek, SeekFrom};
                reader.seek(SeekFrom::Start(source))?;
                reader.read_exact(data).or_else(|_| {
                    rng.fill(data);
                    Ok::<(), std::io::Error>(())
                })?;
            }
            _ => rng.fill(data),
        }
        file.write_all_at(data, offset)?;
        if len == EXTENT {
            written_extents.push(offset);
        }
        offset += len as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// Rewrites `share` of the disk's 4 KiB blocks at random positions with random
/// bytes. Returns the number of blocks written.
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

struct Sync {
    wall: Duration,
    reports: Vec<EpochReport>,
}

impl Sync {
    fn bytes_sent(&self) -> u64 {
        self.reports.iter().map(|r| r.bytes_sent).sum()
    }
    fn chunks_sent(&self) -> u64 {
        self.reports.iter().map(|r| r.chunks_sent).sum()
    }
}

async fn timed_sync(config: &AgentConfig) -> Result<Sync> {
    let started = Instant::now();
    let reports = blockrep_agent::run_once(config, |_| {}).await?.epochs;
    Ok(Sync {
        wall: started.elapsed(),
        reports,
    })
}

fn mib_per_s(bytes: u64, duration: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / duration.as_secs_f64().max(1e-9)
}

/// Runs the bench.
pub async fn run(args: BenchArgs) -> Result<()> {
    let chunk_size = u32::try_from(args.chunk_size).context("chunk size too large")?;
    Geometry::new(args.size, chunk_size)?;
    ensure!(args.size > 0, "--size must be positive");
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
            temp = tempfile_dir()?;
            temp.path().to_owned()
        }
    };
    let disk = workdir.join("disk.raw");
    let tls = workdir.join("tls");
    let data = workdir.join("data");
    if data.exists() {
        fs::remove_dir_all(&data)?;
    }
    eprintln!(
        "making a {} MiB synthetic disk (seed {})...",
        args.size >> 20,
        args.seed
    );
    make_synthetic_disk(&disk, args.size, args.seed)?;
    let source = SourceId::new("bench")?;
    blockrep_pki::init_ca(&tls, &["localhost".into(), "127.0.0.1".into()], true)?;
    blockrep_pki::issue_source(&tls, &source)?;

    let config =
        blockrep_server::ServerConfig::new("127.0.0.1:0".parse()?, data.clone(), tls.clone());
    let server = blockrep_server::Server::bind(config).await?;
    let addr = server.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let mut agent = AgentConfig::new(
        disk.clone(),
        addr.to_string(),
        source.clone(),
        tls.join("ca.crt"),
        tls.join("bench.crt"),
        tls.join("bench.key"),
    );
    agent.chunk_size_bytes = chunk_size;

    let image = DiskImage::open(&disk)?;
    let geometry = Geometry::new(image.size_bytes(), chunk_size)?;
    let nonzero_bytes = nonzero_bytes(&image, geometry);
    let started = Instant::now();
    let _ = scan_buffer(image.bytes(), geometry);
    let scan_floor = started.elapsed();
    drop(image);

    eprintln!("initial sync...");
    let initial = timed_sync(&agent).await?;
    let blocks_changed = churn_blocks(&disk, args.change_percent / 100.0, args.seed)?;
    eprintln!("delta sync after {blocks_changed} random 4 KiB writes...");
    let delta = timed_sync(&agent).await?;

    let _ = stop_tx.send(());
    let _ = server_task.await;
    let exported = workdir.join("export.raw");
    let store = blockrep_store::Store::open_read_only(&data)?;
    store.export(&source, &exported)?;
    let verified = files_equal(&disk, &exported)?;

    let rows = [
        ("disk size (MiB)", format!("{}", args.size >> 20)),
        (
            "non-zero data (MiB)",
            format!("{:.1}", nonzero_bytes as f64 / (1 << 20) as f64),
        ),
        (
            "blake3 scan of the disk, all cores (s)",
            format!("{:.3}", scan_floor.as_secs_f64()),
        ),
        (
            "initial sync (s)",
            format!("{:.3}", initial.wall.as_secs_f64()),
        ),
        (
            "initial sync, disk MiB/s",
            format!("{:.0}", mib_per_s(args.size, initial.wall)),
        ),
        (
            "initial sync, non-zero MiB/s",
            format!("{:.0}", mib_per_s(nonzero_bytes, initial.wall)),
        ),
        (
            "initial sync, bytes on the wire (MiB)",
            format!("{:.1}", initial.bytes_sent() as f64 / (1 << 20) as f64),
        ),
        ("delta: 4 KiB blocks changed", format!("{blocks_changed}")),
        ("delta sync (s)", format!("{:.3}", delta.wall.as_secs_f64())),
        (
            "delta sync / blake3 scan",
            format!(
                "{:.2}x",
                delta.wall.as_secs_f64() / scan_floor.as_secs_f64().max(1e-9)
            ),
        ),
        ("delta chunks sent", format!("{}", delta.chunks_sent())),
        (
            "delta bytes on the wire (MiB)",
            format!("{:.2}", delta.bytes_sent() as f64 / (1 << 20) as f64),
        ),
        ("replica verified equal", format!("{verified}")),
    ];
    println!(
        "blockrep bench: {} cores, seed {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.seed
    );
    for (name, value) in &rows {
        println!("  {name:<44} {value:>12}");
    }
    if let Some(path) = &args.json {
        let mut out = String::from("{\n");
        out.push_str(&format!(
            "  \"version\": \"{}\",\n",
            env!("CARGO_PKG_VERSION")
        ));
        out.push_str(&format!(
            "  \"cores\": {},\n",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ));
        out.push_str(&format!(
            "  \"seed\": {},\n  \"disk_size_bytes\": {},\n  \"nonzero_bytes\": {},\n",
            args.seed, args.size, nonzero_bytes
        ));
        out.push_str(&format!(
            "  \"scan_floor_seconds\": {:.6},\n",
            scan_floor.as_secs_f64()
        ));
        out.push_str(&format!(
            "  \"initial_sync_seconds\": {:.6},\n  \"initial_sync_bytes_sent\": {},\n",
            initial.wall.as_secs_f64(),
            initial.bytes_sent()
        ));
        out.push_str(&format!("  \"delta_blocks_changed\": {},\n  \"delta_sync_seconds\": {:.6},\n  \"delta_chunks_sent\": {},\n  \"delta_bytes_sent\": {},\n", blocks_changed, delta.wall.as_secs_f64(), delta.chunks_sent(), delta.bytes_sent()));
        out.push_str(&format!("  \"verified_equal\": {verified}\n}}\n"));
        fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !verified {
        bail!("the exported replica differs from the disk");
    }
    Ok(())
}

fn nonzero_bytes(image: &DiskImage, geometry: Geometry) -> u64 {
    (0..geometry.chunk_count())
        .filter_map(|i| geometry.chunk_range(i))
        .filter(|r| image.bytes()[r.clone()].iter().any(|&b| b != 0))
        .map(|r| r.len() as u64)
        .sum()
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (DiskImage::open(a)?, DiskImage::open(b)?);
    Ok(a.bytes() == b.bytes())
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("blockrep-bench-");
    let dir = builder
        .tempdir()
        .context("cannot make a temporary directory")?;
    let mut marker = File::create(dir.path().join("README"))?;
    writeln!(
        marker,
        "blockrep bench working directory; removed when the bench ends"
    )?;
    Ok(dir)
}

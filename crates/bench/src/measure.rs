//! What the bench reads off the machine and the disk: a process's CPU time and
//! resident memory (from /proc), the disk's non-zero bytes, the blake3 floor,
//! and the small arithmetic of its figures.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

/// CPU seconds (user + system) of a process, from `/proc/PID/stat`.
pub(crate) fn cpu_seconds(pid: &str) -> f64 {
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
pub(crate) fn rss_bytes(pid: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub(crate) fn mib_per_s(bytes: u64, duration: Duration) -> f64 {
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
pub(crate) fn nonzero_bytes(path: &Path, chunk_size: usize) -> Result<u64> {
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
pub(crate) fn blake3_floor(path: &Path) -> Result<Duration> {
    let started = Instant::now();
    let _ = blake3::Hasher::new().update_mmap_rayon(path)?.finalize();
    Ok(started.elapsed())
}

/// One sample of the continuous phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) seconds: f64,
    pub(crate) lag_seconds: f64,
    pub(crate) bytes_pending: u64,
    pub(crate) bytes_received_total: u64,
}

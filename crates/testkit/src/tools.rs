//! Running external programs from tests: their output as text, success
//! checks, whether a client is installed (and whether it must be), and
//! waiting for a condition.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A command's stdout, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A command's stderr, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Fails the test with the command's status and output unless it succeeded.
pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// `bin export` (`bin`: a blockrep binary) of `source`'s head from the data
/// directory `data` to `out`.
pub fn export_with(bin: &Path, data: &Path, source: &str, out: &Path) -> Output {
    Command::new(bin)
        .args(["export", "--data"])
        .arg(data)
        .args(["--source", source, "--out"])
        .arg(out)
        .output()
        .unwrap()
}

/// Whether external clients must be present: CI and the test script set
/// `BLOCKREP_REQUIRE_TOOLS`, so that a test that needs one fails instead of
/// skipping.
pub fn require_external_tools() -> bool {
    std::env::var_os("BLOCKREP_REQUIRE_TOOLS").is_some()
}

/// Runs an external tool; panics with its output if it fails.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Whether `program` can be run (scripts/test.sh installs the clients).
pub fn have_tool(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || !require_external_tools(),
        "{program} is required (BLOCKREP_REQUIRE_TOOLS is set)"
    );
    found
}

/// Whether `qemu-img` is installed (scripts/test.sh installs it).
pub fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `qemu-img compare` of two raw images (files or NBD URIs): true when it says
/// identical.
pub fn qemu_img_identical(a: impl AsRef<std::ffi::OsStr>, b: impl AsRef<std::ffi::OsStr>) -> bool {
    let output = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    output.status.success()
        && String::from_utf8_lossy(&output.stdout).contains("Images are identical")
}

/// A loopback address on which nothing listens (a port bound, then freed),
/// below the kernel's ephemeral range (see [`free_ports`]): a server that
/// cannot be reached, or one that is started on it later, stopped and
/// started again on the same address while its agent keeps reconnecting.
pub fn closed_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]))
}

/// Free loopback ports, all held until every one is chosen.
///
/// They are taken below the kernel's ephemeral range: a port of that range
/// can be handed to any outgoing connection (a test's client, a server's
/// own S3 requests, even an agent reconnecting to that very port, which
/// then connects to itself) while a server that listened on it is stopped,
/// and its restart would then fail to bind it. Below that range only a
/// process that asks for the port by number can take it.
pub fn free_ports(count: usize) -> Vec<u16> {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Ports under 1024 are privileged and the low thousands are where
    // well-known services sit; a machine whose ephemeral range starts
    // lower than that leaves nothing to choose, and the kernel chooses.
    const LOWEST: u16 = 10_000;
    let span = ephemeral_from.saturating_sub(LOWEST);
    // Seeded apart per call: tests in parallel do not try the same ports.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    let mut rng = crate::SplitMix64::new(seed);
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    let mut tries = 0;
    while listeners.len() < count {
        tries += 1;
        let port = if span >= 1024 && tries < 10_000 {
            LOWEST + rng.below(u64::from(span)) as u16
        } else {
            0
        };
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(listener);
        }
    }
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// Root id (hex) of a disk image file at the given chunk size, as the agent computes it.
pub fn disk_root(path: &Path, chunk_size: u32) -> String {
    disk_root_in(path, chunk_size, blockrep_core::IdSpace::PLAIN)
}

/// [`disk_root`] with chunk ids in `space`: the root a server that encrypts
/// the source at rest (whose id space it is) holds for the disk.
pub fn disk_root_in(path: &Path, chunk_size: u32, space: blockrep_core::IdSpace) -> String {
    let disk = blockrep_core::DiskImage::open(path).unwrap();
    let geometry = blockrep_core::Geometry::new(disk.size_bytes(), chunk_size).unwrap();
    let mut ids = disk.scan(geometry).unwrap();
    space.map_all(&mut ids);
    blockrep_core::Root::from_chunk_ids(geometry, &ids)
        .id()
        .to_hex()
}

/// `promtool check metrics` on an exposition: fails the test on format
/// errors and on lint problems (counters without `_total`, non-base units,
/// missing help, a `quantile` label outside a summary).
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}): {}{}\n{text}",
        output.status,
        stdout(&output),
        stderr(&output)
    );
}

/// Whether two files hold the same bytes, compared in 1 MiB blocks (a large
/// sparse disk does not fit a comfortable test allocation twice).
pub fn files_equal(a: &Path, b: &Path) -> bool {
    let (mut a, mut b) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    if a.metadata().unwrap().len() != b.metadata().unwrap().len() {
        return false;
    }
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut a, &mut x);
        let m = read_full(&mut b, &mut y);
        if n != m || x[..n] != y[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]).unwrap() {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

/// `VmHWM` (peak resident memory) of a process, in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

//! Helpers shared by the end-to-end tests (included with `mod common;`).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_blockrep");

pub fn bin() -> PathBuf {
    PathBuf::from(BIN)
}

/// Runs `blockrep agent --once` for `source` with the certificates in `tls`.
pub fn agent_once(
    disk: &Path,
    addr: std::net::SocketAddr,
    source: &str,
    tls: &Path,
    extra: &[&str],
) -> Output {
    Command::new(BIN)
        .args(["agent", "--once", "--disk"])
        .arg(disk)
        .args(["--to", &addr.to_string(), "--source", source, "--tls-dir"])
        .arg(tls)
        .args(extra)
        .output()
        .unwrap()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "command failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// Sum of `key=N` over the agent's epoch lines.
pub fn sum_field(output: &Output, key: &str) -> u64 {
    stdout(output)
        .lines()
        .filter(|l| l.starts_with("epoch "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|field| field.strip_prefix(&format!("{key}=")))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

/// `blockrep export` of `source` to `out`.
pub fn export(data: &Path, source: &str, out: &Path) -> Output {
    Command::new(BIN)
        .args(["export", "--data"])
        .arg(data)
        .args(["--source", source, "--out"])
        .arg(out)
        .output()
        .unwrap()
}

/// Whether `qemu-img` is installed (scripts/test.sh installs it).
pub fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `qemu-img compare` of two raw images: true when it says identical.
pub fn qemu_img_identical(a: &Path, b: &Path) -> bool {
    let output = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    output.status.success()
        && String::from_utf8_lossy(&output.stdout).contains("Images are identical")
}

/// Whether `qemu-img` must be present: CI and the test script require it.
pub fn require_external_tools() -> bool {
    std::env::var_os("BLOCKREP_REQUIRE_TOOLS").is_some()
}

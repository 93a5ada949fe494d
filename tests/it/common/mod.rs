//! Helpers of the end-to-end tests that drive the blockrep binary under test
//! (`CARGO_BIN_EXE_blockrep`, known only to this package's tests): its
//! commands as the tests run them, and the admin API as they query it. What
//! does not need the binary lives in `blockrep_testkit`.
#![allow(dead_code)]

pub use blockrep_testkit::admin::*;
pub use blockrep_testkit::tools::*;
pub use blockrep_testkit::{AgentProcess, AgentRig};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The blockrep binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_blockrep");

/// [`BIN`] as a path.
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

/// Starts `blockrep agent` for `source` with the certificates in `tls`;
/// continuous unless `extra` says `--once`.
pub fn spawn_agent(
    disk: &Path,
    addr: std::net::SocketAddr,
    source: &str,
    tls: &Path,
    extra: &[&str],
) -> AgentProcess {
    AgentProcess::start(&bin(), disk, addr, source, tls, extra)
}

/// [`agent_once`] claiming source `claimed` while presenting the certificate
/// of source `cert_of` from the same directory: a session the server must refuse.
pub fn agent_once_claiming(
    disk: &Path,
    addr: std::net::SocketAddr,
    claimed: &str,
    pki: &blockrep_testkit::Pki,
    cert_of: &str,
) -> Output {
    let (cert, key) = (pki.cert(cert_of), pki.key(cert_of));
    agent_once(
        disk,
        addr,
        claimed,
        pki.path(),
        &[
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    )
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
    export_with(&bin(), data, source, out)
}

/// The agent's arguments naming its disk, server, source and certificates.
pub fn agent_args<'a>(
    disk: &'a str,
    server: &'a str,
    source: &'a str,
    tls: &'a str,
) -> Vec<&'a str> {
    vec![
        "--disk",
        disk,
        "--to",
        server,
        "--source",
        source,
        "--tls-dir",
        tls,
    ]
}

/// A server that also serves launch volumes over NBD, without automatic
/// snapshots (so the tests' own snapshots are the only ones).
pub fn nbd_server(pki: &blockrep_testkit::Pki, data: &Path) -> blockrep_testkit::ServerProcess {
    blockrep_testkit::ServerProcess::start_with(
        &bin(),
        data,
        pki.path(),
        &["--nbd-listen", "127.0.0.1:0", "--retention", "off"],
    )
}

/// An [`AgentRig`] whose server also serves launch volumes over NBD, as
/// [`nbd_server`] starts one.
pub fn nbd_rig(sources: &[&str]) -> AgentRig {
    rig(
        sources,
        &["--nbd-listen", "127.0.0.1:0", "--retention", "off"],
    )
}

/// Runs the blockrep CLI (`args`) against the server's admin API, with the
/// admin token in `pki`.
pub fn cli(
    server: &blockrep_testkit::ServerProcess,
    pki: &blockrep_testkit::Pki,
    args: &[&str],
) -> Output {
    let admin = server.admin_addr.unwrap().to_string();
    Command::new(BIN)
        .args(args)
        .args(["--admin", &admin, "--admin-token"])
        .arg(pki.path().join("admin.token"))
        .output()
        .unwrap()
}

/// A 4 KiB block `index` stamped with sequence number `seq`: index, seq, then
/// a repeated hash of both. Unique per write, so a torn or misplaced block is
/// detectable, yet it compresses well.
pub fn stamped_block(index: u64, seq: u64) -> Vec<u8> {
    const BLOCK_BYTES: usize = 4096;
    let mut block = Vec::with_capacity(BLOCK_BYTES);
    block.extend_from_slice(&index.to_le_bytes());
    block.extend_from_slice(&seq.to_le_bytes());
    let hash = blake3::hash(&[index.to_le_bytes(), seq.to_le_bytes()].concat());
    while block.len() < BLOCK_BYTES {
        block.extend_from_slice(hash.as_bytes());
    }
    block.truncate(BLOCK_BYTES);
    block
}

/// A number from the environment, decimal or `0x` hex (seeds are printed in
/// hex); `None` when unset. A value that does not parse is a mistake: panic.
pub fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={text:?}: {e}")))
}

/// Cuts `source` over with its agent run as `--once --cutover`; returns the
/// cutover launch's name.
pub fn cut_over_once(disk: &Path, addr: std::net::SocketAddr, source: &str, tls: &Path) -> String {
    let output = agent_once(disk, addr, source, tls, &["--cutover"]);
    assert_success(&output);
    stdout(&output)
        .split_whitespace()
        .find_map(|f| f.strip_prefix("launch="))
        .unwrap_or_else(|| panic!("no launch in {}", stdout(&output)))
        .to_owned()
}

/// `blockrep failback --once` of `source`'s disk to `launch`.
pub fn failback_once(
    disk: &Path,
    addr: std::net::SocketAddr,
    source: &str,
    launch: &str,
    tls: &Path,
    extra: &[&str],
) -> Output {
    Command::new(BIN)
        .args(["failback", "--once", "--disk"])
        .arg(disk)
        .args(["--from", &addr.to_string(), "--source", source])
        .args(["--launch", launch, "--tls-dir"])
        .arg(tls)
        .args(extra)
        .output()
        .unwrap()
}

/// An [`blockrep_testkit::AgentRig`] of the binary under test: certificates
/// for `sources`, a work directory and a server started with `server_args`.
pub fn rig(sources: &[&str], server_args: &[&str]) -> blockrep_testkit::AgentRig {
    blockrep_testkit::AgentRig::start(&bin(), sources, server_args)
}

/// [`rig`] with certificates made beforehand.
pub fn rig_with(pki: blockrep_testkit::Pki, server_args: &[&str]) -> blockrep_testkit::AgentRig {
    blockrep_testkit::AgentRig::start_with_pki(&bin(), pki, server_args)
}

/// A thread writing a random 4 KiB block of `disk` (among its first
/// `blocks`) every 5 ms until `stop` is set, then fsyncing it: a live
/// workload under replication.
pub fn churn(
    disk: std::path::PathBuf,
    blocks: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let mut seq = 1u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let block = blockrep_testkit::random_bytes(4096, seq);
            std::os::unix::fs::FileExt::write_all_at(&file, &block, (seq * 97 % blocks) * 4096)
                .unwrap();
            seq += 1;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        file.sync_all().unwrap();
    })
}

/// `blockrep export --root ROOT` from the bucket `access` names, in a
/// working copy of its own under `work`; the image.
pub fn export_root_from_bucket(
    work: &Path,
    access: &blockrep_testkit::BucketAccess,
    root: &str,
) -> std::path::PathBuf {
    let copy = tempfile::tempdir_in(work).unwrap().keep();
    let out = copy.join("root.img");
    let mut command = Command::new(BIN);
    command.args(["export", "--data"]).arg(copy.join("data"));
    access.apply(&mut command);
    let output = command
        .args(["--root", root, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_success(&output);
    out
}

/// fio's options (its NBD engine) for 4 KiB random writes with crc32c
/// headers over the first `size` of `uri`, queue depth 16, seeded: the same
/// options with `--verify_only` read back the same writes. Jobs as threads,
/// so that a kill of fio kills them all.
pub fn fio_randwrite_job(name: &str, uri: &str, size: &str, seed: u32) -> Vec<String> {
    [
        format!("--name={name}"),
        "--ioengine=nbd".to_owned(),
        format!("--uri={uri}"),
        "--rw=randwrite".to_owned(),
        "--bs=4k".to_owned(),
        format!("--size={size}"),
        "--iodepth=16".to_owned(),
        format!("--randseed={seed}"),
        "--verify=crc32c".to_owned(),
        "--verify_fatal=1".to_owned(),
        "--thread".to_owned(),
    ]
    .into()
}

/// A directory laid out as libnbd and qemu want their certificates
/// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), holding the
/// certificate `stem` of `pki`; `None` for a directory with the CA only.
pub fn client_dir(pki: &blockrep_testkit::Pki, work: &Path, stem: Option<&str>) -> PathBuf {
    let dir = work.join(format!("certs-{}", stem.unwrap_or("none")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(pki.cert("ca"), dir.join("ca-cert.pem")).unwrap();
    if let Some(stem) = stem {
        std::fs::copy(pki.cert(stem), dir.join("client-cert.pem")).unwrap();
        std::fs::copy(pki.key(stem), dir.join("client-key.pem")).unwrap();
    }
    dir
}

/// Runs a tool, returning its output whether it succeeded or not.
pub fn run_output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// A tool's standard output and error, in that order.
pub fn all_output(output: &Output) -> String {
    format!("{}{}", stdout(output), stderr(output))
}

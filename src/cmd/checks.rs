//! Launch checks (post-launch actions), run by `blockrep launch create` once
//! the launch is served: a command of the operator's, the launch's file
//! systems (`--check-fs`), a boot in QEMU (`--check-boot`). Each gives a
//! [`CheckView`] that the caller reports to the server.
//!
//! They run here, not on the server: the server never executes what the API
//! sends it. The launch is read through its NBD export like any client would.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockrep_server::CheckView;

use crate::cli::LaunchCheckArgs;

/// Most output kept from a check (the end of it).
const OUTPUT_TAIL_BYTES: usize = 4096;

/// Where `scripts/drill-kernel.sh` puts the default drill kernel.
const DRILL_DIR: &str = "/var/lib/blockrep/drill";

/// What the checks look at.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub launch: String,
    pub source: String,
    /// Each volume's name and NBD URI, the first being the launch's own for
    /// a single disk.
    pub urls: Vec<(String, String)>,
}

/// Runs every check `args` asks for, in order, and returns their results.
pub(crate) fn run_all(args: &LaunchCheckArgs, target: &Target) -> Vec<CheckView> {
    let mut out = Vec::new();
    if args.check_fs {
        out.push(timed(
            "fs",
            "e2fsck -fn / xfs_repair -n over nbdfuse",
            || check_fs(target, args.check_timeout),
        ));
    }
    if args.check_boot {
        let kernel = drill_file(
            args.boot_kernel.as_ref(),
            "BLOCKREP_DRILL_KERNEL",
            "vmlinuz",
        );
        let initrd = drill_file(
            args.boot_initrd.as_ref(),
            "BLOCKREP_DRILL_INITRD",
            "initrd.img",
        );
        let expect = args.boot_expect.clone().unwrap_or_default();
        let command = format!(
            "qemu-system-x86_64 -kernel {} -initrd {} -append {:?} (expect {expect:?})",
            kernel.display(),
            initrd.display(),
            args.boot_append
        );
        out.push(timed("boot", &command, || {
            check_boot(
                target,
                &kernel,
                &initrd,
                &args.boot_append,
                &expect,
                args.boot_timeout,
            )
        }));
    }
    for (index, command) in args.commands.iter().enumerate() {
        let name = format!("cmd{}", index + 1);
        out.push(timed(&name, command, || {
            let mut shell = Command::new("sh");
            shell.arg("-c").arg(command);
            environment(&mut shell, target);
            run(shell, args.check_timeout)
        }));
    }
    out
}

/// What one check found: passed, exit code, output.
struct Found {
    passed: bool,
    exit_code: Option<i32>,
    output: String,
}

fn timed(name: &str, command: &str, check: impl FnOnce() -> Found) -> CheckView {
    let started = Instant::now();
    let found = check();
    CheckView {
        name: name.to_owned(),
        command: command.to_owned(),
        passed: found.passed,
        exit_code: found.exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        finished_unix_ms: 0,
        output_tail: tail(&found.output),
    }
}

fn failed(why: impl Into<String>) -> Found {
    Found {
        passed: false,
        exit_code: None,
        output: why.into(),
    }
}

fn tail(text: &str) -> String {
    let mut start = text.len().saturating_sub(OUTPUT_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// The launch in a check's environment.
fn environment(command: &mut Command, target: &Target) {
    let urls: Vec<String> = target
        .urls
        .iter()
        .map(|(volume, url)| format!("{volume} {url}"))
        .collect();
    command
        .env("BLOCKREP_LAUNCH", &target.launch)
        .env("BLOCKREP_SOURCE", &target.source)
        .env(
            "BLOCKREP_NBD_URL",
            target.urls.first().map_or("", |(_, url)| url.as_str()),
        )
        .env("BLOCKREP_NBD_URLS", urls.join("\n"));
}

/// Runs `command` to its end or `timeout` (then kills it), output merged.
fn run(mut command: Command, timeout: Duration) -> Found {
    let spawned = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot run {command:?}: {e}")),
    };
    let output = collect_output(&mut child);
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let output = output.join().unwrap_or_default();
                return Found {
                    passed: status.success(),
                    exit_code: status.code(),
                    output,
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let mut output = output.join().unwrap_or_default();
                output.push_str(&format!("\n(killed after {timeout:?})\n"));
                return Found {
                    passed: false,
                    exit_code: None,
                    output,
                };
            }
            Err(e) => return failed(format!("cannot wait for {command:?}: {e}")),
        }
    }
}

/// Reads a child's stdout and stderr to their ends on threads of their own
/// (so neither pipe fills and stalls it); joined, they give both, merged.
fn collect_output(child: &mut Child) -> std::thread::JoinHandle<String> {
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
    .collect();
    std::thread::spawn(move || {
        readers
            .into_iter()
            .map(|r| r.join().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("")
    })
}

/// A drill kernel or initrd: the flag's, the variable's, else the default.
fn drill_file(flag: Option<&PathBuf>, variable: &str, name: &str) -> PathBuf {
    flag.cloned()
        .or_else(|| std::env::var_os(variable).map(PathBuf::from))
        .unwrap_or_else(|| Path::new(DRILL_DIR).join(name))
}

/// The QEMU drive of an NBD URI: `nbd://HOST:PORT/EXPORT` as QEMU's own
/// NBD client options (it reads the export, like any NBD client).
fn qemu_drive(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("nbd://")
        .ok_or_else(|| format!("--check-boot reads plain nbd:// exports; the launch is {url}"))?;
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("no port in {url}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},\
         node-name=launch,read-only=on,cache.direct=off"
    ))
}

/// Boots the launch's first volume and waits for `expect` on the console.
fn check_boot(
    target: &Target,
    kernel: &Path,
    initrd: &Path,
    append: &str,
    expect: &str,
    timeout: Duration,
) -> Found {
    for file in [kernel, initrd] {
        if !file.is_file() {
            return failed(format!(
                "no drill kernel file {} (make one with scripts/drill-kernel.sh {DRILL_DIR}, or \
                 pass --boot-kernel and --boot-initrd)",
                file.display()
            ));
        }
    }
    let Some((_, url)) = target.urls.first() else {
        return failed("the launch has no NBD export (is the server's NBD listener on?)");
    };
    let drive = match qemu_drive(url) {
        Ok(drive) => drive,
        Err(why) => return failed(why),
    };
    let accel = if Path::new("/dev/kvm").exists() {
        "kvm:tcg"
    } else {
        "tcg"
    };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine",
        &format!("accel={accel}"),
        "-m",
        "256",
        "-nographic",
    ])
    .args([
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", append])
    .args(["-blockdev", &drive])
    .args(["-device", "virtio-blk-pci,drive=launch"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = match qemu.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot run qemu-system-x86_64: {e}")),
    };
    let stdout = child.stdout.take();
    let (lines, seen) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut console = String::new();
        if let Some(stdout) = stdout {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                console.push_str(&line);
                console.push('\n');
                let _ = lines.send(line);
            }
        }
        console
    });
    let deadline = Instant::now() + timeout;
    let mut found = false;
    loop {
        match seen.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.contains(expect) => {
                found = true;
                break;
            }
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    // Give a guest that powers off a moment to do so; then stop it.
    let exit_by = Instant::now() + Duration::from_secs(5);
    while Instant::now() < exit_by && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let status = child.wait().ok();
    let mut console = reader.join().unwrap_or_default();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut console);
    }
    if !found {
        console.push_str(&format!(
            "\n(no console line contained {expect:?} within {timeout:?})\n"
        ));
    }
    Found {
        passed: found,
        exit_code: status.and_then(|s| s.code()),
        output: console,
    }
}

/// Checks every file system of every volume, through nbdfuse.
fn check_fs(target: &Target, timeout: Duration) -> Found {
    let mut output = String::new();
    let mut passed = true;
    for (volume, url) in &target.urls {
        let found = check_volume_fs(url, timeout);
        output.push_str(&format!("== volume {volume}\n{}", found.output));
        passed &= found.passed;
    }
    Found {
        passed: passed && !target.urls.is_empty(),
        exit_code: Some(i32::from(!passed)),
        output,
    }
}

/// A FUSE file over the export, unmounted when dropped.
struct Fuse {
    dir: PathBuf,
    child: Child,
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn mount(url: &str) -> Result<Fuse, String> {
    static MOUNTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MOUNTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("blockrep-check-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make a mount point: {e}"))?;
    let pidfile = dir.with_extension("pid");
    let child = Command::new("nbdfuse")
        .arg("--readonly")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg(&dir)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run nbdfuse (needed by --check-fs): {e}"))?;
    let mut fuse = Fuse { dir, child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        if let Ok(Some(status)) = fuse.child.try_wait() {
            return Err(format!("nbdfuse {url} exited {status}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("nbdfuse {url} did not mount within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&pidfile);
    Ok(fuse)
}

fn check_volume_fs(url: &str, timeout: Duration) -> Found {
    let fuse = match mount(url) {
        Ok(fuse) => fuse,
        Err(why) => return failed(why),
    };
    let file = fuse.dir.join("nbd");
    let mut output = String::new();
    let mut checked = 0;
    let mut passed = true;
    // The whole disk first; then the partitions of a partition table.
    if let Some(kind) = fs_type(&file) {
        let found = check_one(&file, &kind, timeout);
        output.push_str(&format!("whole disk ({kind}):\n{}", found.output));
        passed &= found.passed;
        checked += 1;
    } else {
        for (index, (start, size)) in partitions(&file).into_iter().enumerate() {
            let found = check_partition(&file, start, size, timeout);
            if let Some(found) = found {
                output.push_str(&format!("partition {}:\n{}", index + 1, found.output));
                passed &= found.passed;
                checked += 1;
            }
        }
    }
    drop(fuse);
    if checked == 0 {
        return failed(format!(
            "{output}no ext2/3/4 or XFS file system found on the volume, whole or in a partition"
        ));
    }
    Found {
        passed,
        exit_code: Some(i32::from(!passed)),
        output,
    }
}

/// The file system type `blkid` probes on `path`, if it is one we check.
fn fs_type(path: &Path) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(path)
        .output()
        .ok()?;
    let kind = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    matches!(kind.as_str(), "ext2" | "ext3" | "ext4" | "xfs").then_some(kind)
}

fn check_one(path: &Path, kind: &str, timeout: Duration) -> Found {
    let (program, flags) = if kind == "xfs" {
        ("xfs_repair", ["-n", "-f"])
    } else {
        ("e2fsck", ["-f", "-n"])
    };
    let mut command = Command::new(program);
    command.args(flags).arg(path);
    run(command, timeout)
}

/// Partitions as (start, size) in bytes, from `sfdisk --json`.
fn partitions(path: &Path) -> Vec<(u64, u64)> {
    let Ok(out) = Command::new("sfdisk").arg("--json").arg(path).output() else {
        return Vec::new();
    };
    let Ok(table) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return Vec::new();
    };
    let sector = table["partitiontable"]["sectorsize"]
        .as_u64()
        .unwrap_or(512);
    table["partitiontable"]["partitions"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| Some((p["start"].as_u64()? * sector, p["size"].as_u64()? * sector)))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks one partition through a read-only loop device over the file;
/// `None` when it holds no file system we check.
fn check_partition(file: &Path, start: u64, size: u64, timeout: Duration) -> Option<Found> {
    let out = Command::new("losetup")
        .args(["-r", "--find", "--show"])
        .arg(format!("--offset={start}"))
        .arg(format!("--sizelimit={size}"))
        .arg(file)
        .output()
        .ok()?;
    let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || device.is_empty() {
        return Some(failed(format!(
            "cannot attach a loop device at offset {start} (root is needed for partitions): {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let found =
        fs_type(Path::new(&device)).map(|kind| check_one(Path::new(&device), &kind, timeout));
    let _ = Command::new("losetup").arg("-d").arg(&device).status();
    found
}

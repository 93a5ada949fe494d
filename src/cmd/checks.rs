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

use crate::cli::{BootAccel, LaunchCheckArgs};

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
    /// For `nbds://` exports: a directory with `ca-cert.pem`,
    /// `client-cert.pem` and `client-key.pem`, as libnbd and QEMU want them.
    pub certs: Option<PathBuf>,
}

/// The admin certificate in a directory of its own, named as libnbd and QEMU
/// want it (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`): a private
/// temporary directory (mode 0700), removed when dropped.
#[derive(Debug)]
pub(crate) struct CertDir {
    dir: tempfile::TempDir,
}

impl CertDir {
    /// Copies `tls_dir`'s `ca.crt`, `admin.crt` and `admin.key`.
    pub(crate) fn new(tls_dir: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("blockrep-check-certs-")
            .tempdir()?;
        for (from, to) in [
            ("ca.crt", "ca-cert.pem"),
            ("admin.crt", "client-cert.pem"),
            ("admin.key", "client-key.pem"),
        ] {
            let from = tls_dir.join(from);
            std::fs::copy(&from, dir.path().join(to))
                .map_err(|e| anyhow::anyhow!("cannot copy {}: {e}", from.display()))?;
        }
        Ok(Self { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
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
        let kernel = drill_kernel(args.boot_kernel.as_ref());
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
        let boot = BootArgs {
            kernel: &kernel,
            initrd: &initrd,
            append: &args.boot_append,
            expect: &expect,
            timeout: args.boot_timeout,
            accel: args.boot_accel,
        };
        out.push(timed("boot", &command, || check_boot(target, &boot)));
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
        // Cut as the launch keeps it, so a check's report stays small.
        output_tail: blockrep_store::check_output_tail(&found.output),
    }
}

fn failed(why: impl Into<String>) -> Found {
    Found {
        passed: false,
        exit_code: None,
        output: why.into(),
    }
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

/// Runs `command` to its end or `timeout`, output merged. It runs in a
/// process group of its own, killed whole when it ends or times out: what a
/// check leaves running in the background would otherwise hold its output
/// open, and the check with it. The group is killed while its leader is
/// still unreaped (a zombie keeps its pid), so the kill can never reach a
/// process that was given the pid since.
fn run(mut command: Command, timeout: Duration) -> Found {
    use std::os::unix::process::CommandExt;
    let spawned = command
        .process_group(0)
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
    let mut timed_out = false;
    while !exited(&child) {
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = format!("-{}", child.id());
    let _ = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stderr(Stdio::null())
        .status();
    let status = child.wait().ok();
    // A process that left the group (setsid) may hold the output open:
    // what came until then is the output.
    let mut output = output
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| "(the output was still held open; cut here)\n".to_owned());
    if timed_out {
        output.push_str(&format!("\n(killed after {timeout:?})\n"));
    }
    Found {
        passed: !timed_out && status.is_some_and(|s| s.success()),
        exit_code: status.filter(|_| !timed_out).and_then(|s| s.code()),
        output,
    }
}

/// Whether `child` has exited, without reaping it: its state in
/// `/proc/PID/stat` is `Z` (or the entry is gone).
fn exited(child: &Child) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", child.id())) else {
        return true;
    };
    // `PID (COMM) STATE ...`: COMM may hold spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_none_or(|state| state == "Z" || state == "X")
}

/// A child's stdout and stderr, read to their ends (so neither pipe fills
/// and stalls it) and merged line by line; the receiver gets them once both
/// ended.
fn collect_output(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let lines = collect_lines(child);
    let (done, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut merged = String::new();
        for (_, line) in lines {
            merged.push_str(&line);
            merged.push('\n');
        }
        let _ = done.send(merged);
    });
    received
}

/// The drill kernel: the flag's, the variable's, else the default
/// directory's uncompressed `vmlinux` (booted through PVH, twice as fast
/// under TCG) when there is one, else its `vmlinuz`.
fn drill_kernel(flag: Option<&PathBuf>) -> PathBuf {
    let vmlinux = Path::new(DRILL_DIR).join("vmlinux");
    if flag.is_none() && std::env::var_os("BLOCKREP_DRILL_KERNEL").is_none() && vmlinux.is_file() {
        return vmlinux;
    }
    drill_file(flag, "BLOCKREP_DRILL_KERNEL", "vmlinuz")
}

/// A drill kernel or initrd: the flag's, the variable's, else the default.
fn drill_file(flag: Option<&PathBuf>, variable: &str, name: &str) -> PathBuf {
    flag.cloned()
        .or_else(|| std::env::var_os(variable).map(PathBuf::from))
        .unwrap_or_else(|| Path::new(DRILL_DIR).join(name))
}

/// QEMU's drive of an NBD URI (`nbd://HOST:PORT/EXPORT`, or `nbds://` with
/// the certificate directory of `tls_dir`): QEMU's own NBD client reads the
/// export, and `snapshot=on` keeps the guest's writes (a journal replayed at
/// mount) in a temporary overlay, never in the launch.
fn qemu_drive(url: &str, tls_dir: Option<&Path>) -> Result<(Vec<String>, String), String> {
    let (tls, rest) = match (url.strip_prefix("nbd://"), url.strip_prefix("nbds://")) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        _ => return Err(format!("not an NBD URI: {url}")),
    };
    let rest = rest.split('?').next().unwrap_or(rest);
    let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("no port in {url}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut objects = Vec::new();
    let mut drive = format!(
        "driver=nbd,host={host},port={port},export={export},if=virtio,snapshot=on,cache=unsafe"
    );
    if tls {
        let dir = tls_dir.ok_or_else(|| {
            format!(
                "{url} needs TLS: give --admin-tls-dir, whose admin certificate opens every launch"
            )
        })?;
        objects.push(format!(
            "tls-creds-x509,id=launch-tls,dir={},endpoint=client",
            dir.display()
        ));
        drive.push_str(",tls-creds=launch-tls");
    }
    Ok((objects, drive))
}

/// How a boot ended.
enum Boot {
    /// A console line contained the expected text.
    Expected,
    /// The console went silent for `quiet_max` before printing anything
    /// (KVM that opens but cannot run this kernel).
    Silent,
    /// QEMU exited, the drill kernel reported a failure, or time ran out.
    Failed(Option<i32>),
}

/// One QEMU run with `accel`; the console goes to `console`.
fn boot_once(
    accel: &str,
    boot: &BootArgs<'_>,
    drive: &(Vec<String>, String),
    quiet_max: Option<Duration>,
    console: &mut String,
) -> Boot {
    let BootArgs {
        kernel,
        initrd,
        append,
        expect,
        timeout,
        ..
    } = *boot;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-machine", &format!("accel={accel}"), "-m", "256"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append]);
    for object in &drive.0 {
        qemu.args(["-object", object]);
    }
    qemu.args(["-drive", &drive.1])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match qemu.spawn() {
        Ok(child) => child,
        Err(e) => {
            console.push_str(&format!("cannot run qemu-system-x86_64: {e}\n"));
            return Boot::Failed(None);
        }
    };
    let output = collect_lines(&mut child);
    let started = Instant::now();
    let mut printed = false;
    let outcome = loop {
        match output.recv_timeout(Duration::from_millis(100)) {
            Ok((from_console, line)) => {
                let line = line.trim_end_matches('\r').to_owned();
                console.push_str(&line);
                console.push('\n');
                // QEMU's own errors are not the guest speaking; a KVM that
                // cannot run the guest says so there.
                if !from_console && line.contains("KVM internal error") && quiet_max.is_some() {
                    break Boot::Silent;
                }
                printed |= from_console && !line.trim().is_empty();
                // Only the guest's console counts: QEMU's own messages
                // may quote the drive or the command line.
                if from_console && line.contains(expect) {
                    break Boot::Expected;
                }
                // The drill kernel's own failure line: no need to wait.
                if from_console && line.contains("blockrep-drill:") {
                    break Boot::Failed(None);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Boot::Failed(child.wait().ok().and_then(|s| s.code()));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if quiet_max.is_some_and(|quiet| !printed && started.elapsed() >= quiet) {
            break Boot::Silent;
        }
        if started.elapsed() >= timeout {
            console.push_str(&format!(
                "(no console line contained {expect:?} within {timeout:?})\n"
            ));
            break Boot::Failed(None);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// Every line QEMU prints, as it prints it: `true` for the guest's console
/// (stdout), `false` for QEMU's own messages (stderr).
fn collect_lines(child: &mut Child) -> std::sync::mpsc::Receiver<(bool, String)> {
    let (lines, received) = std::sync::mpsc::channel::<(bool, String)>();
    let pipes: Vec<(bool, Box<dyn Read + Send>)> = [
        child
            .stdout
            .take()
            .map(|s| (true, Box::new(s) as Box<dyn Read + Send>)),
        child
            .stderr
            .take()
            .map(|s| (false, Box::new(s) as Box<dyn Read + Send>)),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (from_console, pipe) in pipes {
        let lines = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Bytes, not `lines()`: output that is not UTF-8 must not stop
            // the reading (the pipe would fill and stall the child).
            let mut pipe = std::io::BufReader::new(pipe);
            let mut line = Vec::new();
            while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\n').to_owned();
                line.clear();
                if lines.send((from_console, text)).is_err() {
                    break;
                }
            }
        });
    }
    received
}

/// How long a KVM boot may print nothing before it is taken for a KVM that
/// cannot run the kernel, and the boot is tried again under TCG.
const KVM_QUIET_MAX: Duration = Duration::from_secs(15);

/// Boots the launch's first volume and waits for `expect` on the console.
fn check_boot(target: &Target, boot: &BootArgs<'_>) -> Found {
    for file in [boot.kernel, boot.initrd] {
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
    let drive = match qemu_drive(url, target.certs.as_deref()) {
        Ok(drive) => drive,
        Err(why) => return failed(why),
    };
    let mut console = String::new();
    let mut console_note = None;
    let kvm = match boot.accel {
        BootAccel::Tcg => false,
        BootAccel::Kvm => true,
        BootAccel::Auto => Path::new("/dev/kvm").exists(),
    };
    let quiet_max = (boot.accel == BootAccel::Auto).then_some(KVM_QUIET_MAX);
    let mut run = |accel: &str, quiet_max: Option<Duration>| {
        boot_once(accel, boot, &drive, quiet_max, &mut console)
    };
    let mut outcome = Boot::Silent;
    if kvm {
        outcome = run("kvm", quiet_max);
    }
    if matches!(outcome, Boot::Silent) && boot.accel != BootAccel::Kvm {
        if kvm {
            console_note = Some("(KVM cannot run this kernel here: booted again under TCG)");
        }
        outcome = run("tcg", None);
    }
    if let Some(note) = console_note {
        console.push_str(note);
        console.push('\n');
    }
    match outcome {
        Boot::Expected => Found {
            passed: true,
            exit_code: Some(0),
            output: console,
        },
        Boot::Silent => Found {
            passed: false,
            exit_code: None,
            output: console,
        },
        Boot::Failed(code) => Found {
            passed: false,
            exit_code: code,
            output: console,
        },
    }
}

/// What `--check-boot` boots and waits for.
struct BootArgs<'a> {
    kernel: &'a Path,
    initrd: &'a Path,
    append: &'a str,
    expect: &'a str,
    timeout: Duration,
    accel: BootAccel,
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

/// A FUSE file over the export, unmounted when dropped. Its mount point
/// and pid file are in a private temporary directory (mode 0700, a name no
/// one can guess), so no other user can stand in for the export.
struct Fuse {
    dir: tempfile::TempDir,
    child: Child,
}

impl Fuse {
    fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(self.mount_point())
            .stderr(Stdio::null())
            .status();
        // nbdfuse exits once unmounted; one that does not is killed.
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mount(url: &str) -> Result<Fuse, String> {
    let dir = tempfile::Builder::new()
        .prefix("blockrep-check-")
        .tempdir()
        .map_err(|e| format!("cannot make a mount point: {e}"))?;
    let mount_point = dir.path().join("mnt");
    let pidfile = dir.path().join("nbdfuse.pid");
    std::fs::create_dir(&mount_point).map_err(|e| format!("cannot make a mount point: {e}"))?;
    let child = Command::new("nbdfuse")
        .arg("--readonly")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg(&mount_point)
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
    Ok(fuse)
}

fn check_volume_fs(url: &str, timeout: Duration) -> Found {
    let fuse = match mount(url) {
        Ok(fuse) => fuse,
        Err(why) => return failed(why),
    };
    let file = fuse.mount_point().join("nbd");
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

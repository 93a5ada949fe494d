//! A launch boots in a real VM: a small bootable disk (Debian's kernel and
//! busybox, unpacked from their packages, an init that prints a marker's
//! hash on the serial console and powers off) is replicated, launched, and
//! `launch create --check-boot` boots the launch through NBD in QEMU and sees
//! the hash; a damaged copy fails its check, which blocks mark-ready under
//! --must-succeed.
//!
//! QEMU runs under KVM where it can, else TCG (a few seconds here). The
//! kernel and initramfs come from `scripts/drill-kernel.sh`, cached in the
//! target directory; the packages are fetched with `apt-get download`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use blockrep_server::LaunchView;

const TOOLS: [&str; 5] = [
    "qemu-system-x86_64",
    "mke2fs",
    "apt-get",
    "dpkg-deb",
    "cpio",
];

/// The drill kernel's directory, made once per target directory.
fn drill_kernel() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.join("drill-kernel");
    let made = Command::new("scripts/drill-kernel.sh")
        .arg(&dir)
        .env("BLOCKREP_DRILL_CACHE", tmp.join("drill-cache"))
        .output()
        .unwrap();
    assert_success(&made);
    dir
}

/// A bootable disk at `path` whose init prints the hash of `marker`; returns
/// the console line it prints.
fn drill_disk(path: &Path, marker: &str) -> String {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let made = Command::new("scripts/drill-disk.sh")
        .arg(path)
        .args([marker, "16"])
        .env("BLOCKREP_DRILL_CACHE", tmp.join("drill-cache"))
        .output()
        .unwrap();
    assert_success(&made);
    stdout(&made).trim().to_owned()
}

/// Replicates `disk` as `source` and makes a test launch `name` of it with a
/// boot check waiting for `expect`; returns the command's output.
fn launch_with_boot_check(
    rig: &AgentRig,
    kernel: &Path,
    disk: &Path,
    source: &str,
    name: &str,
    expect: &str,
    accel: &str,
) -> std::process::Output {
    // The file systems too, read through nbdfuse, where FUSE is there.
    let fs = have_tool("nbdfuse") && Path::new("/dev/fuse").exists();
    let tls = rig.pki.path();
    assert_success(&agent_once(disk, rig.server.addr, source, tls, &[]));
    let snapshot = create_snapshot(&rig.server, source, &format!("{name}-base"));
    let vmlinux = kernel.join("vmlinux");
    let image = if vmlinux.is_file() {
        vmlinux
    } else {
        kernel.join("vmlinuz")
    };
    Command::new(BIN)
        .args([
            "launch",
            "create",
            "--source",
            source,
            "--snapshot",
            &snapshot.name,
        ])
        .args([
            "--name",
            name,
            "--allow-live",
            "--must-succeed",
            "--check-boot",
        ])
        .arg("--boot-kernel")
        .arg(image)
        .arg("--boot-initrd")
        .arg(kernel.join("initrd.img"))
        .args([
            "--boot-expect",
            expect,
            "--boot-accel",
            accel,
            "--boot-timeout",
            "3m",
        ])
        .args(if fs { &["--check-fs"][..] } else { &[] })
        .args(["--admin", &rig.admin().to_string(), "--admin-token"])
        .arg(rig.pki.path().join("admin.token"))
        .output()
        .unwrap()
}

fn migration_state(rig: &AgentRig, source: &str) -> String {
    let (_, body) = admin_request(rig.admin(), "GET", &format!("/v1/sources/{source}"), None);
    serde_json::from_str::<blockrep_server::SourceView>(&body)
        .unwrap()
        .migration_state
}

#[test]
fn a_launch_boots_in_qemu_and_a_damaged_copy_fails_its_check() {
    if !TOOLS.iter().all(|tool| have_tool(tool)) {
        return;
    }
    let kernel = drill_kernel();
    let rig = nbd_rig(&["vm", "broken"]);
    let disk = rig.work.path().join("vm.raw");
    let marker = format!("drill marker {}", std::process::id());
    let expect = drill_disk(&disk, &marker);
    let hash = expect.strip_prefix("blockrep-drill-marker: ").unwrap();
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{expect}"
    );

    // The launch boots and prints the marker's hash: the check passes, and
    // the source becomes ready for cutover by itself. `auto` tries KVM
    // first and boots again under TCG where KVM cannot run the kernel.
    let booted = launch_with_boot_check(&rig, &kernel, &disk, "vm", "vm-drill", &expect, "auto");
    assert_success(&booted);
    assert!(
        stdout(&booted).contains("check boot passed"),
        "{}",
        stdout(&booted)
    );
    let fs = have_tool("nbdfuse") && Path::new("/dev/fuse").exists();
    if fs {
        assert!(
            stdout(&booted).contains("check fs passed"),
            "{}",
            stdout(&booted)
        );
    }
    let ready = wait_until(Duration::from_secs(10), || {
        migration_state(&rig, "vm") == "ready_for_cutover"
    });
    assert!(ready, "vm is {}", migration_state(&rig, "vm"));
    let (_, body) = admin_request(rig.admin(), "GET", "/v1/launches?source=vm", None);
    let launches: Vec<LaunchView> = serde_json::from_str(&body).unwrap();
    let check = launches[0]
        .checks
        .iter()
        .find(|c| c.name == "boot")
        .unwrap();
    assert!(
        check.passed && check.output_tail.contains(&expect),
        "{check:?}"
    );

    // A copy whose file system is damaged (its superblock zeroed) does not
    // boot to the marker: the check fails and mark-ready is refused.
    let broken = rig.work.path().join("broken.raw");
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[1024..2048].fill(0);
    std::fs::write(&broken, bytes).unwrap();
    let failed = launch_with_boot_check(
        &rig,
        &kernel,
        &broken,
        "broken",
        "broken-drill",
        &expect,
        "tcg",
    );
    assert!(!failed.status.success(), "{}", stdout(&failed));
    assert!(
        stderr(&failed).contains("blockrep-drill:"),
        "{}",
        stderr(&failed)
    );
    if fs {
        assert!(
            stdout(&failed).contains("check fs FAILED"),
            "{}",
            stdout(&failed)
        );
        assert!(
            stderr(&failed).contains("no ext2/3/4 or XFS"),
            "{}",
            stderr(&failed)
        );
    }
    let (code, body) = admin_request(
        rig.admin(),
        "POST",
        "/v1/sources/broken/mark-ready",
        Some("{}"),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("boot failed"), "{body}");
    assert_eq!(migration_state(&rig, "broken"), "testing");
}

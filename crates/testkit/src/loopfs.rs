//! Kernel file systems on loop devices, for tests that run a real file system
//! over a source image (root only; CI runs the tests as root).
//!
//! Every mount made here is undone in `Drop` (unmount, then detach the loop
//! device), also when the test panics, so a failed run leaves no mount or
//! loop device behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools::{have_tool, require_external_tools, run_tool, stderr, stdout};

/// How long [`LoopMount::unmount`] retries a mount the kernel calls busy.
const UNMOUNT_BUSY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether this process runs as root (`id -u` is 0).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// What an ext4 on a loop device needs: the loop devices, mounting, and
/// ext4's own tools.
pub const EXT4_LOOP_TOOLS: [&str; 5] = ["losetup", "mount", "umount", "mkfs.ext4", "e2fsck"];

/// Whether a loop-device test can run: root, and every tool in `tools`
/// installed. With BLOCKREP_REQUIRE_TOOLS set (CI, which runs as root) a
/// missing piece fails the test; otherwise the test is skipped with a message.
pub fn loop_fs_ready(test: &str, tools: &[&str]) -> bool {
    if !is_root() {
        assert!(
            !require_external_tools(),
            "{test} needs root for loop devices and mounts (BLOCKREP_REQUIRE_TOOLS is set)"
        );
        eprintln!("skipping {test}: needs root for loop devices and mounts");
        return false;
    }
    for tool in tools {
        if !have_tool(tool) {
            eprintln!("skipping {test}: {tool} is not installed");
            return false;
        }
    }
    true
}

/// A kernel file system type the tests make on images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Ext4,
    Xfs,
}

impl FsKind {
    /// The smallest image this file system may be made on (mkfs.xfs refuses
    /// file systems under 300 MB).
    pub fn min_image_bytes(self) -> u64 {
        match self {
            FsKind::Ext4 => 16 << 20,
            FsKind::Xfs => 300 << 20,
        }
    }

    /// Makes an empty file system of this kind on the image file `image`.
    pub fn mkfs(self, image: &Path) {
        let image = image.to_str().unwrap();
        match self {
            // No lazy initialisation: a background thread zeroing inode tables
            // after mount would only add writes nobody asked for.
            FsKind::Ext4 => run_tool(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    image,
                ],
            ),
            FsKind::Xfs => run_tool("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", image]),
        };
    }
}

/// A file (image) attached to a loop device and mounted; unmounted and
/// detached when dropped.
#[derive(Debug)]
pub struct LoopMount {
    device: String,
    mount_point: PathBuf,
    mounted: bool,
}

impl LoopMount {
    /// Attaches `image` to a free loop device (read-only with `read_only`) and
    /// mounts it at `mount_point` (created if missing) with mount `options`.
    pub fn mount(image: &Path, mount_point: &Path, read_only: bool, options: &str) -> Self {
        std::fs::create_dir_all(mount_point).unwrap();
        let mut losetup = vec!["--find", "--show"];
        if read_only {
            losetup.push("--read-only");
        }
        losetup.push(image.to_str().unwrap());
        let device = run_tool("losetup", &losetup).trim().to_owned();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        let mut this = Self {
            device,
            mount_point: mount_point.to_owned(),
            mounted: false,
        };
        let mut args = Vec::new();
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend([this.device.as_str(), mount_point.to_str().unwrap()]);
        // `this` detaches the device if the mount fails and the test panics.
        run_tool("mount", &args);
        this.mounted = true;
        this
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// The loop device.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Unmounts and detaches, failing the test if either fails (a mount
    /// still busy after [`UNMOUNT_BUSY_MAX`] is a bug in the test: something
    /// still has a file open).
    pub fn unmount(mut self) {
        if self.mounted {
            // Busy for a moment is not a leak: a child that another test's
            // thread is starting holds copies of this process's descriptors
            // (a file being read in the mount) until it execs.
            let deadline = std::time::Instant::now() + UNMOUNT_BUSY_MAX;
            loop {
                let output = Command::new("umount")
                    .arg(&self.mount_point)
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run umount: {e}"));
                if output.status.success() {
                    break;
                }
                assert!(
                    stderr(&output).contains("busy") && std::time::Instant::now() < deadline,
                    "umount {} failed: {}\nstdout: {}\nstderr: {}",
                    self.mount_point.display(),
                    output.status,
                    stdout(&output),
                    stderr(&output)
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            self.mounted = false;
        }
        run_tool("losetup", &["--detach", &self.device]);
        self.device.clear();
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let plain = Command::new("umount").arg(&self.mount_point).output();
            if !plain.is_ok_and(|o| o.status.success()) {
                // Something (a panicking test's writer or agent) still holds a
                // file: detach lazily so that the mount goes once it is closed.
                let lazy = Command::new("umount")
                    .arg("--lazy")
                    .arg(&self.mount_point)
                    .output();
                if let Ok(output) = lazy
                    && !output.status.success()
                {
                    eprintln!(
                        "cannot unmount {}: {} {}",
                        self.mount_point.display(),
                        stdout(&output),
                        stderr(&output)
                    );
                }
            }
        }
        if !self.device.is_empty() {
            // On a device still in use (lazy unmount) this sets autoclear: the
            // kernel detaches it when the last user goes.
            let _ = Command::new("losetup")
                .args(["--detach", &self.device])
                .output();
        }
    }
}

/// An empty XFS (which clones files with `FICLONE`, as reflink views need)
/// of the smallest size, in an image file in `dir`, on a loop device and
/// mounted at `dir/mnt`. Keep `dir` alive longer than the mount.
pub fn scratch_xfs(dir: &Path) -> LoopMount {
    let image = dir.join("xfs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(FsKind::Xfs.min_image_bytes())
        .unwrap();
    FsKind::Xfs.mkfs(&image);
    LoopMount::mount(&image, &dir.join("mnt"), false, "")
}

/// An outer XFS file system (reflink enabled) on a loop device, holding a
/// source image that itself carries an inner file system of `inner` kind,
/// attached with its own loop device and mounted. The outer file system can
/// clone the image (`FICLONE`), as the agent's frozen views need.
#[derive(Debug)]
pub struct NestedFs {
    /// Dropped first: the inner mount lives on the outer one.
    inner: Option<LoopMount>,
    outer: Option<LoopMount>,
    image: PathBuf,
    pub kind: FsKind,
}

impl NestedFs {
    /// Makes, under `work`, an outer XFS of `outer_bytes` and on it an image of
    /// `image_bytes` with an inner `kind` file system, both mounted.
    pub fn new(work: &Path, outer_bytes: u64, image_bytes: u64, kind: FsKind) -> Self {
        assert!(image_bytes >= kind.min_image_bytes());
        let outer_file = work.join("outer.xfs");
        std::fs::File::create(&outer_file)
            .unwrap()
            .set_len(outer_bytes)
            .unwrap();
        FsKind::Xfs.mkfs(&outer_file);
        let outer = LoopMount::mount(&outer_file, &work.join("outer"), false, "");
        let image = outer.path().join("source.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(image_bytes)
            .unwrap();
        kind.mkfs(&image);
        let mut this = Self {
            inner: None,
            outer: Some(outer),
            image,
            kind,
        };
        this.inner = Some(LoopMount::mount(
            &this.image,
            &work.join("inner"),
            false,
            "",
        ));
        this
    }

    /// The source image (on the outer file system).
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The mounted inner file system.
    pub fn inner(&self) -> &Path {
        self.inner.as_ref().unwrap().path()
    }

    /// Unmounts the inner file system (its last writes reach the image), then
    /// the outer one.
    pub fn unmount(mut self) {
        if let Some(inner) = self.inner.take() {
            inner.unmount();
        }
        if let Some(outer) = self.outer.take() {
            outer.unmount();
        }
    }
}

impl Drop for NestedFs {
    fn drop(&mut self) {
        drop(self.inner.take());
        drop(self.outer.take());
    }
}

/// Checks a copy of a crash-consistent image the way a restore would, and
/// mounts it read-only for the test to read at `mount_point`:
/// - ext4: `e2fsck -p -f` (exit 0 or 1) may replay the journal and finish
///   off orphaned inodes, nothing else; then `e2fsck -n -f` must find nothing
///   left to fix (exit 0);
/// - XFS: a mount replays the log, then, after unmounting, `xfs_repair -n`
///   must find nothing to fix (exit 0). `nouuid`: the copy shares its UUID
///   with the file system still mounted over the source.
///
/// Returns the mount, or the tool output that showed the damage.
pub fn check_and_mount(kind: FsKind, copy: &Path, mount_point: &Path) -> Result<LoopMount, String> {
    let path = copy.to_str().unwrap();
    let tool = |program: &str, args: &[&str]| {
        let output = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let code = output.status.code().unwrap_or(-1);
        let text = format!(
            "{program} {} exited {code}\n{}{}",
            args.join(" "),
            stdout(&output),
            stderr(&output)
        );
        (code, text)
    };
    match kind {
        FsKind::Ext4 => {
            let (code, preen) = tool("e2fsck", &["-p", "-f", path]);
            if code > 1 {
                return Err(preen);
            }
            // Journal replay and the clean-up of files deleted while open are
            // what a crash-consistent image needs; anything else preen mended
            // was damage.
            let mended: Vec<&str> = preen
                .lines()
                .skip(1)
                .filter(|line| {
                    !line.trim().is_empty()
                        && !line.contains("recovering journal")
                        && !line.contains("orphaned inode")
                        && !line.contains(" files (")
                })
                .collect();
            if !mended.is_empty() {
                return Err(format!("preen mended damage: {mended:#?}\n{preen}"));
            }
            let (code, check) = tool("e2fsck", &["-n", "-f", path]);
            if code != 0 {
                return Err(format!("{preen}\nthen {check}"));
            }
            Ok(LoopMount::mount(copy, mount_point, true, "ro"))
        }
        FsKind::Xfs => {
            // The log replays at mount (read-write: a read-only mount of a
            // dirty log would only replay it in memory).
            LoopMount::mount(copy, mount_point, false, "nouuid").unmount();
            let (code, repair) = tool("xfs_repair", &["-n", path]);
            if code != 0 {
                return Err(repair);
            }
            Ok(LoopMount::mount(copy, mount_point, true, "ro,nouuid"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file held open for a moment (as by a child another thread is
    /// starting) makes the mount busy only for that moment.
    #[test]
    fn a_mount_busy_for_a_moment_is_unmounted() {
        if !loop_fs_ready("a mount busy for a moment", &EXT4_LOOP_TOOLS) {
            return;
        }
        let work = tempfile::tempdir().unwrap();
        let image = work.path().join("fs.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(FsKind::Ext4.min_image_bytes()).unwrap();
        drop(file);
        FsKind::Ext4.mkfs(&image);
        let mounted = LoopMount::mount(&image, &work.path().join("mnt"), false, "");
        let held = mounted.path().join("held");
        std::fs::write(&held, b"x").unwrap();
        let mut holder = Command::new("sh")
            .args([
                "-c",
                "exec 3<\"$0\"; echo open; sleep 1",
                held.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Once the holder says it has the file open (it keeps it for 1 s).
        let mut open = String::new();
        let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut open).unwrap();
        assert_eq!(open, "open\n");
        mounted.unmount();
        assert!(holder.wait().unwrap().success());
    }
}

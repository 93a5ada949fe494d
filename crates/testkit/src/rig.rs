//! The rig most end-to-end tests start from: certificates for the sources,
//! a work directory, and a real server keeping its data in it, with the
//! agent's arguments for a disk of one of those sources. Dropped together, so
//! a failed test leaves no server and no files behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{AgentProcess, Pki, ServerProcess};

/// A server with certificates for its sources and a work directory.
#[derive(Debug)]
pub struct AgentRig {
    /// The blockrep binary under test.
    pub bin: PathBuf,
    /// The CA, the server's and every source's certificate.
    pub pki: Pki,
    /// The running server, its data in `data` under the work directory.
    pub server: ServerProcess,
    /// Where disks, exports and the server's data live.
    pub work: tempfile::TempDir,
    /// The bucket the server keeps its store in, if not its data directory.
    pub bucket: Option<crate::BucketAccess>,
}

impl AgentRig {
    /// Certificates for `sources` and `bin server` on 127.0.0.1:0 with
    /// `server_args` beyond the listen addresses, data and certificates.
    pub fn start(bin: &Path, sources: &[&str], server_args: &[&str]) -> Self {
        Self::start_with_pki(bin, Pki::new(sources), server_args)
    }

    /// [`AgentRig::start`] with certificates made beforehand (in a tenant,
    /// revoked, an admin's...).
    pub fn start_with_pki(bin: &Path, pki: Pki, server_args: &[&str]) -> Self {
        Self::start_in(bin, pki, server_args, None)
    }

    /// [`AgentRig::start_with_pki`] with the server's store in `bucket` when
    /// given (its data directory then a working copy); exports read the
    /// bucket too.
    pub fn start_in(
        bin: &Path,
        pki: Pki,
        server_args: &[&str],
        bucket: Option<crate::BucketAccess>,
    ) -> Self {
        let work = tempfile::tempdir().unwrap();
        let server = ServerProcess::start_in(
            bin,
            "127.0.0.1:0",
            &work.path().join("data"),
            pki.path(),
            server_args,
            bucket.as_ref(),
        );
        Self {
            bin: bin.to_owned(),
            pki,
            server,
            work,
            bucket,
        }
    }

    /// `name` in the work directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The server's data directory.
    pub fn data(&self) -> PathBuf {
        self.path("data")
    }

    /// Writes `bytes` to the file `name` in the work directory: a source disk.
    pub fn disk(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// The bytes of `source`'s head file in the server's data; `None` while
    /// it has no replica.
    pub fn head(&self, source: &str) -> Option<Vec<u8>> {
        std::fs::read(self.data().join("sources").join(source).join("head")).ok()
    }

    /// The admin API's address.
    pub fn admin(&self) -> SocketAddr {
        self.server.admin_addr.unwrap()
    }

    /// The agent's arguments naming `disk`, this server, `source` and the
    /// certificates, then `extra`.
    pub fn agent_args(&self, disk: &Path, source: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--disk".into(),
            disk.to_str().unwrap().into(),
            "--to".into(),
            self.server.addr.to_string(),
            "--source".into(),
            source.into(),
            "--tls-dir".into(),
            self.pki.path().to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args
    }

    /// Runs `blockrep agent --once` for `source` on `disk` with `extra`
    /// arguments, to the end.
    pub fn agent_once(&self, disk: &Path, source: &str, extra: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(["agent", "--once"])
            .args(self.agent_args(disk, source, extra))
            .output()
            .unwrap()
    }

    /// `blockrep export` of `source`'s head from the server's data to
    /// `{source}.export` in the work directory; that file. Fails the test with
    /// the command's output if the export fails.
    pub fn export(&self, source: &str) -> PathBuf {
        let out = self.path(&format!("{source}.export"));
        let output = match &self.bucket {
            None => crate::tools::export_with(&self.bin, &self.data(), source, &out),
            Some(bucket) => {
                // A working copy of its own: the server holds its own.
                let copy = tempfile::tempdir_in(self.work.path()).unwrap();
                let mut command = Command::new(&self.bin);
                command.args(["export", "--data"]).arg(copy.path());
                bucket.apply(&mut command);
                command
                    .args(["--source", source, "--out"])
                    .arg(&out)
                    .output()
                    .unwrap()
            }
        };
        crate::tools::assert_success(&output);
        out
    }

    /// Fails the test unless `source`'s replica, exported, is `disk` byte for
    /// byte.
    pub fn assert_replica_is(&self, source: &str, disk: &Path) {
        assert!(
            crate::tools::files_equal(&self.export(source), disk),
            "the replica of {source} differs from {}",
            disk.display()
        );
    }

    /// Starts `blockrep agent` for `source` on `disk` with `extra` arguments.
    pub fn spawn_agent(&self, disk: &Path, source: &str, extra: &[&str]) -> AgentProcess {
        AgentProcess::start(
            &self.bin,
            disk,
            self.server.addr,
            source,
            self.pki.path(),
            extra,
        )
    }
}

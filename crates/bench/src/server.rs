//! The server under test: a child process running the `blockrep server`
//! command, so that its CPU time and memory are measured apart from the
//! agent's (which runs in the bench's own process).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use blockrep_admin_client::Identity;

/// The server under test: `blockrep server` on ephemeral loopback ports,
/// with retention off.
pub(crate) struct ServerChild {
    child: Child,
    pub(crate) addr: String,
    admin: String,
    /// This server's admin token (its TLS directory's), as the bench's identity.
    identity: Identity,
}

impl ServerChild {
    /// Starts `exe server` on the store in `data` with the certificates in
    /// `tls`, and waits for its first line, which names its addresses.
    pub(crate) fn start(exe: &Path, data: &Path, tls: &Path, extra: &[String]) -> Result<Self> {
        let token_path = tls.join(blockrep_pki::ADMIN_TOKEN_FILE_NAME);
        let token = blockrep_admin_client::read_token(&token_path)?;
        let mut child = Command::new(exe)
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--retention",
                "off",
                "--data",
            ])
            .arg(data)
            .arg("--tls-dir")
            .arg(tls)
            // This server's own token, whatever the caller's environment names.
            .arg("--admin-token")
            .arg(&token_path)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the server")?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(admin)) = (fields.get(2), fields.get(4)) else {
            bail!("unexpected server output {line:?}");
        };
        let (addr, admin) = (addr.to_string(), admin.to_string());
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        Ok(Self {
            child,
            addr,
            admin,
            identity: Identity::Token(Some(token)),
        })
    }

    /// An admin API request with this server's token.
    pub(crate) async fn admin_request(&self, method: &str, path: &str) -> Result<(u16, String)> {
        blockrep_admin_client::request(&self.admin, method, path, None, &self.identity).await
    }

    /// `POST path` with a JSON `body`.
    pub(crate) async fn admin_post(&self, path: &str, body: &str) -> Result<(u16, String)> {
        blockrep_admin_client::request(&self.admin, "POST", path, Some(body), &self.identity).await
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub(crate) fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

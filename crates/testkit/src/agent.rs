//! A running `blockrep agent` process: its output collected line by line
//! as it runs, its epoch lines parsed, signals sent to it, and waiting for it
//! to exit. Killed when dropped, so a failed test leaves no agent behind.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A running agent process whose stdout lines are collected.
#[derive(Debug)]
pub struct AgentProcess {
    pub child: std::process::Child,
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl AgentProcess {
    /// Starts `bin agent ARGS` (`bin`: the blockrep binary under test).
    pub fn spawn(bin: &Path, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(bin)
            .arg("agent")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let lines = std::sync::Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let text = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Starts `bin agent` on `disk` for `source`, to the server at `to` with
    /// the certificates in `tls`, then `extra` arguments.
    pub fn start(
        bin: &Path,
        disk: &Path,
        to: SocketAddr,
        source: &str,
        tls: &Path,
        extra: &[&str],
    ) -> Self {
        let mut args = vec![
            "--disk".to_owned(),
            disk.to_str().unwrap().to_owned(),
            "--to".to_owned(),
            to.to_string(),
            "--source".to_owned(),
            source.to_owned(),
            "--tls-dir".to_owned(),
            tls.to_str().unwrap().to_owned(),
        ];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(bin, &args)
    }

    /// Every stdout line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// `(epoch, root)` of every epoch line printed so far.
    pub fn epochs(&self) -> Vec<(u64, String)> {
        self.lines()
            .iter()
            .filter_map(|line| {
                let rest = line.strip_prefix("epoch ")?;
                let epoch = rest.split_whitespace().next()?.parse().ok()?;
                let root = rest
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("root="))?;
                Some((epoch, root.to_owned()))
            })
            .collect()
    }

    /// Sum of `key=N` over the epoch lines printed so far.
    pub fn sum(&self, key: &str) -> u64 {
        self.lines()
            .iter()
            .filter(|l| l.starts_with("epoch "))
            .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|field| {
                field
                    .strip_prefix(&format!("{key}="))
                    .map(|n| n.parse::<u64>().unwrap())
            })
            .sum()
    }

    /// Waits until the agent has printed at least `count` epoch lines; fails
    /// the test with its output if `timeout` passes first.
    pub fn wait_for_epochs(&self, count: usize, timeout: Duration) {
        assert!(
            crate::tools::wait_until(timeout, || self.epochs().len() >= count),
            "fewer than {count} epochs after {timeout:?}: {:?}\nstderr: {}",
            self.lines(),
            self.stderr.lock().unwrap()
        );
    }

    /// Waits until the agent has printed an epoch line with `root`; fails the
    /// test, saying `what` was awaited, with the agent's output if `timeout`
    /// passes first.
    pub fn wait_for_root(&self, root: &str, timeout: Duration, what: &str) {
        assert!(
            crate::tools::wait_until(timeout, || self.epochs().iter().any(|(_, r)| r == root)),
            "{what}: no epoch with root {root} after {timeout:?}: {:#?}\nstderr: {}",
            self.lines(),
            self.stderr.lock().unwrap()
        );
    }

    /// SIGTERM, then its exit status (see [`wait_exit`]: at most 30 s).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        wait_exit(self, Duration::from_secs(30))
    }

    /// [`AgentProcess::stop`], failing the test with the agent's stderr unless
    /// it exited with status 0, as it must after SIGTERM.
    pub fn stop_cleanly(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "agent exit {status}: {}",
            self.stderr.lock().unwrap()
        );
    }

    /// Sends `signal` (a name such as `TERM`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the agent to exit (after a signal); its exit status. Fails with
/// its stderr if it is still running after `timeout`.
pub fn wait_exit(agent: &mut AgentProcess, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running after {timeout:?}; stderr: {}",
            agent.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

//! A running `blockrep agent` process: its output collected line by line
//! as it runs, its epoch lines parsed, signals sent to it, and waiting for it
//! to exit. Killed when dropped, so a failed test leaves no agent behind.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long an exited agent's output may take to reach its readers: a
/// process it started may hold its pipes open longer.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// A running agent process whose stdout lines are collected.
#[derive(Debug)]
pub struct AgentProcess {
    pub child: std::process::Child,
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Hears from each of the two output readers when its pipe ended.
    drained: std::sync::mpsc::Receiver<()>,
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
        let (done, drained) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::clone(&stdout);
        let out_done = done.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
            let _ = out_done.send(());
        });
        let text = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
            let _ = done.send(());
        });
        Self {
            child,
            stdout,
            stderr,
            drained,
        }
    }

    /// Waits for the agent to exit; its status, once everything it wrote is
    /// in `stdout` and `stderr`.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().unwrap();
        self.drain();
        status
    }

    /// The agent's exit status if it has exited, once everything it wrote
    /// is in `stdout` and `stderr`; `None` while it runs.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.try_wait().unwrap()?;
        self.drain();
        Some(status)
    }

    /// After the exit: the readers may still be reading the last lines
    /// from the pipes, which end once the agent (and whatever it started)
    /// closed them.
    fn drain(&self) {
        let deadline = Instant::now() + DRAIN_MAX;
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.drained.recv_timeout(left).is_err() {
                return;
            }
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
        if let Some(status) = agent.try_wait() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A process that fills its stderr pipe with short lines and exits:
    /// its last lines are still in the pipe when it has exited.
    #[test]
    fn an_exited_agents_output_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("agent.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\nyes x | head -n 200000 >&2\necho last >&2\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        for _ in 0..3 {
            let mut agent = AgentProcess::spawn(&script, &[]);
            let status = loop {
                // Polled as fast as it goes: the exit is seen at once.
                if let Some(status) = agent.try_wait() {
                    break status;
                }
            };
            assert!(status.success());
            let text = agent.stderr.lock().unwrap();
            assert!(text.ends_with("\nlast\n"), "{} bytes read", text.len());
        }
    }
}

//! Running the operator's view commands (snapshot, release, quiesce, thaw):
//! `sh -c` in its own process group, bounded by a timeout that kills the
//! whole group, so a hung command cannot hold an epoch (or the workload) forever.

use std::process::Stdio;
use std::time::{Duration, Instant};

/// Where a command's output goes when the agent does not read it: the agent's
/// stderr, so that stdout stays the agent's own report.
fn to_stderr() -> Stdio {
    use std::os::fd::AsFd;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// Runs `command` with `sh -c` in its own process group; kills the group after
/// `timeout`. With `capture`, returns its standard output.
pub(crate) async fn run(
    command: &str,
    env: &[(&'static str, String)],
    timeout: Duration,
    capture: bool,
) -> Result<String, String> {
    let mut child = tokio::process::Command::new("sh");
    child
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(if capture { Stdio::piped() } else { to_stderr() })
        .process_group(0)
        .kill_on_drop(true);
    let child = child
        .spawn()
        .map_err(|e| format!("{command:?} cannot be started: {e}"))?;
    // Kills the command's group if this future is dropped (the agent shutting
    // down) or times out; `kill_on_drop` alone would reach only `sh`.
    let mut group = GroupGuard(child.id());
    let result = tokio::time::timeout(timeout, child.wait_with_output()).await;
    if result.is_ok() {
        group.0 = None;
    }
    match result {
        Ok(Ok(output)) if output.status.success() => {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
        Ok(Ok(output)) => Err(format!("{command:?} failed ({})", output.status)),
        Ok(Err(e)) => Err(format!("{command:?} could not be waited for: {e}")),
        Err(_) => {
            drop(group);
            Err(format!(
                "{command:?} did not finish within {timeout:?} and was killed (--snapshot-cmd-timeout)"
            ))
        }
    }
}

/// [`run`] without a runtime, for releases run on drop.
pub(crate) fn run_blocking(
    command: &str,
    env: &[(&'static str, String)],
    timeout: Duration,
) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(to_stderr())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{command:?} cannot be started: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("{command:?} failed ({status})")),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(Some(child.id()));
                let _ = child.wait();
                return Err(format!(
                    "{command:?} did not finish within {timeout:?} and was killed (--snapshot-cmd-timeout)"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{command:?} could not be waited for: {e}")),
        }
    }
}

/// Kills the process group of a command still running when dropped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0.take());
    }
}

/// Kills a command's whole process group (`sh` and what it started).
fn kill_group(pid: Option<u32>) {
    let pid = pid
        .and_then(|p| i32::try_from(p).ok())
        .filter(|&p| p > 1)
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

//! Operator scripts the tests hand to the agent, their logs, and waiting for
//! the agent to exit after a signal.

use std::path::Path;
use std::time::{Duration, Instant};

use super::AgentProcess;

/// The lines of a log file; none when it does not exist (yet).
pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Writes an executable `sh` script that stops at its first failing command.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\nset -e\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
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

//! What the migration workflow keeps with a launch beside its volume: when a
//! drill expires, whether its checks must pass, whether it follows its
//! source (a warm standby), and each check's result.
//!
//! File `DATA/launches/NAME/workflow`, a text record (`textrec.rs`). Written
//! inside the launch's directory before that directory is renamed into place
//! when the launch is made with one, and replaced atomically when a check
//! reports; a launch without the file has the default workflow (no expiry,
//! no checks). Deleting the launch deletes it.

use blockrep_core::ChunkId;

use crate::catalog::validate_name;
use crate::error::{Error, ErrorKind};
use crate::fsutil::{publish_atomic, read_small_file};
use crate::mutex::lock;
use crate::store::Store;
use crate::textrec;

/// Most checks a launch keeps results of.
pub const LAUNCH_CHECKS_MAX: usize = 32;

/// Longest output tail kept per check, in bytes.
pub const CHECK_OUTPUT_TAIL_MAX_BYTES: usize = 4096;

/// Longest check name or command kept, in bytes.
pub const CHECK_TEXT_MAX_BYTES: usize = 1024;

const MAGIC: &str = "blockrep launch-workflow v1";

const FILE_MAX_BYTES: usize =
    256 + LAUNCH_CHECKS_MAX * (96 + 12 * (2 * CHECK_TEXT_MAX_BYTES + CHECK_OUTPUT_TAIL_MAX_BYTES));

/// The result of one check run on a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchCheck {
    /// What it checked: `fs`, `boot`, or the command's own name.
    pub name: String,
    /// The command line that ran.
    pub command: String,
    pub passed: bool,
    /// Its exit status; `None` when it was killed or timed out.
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    /// When it finished, Unix ms.
    pub finished_unix_ms: u64,
    /// The end of what it printed.
    pub output_tail: String,
}

/// A launch's workflow record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchWorkflow {
    /// When the launch expires and is deleted, Unix ms (drills).
    pub expires_unix_ms: Option<u64>,
    /// Checks that fail (or have not passed yet) block the source's
    /// `mark-ready` and cutover.
    pub must_succeed: bool,
    /// Checks declared at creation, by name, whose results are awaited.
    pub expected_checks: Vec<String>,
    /// A warm standby: moved to each new committed point of its source while
    /// it has no writes of its own.
    pub follow: bool,
    /// Results, one per check name (the newest run of each).
    pub checks: Vec<LaunchCheck>,
    /// A standby's last move: the root it was moved to, and its source's
    /// epoch then.
    pub followed: Option<(ChunkId, u64)>,
    /// A standby's move under way: the root it is being moved to (written
    /// before the head, so a crash between leaves the head at a root the
    /// record names, and the launch is not taken for written).
    pub following_to: Option<ChunkId>,
}

impl LaunchWorkflow {
    /// Whether the record says anything beyond the default.
    pub fn is_default(&self) -> bool {
        *self == LaunchWorkflow::default()
    }

    /// Whether every expected check has a passing result (and there is at
    /// least one check).
    pub fn checks_passed(&self) -> bool {
        let expected_pass = self
            .expected_checks
            .iter()
            .all(|name| self.checks.iter().any(|c| &c.name == name && c.passed));
        !self.checks.is_empty() && expected_pass && self.checks.iter().all(|c| c.passed)
    }

    /// The names of checks that block: failed, or expected and not yet run.
    pub fn blocking_checks(&self) -> Vec<String> {
        if !self.must_succeed {
            return Vec::new();
        }
        let mut out: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{} failed", c.name))
            .collect();
        for name in &self.expected_checks {
            if !self.checks.iter().any(|c| &c.name == name) {
                out.push(format!("{name} has not run"));
            }
        }
        out
    }

    /// Records a check's result, replacing an earlier run of the same name.
    pub fn record(&mut self, check: LaunchCheck) -> Result<(), Error> {
        let check = LaunchCheck {
            name: textrec::truncate(&check.name, CHECK_TEXT_MAX_BYTES),
            command: textrec::truncate(&check.command, CHECK_TEXT_MAX_BYTES),
            output_tail: check_output_tail(&check.output_tail),
            ..check
        };
        if let Some(old) = self.checks.iter_mut().find(|c| c.name == check.name) {
            *old = check;
            return Ok(());
        }
        if self.checks.len() >= LAUNCH_CHECKS_MAX {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("a launch keeps at most {LAUNCH_CHECKS_MAX} checks"),
            ));
        }
        self.checks.push(check);
        Ok(())
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut lines = vec![
            format!(
                "expires {}",
                self.expires_unix_ms
                    .map_or_else(|| "-".to_owned(), |ms| ms.to_string())
            ),
            format!("must_succeed {}", u8::from(self.must_succeed)),
            format!("follow {}", u8::from(self.follow)),
        ];
        for name in &self.expected_checks {
            lines.push(format!("expect {}", textrec::escape(name)));
        }
        if let Some((root, epoch)) = &self.followed {
            lines.push(format!("followed {} {epoch}", root.to_hex()));
        }
        if let Some(root) = &self.following_to {
            lines.push(format!("following_to {}", root.to_hex()));
        }
        for c in &self.checks {
            lines.push(format!(
                "check {} {} {} {} {} {} {}",
                textrec::escape(&c.name),
                u8::from(c.passed),
                c.exit_code
                    .map_or_else(|| "-".to_owned(), |code| code.to_string()),
                c.duration_ms,
                c.finished_unix_ms,
                textrec::escape(&c.command),
                textrec::escape(&c.output_tail)
            ));
        }
        textrec::seal(MAGIC, &lines)
    }

    pub(crate) fn decode(launch: &str, bytes: &[u8]) -> Result<Self, Error> {
        let what = format!("workflow record of launch {launch}");
        let bad = |line: &str| Error::new(ErrorKind::Corrupt, format!("{what}: bad line {line:?}"));
        let mut out = LaunchWorkflow::default();
        for line in textrec::open(&what, MAGIC, bytes)? {
            let fields: Vec<&str> = line.split(' ').collect();
            let flag = |value: &str| match value {
                "0" => Some(false),
                "1" => Some(true),
                _ => None,
            };
            match fields.as_slice() {
                ["expires", "-"] => out.expires_unix_ms = None,
                ["expires", ms] => out.expires_unix_ms = Some(ms.parse().map_err(|_| bad(line))?),
                ["must_succeed", v] => out.must_succeed = flag(v).ok_or_else(|| bad(line))?,
                ["follow", v] => out.follow = flag(v).ok_or_else(|| bad(line))?,
                ["followed", root, epoch] => {
                    let root = parse_id(root).ok_or_else(|| bad(line))?;
                    out.followed = Some((root, epoch.parse().map_err(|_| bad(line))?));
                }
                ["following_to", root] => {
                    out.following_to = Some(parse_id(root).ok_or_else(|| bad(line))?);
                }
                ["expect", name] => out
                    .expected_checks
                    .push(textrec::unescape(name).ok_or_else(|| bad(line))?),
                [
                    "check",
                    name,
                    passed,
                    code,
                    duration,
                    finished,
                    command,
                    tail,
                ] => {
                    let parse = || -> Option<LaunchCheck> {
                        Some(LaunchCheck {
                            name: textrec::unescape(name)?,
                            passed: flag(passed)?,
                            exit_code: match *code {
                                "-" => None,
                                code => Some(code.parse().ok()?),
                            },
                            duration_ms: duration.parse().ok()?,
                            finished_unix_ms: finished.parse().ok()?,
                            command: textrec::unescape(command)?,
                            output_tail: textrec::unescape(tail)?,
                        })
                    };
                    out.checks.push(parse().ok_or_else(|| bad(line))?);
                }
                _ => return Err(bad(line)),
            }
        }
        Ok(out)
    }
}

/// A chunk id from its 64 hex digits ([`ChunkId::to_hex`]'s form).
fn parse_id(hex: &str) -> Option<ChunkId> {
    blake3::Hash::from_hex(hex).ok().map(ChunkId::from)
}

/// The end of a check's output that a launch keeps: its last
/// [`CHECK_OUTPUT_TAIL_MAX_BYTES`], at a character boundary.
pub fn check_output_tail(text: &str) -> String {
    let mut start = text.len().saturating_sub(CHECK_OUTPUT_TAIL_MAX_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

impl Store {
    /// The workflow record of launch `name` (the default when it has none).
    /// `NotFound` when the launch does not exist.
    pub fn launch_workflow(&self, name: &str) -> Result<LaunchWorkflow, Error> {
        validate_name("launch", name)?;
        let dir = self.launches_dir().join(name);
        if !self.vfs().is_dir(&dir) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no launch named {name}"),
            ));
        }
        match read_small_file(self.vfs(), &dir.join("workflow"), FILE_MAX_BYTES)? {
            Some(bytes) => LaunchWorkflow::decode(name, &bytes),
            None => Ok(LaunchWorkflow::default()),
        }
    }

    /// Changes the workflow record of launch `name` with `change`, durably,
    /// under the catalog lock (so a deletion cannot interleave); returns the
    /// new record. `NotFound` when the launch does not exist.
    pub fn update_launch_workflow(
        &self,
        name: &str,
        change: impl FnOnce(&mut LaunchWorkflow) -> Result<(), Error>,
    ) -> Result<LaunchWorkflow, Error> {
        self.check_writable()?;
        let _guard = lock(&self.catalog.lock);
        let mut workflow = self.launch_workflow(name)?;
        change(&mut workflow)?;
        let path = self.launches_dir().join(name).join("workflow");
        publish_atomic(self.vfs(), &path, &workflow.encode())?;
        Ok(workflow)
    }

    /// Writes `workflow` into a launch directory being built.
    pub(crate) fn publish_launch_workflow(
        &self,
        dir: &std::path::Path,
        workflow: &LaunchWorkflow,
    ) -> Result<(), Error> {
        publish_atomic(self.vfs(), &dir.join("workflow"), &workflow.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, passed: bool) -> LaunchCheck {
        LaunchCheck {
            name: name.into(),
            command: format!("run {name} --flag"),
            passed,
            exit_code: Some(if passed { 0 } else { 1 }),
            duration_ms: 1234,
            finished_unix_ms: 99,
            output_tail: "line one\nline two é\n".into(),
        }
    }

    #[test]
    fn records_round_trip_and_gate() {
        let mut w = LaunchWorkflow {
            expires_unix_ms: Some(5_000),
            must_succeed: true,
            expected_checks: vec!["fs".into(), "boot".into()],
            follow: true,
            checks: Vec::new(),
            followed: Some((ChunkId([0xab; 32]), 7)),
            following_to: Some(ChunkId([0x01; 32])),
        };
        assert!(!w.checks_passed());
        assert_eq!(
            w.blocking_checks(),
            vec!["fs has not run", "boot has not run"]
        );
        w.record(check("fs", true)).unwrap();
        w.record(check("boot", false)).unwrap();
        assert_eq!(w.blocking_checks(), vec!["boot failed"]);
        let decoded = LaunchWorkflow::decode("t", &w.encode()).unwrap();
        assert_eq!(decoded, w);
        w.record(check("boot", true)).unwrap();
        assert!(w.checks_passed());
        assert!(w.blocking_checks().is_empty());
        assert_eq!(w.checks.len(), 2);
        let mut long = check("long", true);
        long.output_tail = "é".repeat(CHECK_OUTPUT_TAIL_MAX_BYTES);
        w.record(long).unwrap();
        assert!(w.checks[2].output_tail.len() <= CHECK_OUTPUT_TAIL_MAX_BYTES);
        assert_eq!(LaunchWorkflow::decode("t", &w.encode()).unwrap(), w);
        assert!(LaunchWorkflow::default().is_default());
        assert_eq!(
            LaunchWorkflow::decode("t", &LaunchWorkflow::default().encode()).unwrap(),
            LaunchWorkflow::default()
        );
    }
}

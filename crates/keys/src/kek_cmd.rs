//! A key service reached through a command (`--kek-cmd CMD`).
//!
//! # The contract
//!
//! blockrep runs `/bin/sh -c CMD` with the operation in the environment
//! variable `BLOCKREP_KEK_OP` and, for `wrap` and `unwrap`, the context the
//! key belongs to in `BLOCKREP_KEK_CONTEXT` (pass it to the service as
//! associated data, e.g. KMS's encryption context, so a wrapped key cannot be
//! replayed for another source):
//!
//! | op | stdin | stdout (one line) |
//! |---|---|---|
//! | `id` | nothing | the KEK's id (1 to 200 printable ASCII characters, no spaces), e.g. the KMS key's ARN |
//! | `wrap` | the data key as 64 hex digits and a newline | the wrapped key: 1 to 8192 printable ASCII characters without spaces (base64, say) |
//! | `unwrap` | what `wrap` printed, and a newline | the data key as 64 hex digits |
//!
//! Exit status 0 means success; anything else is a failure, reported with
//! the last lines of the command's standard error. A command that has not
//! finished after [`KEK_CMD_TIMEOUT`] is killed (with its process group) and
//! fails. The plain text key passes only through the pipe: blockrep never
//! writes it to a file, and the command should not either.
//! `scripts/kek-aws-kms.sh` is an example for AWS KMS.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::data_key::{DATA_KEY_LEN, DataKey};
use crate::error::{Error, ErrorKind};

/// How long one run of a KEK command may take.
pub const KEK_CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest KEK id a command may print.
pub const KEK_ID_MAX_LEN: usize = 200;
/// Longest wrapped key a command may print.
pub const WRAPPED_MAX_LEN: usize = 8192;
/// Bytes of a command's standard error kept for the error message.
const STDERR_TAIL: usize = 1024;

/// A key service behind a command; see the module's contract.
pub struct KekCommand {
    command: String,
    id: String,
    timeout: Duration,
}

impl fmt::Debug for KekCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self.command, self.id)
    }
}

impl KekCommand {
    /// The service behind `command`, checked by asking it for its id.
    pub fn new(command: &str) -> Result<Self, Error> {
        Self::with_timeout(command, KEK_CMD_TIMEOUT)
    }

    /// [`KekCommand::new`] with another time-out than [`KEK_CMD_TIMEOUT`].
    pub fn with_timeout(command: &str, timeout: Duration) -> Result<Self, Error> {
        if command.trim().is_empty() {
            return Err(Error::new(ErrorKind::Kek, "the KEK command is empty"));
        }
        let mut this = Self {
            command: command.to_owned(),
            id: String::new(),
            timeout,
        };
        let id = this.run("id", None, &[], KEK_ID_MAX_LEN)?;
        this.id = printable_line(&id, KEK_ID_MAX_LEN)
            .ok_or_else(|| this.bad_answer("id", "not one line of printable ASCII"))?;
        Ok(this)
    }

    /// The id the service gave.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Wraps `key` for `context`.
    pub fn wrap(&self, key: &DataKey, context: &str) -> Result<Vec<u8>, Error> {
        let mut input = Zeroizing::new(String::with_capacity(2 * DATA_KEY_LEN + 1));
        for byte in key.bytes() {
            input.push_str(&format!("{byte:02x}"));
        }
        input.push('\n');
        let out = self.run("wrap", Some(context), input.as_bytes(), WRAPPED_MAX_LEN)?;
        printable_line(&out, WRAPPED_MAX_LEN)
            .map(String::into_bytes)
            .ok_or_else(|| self.bad_answer("wrap", "not one line of printable ASCII"))
    }

    /// Unwraps what [`KekCommand::wrap`] answered for `context`.
    pub fn unwrap_key(&self, wrapped: &[u8], context: &str) -> Result<DataKey, Error> {
        let mut input = wrapped.to_vec();
        input.push(b'\n');
        let out =
            Zeroizing::new(self.run("unwrap", Some(context), &input, 2 * DATA_KEY_LEN + 2)?);
        let text = std::str::from_utf8(&out)
            .map(str::trim_end)
            .map_err(|_| self.bad_answer("unwrap", "not text"))?;
        if text.len() != 2 * DATA_KEY_LEN {
            return Err(self.bad_answer("unwrap", "not 64 hex digits"));
        }
        let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            key[i] = match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => (h * 16 + l) as u8,
                _ => return Err(self.bad_answer("unwrap", "not 64 hex digits")),
            };
        }
        DataKey::from_bytes(key.as_ref())
    }

    fn bad_answer(&self, op: &str, why: &str) -> Error {
        Error::new(
            ErrorKind::Kek,
            format!(
                "the KEK command {:?} answered {op} with {why}",
                self.command
            ),
        )
    }

    /// Runs the command for `op`, feeding `input`; its standard output, at
    /// most `out_max` bytes before the line's end (more is a failure).
    /// Everything is bounded by the time-out: the input is written, and both
    /// outputs read, by threads the caller never waits on past it, and the
    /// command's process group is killed once its leader ends (or at the
    /// time-out), so a child left holding a pipe cannot hang the caller.
    fn run(
        &self,
        op: &str,
        context: Option<&str>,
        input: &[u8],
        out_max: usize,
    ) -> Result<Vec<u8>, Error> {
        let failed = |why: String| {
            Error::new(
                ErrorKind::Kek,
                format!("the KEK command {:?} failed to {op}: {why}", self.command),
            )
        };
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&self.command)
            .env("BLOCKREP_KEK_OP", op)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so what it started is killed with it.
            .process_group(0);
        if let Some(context) = context {
            command.env("BLOCKREP_KEK_CONTEXT", context);
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed(format!("cannot start /bin/sh: {e}")))?;
        let group = rustix::process::Pid::from_child(&child);
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        // The answer may end in "\r\n": two bytes past the longest line.
        let keep = out_max as u64 + 2;
        let (out_tx, out_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Zeroizing::new(Vec::with_capacity(keep as usize + 1));
            let read = (&mut stdout).take(keep + 1).read_to_end(&mut out);
            // Drain the rest so the command is not stopped by a full pipe.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
            let _ = out_tx.send(read.map(|_| out));
        });
        let (err_tx, err_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Only the tail is kept, whatever the command writes.
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            let _ = err_tx.send(tail);
        });
        let input = Zeroizing::new(input.to_vec());
        std::thread::spawn(move || {
            // A command that exits without reading its input is fine.
            let _ = stdin.write_all(&input);
        });

        let deadline = Instant::now() + self.timeout;
        let kill = || {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    kill();
                    break Ok(status);
                }
                Ok(None) if Instant::now() >= deadline => {
                    kill();
                    let _ = child.wait();
                    break Err(failed(format!(
                        "no answer within {:?}; killed",
                        self.timeout
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    kill();
                    break Err(failed(format!("cannot wait for it: {e}")));
                }
            }
        };
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(200))
        };
        let out = out_rx.recv_timeout(left());
        let err = err_rx.recv_timeout(left()).unwrap_or_default();
        let status = status?;
        let tail = String::from_utf8_lossy(&err[err.len().saturating_sub(STDERR_TAIL)..])
            .trim()
            .to_owned();
        if !status.success() {
            return Err(failed(format!(
                "{status}{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; its standard error ends: {tail}")
                }
            )));
        }
        let out = match out {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(failed(format!("cannot read its output: {e}"))),
            Err(_) => return Err(failed("its output did not end".into())),
        };
        if out.len() as u64 > keep {
            return Err(failed(format!("its answer is longer than {out_max} bytes")));
        }
        Ok(out.to_vec())
    }
}

/// `bytes` as one line (a final newline allowed) of printable ASCII without
/// spaces, 1 to `max` characters long.
fn printable_line(bytes: &[u8], max: usize) -> Option<String> {
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let ok = !line.is_empty() && line.len() <= max && line.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| String::from_utf8_lossy(line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in key service: "wraps" by XOR with a fixed pad and hex, so
    /// the test sees exactly what crosses the pipe; it also records the
    /// context it was given.
    const SERVICE: &str = r#"
        case "$BLOCKREP_KEK_OP" in
          id) echo "test-kms/key-1" ;;
          wrap) read k; printf '%s:%s\n' "$BLOCKREP_KEK_CONTEXT" "$k" | rev ;;
          unwrap) read w; w=$(printf '%s' "$w" | rev); c=${w%%:*}; k=${w#*:};
                  [ "$c" = "$BLOCKREP_KEK_CONTEXT" ] || { echo "context mismatch" >&2; exit 3; }
                  echo "$k" ;;
          *) exit 9 ;;
        esac"#;

    #[test]
    fn a_command_wraps_and_unwraps_through_its_contract() {
        let kek = KekCommand::new(SERVICE).unwrap();
        assert_eq!(kek.id(), "test-kms/key-1");
        let key = DataKey::generate().unwrap();
        let wrapped = kek.wrap(&key, "source=web-1").unwrap();
        let back = kek.unwrap_key(&wrapped, "source=web-1").unwrap();
        assert_eq!(back.bytes(), key.bytes());
        let error = kek.unwrap_key(&wrapped, "source=db-1").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Kek);
        assert!(error.to_string().contains("context mismatch"), "{error}");
    }

    #[test]
    fn failing_silent_and_babbling_commands_are_refused_clearly() {
        let error = KekCommand::new("echo 'access denied' >&2; exit 4").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Kek);
        let text = error.to_string();
        assert!(
            text.contains("access denied") && text.contains("id"),
            "{text}"
        );

        let error = KekCommand::new("echo 'two words'").unwrap_err();
        assert!(error.to_string().contains("printable"), "{error}");

        let error = KekCommand::new("head -c 100000 /dev/zero | tr '\\0' a").unwrap_err();
        assert!(error.to_string().contains("longer than"), "{error}");

        // A service that hangs (its child holding the pipes) is killed with
        // its child at the time-out.
        let started = Instant::now();
        let error = KekCommand::with_timeout("sleep 30 & sleep 30", Duration::from_millis(300))
            .unwrap_err();
        assert!(error.to_string().contains("killed"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));

        // A service that answers and leaves a child holding its output is
        // done when it exits (the child is killed), not when the child is.
        let started = Instant::now();
        let kek = KekCommand::with_timeout("sleep 30 & echo k-1", Duration::from_secs(20)).unwrap();
        assert_eq!(kek.id(), "k-1");
        assert!(started.elapsed() < Duration::from_secs(10));
        // The longest id the contract allows, ended by "\r\n".
        let long = "i".repeat(KEK_ID_MAX_LEN);
        let kek = KekCommand::new(&format!("printf '{long}\\r\\n'")).unwrap();
        assert_eq!(kek.id(), long);

        // A service that answers its id but garbles unwrap.
        let kek = KekCommand::new(
            r#"case "$BLOCKREP_KEK_OP" in id) echo k;; wrap) echo w;; unwrap) echo nothex;; esac"#,
        )
        .unwrap();
        let key = DataKey::generate().unwrap();
        let wrapped = kek.wrap(&key, "c").unwrap();
        let error = kek.unwrap_key(&wrapped, "c").unwrap_err();
        assert!(error.to_string().contains("64 hex digits"), "{error}");
    }
}

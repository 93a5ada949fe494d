//! The agent's `--ack-log`, as the tests read it back.

use std::path::Path;

/// One line of the agent's `--ack-log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The epoch the line acknowledges.
    pub epoch: u64,
    pub root: String,
    pub complete: bool,
    /// When the agent had the commit's acknowledgement.
    pub unix_ms: u64,
    /// When the epoch's view of the disk was taken (its scan start, or in
    /// capture mode its cut).
    pub scan_started_unix_ms: u64,
}

/// The whole lines of the ack log at `path` (none when it does not exist yet).
pub fn read_acks(path: &Path) -> Vec<Ack> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Lines are written whole; a line without its newline is not finished yet.
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .map(|line| {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                    .unwrap_or_else(|| panic!("ack log line {line:?} has no {key}"))
            };
            Ack {
                epoch: field("epoch").parse().unwrap(),
                root: field("root").to_owned(),
                complete: field("complete").parse().unwrap(),
                unix_ms: field("unix_ms").parse().unwrap(),
                scan_started_unix_ms: field("scan_started_unix_ms").parse().unwrap(),
            }
        })
        .collect()
}

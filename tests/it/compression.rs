//! The agent's compression controller under a steady load: it settles, and
//! says what it chose on every epoch line.
#![allow(clippy::unwrap_used)]

use crate::common::*;
use blockrep_testkit::AgentRig;
use blockrep_testkit::admin::{admin_source, metrics};

const MIB: usize = 1 << 20;

/// A 96 MiB disk of text-like lines (zstd makes it about a third), every
/// line different, so there is no zero chunk and no duplicate.
fn text_disk(path: &std::path::Path) {
    let words = [
        "block", "replica", "epoch", "kernel", "inode", "journal", "sector", "commit",
    ];
    let mut disk = Vec::with_capacity(96 * MIB);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut line = 0u64;
    while disk.len() < 96 * MIB {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let word = words[(state % words.len() as u64) as usize];
        disk.extend_from_slice(format!("{line:010} {word} {:016x}\n", state >> 11).as_bytes());
        line += 1;
    }
    disk.truncate(96 * MIB);
    std::fs::write(path, disk).unwrap();
}

/// `key=value` of the agent's (only) epoch line.
fn field(output: &std::process::Output, key: &str) -> String {
    let out = stdout(output);
    let line = out.lines().find(|l| l.contains(" committed ")).unwrap();
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .to_owned()
}

/// On a link throttled far below what zstd can feed, compression stays on
/// through the whole sync (six of the controller's windows): no change,
/// every data chunk compressed. Unthrottled on loopback, whichever way the
/// measurements point, it changes its mind at most once.
#[test]
fn the_compression_controller_settles_on_a_slow_and_a_fast_link() {
    let AgentRig {
        pki, work, server, ..
    } = rig(&["slow", "fast", "fixed"], &[]);
    let disk = work.path().join("disk.raw");
    text_disk(&disk);

    let slow = agent_once(
        &disk,
        server.addr,
        "slow",
        pki.path(),
        // Far below zstd's pace even on a machine busy with other tests
        // (a 2-core runner booting a VM beside it measured zstd under
        // 32 MiB/s once): compression must win by a wide margin here.
        &["--max-rate", "8MiB/s"],
    );
    assert_success(&slow);
    assert_eq!(field(&slow, "compression"), "on", "{}", stdout(&slow));
    assert_eq!(field(&slow, "compression_changes"), "0");
    let chunks: u64 = field(&slow, "chunks_sent").parse().unwrap();
    let compressed: u64 = field(&slow, "compressed_chunks_sent").parse().unwrap();
    assert_eq!(chunks, 96 * 16);
    assert_eq!(
        compressed, chunks,
        "every chunk compressed on the slow link"
    );
    // The server sees the same choice, in its API and its metrics.
    let view = admin_source(server.admin_addr.unwrap(), "slow").unwrap();
    assert_eq!(view.compressed_chunk_share, Some(1.0));
    assert_eq!(view.chunks_compressed_total, chunks);

    let fast = agent_once(&disk, server.addr, "fast", pki.path(), &[]);
    assert_success(&fast);
    let changes: u64 = field(&fast, "compression_changes").parse().unwrap();
    assert!(changes <= 1, "{}", stdout(&fast));
    // `--compress none` fixes the choice: the line says so.
    let fixed = agent_once(
        &disk,
        server.addr,
        "fixed",
        pki.path(),
        &["--compress", "none"],
    );
    assert_success(&fixed);
    assert_eq!(field(&fixed, "compression"), "off");
    assert_eq!(field(&fixed, "compressed_chunks_sent"), "0");
    let text = metrics(&server);
    assert!(
        text.contains("blockrep_compressed_chunk_share{source=\"slow\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("blockrep_compressed_chunk_share{source=\"fixed\"} 0\n"),
        "{text}"
    );
}

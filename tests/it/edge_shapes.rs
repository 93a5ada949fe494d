//! Disks of awkward shapes replicate exactly, and disks that change shape or
//! identity between epochs are handled as documented: a resize stops the agent
//! with an error naming both sizes and writes nothing; a file replaced by
//! another (a new inode at the same path) is read afresh and the replica
//! converges to it.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::wait_exit;
use blockrep_testkit::{random_bytes, write_at};

const KIB: u64 = 1024;

/// Truncates or extends the file at `disk` to `len` bytes.
fn resize(disk: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// `agent --once` of `disk` as `source` at `chunk_size`.
fn once(env: &AgentRig, disk: &Path, source: &str, chunk_size: u64) -> Output {
    env.agent_once(disk, source, &["--chunk-size", &chunk_size.to_string()])
}

/// A continuous agent of `disk` as `source`.
fn agent(env: &AgentRig, disk: &Path, source: &str) -> AgentProcess {
    // Long enough that a resize made right after an epoch line lands
    // between two scans, not inside one.
    env.spawn_agent(disk, source, &["--interval", "700ms"])
}

#[test]
fn sizes_around_chunk_boundaries_replicate_exactly_and_zeroed_chunks_become_zero() {
    let mut cases = Vec::new();
    for chunk in [64 * KIB, 4 * KIB] {
        for size in [1, chunk - 1, chunk, chunk + 1] {
            cases.push((format!("c{}k-{size}", chunk / KIB), chunk, size));
        }
    }
    let names: Vec<&str> = cases.iter().map(|(name, ..)| name.as_str()).collect();
    let env = rig(&names, &[]);
    for (seed, (source, chunk, size)) in cases.iter().enumerate() {
        let disk = env.path(&format!("{source}.raw"));
        std::fs::write(&disk, random_bytes(*size as usize, seed as u64 + 1)).unwrap();
        let first = once(&env, &disk, source, *chunk);
        assert_success(&first);
        let chunks = size.div_ceil(*chunk);
        assert_eq!(
            sum_field(&first, "chunks_sent"),
            chunks,
            "{source}: {}",
            stdout(&first)
        );
        env.assert_replica_is(source, &disk);

        // Zero the first chunk and (when there is one) the last, short or not;
        // each becomes zero on the replica and travels as a zero chunk.
        write_at(&disk, 0, &vec![0u8; (*size).min(*chunk) as usize]);
        let mut zeroed = 1;
        if chunks > 1 {
            let last_start = (chunks - 1) * chunk;
            write_at(&disk, last_start, &vec![0u8; (size - last_start) as usize]);
            zeroed += 1;
        }
        let second = once(&env, &disk, source, *chunk);
        assert_success(&second);
        assert_eq!(
            sum_field(&second, "zero_chunks_sent"),
            zeroed,
            "{source}: {}",
            stdout(&second)
        );
        assert_eq!(sum_field(&second, "chunks_sent"), 0, "{}", stdout(&second));
        env.assert_replica_is(source, &disk);
        assert_eq!(
            disk_root(&env.path(&format!("{source}.export")), *chunk as u32),
            disk_root(&disk, *chunk as u32)
        );
    }
}

#[test]
fn empty_disk_replicates_and_exports_as_an_empty_file() {
    let env = rig(&["empty"], &[]);
    let disk = env.path("empty.raw");
    std::fs::write(&disk, b"").unwrap();
    let first = once(&env, &disk, "empty", 64 * KIB);
    assert_success(&first);
    assert!(env.head("empty").is_some(), "no head for the empty disk");
    env.assert_replica_is("empty", &disk);
    let second = once(&env, &disk, "empty", 64 * KIB);
    assert_success(&second);
    assert!(
        stdout(&second).contains("replica already equals disk"),
        "{}",
        stdout(&second)
    );
}

#[test]
fn sparse_disk_of_one_gib_and_4095_bytes_replicates_exactly() {
    let env = rig(&["sparse"], &[]);
    let disk = env.path("sparse.raw");
    let size = (1u64 << 30) + 4095;
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    // A few non-zero chunks: the first, one in the middle, one across a page
    // boundary of the index (chunk 1024), and the short last chunk.
    let chunk = 64 * KIB;
    let written = [0, 512 << 20, 1024 * chunk - 10, size - 4095];
    for (i, offset) in written.iter().enumerate() {
        let len = (size - offset).min(chunk) as usize;
        write_at(&disk, *offset, &random_bytes(len, 40 + i as u64));
    }
    let first = once(&env, &disk, "sparse", chunk);
    assert_success(&first);
    // The write at chunk 1024 - 10 bytes spans two chunks.
    assert_eq!(sum_field(&first, "chunks_sent"), 5, "{}", stdout(&first));
    env.assert_replica_is("sparse", &disk);
    let allocated = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(env.path("sparse.export")).unwrap(),
    ) * 512;
    assert!(allocated < 16 << 20, "export not sparse: {allocated} bytes");

    // Zero the short last chunk and change the middle one.
    write_at(&disk, size - 4095, &vec![0u8; 4095]);
    write_at(&disk, 512 << 20, b"changed");
    let second = once(&env, &disk, "sparse", chunk);
    assert_success(&second);
    assert_eq!(
        sum_field(&second, "zero_chunks_sent"),
        1,
        "{}",
        stdout(&second)
    );
    // The changed chunk had data: its one changed 4 KiB block goes as a patch.
    assert_eq!(sum_field(&second, "chunks_sent"), 0, "{}", stdout(&second));
    assert_eq!(sum_field(&second, "patches_sent"), 1, "{}", stdout(&second));
    env.assert_replica_is("sparse", &disk);
}

/// `agent --once` against a replica of another size: refused with both sizes
/// named, and the head untouched.
fn assert_resize_refused_once(env: &AgentRig, source: &str, disk: &Path, old: u64, new: u64) {
    let head = env.head(source).unwrap();
    let output = once(env, disk, source, 64 * KIB);
    assert!(!output.status.success(), "resized disk was accepted");
    let text = stderr(&output);
    assert!(
        text.contains(&old.to_string()) && text.contains(&new.to_string()),
        "error does not name both sizes ({old}, {new}): {text}"
    );
    assert!(text.contains("new source id"), "{text}");
    assert_eq!(env.head(source).unwrap(), head, "head changed");
}

#[test]
fn resized_disk_is_refused_with_both_sizes_and_nothing_written() {
    let env = rig(&["grow", "shrink"], &[]);
    let size = 1u64 << 20;
    for (source, new) in [("grow", size + 4096), ("shrink", size - 65_536)] {
        let disk = env.path(&format!("{source}.raw"));
        std::fs::write(&disk, random_bytes(size as usize, 7)).unwrap();
        assert_success(&once(&env, &disk, source, 64 * KIB));
        resize(&disk, new);
        assert_resize_refused_once(&env, source, &disk, size, new);
        // The replica still holds the disk as it was before the resize.
        let before = env.path(&format!("{source}.before"));
        std::fs::write(&before, random_bytes(size as usize, 7)).unwrap();
        env.assert_replica_is(source, &before);
    }
    assert!(
        env.server.wait_for_log("geometry", Duration::from_secs(5)),
        "{}",
        env.server.log()
    );
}

#[test]
fn continuous_agent_stops_on_a_resize_instead_of_spinning() {
    let env = rig(&["grow", "shrink"], &[]);
    let size = 1u64 << 20;
    for (source, new) in [("grow", size + 65_536 + 1), ("shrink", size / 2)] {
        let disk = env.path(&format!("{source}.raw"));
        std::fs::write(&disk, random_bytes(size as usize, 9)).unwrap();
        let mut agent = agent(&env, &disk, source);
        assert!(
            wait_until(Duration::from_secs(20), || !agent.epochs().is_empty()),
            "no first epoch: {}",
            agent.stderr.lock().unwrap()
        );
        let head = env.head(source).unwrap();
        resize(&disk, new);
        let status = wait_exit(&mut agent, Duration::from_secs(15));
        let text = agent.stderr.lock().unwrap().clone();
        assert!(!status.success(), "agent exited 0 after a resize: {text}");
        assert!(
            text.contains(&size.to_string()) && text.contains(&new.to_string()),
            "error does not name both sizes ({size}, {new}): {text}"
        );
        assert!(
            !text.contains("reconnecting"),
            "agent retried a resize: {text}"
        );
        assert_eq!(env.head(source).unwrap(), head, "head changed");
    }
}

#[test]
fn disk_file_replaced_by_another_file_is_read_afresh() {
    let env = rig(&["swap"], &[]);
    let size = 2usize << 20;
    let disk = env.path("swap.raw");
    std::fs::write(&disk, random_bytes(size, 11)).unwrap();
    let mut agent = agent(&env, &disk, "swap");
    let first_root = disk_root(&disk, 64 * KIB as u32);
    agent.wait_for_root(&first_root, Duration::from_secs(20), "no first epoch");
    // A new file (new inode, same size) renamed over the disk's path, as an
    // image restored from backup or rewritten by a tool would be.
    let mut replacement = random_bytes(size, 12);
    replacement[..4096].fill(0);
    let staged = env.path("swap.raw.new");
    std::fs::write(&staged, &replacement).unwrap();
    let old_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&disk).unwrap());
    std::fs::rename(&staged, &disk).unwrap();
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&disk).unwrap()),
        old_inode
    );
    let new_root = disk_root(&disk, 64 * KIB as u32);
    agent.wait_for_root(
        &new_root,
        Duration::from_secs(20),
        "replica did not converge to the new file",
    );
    agent.signal("TERM");
    assert!(agent.wait().success());
    env.assert_replica_is("swap", &disk);
}

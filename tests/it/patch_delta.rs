//! A delta of scattered 4 KiB writes travels as patches: the bytes on the wire
//! stay close to the bytes changed, where whole chunks (`--no-patches`) send many
//! times more; both replicas equal the disk afterwards.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::*;
use blockrep_testkit::{mixed_image, random_bytes, write_at};

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

/// Rewrites `count` distinct 4 KiB blocks of `disk` at seeded random positions
/// with random bytes; returns the bytes changed.
fn rewrite_random_blocks(disk: &Path, count: usize, seed: u64) -> u64 {
    let blocks = std::fs::metadata(disk).unwrap().len() as usize / BLOCK;
    let positions = random_bytes(count * 64, seed);
    let mut chosen = BTreeSet::new();
    for word in positions.chunks_exact(8) {
        if chosen.len() == count {
            break;
        }
        chosen.insert(u64::from_le_bytes(word.try_into().unwrap()) as usize % blocks);
    }
    assert_eq!(chosen.len(), count, "not enough distinct positions");
    for (n, block) in chosen.iter().enumerate() {
        write_at(
            disk,
            (block * BLOCK) as u64,
            &random_bytes(BLOCK, seed ^ (n as u64 + 1)),
        );
    }
    (count * BLOCK) as u64
}

fn assert_export_equals(data: &Path, source: &str, disk: &Path, out: &Path) {
    assert_success(&export(data, source, out));
    assert!(
        std::fs::read(out).unwrap() == std::fs::read(disk).unwrap(),
        "the export of {source} differs from the disk"
    );
}

#[test]
fn a_scattered_delta_travels_as_patches_close_to_the_bytes_changed() {
    let rig = rig(&["patched", "whole"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, mixed_image(64 * MIB, 7)).unwrap();
    assert_success(&agent_once(&disk, server.addr, "patched", pki.path(), &[]));
    assert_success(&agent_once(
        &disk,
        server.addr,
        "whole",
        pki.path(),
        &["--no-patches"],
    ));

    // 1% of the 4 KiB blocks, scattered: most 64 KiB chunks they touch get
    // one changed block.
    let blocks = 64 * MIB / BLOCK / 100;
    let changed = rewrite_random_blocks(&disk, blocks, 13);

    let patched = agent_once(&disk, server.addr, "patched", pki.path(), &[]);
    assert_success(&patched);
    let patched_wire = sum_field(&patched, "bytes_sent");
    assert!(
        sum_field(&patched, "patches_sent") > 0,
        "no patches sent: {}",
        stdout(&patched)
    );
    assert!(
        patched_wire * 10 <= changed * 13,
        "patches put {patched_wire} bytes on the wire for {changed} changed (more than 1.3x): {}",
        stdout(&patched)
    );

    let whole = agent_once(&disk, server.addr, "whole", pki.path(), &["--no-patches"]);
    assert_success(&whole);
    let whole_wire = sum_field(&whole, "bytes_sent");
    assert_eq!(sum_field(&whole, "patches_sent"), 0, "{}", stdout(&whole));
    assert!(
        whole_wire > 3 * patched_wire,
        "whole chunks sent {whole_wire} bytes, patches {patched_wire}: {}",
        stdout(&whole)
    );

    let out = work.path().join("export.raw");
    assert_export_equals(&data, "patched", &disk, &out);
    assert_export_equals(&data, "whole", &disk, &out);

    // A chunk rewritten whole is no patch: it travels as a chunk, and a
    // single changed byte is a patch of one block.
    write_at(&disk, (5 * MIB) as u64, &random_bytes(65_536, 21));
    write_at(&disk, (9 * MIB + 4_100) as u64, b"!");
    let next = agent_once(&disk, server.addr, "patched", pki.path(), &[]);
    assert_success(&next);
    assert_eq!(sum_field(&next, "chunks_sent"), 1, "{}", stdout(&next));
    assert_eq!(sum_field(&next, "patches_sent"), 1, "{}", stdout(&next));
    assert_export_equals(&data, "patched", &disk, &out);
}

/// The `key=N` of the failback pass line.
fn pass_field(output: &std::process::Output, key: &str) -> u64 {
    stdout(output)
        .lines()
        .filter(|l| l.starts_with("failback pass"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {}", stdout(output)))
        .parse()
        .unwrap()
}

#[test]
fn failback_receives_the_blocks_that_differ_as_patches() {
    let rig = nbd_rig(&["fb", "fb-whole"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let image = mixed_image(4 * MIB, 31);
    // Three chunks that hold data (a chunk of zeros is sent as "zero", with
    // no bytes either way), one 4 KiB block in each.
    let blocks: Vec<usize> = image
        .chunks(65_536)
        .enumerate()
        .filter(|(_, chunk)| chunk.iter().any(|&b| b != 0))
        .step_by(5)
        .take(3)
        .map(|(chunk, _)| chunk * 16 + 5)
        .collect();
    assert_eq!(blocks.len(), 3, "the image has too few chunks with data");
    let mut received = Vec::new();
    for (source, extra) in [("fb", &[][..]), ("fb-whole", &["--no-patches"][..])] {
        let disk = work.path().join(format!("{source}.raw"));
        std::fs::write(&disk, &image).unwrap();
        let launch = cut_over_once(&disk, server.addr, source, pki.path());
        // After cutover the disk and the launch differ by three 4 KiB blocks.
        for (n, block) in blocks.iter().enumerate() {
            write_at(
                &disk,
                (block * BLOCK) as u64,
                &random_bytes(BLOCK, 90 + n as u64),
            );
        }
        let mut args = vec!["--overwrite-source-changes"];
        args.extend_from_slice(extra);
        let output = failback_once(&disk, server.addr, source, &launch, pki.path(), &args);
        assert_success(&output);
        assert_eq!(
            pass_field(&output, "chunks_written"),
            3,
            "{}",
            stdout(&output)
        );
        received.push(pass_field(&output, "bytes_received"));
        assert!(
            std::fs::read(&disk).unwrap() == image,
            "{source}: the disk differs from the launch after failback"
        );
    }
    let (patched, whole) = (received[0], received[1]);
    assert!(
        patched <= 3 * BLOCK as u64,
        "failback with patches received {patched} bytes for three 4 KiB blocks"
    );
    assert!(
        whole >= 3 * 65_536 / 2,
        "failback without patches received only {whole} bytes"
    );
}

//! `blockrep bench` runs end to end on a small disk, reports every figure, and
//! fails when the replica it verifies is damaged.
#![allow(clippy::unwrap_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn bench(work: &std::path::Path) -> (std::process::Output, std::path::PathBuf) {
    bench_with(
        work,
        &["--size", "32MiB", "--duration", "3s", "--interval", "300ms"],
    )
}

/// Runs `blockrep bench` with `args`, its JSON, plot and working directory in `work`.
fn bench_with(work: &std::path::Path, args: &[&str]) -> (std::process::Output, std::path::PathBuf) {
    let json = work.join("out.json");
    let plot = work.join("out.svg");
    let mut command = Command::new(BIN);
    command
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .arg("--workdir")
        .arg(work.join("run"));
    (command.output().unwrap(), json)
}

#[test]
fn bench_reports_every_figure_and_verifies_the_cutover_volume() {
    let work = tempfile::tempdir().unwrap();
    let (output, json) = bench(work.path());
    assert_success(&output);
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let number = |path: &[&str]| figure(&figures, path);
    for path in [
        &["initial_sync", "seconds"][..],
        &["initial_sync", "disk_mib_per_second"],
        &["initial_sync", "nonzero_mib_per_second"],
        &["initial_sync", "bytes_on_wire"],
        &["initial_sync", "agent_cpu_seconds"],
        &["initial_sync", "server_cpu_seconds"],
        &["initial_sync", "cpu_seconds_per_nonzero_gib"],
        &["initial_sync", "to_commit", "seconds"],
        &["delta_sync", "seconds"],
        &["delta_sync", "bytes_on_wire"],
        &["delta_compare", "changed_bytes"],
        &["delta_compare", "patches", "bytes_on_wire"],
        &["delta_compare", "patches", "patches_sent"],
        &["delta_compare", "whole_chunks", "bytes_on_wire"],
        &["cutover", "downtime_seconds"],
        &["cutover", "final_scan_seconds"],
        &["cutover", "launch_ready_seconds"],
        &["memory", "agent_peak_rss_bytes"],
        &["memory", "server_peak_rss_bytes"],
        &["blake3_all_cores_seconds"],
        &["nonzero_bytes"],
        &["cores"],
    ] {
        assert!(number(path) > 0.0, "{path:?} is not positive: {figures:#}");
    }
    // Both ends' CPU over the non-zero GiB, as the table prints it.
    let cpu = number(&["initial_sync", "agent_cpu_seconds"])
        + number(&["initial_sync", "server_cpu_seconds"]);
    let per_gib = cpu / (number(&["nonzero_bytes"]) / 1073741824.0);
    let printed = number(&["initial_sync", "cpu_seconds_per_nonzero_gib"]);
    assert!(
        (printed - per_gib).abs() <= per_gib * 1e-9,
        "{printed} != {per_gib}"
    );
    // The full sync to its commit is part of the `--once` run, which then
    // reads the disk once more: it took no longer and no more CPU.
    let to_commit = |what: &str| number(&["initial_sync", "to_commit", what]);
    assert!(to_commit("seconds") <= number(&["initial_sync", "seconds"]));
    assert!(
        to_commit("agent_cpu_seconds") + to_commit("server_cpu_seconds") <= cpu,
        "{figures:#}"
    );
    let lag_max = number(&["continuous", "lag_seconds_max"]);
    assert!(
        number(&["continuous", "lag_seconds_p50"]) <= number(&["continuous", "lag_seconds_p99"])
    );
    assert!(
        lag_max < 3.0,
        "lag {lag_max} s is not below the 3 s duration"
    );
    assert!(number(&["continuous", "epochs"]) >= 2.0, "{figures:#}");
    assert!(number(&["continuous", "churn_bytes_written"]) > 0.0);
    assert!(number(&["initial_sync", "bytes_on_wire"]) <= 32.0 * 1048576.0 * 1.05);
    // The same change as patches and as whole chunks: patches put less on the wire.
    assert!(
        number(&["delta_compare", "patches", "bytes_on_wire"])
            < number(&["delta_compare", "whole_chunks", "bytes_on_wire"]),
        "{figures:#}"
    );
    // And again with the agents capped at 1 Gbit/s: patches, then whole chunks.
    assert_eq!(
        number(&["delta_compare", "link_bytes_per_second"]),
        125_000_000.0
    );
    assert!(number(&["delta_compare", "link_patches", "patches_sent"]) > 0.0);
    assert!(
        number(&["delta_compare", "link_patches", "bytes_on_wire"])
            < number(&["delta_compare", "link_whole_chunks", "bytes_on_wire"]),
        "{figures:#}"
    );
    // The lag figures leave out the samples before the phase's first commit.
    assert!(
        number(&["continuous", "lag_samples"]) <= number(&["continuous", "samples"]),
        "{figures:#}"
    );
    if have_tool("rsync") {
        assert!(number(&["delta_compare", "rsync_4k", "bytes_on_wire"]) > 0.0);
    }
    assert_eq!(figures["verified_equal"], serde_json::Value::Bool(true));
    assert_eq!(figures["seed"], 1);
    assert!(
        stdout(&output).contains("cutover downtime")
            && stdout(&output).contains("CPU agent + server per GiB of non-zero data"),
        "{}",
        stdout(&output)
    );
    let svg = std::fs::read_to_string(work.path().join("out.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("replication lag"),
        "bad plot"
    );
}

/// After a bench run, one byte of a chunk the cutover volume uses is damaged
/// in the store: the bench's verification of the cutover volume must fail.
/// A 32 MiB bench with 2 s of churn, plus `extra`.
fn short_bench(work: &Path, extra: &[&str]) -> (std::process::Output, PathBuf) {
    let mut args = vec!["--size", "32MiB", "--duration", "2s", "--interval", "300ms"];
    args.extend_from_slice(extra);
    bench_with(work, &args)
}

/// The bench of a source encrypted at rest: its whole run (sync, delta with
/// patches, churn, cutover) goes through the seals, and the cutover volume,
/// read back with the keys, is the disk (the bench fails otherwise).
#[test]
fn bench_encrypted_at_rest_verifies_its_sealed_cutover_volume() {
    let work = tempfile::tempdir().unwrap();
    let (output, json) = short_bench(work.path(), &["--encrypt-at-rest"]);
    assert_success(&output);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("encrypted at rest"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(figure(&figures, &["initial_sync", "disk_mib_per_second"]) > 0.0);
    let keys = blockrep_keys::KeyDir::open(&work.path().join("run/keys/keys")).unwrap();
    let records = keys
        .records(&blockrep_core::SourceId::new("bench").unwrap())
        .unwrap();
    assert_eq!(records.len(), 1);
}

/// The bench on a real file system's image (`--disk-kind fs`): ext4 made
/// with `mke2fs -d` from this machine's files, replicated and verified.
#[test]
fn bench_on_a_file_system_disk_verifies_its_cutover_volume() {
    if !have_tool("mke2fs") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (output, json) = short_bench(work.path(), &["--disk-kind", "fs"]);
    assert_success(&output);
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(figures["disk_kind"], "fs");
    let files = figures["layout_bytes"]["file data"].as_u64().unwrap();
    assert!(files > 8 << 20, "{files} bytes of files");
    assert!(figure(&figures, &["initial_sync", "disk_mib_per_second"]) > 0.0);
}

#[test]
fn bench_fails_when_the_replica_is_damaged() {
    let work = tempfile::tempdir().unwrap();
    let (output, json) = bench(work.path());
    assert_success(&output);
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let run = work.path().join("run");
    let (data, disk) = (run.join("data"), run.join("disk.raw"));
    let (chunk_size, launch, root) = damage_after_bench(&figures, &data, &disk);
    let verification = blockrep_bench::verify_cutover(&blockrep_bench::CutoverVolume {
        data,
        keys: None,
        disk,
        source: blockrep_core::SourceId::new("bench").unwrap(),
        chunk_size_bytes: chunk_size,
        root,
        launch,
        scratch: run.join("cutover-volume.raw"),
    })
    .unwrap();
    assert!(!verification.equal(), "a damaged replica verified equal");
    let error = verification.ensure_equal().unwrap_err().to_string();
    assert!(error.contains("differs"), "{error}");
}

/// The number at `path` in the bench's figures.
fn figure(figures: &serde_json::Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(figures, |v, k| &v[*k])
        .as_f64()
        .unwrap_or_else(|| panic!("missing {path:?} in {figures:#}"))
}

/// A machine of three small disks (the last 2 MiB + 4 KiB, not a whole chunk).
fn machine_bench(work: &Path) -> (std::process::Output, serde_json::Value) {
    let (output, json) = bench_with(
        work,
        &[
            "--disks",
            "3",
            "--size",
            "4MiB",
            "--duration",
            "2s",
            "--interval",
            "300ms",
        ],
    );
    assert_success(&output);
    let figures = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (output, figures)
}

/// `bench --disks 3` replicates a machine of three disks, cuts it over as one,
/// and verifies every volume of the cutover launch against its disk.
#[test]
fn bench_of_three_disks_verifies_every_volume_of_the_machine_cutover() {
    let work = tempfile::tempdir().unwrap();
    let (output, figures) = machine_bench(work.path());
    assert_eq!(figures["disks"], 3, "{figures:#}");
    let sizes = [4 << 20, 4 << 20, (2 << 20) + 4096];
    assert_eq!(figures["disk_sizes_bytes"], serde_json::json!(sizes));
    assert_eq!(figures["disk_size_bytes"], sizes.iter().sum::<u64>());
    let volumes = figures["volumes"].as_array().unwrap();
    let names: Vec<&str> = volumes
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk0", "disk1", "disk2"], "{figures:#}");
    for (volume, size) in volumes.iter().zip(sizes) {
        assert_eq!(volume["size_bytes"], size, "{volume:#}");
        assert_eq!(volume["roots_equal"], true, "{volume:#}");
        assert_eq!(volume["bytes_equal"], true, "{volume:#}");
    }
    assert_eq!(figures["verified_equal"], true, "{figures:#}");
    let number = |path: &[&str]| figure(&figures, path);
    for path in [
        &["blake3_all_cores_seconds"][..],
        &["initial_sync", "seconds"],
        &["initial_sync", "bytes_on_wire"],
        &["delta_sync", "seconds"],
        &["delta_sync", "bytes_on_wire"],
        &["delta_sync", "ratio_to_floor"],
        &["continuous", "epochs"],
        &["continuous", "churn_bytes_written"],
        &["cutover", "downtime_seconds"],
        &["cutover", "ratio_to_floor"],
    ] {
        assert!(number(path) > 0.0, "{path:?} is not positive: {figures:#}");
    }
    assert!(
        number(&["continuous", "lag_seconds_max"]) < 2.0,
        "{figures:#}"
    );
    // The comparison of single-disk send paths is not made for a machine.
    assert!(figures["delta_compare"].is_null(), "{figures:#}");
    let table = stdout(&output);
    assert!(table.contains("3 disks: 4 + 4 + 2 MiB"), "{table}");
    assert!(table.contains("true (3 of 3)"), "{table}");
    let svg = std::fs::read_to_string(work.path().join("out.svg")).unwrap();
    assert!(svg.contains("3 disks"), "bad plot");
}

/// After a machine's bench, one byte of a chunk of its second disk is
/// damaged in the store: that volume, and so the machine, verify unequal.
#[test]
fn bench_of_a_machine_fails_when_one_volume_is_damaged() {
    let work = tempfile::tempdir().unwrap();
    let (_, figures) = machine_bench(work.path());
    let run = work.path().join("run");
    let data = run.join("data");
    let (chunk_size, launch, root) = damage_after_bench(&figures, &data, &run.join("disk1.raw"));
    let disks = ["disk0", "disk1", "disk2"]
        .map(|name| {
            let volume = blockrep_core::VolumeName::new(name).unwrap();
            (volume, run.join(format!("{name}.raw")))
        })
        .to_vec();
    let (whole, volumes) =
        blockrep_bench::verify_machine_cutover(&blockrep_bench::CutoverMachine {
            data,
            keys: None,
            source: blockrep_core::SourceId::new("bench").unwrap(),
            disks,
            chunk_size_bytes: chunk_size,
            root,
            launch,
            scratch: run.join("cutover-volume.raw"),
        })
        .unwrap();
    assert!(!whole.equal(), "a damaged machine verified equal");
    assert!(!volumes[1].verification.bytes_equal, "{volumes:?}");
    let error = whole.ensure_equal().unwrap_err().to_string();
    assert!(error.contains("differs"), "{error}");
}

/// `--capture` measures one disk at a time: `--disks` with it is refused.
#[test]
fn bench_refuses_disks_with_capture() {
    let output = Command::new(BIN)
        .args(["bench", "--capture", "--disks", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("--disks") && error.contains("--capture"),
        "{error}"
    );
}

/// After a bench run whose figures are `figures` and store `data`: damages a
/// stored chunk of `disk` and returns the chunk size, and the cutover
/// launch's name and root.
fn damage_after_bench(
    figures: &serde_json::Value,
    data: &Path,
    disk: &Path,
) -> (u32, String, blockrep_core::ChunkId) {
    let chunk_size = figures["chunk_size_bytes"].as_u64().unwrap() as u32;
    damage_a_stored_chunk(data, disk, chunk_size as usize);
    let launch = figures["cutover"]["launch"].as_str().unwrap().to_owned();
    let root = blockrep_store::Store::open_read_only(data)
        .unwrap()
        .launch(&launch)
        .unwrap()
        .unwrap()
        .root;
    (chunk_size, launch, root)
}

/// Flips one byte of a chunk of the disk stored in the packs (found by
/// searching them for a whole chunk of the disk stored uncompressed: by its
/// id, the live copy).
fn damage_a_stored_chunk(data: &Path, disk: &Path, chunk_size: usize) {
    let disk = std::fs::read(disk).unwrap();
    let packs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(data.join("packs"))
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    for chunk in disk.chunks_exact(chunk_size) {
        if chunk.iter().all(|&b| b == chunk[0]) {
            continue;
        }
        for (path, bytes) in &packs {
            let mut from = 0;
            while let Some(found) = bytes[from..].windows(32).position(|w| w == &chunk[..32]) {
                let at = from + found;
                if bytes.len() >= at + chunk.len() && &bytes[at..at + chunk.len()] == chunk {
                    let file = OpenOptions::new().write(true).open(path).unwrap();
                    file.write_all_at(&[bytes[at + 10] ^ 0xff], (at + 10) as u64)
                        .unwrap();
                    return;
                }
                from = at + 1;
            }
        }
    }
    panic!("no stored chunk of the disk found to damage");
}

/// `bench --capture` on two small sparse disks: a capture and a rescan run
/// each, lag percentiles from samples, and the server saw the capture runs
/// in capture mode (their `Capture` reports) and the rescan runs in scan mode.
#[test]
fn bench_capture_reports_the_lag_of_capture_and_rescan_on_each_disk() {
    let work = tempfile::tempdir().unwrap();
    let json = work.path().join("capture.json");
    let output = Command::new(BIN)
        .args([
            "bench",
            "--capture",
            "--capture-sizes",
            "16MiB,64MiB",
            "--capture-duration",
            "3s",
            "--interval",
            "300ms",
            "--churn-rate",
            "1MiB/s",
            "--json",
        ])
        .arg(&json)
        .arg("--workdir")
        .arg(work.path().join("run"))
        .output()
        .unwrap();
    assert_success(&output);
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = figures["runs"].as_array().unwrap();
    let shapes: Vec<(u64, &str)> = runs
        .iter()
        .map(|r| {
            (
                r["disk_size_bytes"].as_u64().unwrap(),
                r["mode"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shapes,
        [
            (16 << 20, "capture"),
            (16 << 20, "rescan"),
            (64 << 20, "capture"),
            (64 << 20, "rescan")
        ],
        "{figures:#}"
    );
    for run in runs {
        let number = |key: &str| {
            run[key]
                .as_f64()
                .unwrap_or_else(|| panic!("no {key} in {run:#}"))
        };
        assert!(number("samples") >= 10.0, "{run:#}");
        assert!(number("epochs") >= 2.0, "{run:#}");
        assert!(number("writes") > 100.0, "{run:#}");
        assert!(number("lag_seconds_p50") > 0.0, "{run:#}");
        assert!(
            number("lag_seconds_p50") <= number("lag_seconds_p99"),
            "{run:#}"
        );
        assert!(
            number("lag_seconds_p99") <= number("lag_seconds_max"),
            "{run:#}"
        );
        assert!(number("lag_seconds_max") < 3.0, "{run:#}");
        // An epoch's time from cut to commit is its cut plus its transfer.
        assert!(number("epoch_seconds_p50") > 0.0, "{run:#}");
        assert!(
            number("epoch_seconds_p50") <= number("epoch_seconds_max"),
            "{run:#}"
        );
        assert!(number("cut_seconds_p50") >= 0.0, "{run:#}");
        assert!(number("transfer_seconds_p50") > 0.0, "{run:#}");
        if run["mode"] == "capture" {
            assert_eq!(run["server_mode"], "capture", "{run:#}");
            assert!(
                run["server_capture"]["cuts"].as_u64().unwrap() >= 2,
                "{run:#}"
            );
            assert!(
                run["server_capture"]["writes"].as_u64().unwrap() > 0,
                "{run:#}"
            );
        } else {
            assert_eq!(run["server_mode"], "scan", "{run:#}");
            assert!(run["server_capture"].is_null(), "{run:#}");
        }
    }
    assert!(
        figures["capture_lag_p99_bar_met"].is_boolean(),
        "{figures:#}"
    );
    let table = stdout(&output);
    assert!(table.contains("64 MiB   rescan"), "{table}");
    assert!(table.contains("capture lag p99 under 1.5s"), "{table}");
}

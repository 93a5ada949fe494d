//! `blockrep bench` runs end to end on a small disk, reports every figure, and
//! fails when the replica it verifies is damaged.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn bench(work: &std::path::Path, corrupt: bool) -> (std::process::Output, std::path::PathBuf) {
    let json = work.join("out.json");
    let plot = work.join("out.svg");
    let mut command = Command::new(BIN);
    command
        .args([
            "bench",
            "--size",
            "32MiB",
            "--duration",
            "3s",
            "--interval",
            "300ms",
            "--json",
        ])
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .arg("--workdir")
        .arg(work.join("run"));
    if corrupt {
        command.env("BLOCKREP_BENCH_CORRUPT", "1");
    }
    (command.output().unwrap(), json)
}

#[test]
fn bench_reports_every_figure_and_verifies_the_cutover_volume() {
    let work = tempfile::tempdir().unwrap();
    let (output, json) = bench(work.path(), false);
    assert_success(&output);
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let number = |path: &[&str]| -> f64 {
        path.iter()
            .fold(&figures, |v, k| &v[*k])
            .as_f64()
            .unwrap_or_else(|| panic!("missing {path:?} in {figures:#}"))
    };
    for path in [
        &["initial_sync", "seconds"][..],
        &["initial_sync", "disk_mib_per_second"],
        &["initial_sync", "nonzero_mib_per_second"],
        &["initial_sync", "bytes_on_wire"],
        &["initial_sync", "agent_cpu_seconds"],
        &["initial_sync", "server_cpu_seconds"],
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
    if have_tool("rsync") {
        assert!(number(&["delta_compare", "rsync_4k", "bytes_on_wire"]) > 0.0);
    }
    assert_eq!(figures["verified_equal"], serde_json::Value::Bool(true));
    assert_eq!(figures["seed"], 1);
    assert!(
        stdout(&output).contains("cutover downtime"),
        "{}",
        stdout(&output)
    );
    let svg = std::fs::read_to_string(work.path().join("out.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("replication lag"),
        "bad plot"
    );
}

#[test]
fn bench_fails_when_the_replica_is_damaged() {
    let work = tempfile::tempdir().unwrap();
    let (output, _) = bench(work.path(), true);
    assert!(
        !output.status.success(),
        "bench passed on a damaged replica: {}",
        stdout(&output)
    );
    assert!(stderr(&output).contains("differs"), "{}", stderr(&output));
}

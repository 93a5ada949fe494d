//! The table `blockrep bench` prints from its figures.

use crate::{delta, disks};

/// Prints the figures as a two-column table.
pub(crate) fn print_table(f: &serde_json::Value) {
    let num = |path: &[&str]| -> f64 {
        path.iter()
            .fold(f, |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let mut rows: Vec<(&str, String)> = vec![
        (
            "disk size (MiB) / non-zero (MiB)",
            format!(
                "{:.0} / {:.0}",
                num(&["disk_size_bytes"]) / 1048576.0,
                num(&["nonzero_bytes"]) / 1048576.0
            ),
        ),
        (
            "blake3 of the disk, all cores (s)",
            format!("{:.3}", num(&["blake3_all_cores_seconds"])),
        ),
        (
            "initial sync (s)",
            format!("{:.2}", num(&["initial_sync", "seconds"])),
        ),
        (
            "  disk MiB/s / non-zero MiB/s",
            format!(
                "{:.0} / {:.0}",
                num(&["initial_sync", "disk_mib_per_second"]),
                num(&["initial_sync", "nonzero_mib_per_second"])
            ),
        ),
        (
            "  bytes on the wire (MiB)",
            format!("{:.1}", num(&["initial_sync", "bytes_on_wire"]) / 1048576.0),
        ),
        (
            "  CPU agent / server (s)",
            format!(
                "{:.2} / {:.2}",
                num(&["initial_sync", "agent_cpu_seconds"]),
                num(&["initial_sync", "server_cpu_seconds"])
            ),
        ),
        (
            "  CPU agent + server per GiB of non-zero data (s)",
            format!(
                "{:.2}",
                num(&["initial_sync", "cpu_seconds_per_nonzero_gib"])
            ),
        ),
        (
            "  to the commit: s, CPU agent / server, per GiB",
            format!(
                "{:.2}, {:.2} / {:.2}, {:.2}",
                num(&["initial_sync", "to_commit", "seconds"]),
                num(&["initial_sync", "to_commit", "agent_cpu_seconds"]),
                num(&["initial_sync", "to_commit", "server_cpu_seconds"]),
                num(&["initial_sync", "to_commit", "cpu_seconds_per_nonzero_gib"])
            ),
        ),
        (
            "delta sync (s), 4 KiB blocks changed",
            format!(
                "{:.3}, {}",
                num(&["delta_sync", "seconds"]),
                num(&["delta_sync", "blocks_changed"])
            ),
        ),
        (
            "  vs floor (blake3 + bytes / loopback rate)",
            format!("{:.2}x", num(&["delta_sync", "ratio_to_floor"])),
        ),
        ("", String::new()), // the delta comparison goes here
        (
            "continuous: epochs, mean scan (s)",
            format!(
                "{}, {:.3}",
                num(&["continuous", "epochs"]),
                num(&["continuous", "scan_seconds_mean"])
            ),
        ),
        (
            "  lag p50 / p99 / max (s)",
            format!(
                "{:.2} / {:.2} / {:.2}",
                num(&["continuous", "lag_seconds_p50"]),
                num(&["continuous", "lag_seconds_p99"]),
                num(&["continuous", "lag_seconds_max"])
            ),
        ),
        (
            "  lag target: interval + 2 scans (s)",
            format!("{:.2}", num(&["continuous", "lag_target_seconds"])),
        ),
        (
            "cutover downtime (s)",
            format!("{:.3}", num(&["cutover", "downtime_seconds"])),
        ),
        (
            "  final scan / transfer / commit / launch (s)",
            format!(
                "{:.3} / {:.3} / {:.3} / {:.3}",
                num(&["cutover", "final_scan_seconds"]),
                num(&["cutover", "transfer_seconds"]),
                num(&["cutover", "commit_seconds"]),
                num(&["cutover", "launch_ready_seconds"])
            ),
        ),
        (
            "  vs floor (blake3 + last epoch / rate)",
            format!("{:.2}x", num(&["cutover", "ratio_to_floor"])),
        ),
        (
            "peak memory agent / server (MiB)",
            format!(
                "{:.0} / {:.0}",
                num(&["memory", "agent_peak_rss_bytes"]) / 1048576.0,
                num(&["memory", "server_peak_rss_bytes"]) / 1048576.0
            ),
        ),
        (
            "cutover volume verified equal",
            format!("{}", f["verified_equal"]),
        ),
    ];
    if let Some(at) = rows.iter().position(|(name, _)| name.is_empty()) {
        rows.splice(at..=at, delta::table_rows(f));
    }
    if f["disks"].as_u64().is_some_and(|disks| disks > 1) {
        machine_rows(f, &mut rows);
    }
    println!(
        "blockrep bench: {} cores, seed {}, {} disk",
        f["cores"],
        f["seed"],
        f["disk_kind"].as_str().unwrap_or("synthetic")
    );
    for (name, value) in rows {
        println!("  {name:<46} {value:>22}");
    }
}

/// A machine's rows: its disks first, and how many volumes of the cutover
/// launch verified equal to their disks.
fn machine_rows(f: &serde_json::Value, rows: &mut Vec<(&str, String)>) {
    let sizes: Vec<u64> = f["disk_sizes_bytes"]
        .as_array()
        .map_or(Vec::new(), |sizes| {
            sizes.iter().filter_map(serde_json::Value::as_u64).collect()
        });
    rows.insert(0, ("machine of", disks::describe(&sizes)));
    if let Some(row) = rows
        .iter_mut()
        .find(|(name, _)| name.starts_with("blake3 of the disk"))
    {
        row.0 = "blake3 of every disk, all cores (s)";
    }
    let volumes = f["volumes"].as_array().map_or(&[][..], Vec::as_slice);
    let equal = volumes
        .iter()
        .filter(|v| v["roots_equal"] == true && v["bytes_equal"] == true)
        .count();
    if let Some(row) = rows
        .iter_mut()
        .find(|(name, _)| *name == "cutover volume verified equal")
    {
        *row = (
            "cutover volumes verified equal",
            format!("{} ({equal} of {})", f["verified_equal"], volumes.len()),
        );
    }
}

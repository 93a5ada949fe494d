//! What the commands print: tables of the admin API's answers, an epoch's and
//! a cutover's report lines, byte counts, dates and error chains. Tests and
//! scripts read these lines, so their shape only changes on purpose.

use std::time::Duration;

use blockrep_agent::{CutoverReport, EpochReport};
use blockrep_server::{LaunchView, SnapshotView, SourceState, SourceView};

/// The error and its causes on one line, skipping a cause whose text the message
/// before it already carries (library errors name their cause in their message).
pub(crate) fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// `1.5GiB`, `12B`: binary multiples with one decimal.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// `2026-12-02 08:22:04Z` (UTC, to the second), or `never` for 0: the API's
/// "no time" (a snapshot that does not expire).
pub(crate) fn unix_ms_text(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".to_owned();
    }
    let seconds = i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX);
    match time::OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(at) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        ),
        // Past year 9999: no date to show, but the number still means something.
        Err(_) => format!("{unix_ms} ms after 1970"),
    }
}

/// `blockrep status`: one line per source, then the capture line of each
/// source in capture mode.
pub(crate) fn sources(sources: &[SourceView]) {
    println!(
        "{:<20} {:<16} {:<17} {:<7} {:>6} {:<16} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "SOURCE",
        "STATE",
        "MIGRATION",
        "MODE",
        "EPOCH",
        "CONSISTENCY",
        "LAG",
        "RPO",
        "PENDING",
        "RATE",
        "AGENT"
    );
    for s in sources {
        println!(
            "{:<20} {:<16} {:<17} {:<7} {:>6} {:<16} {:>10} {:>10} {:>12} {:>12} {:>9}",
            s.source,
            s.state.as_str(),
            s.migration_state,
            s.mode.as_str(),
            s.epoch,
            s.consistency.as_deref().unwrap_or("-"),
            s.lag_seconds
                .map_or_else(|| "-".to_owned(), |l| format!("{l:.1}s")),
            format!("{:.0}s", s.rpo_target_seconds),
            human_bytes(s.bytes_pending),
            format!("{}/s", human_bytes(s.throughput_bytes_per_second as u64)),
            match (&s.state, &s.lease) {
                // In a shared bucket: where its agent is.
                (SourceState::ServedElsewhere, Some(lease)) => format!("at {}", lease.holder),
                _ if s.connected => "connected".to_owned(),
                _ => "away".to_owned(),
            },
        );
    }
    if sources.is_empty() {
        println!("(no sources yet)");
    }
    for s in sources.iter().filter(|s| !s.volumes.is_empty()) {
        let volumes: Vec<String> = s
            .volumes
            .iter()
            .map(|v| match v.bytes_pending {
                0 => format!("{} {}", v.name, human_bytes(v.disk_size_bytes)),
                pending => format!(
                    "{} {} ({} pending)",
                    v.name,
                    human_bytes(v.disk_size_bytes),
                    human_bytes(pending)
                ),
            })
            .collect();
        println!(
            "{}: machine of {} volumes: {}",
            s.source,
            volumes.len(),
            volumes.join(", ")
        );
    }
    for s in sources {
        if let Some(e) = &s.encryption {
            println!(
                "{}: encrypted at rest, data key {} wrapped by KEK {}",
                s.source, e.key, e.kek_id
            );
        }
    }
    for s in sources {
        if let Some(c) = &s.capture {
            println!(
                "{}: capture {} dirty, {} preserved, {} cuts, {} writes, write latency p50 {}us p99 {}us",
                s.source,
                human_bytes(c.dirty_bytes),
                human_bytes(c.preserved_bytes),
                c.cuts,
                c.writes,
                c.write_p50_us,
                c.write_p99_us
            );
        }
    }
}

/// `blockrep snapshot list`.
pub(crate) fn snapshots(snapshots: &[SnapshotView]) {
    println!(
        "{:<16} {:<28} {:<8} {:>6} {:<16} {:<21} {:<21}",
        "SOURCE", "NAME", "KIND", "EPOCH", "CONSISTENCY", "CREATED", "EXPIRES"
    );
    for s in snapshots {
        println!(
            "{:<16} {:<28} {:<8} {:>6} {:<16} {:<21} {:<21}",
            s.source,
            s.name,
            s.kind,
            s.epoch,
            s.consistency,
            unix_ms_text(s.created_unix_ms),
            unix_ms_text(s.expires_unix_ms)
        );
    }
}

/// `blockrep launch list`.
pub(crate) fn launches(launches: &[LaunchView]) {
    println!(
        "{:<20} {:<16} {:<24} {:<8} {:<16} {:>4} NBD",
        "NAME", "SOURCE", "SNAPSHOT", "KIND", "CONSISTENCY", "GEN"
    );
    for l in launches {
        println!(
            "{:<20} {:<16} {:<24} {:<8} {:<16} {:>4} {}",
            l.name,
            l.source,
            l.snapshot,
            l.kind,
            l.consistency,
            l.generation,
            l.nbd_uri.as_deref().unwrap_or("-")
        );
        if let Some(expires) = l.expires_unix_ms {
            println!("{:<20} expires {}", "", unix_ms_text(expires));
        }
        for c in &l.checks {
            println!(
                "{:<20} check {} {} in {:.1}s{}",
                "",
                c.name,
                if c.passed { "passed" } else { "FAILED" },
                c.duration_ms as f64 / 1000.0,
                if l.must_succeed {
                    " (must succeed)"
                } else {
                    ""
                }
            );
        }
        for name in l
            .expected_checks
            .iter()
            .filter(|name| !l.checks.iter().any(|c| &c.name == *name))
        {
            println!("{:<20} check {name} not run yet", "");
        }
        for m in &l.materialize {
            println!("{:<20} {}", "", materialize_text(m));
        }
        // A machine's launch: one export per volume, each on a line of its own.
        if l.volumes.len() > 1 {
            for v in &l.volumes {
                println!(
                    "{:<20} volume {:<57} {}",
                    "",
                    v.name,
                    v.nbd_uri.as_deref().unwrap_or("-")
                );
            }
        }
    }
}

/// A materialization's progress, on one line.
pub(crate) fn materialize_text(m: &blockrep_server::MaterializeView) -> String {
    let volume = m
        .volume
        .as_deref()
        .map_or_else(String::new, |v| format!("volume {v} "));
    if m.done {
        return format!("{volume}materialized to {}: served from it", m.target);
    }
    let percent = match m.size_bytes {
        0 => 100.0,
        size => m.copied_bytes as f64 * 100.0 / size as f64,
    };
    format!(
        "{volume}materializing to {}: {percent:.1}% copied, {} still remote",
        m.target,
        human_bytes(m.remote_bytes)
    )
}

/// One committed epoch of the agent: a log event, and a `key=value` line on
/// stdout that tests and scripts sum up. An idle epoch is only logged at debug.
pub(crate) fn epoch(report: &EpochReport) {
    let idle =
        report.chunks_sent + report.zero_chunks_sent + report.ref_chunks_sent + report.patches_sent
            == 0;
    if idle {
        tracing::debug!(
            epoch = report.epoch,
            scan_ms = report.scan_duration.as_millis() as u64,
            "idle epoch: disk unchanged"
        );
        return;
    }
    tracing::info!(
        epoch = report.epoch, root = %report.root, chunks_sent = report.chunks_sent,
        zero_chunks_sent = report.zero_chunks_sent, ref_chunks_sent = report.ref_chunks_sent,
        patches_sent = report.patches_sent, bytes_sent = report.bytes_sent,
        scan_ms = report.scan_duration.as_millis() as u64,
        transfer_ms = report.transfer_duration.as_millis() as u64,
        consistency = report.consistency.as_str(), "epoch committed"
    );
    println!(
        "epoch {} committed root={} chunks_sent={} zero_chunks_sent={} ref_chunks_sent={} bytes_sent={} \
         raw_bytes_sent={} patches_sent={} patch_bytes_sent={} block_values_bytes_received={} \
         server_chunks_received={} server_chunks_stored={} scan_ms={} transfer_ms={} consistency={} \
         compressed_chunks_sent={} compression={} compression_changes={}",
        report.epoch,
        report.root,
        report.chunks_sent,
        report.zero_chunks_sent,
        report.ref_chunks_sent,
        report.bytes_sent,
        report.raw_bytes_sent,
        report.patches_sent,
        report.patch_bytes_sent,
        report.block_values_bytes_received,
        report.server_chunks_received,
        report.server_chunks_stored,
        report.scan_duration.as_millis(),
        report.transfer_duration.as_millis(),
        report.consistency.as_str(),
        report.compressed_chunks_sent,
        if report.compressing { "on" } else { "off" },
        report.compression_changes,
    );
}

/// The agent's own report of the cutover it ran.
pub(crate) fn cutover(report: &CutoverReport) {
    let ms = |d: Duration| d.as_millis();
    println!(
        "cutover complete: epoch {} root={} launch={} snapshot={} consistency={}",
        report.epoch,
        report.root,
        report.launch,
        report.snapshot,
        report.consistency.as_str()
    );
    println!(
        "downtime_ms={} final_scan_ms={} transfer_ms={} commit_ms={} launch_ready_ms={} pre_cutover_cmd_ms={} \
         chunks_sent={} bytes_sent={}",
        ms(report.downtime),
        ms(report.scan),
        ms(report.transfer),
        ms(report.commit),
        ms(report.launch_ready),
        ms(report.hook),
        report.chunks_sent,
        report.bytes_sent
    );
}

/// A source's migration history, oldest first.
pub(crate) fn history(events: &[blockrep_server::EventView]) {
    println!(
        "{:>4} {:<24} {:<18} {:<18} {:<6} {:<28} NOTE",
        "SEQ", "TIME (UTC)", "FROM", "TO", "FORCED", "BY"
    );
    for e in events {
        println!(
            "{:>4} {:<24} {:<18} {:<18} {:<6} {:<28} {}",
            e.seq,
            unix_ms_text(e.unix_ms),
            e.from,
            e.to,
            if e.forced { "yes" } else { "" },
            e.by,
            e.note
        );
    }
    if events.is_empty() {
        println!("(no steps recorded yet)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_to_the_second_and_zero_is_never() {
        assert_eq!(unix_ms_text(0), "never");
        assert_eq!(unix_ms_text(1), "1970-01-01 00:00:00Z");
        assert_eq!(unix_ms_text(951_782_400_999), "2000-02-29 00:00:00Z");
        assert_eq!(unix_ms_text(1_796_199_724_000), "2026-12-02 08:22:04Z");
    }
}

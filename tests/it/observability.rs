//! Observability against the real server: Prometheus metrics that promtool
//! accepts and that follow replication, `/health` that follows the data
//! directory, the RPO breach hook, and JSON logs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::{Pki, RawClient, ServerProcess, random_bytes, write_at};

const MIB: usize = 1 << 20;
const CHUNK: u32 = 65_536;

/// Samples of one scrape, keyed by the series as written (name and labels).
type Samples = BTreeMap<String, f64>;

fn scrape(admin: SocketAddr) -> (String, Samples) {
    let (code, body) = admin_request(admin, "GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    let samples = body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value = match value {
                "+Inf" => f64::INFINITY,
                other => other
                    .parse()
                    .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
            };
            (series.to_owned(), value)
        })
        .collect();
    (body, samples)
}

fn sample(samples: &Samples, series: &str) -> Option<f64> {
    samples.get(series).copied()
}

/// Counters, histogram buckets, sums and counts never go backwards.
fn assert_monotonic(before: &Samples, after: &Samples) {
    for (series, &old) in before {
        let name = series.split('{').next().unwrap();
        let cumulative = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.ends_with(suffix));
        if cumulative {
            let new = after.get(series).copied().unwrap_or(f64::NAN);
            assert!(new >= old, "{series} went from {old} to {new}");
        }
    }
}

#[test]
fn metrics_pass_promtool_and_follow_backlog_commits_and_lag() {
    if !have_tool("promtool") {
        eprintln!("skipped: promtool not installed (scripts/test.sh installs it)");
        return;
    }
    let rig = rig(&["web", "other"], &["--rpo-target", "1h"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(8 * MIB, 11)).unwrap();
    let admin = server.admin_addr.unwrap();
    let (_, empty) = scrape(admin);
    assert_eq!(sample(&empty, "blockrep_availability"), Some(1.0));
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));

    let (text, synced) = scrape(admin);
    promtool_check_metrics(&text);
    assert_eq!(
        sample(&synced, r#"blockrep_epochs_committed_total{source="web"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &synced,
            r#"blockrep_source_state{source="web",state="healthy"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&synced, r#"blockrep_rpo_target_seconds{source="web"}"#),
        Some(3600.0)
    );
    assert!(sample(&synced, r#"blockrep_store_bytes{kind="packs"}"#).unwrap() >= (8 * MIB) as f64);
    assert_eq!(
        sample(&synced, "blockrep_epoch_commit_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(&synced, r#"blockrep_epoch_size_bytes_bucket{le="4194304"}"#),
        Some(0.0),
        "an 8 MiB epoch counted in a 4 MiB bucket"
    );
    assert_eq!(
        sample(
            &synced,
            r#"blockrep_epoch_size_bytes_bucket{le="16777216"}"#
        ),
        Some(1.0)
    );

    // A throttled continuous agent: idle at first, then a 3 MiB write is a
    // backlog that drains at 1 MiB/s.
    let mut agent = spawn_agent(
        &disk,
        server.addr,
        "web",
        pki.path(),
        &["--max-rate", "1MiB/s", "--interval", "200ms"],
    );
    let connected = r#"blockrep_source_connected{source="web"}"#;
    let pending = r#"blockrep_bytes_pending_replication{source="web"}"#;
    let pending_chunks = r#"blockrep_operations_pending_replication{source="web"}"#;
    assert!(wait_until(Duration::from_secs(10), || sample(
        &scrape(admin).1,
        connected
    ) == Some(1.0)));
    let (_, idle) = scrape(admin);
    assert_eq!(sample(&idle, pending), Some(0.0));
    assert!(sample(&idle, "blockrep_connections").unwrap() >= 1.0);
    assert_monotonic(&synced, &idle);

    write_at(&disk, MIB as u64, &random_bytes(3 * MIB, 12));
    let mut history = vec![idle];
    let mut backlog = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (text, now) = scrape(admin);
            assert_monotonic(history.last().unwrap(), &now);
            if sample(&now, pending).unwrap() > 0.0 && backlog.is_none() {
                backlog = Some((text, now.clone()));
            }
            history.push(now);
            backlog.is_some()
        }),
        "the backlog never showed"
    );
    let (text, during) = backlog.unwrap();
    promtool_check_metrics(&text);
    assert_eq!(sample(&during, pending), Some((3 * MIB) as f64));
    assert_eq!(
        sample(&during, pending_chunks),
        Some((3 * MIB / CHUNK as usize) as f64)
    );

    let expected = disk_root(&disk, CHUNK);
    wait_for_head_root(admin, "web", &expected, Duration::from_secs(30));
    let (text, committed) = scrape(admin);
    promtool_check_metrics(&text);
    assert_monotonic(&during, &committed);
    assert_eq!(sample(&committed, pending), Some(0.0));
    assert_eq!(sample(&committed, pending_chunks), Some(0.0));
    assert_eq!(
        sample(
            &committed,
            r#"blockrep_epochs_committed_total{source="web"}"#
        ),
        Some(2.0)
    );
    let received = r#"blockrep_bytes_received_total{source="web"}"#;
    assert!(
        sample(&committed, received).unwrap() - sample(&synced, received).unwrap()
            >= (3 * MIB) as f64
    );
    assert_eq!(
        sample(&committed, "blockrep_epoch_commit_duration_seconds_count"),
        Some(2.0)
    );

    // Agent gone: the lag keeps growing from the last complete commit's scan.
    agent.child.kill().unwrap();
    agent.wait();
    assert!(wait_until(Duration::from_secs(10), || sample(
        &scrape(admin).1,
        connected
    ) == Some(0.0)));
    let lag = r#"blockrep_replication_lag_seconds{source="web"}"#;
    let (_, first) = scrape(admin);
    std::thread::sleep(Duration::from_millis(1500));
    let (text, second) = scrape(admin);
    promtool_check_metrics(&text);
    let grown = sample(&second, lag).unwrap() - sample(&first, lag).unwrap();
    // At least the time slept; a loaded machine may add to it between the
    // two scrapes.
    assert!((1.4..5.0).contains(&grown), "lag grew by {grown}s in 1.5s");
    assert_monotonic(&first, &second);

    // Failures are counted by kind: a client without a certificate, a peer
    // that does not speak TLS, and a session refused for a wrong source id.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if let Ok(mut client) = RawClient::connect(server.addr, &pki.cert("ca"), None).await {
            let _ = client.recv().await;
        }
    });
    let mut plain = std::net::TcpStream::connect(server.addr).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let _ = std::io::Read::read(&mut plain, &mut [0u8; 64]);
    let wrong = agent_once_claiming(&disk, server.addr, "other", pki, "web");
    assert!(!wrong.status.success());
    let certificate = r#"blockrep_handshake_failures_total{reason="certificate"}"#;
    let protocol = r#"blockrep_handshake_failures_total{reason="protocol"}"#;
    let mismatch = r#"blockrep_sessions_rejected_total{code="source_mismatch"}"#;
    assert_eq!(sample(&second, mismatch), Some(0.0));
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (_, now) = scrape(admin);
            sample(&now, certificate) == Some(1.0)
                && sample(&now, protocol) == Some(1.0)
                && sample(&now, mismatch) == Some(1.0)
        }),
        "failures not counted: {:?}\n{}",
        scrape(admin).1,
        server.log()
    );
    let (text, last) = scrape(admin);
    promtool_check_metrics(&text);
    assert_monotonic(&second, &last);
}

/// Makes a data directory unwritable and writable again, as root: by filling a
/// small tmpfs mounted on it, or where mounting is not permitted, by making
/// the directory immutable (`chattr +i`, which root cannot write through
/// either). `chmod` would not do: root ignores permissions.
enum DataDirFault {
    Tmpfs { dir: PathBuf, filler: PathBuf },
    Immutable { dir: PathBuf },
}

impl DataDirFault {
    /// Prepares `dir` (created) for faults; `None` if no method works here.
    /// `BLOCKREP_TEST_DATA_FAULT=immutable` forces the fallback.
    fn new(dir: &Path) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let forced = std::env::var("BLOCKREP_TEST_DATA_FAULT").ok();
        let succeeded = |program: &str, args: &[&str], path: &Path| {
            Command::new(program)
                .args(args)
                .arg(path)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if forced.as_deref() != Some("immutable")
            && succeeded("mount", &["-t", "tmpfs", "-o", "size=8m", "tmpfs"], dir)
        {
            return Some(Self::Tmpfs {
                dir: dir.to_owned(),
                filler: dir.join("filler"),
            });
        }
        let probe = dir.with_extension("chattr-probe");
        std::fs::create_dir_all(&probe).unwrap();
        let immutable = succeeded("chattr", &["+i"], &probe)
            && std::fs::write(probe.join("x"), b"x").is_err()
            && succeeded("chattr", &["-i"], &probe);
        if immutable {
            return Some(Self::Immutable {
                dir: dir.to_owned(),
            });
        }
        None
    }

    fn method(&self) -> &'static str {
        match self {
            Self::Tmpfs { .. } => "full tmpfs",
            Self::Immutable { .. } => "immutable directory",
        }
    }

    fn break_it(&self) {
        match self {
            Self::Tmpfs { filler, .. } => {
                let mut file = std::fs::File::create(filler).unwrap();
                let block = vec![0x33u8; 256 * 1024];
                let full = (0..1024).any(|_| file.write_all(&block).is_err());
                assert!(full, "the tmpfs never filled up");
                // Whatever the page cache accepted is now on tmpfs: no space left.
            }
            Self::Immutable { dir } => {
                assert_success(&Command::new("chattr").arg("+i").arg(dir).output().unwrap());
            }
        }
    }

    fn repair(&self) {
        match self {
            Self::Tmpfs { filler, .. } => std::fs::remove_file(filler).unwrap(),
            Self::Immutable { dir } => {
                assert_success(&Command::new("chattr").arg("-i").arg(dir).output().unwrap());
            }
        }
    }
}

impl Drop for DataDirFault {
    fn drop(&mut self) {
        match self {
            Self::Tmpfs { dir, .. } => {
                let _ = Command::new("umount").arg("-l").arg(&*dir).output();
            }
            Self::Immutable { dir } => {
                let _ = Command::new("chattr").arg("-i").arg(&*dir).output();
            }
        }
    }
}

fn health(admin: SocketAddr) -> (u16, serde_json::Value) {
    let (code, body) = admin_request(admin, "GET", "/health", None);
    (code, serde_json::from_str(&body).unwrap())
}

#[test]
fn health_follows_whether_the_data_directory_is_writable() {
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let Some(fault) = DataDirFault::new(&data) else {
        assert!(
            !require_external_tools(),
            "cannot make a data directory unwritable here (no tmpfs mount, no chattr +i)"
        );
        eprintln!("skipped: cannot make a data directory unwritable here");
        return;
    };
    eprintln!("data directory fault: {}", fault.method());
    let server = ServerProcess::start(&bin(), &data, pki.path());
    let admin = server.admin_addr.unwrap();
    let (code, body) = health(admin);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["availability"], 1);

    fault.break_it();
    assert!(
        wait_until(Duration::from_secs(10), || health(admin).0 == 503),
        "health ignored an unwritable data directory ({}): {}",
        fault.method(),
        health(admin).1
    );
    let (_, body) = health(admin);
    assert_eq!(body["availability"], 0, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains(data.to_str().unwrap()), "{reason}");
    assert_eq!(body["checks"]["replication_listener"]["ok"], true);
    let (_, samples) = scrape(admin);
    assert_eq!(sample(&samples, "blockrep_availability"), Some(0.0));
    assert!(server.wait_for_log("server unavailable", Duration::from_secs(5)));

    fault.repair();
    assert!(
        wait_until(Duration::from_secs(10), || health(admin).0 == 200),
        "health did not recover: {}",
        health(admin).1
    );
    let (_, samples) = scrape(admin);
    assert_eq!(sample(&samples, "blockrep_availability"), Some(1.0));
    drop(server);
}

/// The hook's lines: `EVENT SOURCE LAG TARGET`.
fn hook_lines(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn rpo_breach_hook_runs_once_per_crossing_even_without_an_agent() {
    let pki = Pki::new(&["gone", "syncing"]);
    let work = tempfile::tempdir().unwrap();
    let events = work.path().join("events.txt");
    let hook = format!(
        "printf '%s %s %s %s\\n' \"$BLOCKREP_EVENT\" \"$BLOCKREP_SOURCE\" \
         \"$BLOCKREP_LAG_SECONDS\" \"$BLOCKREP_RPO_TARGET_SECONDS\" >> '{}'",
        events.display()
    );
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("data"),
        pki.path(),
        &[
            "--rpo-target",
            "1s",
            "--alert-interval",
            "100ms",
            "--stall-after",
            "1h",
            "--on-rpo-breach",
            &hook,
        ],
    );
    let admin = server.admin_addr.unwrap();

    // A source still in its initial sync (throttled far below its disk size)
    // has no recovery point yet, so it never breaches.
    let big = work.path().join("syncing.raw");
    std::fs::write(&big, random_bytes(16 * MIB, 21)).unwrap();
    let _syncing = spawn_agent(
        &big,
        server.addr,
        "syncing",
        pki.path(),
        &["--max-rate", "256KiB/s"],
    );
    assert!(wait_until(Duration::from_secs(10), || admin_source(
        admin, "syncing"
    )
    .is_some_and(|v| v.connected)));

    // A source synced once whose agent then went away.
    let disk = work.path().join("gone.raw");
    std::fs::write(&disk, random_bytes(MIB, 22)).unwrap();
    assert_success(&agent_once(&disk, server.addr, "gone", pki.path(), &[]));
    assert!(
        wait_until(Duration::from_secs(10), || !hook_lines(&events).is_empty()),
        "no breach hook: {}",
        server.log()
    );
    // Several more evaluations: still exactly one breach.
    std::thread::sleep(Duration::from_millis(1000));
    let lines = hook_lines(&events);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let breach = &lines[0];
    assert_eq!(breach[..2], ["breach", "gone"]);
    let lag: f64 = breach[2].parse().unwrap();
    assert!((1.0..5.0).contains(&lag), "{breach:?}");
    assert_eq!(breach[3], "1.000");
    assert!(server.log().contains("RPO target breached"));
    let (_, samples) = scrape(admin);
    assert_eq!(
        sample(&samples, r#"blockrep_rpo_breaches_total{source="gone"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&samples, r#"blockrep_rpo_breaches_total{source="syncing"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &samples,
            r#"blockrep_source_state{source="syncing",state="initial_sync"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &samples,
            r#"blockrep_replication_lag_seconds{source="syncing"}"#
        ),
        None
    );

    // A per-source target above the lag: recovered, once.
    let (code, body) = admin_request(
        admin,
        "PUT",
        "/v1/sources/gone/rpo-target",
        Some(r#"{"seconds": 3600}"#),
    );
    assert_eq!(code, 200, "{body}");
    let view: blockrep_server::SourceView = serde_json::from_str(&body).unwrap();
    assert_eq!(view.rpo_target_seconds, 3600.0);
    assert!(wait_until(Duration::from_secs(10), || hook_lines(&events)
        .len()
        == 2));
    std::thread::sleep(Duration::from_millis(500));
    let lines = hook_lines(&events);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1][..2], ["recovered", "gone"]);
    assert_eq!(lines[1][3], "3600.000");
    let (_, samples) = scrape(admin);
    assert_eq!(
        sample(&samples, r#"blockrep_rpo_target_seconds{source="gone"}"#),
        Some(3600.0)
    );

    // Back to the server-wide target: a second breach.
    let (code, body) = admin_request(admin, "DELETE", "/v1/sources/gone/rpo-target", None);
    assert_eq!(code, 200, "{body}");
    assert!(wait_until(Duration::from_secs(10), || hook_lines(&events)
        .len()
        == 3));
    std::thread::sleep(Duration::from_millis(500));
    let lines = hook_lines(&events);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2][..2], ["breach", "gone"]);
    assert!(lines.iter().all(|line| line[1] == "gone"), "{lines:?}");
    let (_, samples) = scrape(admin);
    assert_eq!(
        sample(&samples, r#"blockrep_rpo_breaches_total{source="gone"}"#),
        Some(2.0)
    );

    // Unknown sources and nonsense targets are refused.
    let (code, _) = admin_request(
        admin,
        "PUT",
        "/v1/sources/nobody/rpo-target",
        Some(r#"{"seconds": 5}"#),
    );
    assert_eq!(code, 404);
    let (code, _) = admin_request(
        admin,
        "PUT",
        "/v1/sources/gone/rpo-target",
        Some(r#"{"seconds": -1}"#),
    );
    assert_eq!(code, 400);
}

/// A source's RPO target is one of its records: a restarted server
/// applies it, and forgets it once it is cleared.
#[test]
fn an_rpo_target_outlives_a_restart_until_cleared() {
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let start = || ServerProcess::start_with(&bin(), &data, pki.path(), &["--rpo-target", "1h"]);
    let target_of = |server: &ServerProcess| {
        admin_source(server.admin_addr.unwrap(), "web").map(|view| view.rpo_target_seconds)
    };
    let disk = work.path().join("web.raw");
    std::fs::write(&disk, random_bytes(MIB, 41)).unwrap();
    let mut server = start();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    let (code, body) = admin_request(
        server.admin_addr.unwrap(),
        "PUT",
        "/v1/sources/web/rpo-target",
        Some(r#"{"seconds": 90.5}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(target_of(&server), Some(90.5));

    server.stop();
    let mut server = start();
    assert_eq!(target_of(&server), Some(90.5), "{}", server.log());
    let (_, samples) = scrape(server.admin_addr.unwrap());
    assert_eq!(
        sample(&samples, r#"blockrep_rpo_target_seconds{source="web"}"#),
        Some(90.5)
    );
    let (code, body) = admin_request(
        server.admin_addr.unwrap(),
        "DELETE",
        "/v1/sources/web/rpo-target",
        None,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(target_of(&server), Some(3600.0));

    server.stop();
    let server = start();
    assert_eq!(target_of(&server), Some(3600.0), "{}", server.log());
}

#[test]
fn json_logs_parse_line_by_line_and_session_lines_name_their_source() {
    let rig = rig(
        &["web", "other"],
        &["--log-format", "json", "--retention", "off"],
    );
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(2 * MIB, 31)).unwrap();
    let admin = server.admin_addr.unwrap();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    write_at(&disk, 0, &random_bytes(CHUNK as usize, 32));
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    // A session refused: the certificate says web, the agent claims other.
    let wrong = agent_once_claiming(&disk, server.addr, "other", pki, "web");
    assert!(!wrong.status.success());
    for (method, path, body) in [
        (
            "POST",
            "/v1/snapshots",
            Some(r#"{"source":"web","name":"s1"}"#),
        ),
        (
            "POST",
            "/v1/launches",
            Some(r#"{"source":"web","snapshot":"s1","name":"l1","allow_live":true}"#),
        ),
        ("DELETE", "/v1/launches/l1", None),
        ("DELETE", "/v1/snapshots/web/s1", None),
    ] {
        let (code, text) = admin_request(admin, method, path, body);
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
    }
    assert!(server.wait_for_log("snapshot deleted", Duration::from_secs(5)));
    assert!(server.wait_for_log("session rejected", Duration::from_secs(5)));

    let log = server.log();
    let mut messages: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        let message = entry["fields"]["message"].as_str().unwrap().to_owned();
        assert!(entry["level"].is_string() && entry["timestamp"].is_string());
        let in_session = message.starts_with("session ")
            || message == "epoch committed"
            || entry["target"]
                .as_str()
                .is_some_and(|t| t.ends_with("::session"));
        if in_session {
            let source = entry["fields"]["source"]
                .as_str()
                .or_else(|| entry["span"]["source"].as_str());
            assert_eq!(
                source,
                Some("web"),
                "session line without its source: {line}"
            );
        }
        if message == "session rejected" {
            assert!(
                entry["fields"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("certificate")),
                "{line}"
            );
        }
        *messages.entry(message).or_default() += 1;
    }
    let count = |message: &str| messages.get(message).copied().unwrap_or(0);
    assert_eq!(count("session started"), 2, "{messages:?}");
    assert_eq!(count("session ended"), 2, "{messages:?}");
    assert_eq!(count("session rejected"), 1, "{messages:?}");
    assert_eq!(count("epoch committed"), 2, "{messages:?}");
    for message in [
        "snapshot created",
        "snapshot deleted",
        "launch created",
        "launch deleted",
    ] {
        assert_eq!(count(message), 1, "{message}: {messages:?}");
    }
}

#[test]
fn prometheus_examples_pass_promtool() {
    if !have_tool("promtool") {
        eprintln!("skipped: promtool not installed (scripts/test.sh installs it)");
        return;
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/prometheus");
    let path = |name: &str| docs.join(name).to_str().unwrap().to_owned();
    let rules = run_tool("promtool", &["check", "rules", &path("alerts.yml")]);
    assert!(rules.contains("SUCCESS"), "{rules}");
    let config = run_tool("promtool", &["check", "config", &path("prometheus.yml")]);
    assert!(config.contains("SUCCESS"), "{config}");
    // The rules fire on the series the server exports, and only then.
    run_tool("promtool", &["test", "rules", &path("alerts.test.yml")]);
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have_tool("systemd-analyze") {
        eprintln!("skipped: systemd-analyze not installed");
        return;
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/systemd");
    let work = tempfile::tempdir().unwrap();
    for name in ["blockrep-server.service", "blockrep-agent@.service"] {
        // verify insists that ExecStart names an executable: point it at ours.
        let unit = std::fs::read_to_string(docs.join(name))
            .unwrap()
            .replace("/usr/local/bin/blockrep", BIN);
        std::fs::write(work.path().join(name), unit).unwrap();
    }
    for instance in ["blockrep-server.service", "blockrep-agent@web-1.service"] {
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(work.path().join(instance))
            .output()
            .unwrap();
        // verify exits 0 on unknown keys and bad values; it only says so.
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "{instance}: {}{}",
            stdout(&output),
            stderr(&output)
        );
    }
}

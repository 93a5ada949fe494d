//! Live materialization of a launch volume (`blockrep launch materialize`)
//! against the real server: copied while fio writes to it, served from the
//! file once complete (reads no longer reach the store), and resumed after
//! the server is SIGKILLed during the copy.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::{Pki, ServerProcess, random_bytes};

const MIB: usize = 1 << 20;

fn server(pki: &Pki, data: &std::path::Path, rate: &str) -> ServerProcess {
    ServerProcess::start_with(
        &bin(),
        data,
        pki.path(),
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--retention",
            "off",
            "--launch-materialize-rate",
            rate,
        ],
    )
}

/// One launch's materialization, from `GET /v1/launches`.
fn progress(admin: SocketAddr, name: &str) -> Option<serde_json::Value> {
    let (code, body) = admin_request(admin, "GET", "/v1/launches", None);
    assert_eq!(code, 200, "{body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    list.into_iter()
        .find(|l| l["name"] == name)
        .and_then(|l| l["materialize"].as_array()?.first().cloned())
}

/// A counter or gauge of `GET /metrics` (no labels).
fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (code, body) = admin_request(admin, "GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
        .parse()
        .unwrap()
}

#[test]
fn a_launch_materialized_while_fio_writes_is_served_from_its_file() {
    if !have_tool("fio") || !have_tool("nbdcopy") {
        return;
    }
    let pki = Pki::new(&["db"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(32 * MIB, 51)).unwrap();
    // 8 MiB/s: the copy takes about 4 s, while fio writes.
    let server = server(&pki, &data, "8MiB");
    let admin = server.admin_addr.unwrap();
    assert_success(&agent_once(&disk, server.addr, "db", pki.path(), &[]));
    create_snapshot(&server, "db", "snap");
    let uri = create_launch(&server, "db", "snap", "db-1")
        .nbd_uri
        .unwrap();
    let fio = Command::new("timeout")
        // fio leaves its verify state files where it runs.
        .current_dir(work.path())
        .args(["-s", "KILL", "60", "fio"])
        .args(fio_randwrite_job("materialize", &uri, "24M", 5))
        .args(["--do_verify=0", "--rate_iops=1000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // `blockrep launch materialize --name db-1 --to TO` and more flags.
    let materialize = |to: &str, more: &[&str]| {
        let mut args = vec!["launch", "materialize", "--name", "db-1", "--to", to];
        args.extend_from_slice(more);
        cli(&server, &pki, &args)
    };
    // Outside the server's materialize directory: refused, nothing made.
    let outside = work.path().join("outside.raw");
    for to in [outside.to_str().unwrap(), "../outside.raw"] {
        let refused = materialize(to, &[]);
        assert!(!refused.status.success());
        let text = String::from_utf8_lossy(&refused.stderr);
        assert!(
            text.contains("--launch-materialize-dir") || text.contains("`..`"),
            "{text}"
        );
    }
    assert!(!outside.exists() && !data.join("outside.raw").exists());
    assert!(progress(admin, "db-1").is_none());
    let target = data.join("materialized/db-1.raw");
    let started = materialize("db-1.raw", &["--no-wait"]);
    assert_success(&started);
    let text = String::from_utf8_lossy(&started.stdout);
    assert!(text.contains("materializing to"), "{text}");
    let during = progress(admin, "db-1").unwrap();
    assert_eq!(during["done"], false, "{during}");
    let output = fio.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Waits for the end, showing progress.
    let waited = materialize("db-1.raw", &[]);
    assert_success(&waited);
    let text = String::from_utf8_lossy(&waited.stdout);
    assert!(text.contains("materialized to"), "{text}");
    let done = progress(admin, "db-1").unwrap();
    assert_eq!(
        (done["done"].as_bool(), done["remote_bytes"].as_u64()),
        (Some(true), Some(0))
    );

    // Served from the file: a whole read and fio's verification pass
    // without one chunk from the store, cached or not.
    let hits = metric(admin, "blockrep_launch_cache_hits_total");
    let misses = metric(admin, "blockrep_launch_cache_misses_total");
    let verify = Command::new("timeout")
        // fio leaves its verify state files where it runs.
        .current_dir(work.path())
        .args(["-s", "KILL", "60", "fio"])
        .args(fio_randwrite_job("materialize", &uri, "24M", 5))
        .args(["--verify_only", "--do_verify=1"])
        .output()
        .unwrap();
    let checked = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && !checked.contains("bad magic"),
        "fio's verification failed:\n{checked}\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let copy = work.path().join("read.raw");
    run_tool("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert_eq!(metric(admin, "blockrep_launch_cache_hits_total"), hits);
    assert_eq!(metric(admin, "blockrep_launch_cache_misses_total"), misses);
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&target).unwrap(),
        "the materialized file differs from the volume"
    );
    // fio wrote over part of the disk: the rest is the source's.
    let source = std::fs::read(&disk).unwrap();
    let read = std::fs::read(&copy).unwrap();
    let unchanged = read
        .chunks(4096)
        .zip(source.chunks(4096))
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        unchanged > 1000 && unchanged < 8192,
        "{unchanged} blocks unchanged"
    );
    let listed = cli(&server, &pki, &["launch", "list"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("materialized to"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
}

#[test]
fn a_materialization_killed_midway_resumes_where_it_stopped() {
    if !have_tool("nbdcopy") {
        return;
    }
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    let size = 32 * MIB as u64;
    std::fs::write(&disk, random_bytes(size as usize, 52)).unwrap();
    // 4 MiB/s: about 8 s for the whole copy.
    let mut first = server(&pki, &data, "4MiB");
    let admin = first.admin_addr.unwrap();
    assert_success(&agent_once(&disk, first.addr, "web", pki.path(), &[]));
    create_snapshot(&first, "web", "snap");
    create_launch(&first, "web", "snap", "web-1");
    let target = data.join("materialized/web-1.raw");
    let (code, body) = admin_request(
        admin,
        "POST",
        "/v1/launches/web-1/materialize",
        Some(r#"{"to":"web-1.raw"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let mut seen = 0;
    assert!(
        wait_until(Duration::from_secs(30), || {
            seen = progress(admin, "web-1").unwrap()["copied_bytes"]
                .as_u64()
                .unwrap();
            seen >= 8 * MIB as u64
        }),
        "the copy did not go on: {seen} bytes"
    );
    assert!(seen < size, "the copy ended before the kill");
    first.kill();

    let second = server(&pki, &data, "64MiB");
    let admin = second.admin_addr.unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            progress(admin, "web-1").unwrap()["done"] == true
        }),
        "the copy did not resume: {:?}",
        progress(admin, "web-1")
    );
    // Copied after the restart: what was left, not the whole volume (what
    // the last step before the kill had not recorded is copied again).
    let copied = metric(admin, "blockrep_launch_materialize_copied_bytes_total");
    assert!(
        copied + seen <= size + 2 * MIB as u64 && copied < size,
        "copied {copied} after the restart, {seen} seen before"
    );
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&disk).unwrap());
    let read = work.path().join("read.raw");
    run_tool(
        "nbdcopy",
        &[
            &format!("nbd://{}/web-1", second.nbd_addr.unwrap()),
            read.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&read).unwrap() == std::fs::read(&disk).unwrap());
    // Deleting the launch leaves the file, which is the user's.
    let (code, body) = admin_request(admin, "DELETE", "/v1/launches/web-1", None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), size);
}

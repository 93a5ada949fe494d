//! Launch volumes under a real workload: fio's NBD engine writing while the
//! server is SIGKILLed, and what a fold puts in the store read back byte for
//! byte by `blockrep export`.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::{Pki, ServerProcess, random_bytes};

const MIB: usize = 1 << 20;

#[test]
fn fio_writes_survive_a_server_killed_while_it_writes() {
    if !have_tool("fio") {
        return;
    }
    let pki = Pki::new(&["db"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(16 * MIB, 41)).unwrap();
    let mut server = nbd_server(&pki, &data);
    assert_success(&agent_once(&disk, server.addr, "db", pki.path(), &[]));
    create_snapshot(&server, "db", "snap");
    let launch = create_launch(&server, "db", "snap", "db-1");
    let uri = launch.nbd_uri.unwrap();

    // Writes with a flush every 8, throttled so that the kill lands among
    // them (4096 writes take about 8 s).
    // fio's NBD engine spins on a connection that is gone, deaf to SIGINT
    // and SIGTERM: it is killed at a deadline, and what it had issued is
    // read from the status it prints every second.
    let fio = Command::new("timeout")
        // fio leaves its verify state files where it runs.
        .current_dir(work.path())
        .args(["-s", "KILL", "12", "fio"])
        .args(fio_randwrite_job("overlay", &uri, "16M", 3))
        .args([
            "--fsync=8",
            "--do_verify=0",
            "--rate_iops=500",
            "--status-interval=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    server.kill();
    let output = fio.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout).to_string();
    // The last "issued rwts: total=0,WRITES,0,SYNCS" fio printed: writes
    // sent by then, some of them still in flight (16 at most).
    let issued: u64 = report
        .rsplit("issued rwts: total=")
        .next()
        .filter(|_| report.contains("issued rwts: total="))
        .and_then(|rest| rest.split(',').nth(1))
        .and_then(|writes| writes.parse().ok())
        .unwrap_or_else(|| panic!("no issued writes in fio's report:\n{report}"));
    // Every write before the last flush fio saw acknowledged: all but the
    // 16 in flight and the 8 since the flush before them.
    let flushed = issued.saturating_sub(16 + 8) / 8 * 8;
    assert!(flushed >= 300, "too few writes before the kill: {report}");

    let server = nbd_server(&pki, &data);
    let uri = format!("nbd://{}/db-1", server.nbd_addr.unwrap());
    // The same job (same seed, so the same offsets and data) reads back the
    // first `flushed` writes and checks each block's crc32c and header.
    let verify = Command::new("fio")
        // fio leaves its verify state files where it runs.
        .current_dir(work.path())
        .args(fio_randwrite_job("overlay", &uri, "16M", 3))
        .args([
            "--verify_only",
            "--do_verify=1",
            &format!("--number_ios={flushed}"),
        ])
        .output()
        .unwrap();
    let checked = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && !checked.contains("bad magic"),
        "fio's verification failed after the restart:\n{checked}\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        checked.contains(&format!("issued rwts: total={flushed},")),
        "{checked}"
    );
}

#[test]
fn a_folded_launch_exports_what_was_written_byte_for_byte() {
    if !have_tool("qemu-io") {
        return;
    }
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    let size = 8 * MIB + 3000;
    std::fs::write(&disk, random_bytes(size, 42)).unwrap();
    // The same writes go to a raw copy through qemu-io's own file driver.
    let expected = work.path().join("expected.raw");
    std::fs::copy(&disk, &expected).unwrap();
    let server = nbd_server(&pki, &data);
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));
    create_snapshot(&server, "web", "snap");
    let launch = create_launch(&server, "web", "snap", "web-1");
    let uri = launch.nbd_uri.unwrap();
    let writes = [
        "write -P 0x11 0 4096",
        "write -P 0x22 5000 70000",
        "write -z 131072 262144",
        "write -P 0x33 1048575 3",
        "write -P 0x44 4194304 1048576",
        "write -z 6000000 5000",
        // The short last block.
        "write -P 0x55 8389600 2008",
    ];
    for target in [uri.as_str(), expected.to_str().unwrap()] {
        let mut args = vec!["-f", "raw"];
        for write in &writes {
            args.extend(["-c", write]);
        }
        args.extend(["-c", "flush", target]);
        run_tool("qemu-io", &args);
    }
    let copy = work.path().join("copy.raw");
    run_tool("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&expected).unwrap(),
        "the launch read over NBD differs from the raw copy given the same writes"
    );

    // Fold: the writes go into the store, and the launch's head names them.
    let folded = cli(&server, &pki, &["launch", "fold", "--name", "web-1"]);
    assert_success(&folded);
    let line = String::from_utf8_lossy(&folded.stdout).to_string();
    let root = line
        .split_whitespace()
        .skip_while(|w| *w != "root")
        .nth(1)
        .unwrap_or_else(|| panic!("no root in {line:?}"))
        .to_owned();
    assert!(line.contains("generation 1"), "{line}");
    let exported = work.path().join("exported.raw");
    let export = Command::new(bin())
        .args(["export", "--data"])
        .arg(&data)
        .args(["--root", &root, "--out"])
        .arg(&exported)
        .output()
        .unwrap();
    assert_success(&export);
    assert!(
        std::fs::read(&exported).unwrap() == std::fs::read(&expected).unwrap(),
        "the folded root differs from the raw copy given the same writes"
    );
    drop(server);
    let verify = Command::new(bin())
        .args(["verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_success(&verify);
}

#[test]
fn a_server_restarted_folds_what_a_killed_one_left_in_overlays() {
    if !have_tool("qemu-io") {
        return;
    }
    let pki = Pki::new(&["app"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(4 * MIB, 43)).unwrap();
    let mut server = ServerProcess::start_with(
        &bin(),
        &data,
        pki.path(),
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--retention",
            "off",
            "--launch-fold-interval",
            "off",
        ],
    );
    assert_success(&agent_once(&disk, server.addr, "app", pki.path(), &[]));
    create_snapshot(&server, "app", "snap");
    let launch = create_launch(&server, "app", "snap", "app-1");
    let base_root = launch.root.clone();
    let uri = launch.nbd_uri.unwrap();
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x66 65536 65536",
            "-c",
            "flush",
            &uri,
        ],
    );
    server.kill();
    // Folding at start is the default: the head moves off the base.
    let server = nbd_server(&pki, &data);
    let admin = server.admin_addr.unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            launch_root(admin, "app-1").is_some_and(|root| root != base_root)
        }),
        "the launch's head never moved: {:?}",
        launch_root(admin, "app-1")
    );
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x66 65536 65536",
            &format!("nbd://{}/app-1", server.nbd_addr.unwrap()),
        ],
    );
}

#[test]
fn a_written_cutover_launch_snapshots_fails_back_and_exports_byte_for_byte() {
    if !have_tool("qemu-io") {
        return;
    }
    let pki = Pki::new(&["crm"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disk = work.path().join("disk.raw");
    let size = 4 * MIB + 5000;
    std::fs::write(&disk, random_bytes(size, 44)).unwrap();
    let server = nbd_server(&pki, &data);
    let launch = cut_over_once(&disk, server.addr, "crm", pki.path());
    let uri = format!("nbd://{}/{launch}", server.nbd_addr.unwrap());
    // The workload after cutover writes to the launch; the same writes go
    // to a raw copy through qemu-io's own file driver.
    let expected = work.path().join("expected.raw");
    std::fs::copy(&disk, &expected).unwrap();
    let writes = [
        "write -P 0x61 0 65536",
        "write -P 0x62 70000 9000",
        "write -z 1048576 131072",
        "write -P 0x63 2097151 2",
        "write -P 0x64 4194304 5000",
    ];
    for target in [uri.as_str(), expected.to_str().unwrap()] {
        let mut args = vec!["-f", "raw"];
        for write in &writes {
            args.extend(["-c", write]);
        }
        // No flush on the launch: a snapshot takes what clients wrote.
        args.push(target);
        run_tool("qemu-io", &args);
    }
    let expected = std::fs::read(&expected).unwrap();

    // A snapshot of the launch, exported from the store.
    let snap = cli(
        &server,
        &pki,
        &["snapshot", "create", "--launch", &launch, "--name", "after"],
    );
    assert_success(&snap);
    let text = String::from_utf8_lossy(&snap.stdout);
    // Of the source, labelled as the launch's base was (an agent reading a
    // plain image file is `live`).
    assert!(
        text.contains("snapshot after of crm") && text.contains("live"),
        "{text}"
    );
    let exported = work.path().join("snapshot.raw");
    let export = Command::new(bin())
        .args(["export", "--data"])
        .arg(&data)
        .args(["--source", "crm", "--snapshot", "after", "--out"])
        .arg(&exported)
        .output()
        .unwrap();
    assert_success(&export);
    assert!(
        std::fs::read(&exported).unwrap() == expected,
        "the launch's snapshot differs from the raw copy given the same writes"
    );
    let listed = cli(&server, &pki, &["snapshot", "list", "--source", "crm"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("after"));

    // Failback brings the source's disk to the launch.
    let output = failback_once(
        &disk,
        server.addr,
        "crm",
        &launch,
        pki.path(),
        &["--overwrite-source-changes"],
    );
    assert_success(&output);
    assert!(
        std::fs::read(&disk).unwrap() == expected,
        "the disk after failback differs from the raw copy given the same writes"
    );
}

/// The root a launch's head names, from `GET /v1/launches`.
fn launch_root(admin: std::net::SocketAddr, name: &str) -> Option<String> {
    let (code, body) = admin_request(admin, "GET", "/v1/launches", None);
    assert_eq!(code, 200, "{body}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    list.iter()
        .find(|l| l["name"] == name)
        .and_then(|l| l["root"].as_str().map(str::to_owned))
}

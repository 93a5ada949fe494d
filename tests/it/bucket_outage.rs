//! A server whose store is in a bucket (SeaweedFS on loopback) while the
//! bucket goes away and comes back, and while the server itself is killed
//! in the middle of its uploads: nothing acknowledged is lost, nothing
//! half-uploaded is named, and the server recovers by itself.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::ack_log::read_acks;
use blockrep_testkit::seaweedfs::SeaweedFs;
use blockrep_testkit::{AgentProcess, Pki, ServerProcess, random_bytes};

const MIB: usize = 1 << 20;
/// Small packs, so that packs seal and upload in the middle of a sync.
const SERVER_ARGS: [&str; 6] = [
    "--lease-ttl",
    "3s",
    "--retention",
    "off",
    "--pack-size-max",
    "4MiB",
];

fn health(server: &ServerProcess) -> (u16, String) {
    admin_request(server.admin_addr.unwrap(), "GET", "/health", None)
}

#[test]
fn nothing_acknowledged_is_lost_through_a_bucket_outage_and_a_kill_during_uploads() {
    let Some(mut weed) = SeaweedFs::start("bucket outage") else {
        return;
    };
    let access = weed.access("outage");
    let pki = Pki::new(&["web", "db"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let start = |listen: &str| {
        ServerProcess::start_in(
            &bin(),
            listen,
            &data,
            pki.path(),
            &SERVER_ARGS,
            Some(&access),
        )
    };
    // Restarted on the same address while the agent reconnects: one below
    // the ephemeral range, which no connection is given meanwhile.
    let mut server = start(&closed_addr().to_string());
    let disk = work.path().join("web.raw");
    std::fs::write(&disk, random_bytes(16 * MIB, 3)).unwrap();
    let ack = work.path().join("ack.log");
    let stop = Arc::new(AtomicBool::new(false));
    let writing = churn(disk.clone(), 4096, Arc::clone(&stop));
    let mut agent = AgentProcess::spawn(
        &bin(),
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--to",
            &server.addr.to_string(),
            "--source",
            "web",
            "--tls-dir",
            pki.path().to_str().unwrap(),
            "--interval",
            "200ms",
            "--io-timeout",
            "2s",
            "--ack-log",
            ack.to_str().unwrap(),
        ],
    );
    let acks_at_least = |count: usize, what: &str, server: &ServerProcess| {
        assert!(
            wait_until(Duration::from_secs(60), || read_acks(&ack).len() >= count),
            "{what}: fewer than {count} acknowledged epochs\nagent: {}\nserver: {}",
            agent.stderr.lock().unwrap(),
            server.log()
        );
    };
    acks_at_least(3, "before the outage", &server);

    // The bucket goes away: the server says it is unavailable, and
    // acknowledges nothing while it cannot make a commit durable there.
    weed.stop();
    assert!(
        wait_until(Duration::from_secs(20), || health(&server).0 == 503),
        "health stayed {:?}",
        health(&server)
    );
    let (_, body) = health(&server);
    assert!(body.contains("cannot be reached"), "{body}");
    let before_outage = read_acks(&ack);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        read_acks(&ack),
        before_outage,
        "acknowledged while the bucket was away"
    );

    // It comes back: the server recovers by itself.
    weed.restart();
    assert!(
        wait_until(Duration::from_secs(30), || health(&server).0 == 200),
        "health stayed {:?}",
        health(&server)
    );
    acks_at_least(before_outage.len() + 2, "after the outage", &server);

    // The server is killed while it uploads, and started again.
    let before_kill = read_acks(&ack);
    let listen = server.addr.to_string();
    server.kill();
    server = start(&listen);
    acks_at_least(before_kill.len() + 2, "after the kill", &server);

    // A larger sync of another source, killed part way through its
    // uploads, then run again to the end.
    let big = work.path().join("db.raw");
    std::fs::write(&big, random_bytes(40 * MIB, 4)).unwrap();
    let mut once = std::process::Command::new(BIN)
        .args(["agent", "--once", "--disk"])
        .arg(&big)
        .args(["--to", &listen, "--source", "db", "--tls-dir"])
        .arg(pki.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::fs::read_dir(data.join("packs")).is_ok_and(|d| d.count() >= 4)
        }),
        "no packs written"
    );
    server.kill();
    let _ = once.wait();
    server = start(&listen);
    assert_success(&agent_once(&big, server.addr, "db", pki.path(), &[]));

    stop.store(true, Ordering::SeqCst);
    writing.join().unwrap();
    let final_root = disk_root(&disk, 65_536);
    agent.wait_for_root(&final_root, Duration::from_secs(60), "caught up");
    agent.stop_cleanly();

    // Everything is in the bucket, whole: verify reads every blob there,
    // and the roots acknowledged before the outage, before the kill and at
    // the end are exactly their disks.
    let verify_copy = tempfile::tempdir().unwrap();
    let mut verify = std::process::Command::new(BIN);
    verify.args(["verify", "--data"]).arg(verify_copy.path());
    access.apply(&mut verify);
    assert_success(&verify.output().unwrap());
    for acked in [before_outage.last().unwrap(), before_kill.last().unwrap()] {
        let image = export_root_from_bucket(work.path(), &access, &acked.root);
        assert_eq!(disk_root(&image, 65_536), acked.root);
    }
    assert!(
        std::fs::read(export_root_from_bucket(work.path(), &access, &final_root)).unwrap()
            == std::fs::read(&disk).unwrap()
    );
    let db_root = disk_root(&big, 65_536);
    assert!(
        std::fs::read(export_root_from_bucket(work.path(), &access, &db_root)).unwrap()
            == std::fs::read(&big).unwrap()
    );
}

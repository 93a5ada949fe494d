//! Two replication servers sharing one bucket (SeaweedFS on loopback): an
//! agent given both fails over when its server dies or stalls, and goes on
//! from the same head; a server that lost the source's lease never writes
//! its head again; one server collects garbage while the other replicates.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::ack_log::read_acks;
use blockrep_testkit::seaweedfs::SeaweedFs;
use blockrep_testkit::{AgentProcess, BucketAccess, Pki, ServerProcess, random_bytes};

const MIB: usize = 1 << 20;
const SERVER_ARGS: [&str; 4] = ["--lease-ttl", "2s", "--retention", "off"];

struct Pair {
    pki: Pki,
    work: tempfile::TempDir,
    access: BucketAccess,
    a: ServerProcess,
    b: ServerProcess,
}

fn pair(weed: &SeaweedFs, prefix: &str) -> Pair {
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let access = weed.access(prefix);
    let start = |name: &str| {
        ServerProcess::start_in(
            &bin(),
            "127.0.0.1:0",
            &work.path().join(name),
            pki.path(),
            &SERVER_ARGS,
            Some(&access),
        )
    };
    let (a, b) = (start("a"), start("b"));
    Pair {
        pki,
        work,
        access,
        a,
        b,
    }
}

fn agent(pair: &Pair, disk: &Path, ack: &Path) -> AgentProcess {
    let to = format!("{},{}", pair.a.addr, pair.b.addr);
    agent_to(&to, &pair.pki, disk, ack)
}

/// A continuous agent of `web` replicating `disk` to the servers `to`.
fn agent_to(to: &str, pki: &Pki, disk: &Path, ack: &Path) -> AgentProcess {
    AgentProcess::spawn(
        &bin(),
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--to",
            to,
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
    )
}

fn wait_for_acks(ack: &Path, count: usize, agent: &AgentProcess, what: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || read_acks(ack).len() >= count),
        "{what}: fewer than {count} acknowledged epochs: {:?}\nstderr: {}",
        read_acks(ack),
        agent.stderr.lock().unwrap()
    );
}

fn export_root(pair: &Pair, root: &str) -> PathBuf {
    export_root_from_bucket(pair.work.path(), &pair.access, root)
}

fn gc(pki: &Pki, server: &ServerProcess) -> std::process::Output {
    std::process::Command::new(BIN)
        .args([
            "gc",
            "--admin",
            &server.admin_addr.unwrap().to_string(),
            "--admin-token",
        ])
        .arg(pki.path().join("admin.token"))
        .output()
        .unwrap()
}

fn assert_one_history(ack: &Path) {
    let acks = read_acks(ack);
    for pair in acks.windows(2) {
        assert!(
            pair[1].epoch == pair[0].epoch || pair[1].epoch == pair[0].epoch + 1,
            "acknowledged epochs jump: {pair:?}"
        );
    }
}

#[test]
fn an_agent_fails_over_to_the_second_server_and_goes_on_from_the_same_head() {
    let Some(weed) = SeaweedFs::start("failover") else {
        return;
    };
    let mut pair = pair(&weed, "failover");
    let disk = pair.work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(8 * MIB, 1)).unwrap();
    let ack = pair.work.path().join("ack.log");
    let stop = Arc::new(AtomicBool::new(false));
    let writing = churn(disk.clone(), 2048, Arc::clone(&stop));
    let mut agent = agent(&pair, &disk, &ack);
    wait_for_acks(&ack, 3, &agent, "replicating to A");
    let lease = admin_source(pair.a.admin_addr.unwrap(), "web")
        .and_then(|view| view.lease)
        .expect("A holds no lease of the source");
    assert_eq!(lease.holder, pair.a.addr.to_string());

    pair.a.kill();
    let by_a = read_acks(&ack);
    let last_by_a = by_a.last().unwrap().clone();
    wait_for_acks(&ack, by_a.len() + 3, &agent, "after A was killed");
    let admin_b = pair.b.admin_addr.unwrap();
    let view = admin_source(admin_b, "web").unwrap();
    assert!(view.epoch > last_by_a.epoch, "{view:?} {last_by_a:?}");
    let taken = view.lease.clone().expect("B holds no lease of the source");
    assert_eq!(taken.holder, pair.b.addr.to_string());
    assert!(taken.generation > lease.generation, "{taken:?} {lease:?}");

    // The writer stops; B catches up with the disk.
    stop.store(true, Ordering::SeqCst);
    writing.join().unwrap();
    let final_root = disk_root(&disk, 65_536);
    agent.wait_for_root(&final_root, Duration::from_secs(60), "B catches up");
    agent.stop_cleanly();
    assert_one_history(&ack);

    // Every root acknowledged, by A or by B, is in the bucket whole.
    assert_eq!(
        disk_root(&export_root(&pair, &last_by_a.root), 65_536),
        last_by_a.root
    );
    assert!(
        std::fs::read(export_root(&pair, &final_root)).unwrap() == std::fs::read(&disk).unwrap(),
        "the last root served by B differs from the disk"
    );
    // A is gone (its presence expired): B is alone and may collect.
    assert_success(&gc(&pair.pki, &pair.b));
}

#[test]
fn a_server_paused_past_its_lease_never_writes_the_head_again() {
    let Some(weed) = SeaweedFs::start("paused server") else {
        return;
    };
    let pair = pair(&weed, "paused");
    let disk = pair.work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(8 * MIB, 2)).unwrap();
    let ack = pair.work.path().join("ack.log");
    let stop = Arc::new(AtomicBool::new(false));
    let writing = churn(disk.clone(), 2048, Arc::clone(&stop));
    let mut agent = agent(&pair, &disk, &ack);
    wait_for_acks(&ack, 3, &agent, "replicating to A");

    // A stalls (SIGSTOP) in the middle of replication; the agent gives up
    // on it and B takes the source once A's lease has run out.
    let signal = |what: &str| {
        let status = std::process::Command::new("kill")
            .args([what, &pair.a.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let by_a = read_acks(&ack).len();
    wait_for_acks(&ack, by_a + 3, &agent, "after A was paused");
    stop.store(true, Ordering::SeqCst);
    writing.join().unwrap();
    let final_root = disk_root(&disk, 65_536);
    agent.wait_for_root(&final_root, Duration::from_secs(60), "B catches up");
    agent.stop_cleanly();
    let head_by_b = admin_source(pair.b.admin_addr.unwrap(), "web").unwrap();
    assert_eq!(head_by_b.root, Some(final_root));

    // A resumes, long past its lease: whatever it was doing, it writes no
    // head; it finds its lease lost and sends the agent to the other server.
    signal("-CONT");
    assert!(
        pair.a.wait_for_log("lease lost", Duration::from_secs(10)),
        "A did not notice: {}",
        pair.a.log()
    );
    // Its status names the server that has the source now.
    let b_addr = pair.b.addr.to_string();
    assert!(
        wait_until(Duration::from_secs(10), || {
            admin_source(pair.a.admin_addr.unwrap(), "web")
                .and_then(|view| view.lease)
                .is_some_and(|lease| lease.holder == b_addr)
        }),
        "{:?}",
        admin_source(pair.a.admin_addr.unwrap(), "web")
    );
    let refused = std::process::Command::new(BIN)
        .args(["agent", "--once", "--disk"])
        .arg(&disk)
        .args([
            "--to",
            &pair.a.addr.to_string(),
            "--source",
            "web",
            "--tls-dir",
        ])
        .arg(pair.pki.path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("served by another server"),
        "{}",
        stderr(&refused)
    );
    // Both servers are present: B collects, with A (back, its packs read
    // again) taking part.
    assert_success(&gc(&pair.pki, &pair.b));
    assert!(
        pair.a
            .wait_for_log("taking part in a collection", Duration::from_secs(10)),
        "{}",
        pair.a.log()
    );
    // The bucket's head is still B's last one.
    let fresh = tempfile::tempdir().unwrap();
    let check = ServerProcess::start_in(
        &bin(),
        "127.0.0.1:0",
        &fresh.path().join("data"),
        pair.pki.path(),
        &SERVER_ARGS,
        Some(&pair.access),
    );
    assert_eq!(
        admin_source(check.admin_addr.unwrap(), "web").unwrap().root,
        head_by_b.root
    );
    assert_one_history(&ack);
}

#[test]
fn a_cutover_made_through_one_server_fences_the_source_on_the_other() {
    let Some(weed) = SeaweedFs::start("cutover across servers") else {
        return;
    };
    let mut pair = pair(&weed, "cutover");
    let disk = pair.work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(4 * MIB, 5)).unwrap();
    // B started before the source existed: all it knows comes from the bucket.
    let launch = cut_over_once(&disk, pair.a.addr, "web", pair.pki.path());
    assert!(launch.starts_with("web-cutover"), "{launch}");
    pair.a.stop();

    blockrep_testkit::write_at(&disk, 0, &random_bytes(8192, 6));
    let refused = agent_once(&disk, pair.b.addr, "web", pair.pki.path(), &[]);
    assert!(!refused.status.success(), "B replicated a source cut over");
    assert!(stderr(&refused).contains("fenced"), "{}", stderr(&refused));
    let view = admin_source(pair.b.admin_addr.unwrap(), "web").unwrap();
    assert_eq!(view.cutover.map(|c| c.launch), Some(launch));
}

#[test]
fn one_server_collects_garbage_while_the_other_replicates() {
    let Some(weed) = SeaweedFs::start("collection beside replication") else {
        return;
    };
    let pair = pair(&weed, "collect");
    let disk = pair.work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(8 * MIB, 7)).unwrap();
    let ack = pair.work.path().join("ack.log");
    let stop = Arc::new(AtomicBool::new(false));
    let writing = churn(disk.clone(), 2048, Arc::clone(&stop));
    let mut agent = agent(&pair, &disk, &ack);
    wait_for_acks(&ack, 3, &agent, "replicating to A");

    // A snapshot is taken by the server that serves the source: B's copy
    // of the head may be old, so B refuses and names the holder.
    let snapshot = |server: &ServerProcess, name: &str| {
        std::process::Command::new(BIN)
            .args(["snapshot", "create", "--source", "web", "--name", name])
            .args(["--admin", &server.admin_addr.unwrap().to_string()])
            .arg("--admin-token")
            .arg(pair.pki.path().join("admin.token"))
            .output()
            .unwrap()
    };
    let refused = snapshot(&pair.b, "by-b");
    assert!(!refused.status.success());
    let text = stderr(&refused);
    assert!(text.contains(&pair.a.addr.to_string()), "{text}");
    let kept = blockrep_testkit::admin::create_snapshot(&pair.a, "web", "by-a");
    // B lists it: the snapshots of a source another server serves are read
    // from the bucket, not from B's working copy.
    let listed = blockrep_testkit::admin::snapshots(&pair.b);
    assert!(
        listed
            .iter()
            .any(|s| s.name == "by-a" && s.root == kept.root),
        "{listed:?}"
    );
    // And a launch A makes of it.
    blockrep_testkit::admin::create_launch(&pair.a, "web", "by-a", "drill-a");
    let b_admin = pair.b.admin_addr.unwrap();
    let (code, body) = blockrep_testkit::admin::admin_request(b_admin, "GET", "/v1/launches", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""name":"drill-a""#), "{body}");

    // B collects, again and again, while the writer overwrites the disk and
    // A commits epoch after epoch: A takes part in every round.
    let mut freed_any = false;
    for _ in 0..4 {
        let collected = gc(&pair.pki, &pair.b);
        assert_success(&collected);
        freed_any |= !stdout(&collected).contains(" in 0 packs ");
    }
    let acked = read_acks(&ack).len();
    wait_for_acks(&ack, acked + 3, &agent, "after the collections");
    stop.store(true, Ordering::SeqCst);
    writing.join().unwrap();
    let final_root = disk_root(&disk, 65_536);
    agent.wait_for_root(&final_root, Duration::from_secs(60), "A catches up");
    agent.stop_cleanly();
    assert_one_history(&ack);
    // Every epoch went to A; what it acknowledged last is whole.
    let view = admin_source(pair.a.admin_addr.unwrap(), "web").unwrap();
    assert_eq!(view.lease.unwrap().holder, pair.a.addr.to_string());
    assert!(
        pair.a.log().contains("taking part in a collection"),
        "{}",
        pair.a.log()
    );
    assert!(
        std::fs::read(export_root(&pair, &final_root)).unwrap() == std::fs::read(&disk).unwrap(),
        "the last root differs from the disk"
    );
    // The snapshot outlived the collections whole.
    assert_eq!(
        disk_root(&export_root(&pair, &kept.root), 65_536),
        kept.root
    );
    // A last collection, the writer stopped, frees what the overwrites left.
    let last = gc(&pair.pki, &pair.b);
    assert_success(&last);
    freed_any |= !stdout(&last).contains(" in 0 packs ");
    assert!(freed_any, "{}", stdout(&last));
    assert!(
        std::fs::read(export_root(&pair, &final_root)).unwrap() == std::fs::read(&disk).unwrap(),
        "the last root differs from the disk after the last collection"
    );
}

#[test]
fn a_server_leaves_what_another_server_serves_to_that_server() {
    let Some(weed) = SeaweedFs::start("rpo across servers") else {
        return;
    };
    let pki = Pki::new(&["web", "db"]);
    let work = tempfile::tempdir().unwrap();
    let access = weed.access("rpo");
    // An RPO target a server that does not serve the source soon passes.
    let start = |name: &str| {
        let hook = format!(
            "echo \"$BLOCKREP_SOURCE $BLOCKREP_EVENT\" >> {}",
            work.path().join(format!("{name}.hook")).display()
        );
        let mut args = SERVER_ARGS.to_vec();
        args.extend(["--rpo-target", "1s", "--alert-interval", "100ms"]);
        args.extend(["--retention-tick", "200ms"]);
        args.extend(["--on-rpo-breach", &hook]);
        ServerProcess::start_in(
            &bin(),
            "127.0.0.1:0",
            &work.path().join(name),
            pki.path(),
            &args,
            Some(&access),
        )
    };
    let mut a = start("a");
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(4 * MIB, 3)).unwrap();
    let ack = work.path().join("ack.log");
    let mut agent = agent_to(&a.addr.to_string(), &pki, &disk, &ack);
    wait_for_acks(&ack, 2, &agent, "replicating to A");

    // B knows the source from the bucket alone, its head older than the
    // target within a second: A serves it, so B raises no alarm, reports
    // no lag for it, and says where it is served.
    let b = start("b");
    std::thread::sleep(Duration::from_secs(3));
    let hooked = std::fs::read_to_string(work.path().join("b.hook")).unwrap_or_default();
    assert!(hooked.is_empty(), "B alarmed for A's source: {hooked}");
    let view = admin_source(b.admin_addr.unwrap(), "web").expect("B lists the source");
    assert_eq!(
        view.state,
        blockrep_server::SourceState::ServedElsewhere,
        "{view:?}"
    );
    assert_eq!(view.lag_seconds, None, "{view:?}");
    assert_eq!(view.lease.unwrap().holder, a.addr.to_string());
    let status = std::process::Command::new(BIN)
        .args(["status", "--admin", &b.admin_addr.unwrap().to_string()])
        .arg("--admin-token")
        .arg(pki.path().join("admin.token"))
        .output()
        .unwrap();
    assert_success(&status);
    let line = stdout(&status)
        .lines()
        .find(|line| line.starts_with("web "))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        line.contains("served_elsewhere") && line.contains(&format!("at {}", a.addr)),
        "{line}"
    );
    let metrics = blockrep_testkit::admin::metrics(&b);
    assert!(
        !metrics.contains("blockrep_replication_lag_seconds{source=\"web\"}"),
        "{metrics}"
    );
    // A, which serves it, reports its lag.
    let metrics = blockrep_testkit::admin::metrics(&a);
    assert!(
        metrics.contains("blockrep_replication_lag_seconds{source=\"web\"}"),
        "{metrics}"
    );

    // Refused on B, naming A, which serves the source.
    let refused_for_a = |(code, body): (u16, String)| {
        assert_eq!(code, 409, "{body}");
        assert!(body.contains(&a.addr.to_string()), "{body}");
    };
    // A workflow step asked of B is refused, naming A: B's records may be
    // old, and the agent is A's. Asked of A, it is made. So is an RPO
    // target, a record of the source: set through A, B applies it too, as
    // the bucket has it.
    for (method, path, body) in [
        ("POST", "/v1/sources/web/mark-ready", r#"{"force":true}"#),
        ("PUT", "/v1/sources/web/rpo-target", r#"{"seconds": 2}"#),
    ] {
        let ask = |server: &ServerProcess| {
            blockrep_testkit::admin::admin_request(
                server.admin_addr.unwrap(),
                method,
                path,
                Some(body),
            )
        };
        refused_for_a(ask(&b));
        let (code, answer) = ask(&a);
        assert_eq!(code, 200, "{method} {path}: {answer}");
    }
    let view = admin_source(b.admin_addr.unwrap(), "web").unwrap();
    assert_eq!(view.rpo_target_seconds, 2.0, "{view:?}");
    // B reports the source as the bucket has it: A's step, A's epochs.
    let before = read_acks(&ack).len();
    blockrep_testkit::write_at(&disk, 0, &random_bytes(8192, 4));
    wait_for_acks(&ack, before + 1, &agent, "after a write");
    let acked = read_acks(&ack).last().unwrap().epoch;
    assert!(acked >= 2, "{acked}");
    let view = admin_source(b.admin_addr.unwrap(), "web").unwrap();
    assert_eq!(view.migration_state, "ready_for_cutover", "{view:?}");
    assert!(
        view.epoch >= acked,
        "B shows epoch {} of {acked}",
        view.epoch
    );
    let (code, body) = blockrep_testkit::admin::admin_request(
        b.admin_addr.unwrap(),
        "GET",
        "/v1/sources/web/history",
        None,
    );
    assert!(code == 200 && body.contains("ready_for_cutover"), "{body}");
    // So is a launch: A would serve it.
    blockrep_testkit::admin::create_snapshot(&a, "web", "kept");
    let launch_for = |server: &ServerProcess, name: &str, ttl_seconds: u32| {
        blockrep_testkit::admin::admin_request(
            server.admin_addr.unwrap(),
            "POST",
            "/v1/launches",
            Some(&format!(
                r#"{{"source":"web","snapshot":"kept","name":"{name}","allow_live":true,"ttl_seconds":{ttl_seconds}}}"#
            )),
        )
    };
    let launch = |server: &ServerProcess, name: &str| launch_for(server, name, 1);
    let listed = blockrep_testkit::admin::snapshots(&b);
    assert!(listed.iter().any(|s| s.name == "kept"), "{listed:?}");
    refused_for_a(launch(&b, "by-b"));
    // And what changes A's launches and snapshots: B knows them, A serves
    // them.
    let (code, body) = launch_for(&a, "held", 600);
    assert_eq!(code, 201, "{body}");
    let b_admin = b.admin_addr.unwrap();
    let request = |method: &str, path: &str| {
        blockrep_testkit::admin::admin_request(b_admin, method, path, None)
    };
    let (code, body) = request("GET", "/v1/launches");
    assert!(code == 200 && body.contains(r#""name":"held""#), "{body}");
    let on_a = |method: &str, path: &str, body: Option<&str>| {
        blockrep_testkit::admin::admin_request(a.admin_addr.unwrap(), method, path, body)
    };
    for (method, path) in [
        ("POST", "/v1/launches/held/fold"),
        ("DELETE", "/v1/launches/held"),
        ("DELETE", "/v1/snapshots/web/kept"),
    ] {
        let (code, body) = request(method, path);
        refused_for_a((code, format!("{method} {path}: {body}")));
    }
    let of_held = Some(r#"{"launch":"held","name":"of-held"}"#);
    let (code, body) =
        blockrep_testkit::admin::admin_request(b_admin, "POST", "/v1/snapshots", of_held);
    refused_for_a((code, format!("a snapshot of launch held: {body}")));
    let (code, body) = on_a("DELETE", "/v1/launches/held", None);
    assert_eq!(code, 200, "{body}");
    // Even for a source made after B started, which B knows only from a
    // listing.
    let db = work.path().join("db.raw");
    std::fs::write(&db, random_bytes(MIB, 5)).unwrap();
    assert_success(&agent_once(&db, a.addr, "db", pki.path(), &[]));
    blockrep_testkit::admin::create_snapshot(&a, "db", "first");
    let listed = blockrep_testkit::admin::snapshots(&b);
    assert!(listed.iter().any(|s| s.source == "db"), "{listed:?}");
    refused_for_a(request("DELETE", "/v1/snapshots/db/first"));

    // A snapshot of it expires on A, which serves it, not on B, though B
    // lists it.
    let (code, body) = on_a(
        "POST",
        "/v1/snapshots",
        Some(r#"{"source":"web","name":"brief","ttl_seconds":1}"#),
    );
    assert_eq!(code, 201, "{body}");
    let listed = blockrep_testkit::admin::snapshots(&b);
    assert!(listed.iter().any(|s| s.name == "brief"), "{listed:?}");
    assert!(
        wait_until(Duration::from_secs(20), || a
            .log()
            .contains("snapshot expired source=web snapshot=brief")),
        "A never expired it: {}",
        a.log()
    );
    // A drill of it too: A closes its exports and deletes it.
    let (code, body) = launch(&a, "drill");
    assert_eq!(code, 201, "{body}");
    let (code, body) =
        blockrep_testkit::admin::admin_request(b.admin_addr.unwrap(), "GET", "/v1/launches", None);
    assert!(code == 200 && body.contains(r#""name":"drill""#), "{body}");
    assert!(
        wait_until(Duration::from_secs(20), || a.log().contains(
            "test launch expired: exports closed, launch deleted launch=drill"
        )),
        "A never expired the drill: {}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let b_log = b.log();
    assert!(!b_log.contains("snapshot expired"), "{b_log}");
    assert!(!b_log.contains("test launch expired"), "{b_log}");

    // Once A is gone and its lease lapsed, the source is B's to watch
    // (nobody serves it): B reports its lag and alarms.
    agent.stop_cleanly();
    a.kill();
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(work.path().join("b.hook"))
                .is_ok_and(|hooked| hooked.contains("web breach"))
        }),
        "B never watched the source after A was gone"
    );
    let view = admin_source(b.admin_addr.unwrap(), "web").unwrap();
    assert_ne!(
        view.state,
        blockrep_server::SourceState::ServedElsewhere,
        "{view:?}"
    );
    assert!(view.lag_seconds.is_some(), "{view:?}");
}

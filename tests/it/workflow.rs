//! The migration workflow end to end with the real server and CLI: every
//! state a source passes through, the refusals of steps out of order, the
//! record of who asked, each state surviving a server restart; drills that
//! expire with an NBD client attached; launch checks that gate mark-ready.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;
use crate::nbd_access::{enter_transmission, greeted};
use blockrep_server::{EventView, LaunchView};
use blockrep_testkit::admin::admin_source;
use blockrep_testkit::{AgentRig, ServerProcess, mixed_image};

const SERVER_ARGS: [&str; 4] = ["--nbd-listen", "127.0.0.1:0", "--retention", "off"];

/// The CLI against the rig's server, as operator `alice`.
fn operator(rig: &AgentRig, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .args(["--admin", &rig.admin().to_string(), "--admin-token"])
        .arg(rig.pki.path().join("admin.token"))
        .env("BLOCKREP_OPERATOR", "alice")
        .output()
        .unwrap()
}

/// A step through the CLI that must be refused, naming `named`.
fn refused(rig: &AgentRig, args: &[&str], named: &str) {
    let output = operator(rig, args);
    assert!(!output.status.success(), "{args:?} was not refused");
    let text = stderr(&output);
    assert!(
        text.contains(named) && text.contains("409"),
        "{args:?}: {text}"
    );
}

/// The source's migration state as the API shows it.
fn state(rig: &AgentRig, source: &str) -> String {
    let (code, body) = admin_request(rig.admin(), "GET", &format!("/v1/sources/{source}"), None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<blockrep_server::SourceView>(&body)
        .unwrap()
        .migration_state
}

/// Waits until the source shows `expected` (the server's own steps are
/// recorded a moment after what they record).
fn wait_state(rig: &AgentRig, source: &str, expected: &str) {
    let reached = wait_until(Duration::from_secs(20), || state(rig, source) == expected);
    assert!(
        reached,
        "{source} is {}, not {expected}",
        state(rig, source)
    );
}

/// Restarts the server on the same data; the state must be what it was.
fn restart(rig: &mut AgentRig, source: &str, expected: &str) {
    rig.server.stop();
    rig.server = ServerProcess::start_with(
        &bin(),
        &rig.work.path().join("data"),
        rig.pki.path(),
        &SERVER_ARGS,
    );
    assert_eq!(state(rig, source), expected, "after a restart");
}

fn history(rig: &AgentRig, source: &str) -> Vec<EventView> {
    let path = format!("/v1/sources/{source}/history");
    let (code, body) = admin_request(rig.admin(), "GET", &path, None);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Writes `web`'s disk from `seed`, replicates it and snapshots it as
/// `base`; returns the disk and the snapshot's name.
fn synced_web(rig: &AgentRig, seed: u64) -> (std::path::PathBuf, String) {
    let disk = rig.work.path().join("web.raw");
    std::fs::write(&disk, mixed_image(4 << 20, seed)).unwrap();
    assert_success(&agent_once(
        &disk,
        rig.server.addr,
        "web",
        rig.pki.path(),
        &[],
    ));
    (disk, create_snapshot(&rig.server, "web", "base").name)
}

/// `launch create` of `web`'s `snapshot` as `name`, with `extra` flags.
fn launch_web(rig: &AgentRig, snapshot: &str, name: &str, extra: &[&str]) -> std::process::Output {
    let create = [
        "launch",
        "create",
        "--source",
        "web",
        "--snapshot",
        snapshot,
        "--name",
        name,
    ];
    let args: Vec<&str> = create
        .iter()
        .chain(["--allow-live"].iter())
        .chain(extra)
        .copied()
        .collect();
    operator(rig, &args)
}

#[test]
fn every_step_is_gated_recorded_and_survives_restarts() {
    if !(have_tool("qemu-img") && have_tool("nbdcopy")) {
        return;
    }
    let mut rig = nbd_rig(&["web", "db"]);
    let tls = rig.pki.path().to_owned();
    let disk = rig.work.path().join("web.raw");
    let (code, _) = admin_request(rig.admin(), "GET", "/v1/sources/web/history", None);
    assert_eq!(code, 404, "a source never seen has no history");

    // The initial sync under way: a step is committed, not a whole pass.
    std::fs::write(&disk, blockrep_testkit::random_bytes(4 << 20, 7)).unwrap();
    let throttled = ["--max-rate", "256KiB/s", "--commit-every", "128KiB"];
    let mut agent = blockrep_testkit::AgentProcess::start(
        &bin(),
        &disk,
        rig.server.addr,
        "web",
        &tls,
        &throttled,
    );
    let stepped = wait_until(Duration::from_secs(20), || {
        admin_source(rig.admin(), "web").is_some_and(|v| v.epoch >= 1)
    });
    agent.stop();
    assert!(stepped, "no step of the initial sync committed");
    assert_eq!(state(&rig, "web"), "not_ready");
    restart(&mut rig, "web", "not_ready");
    // The initial sync commits: ready for testing.
    std::fs::write(&disk, mixed_image(4 << 20, 7)).unwrap();
    assert_success(&agent_once(&disk, rig.server.addr, "web", &tls, &[]));
    wait_state(&rig, "web", "ready_for_test");
    refused(
        &rig,
        &["source", "mark-ready", "--source", "web"],
        "ready_for_test",
    );
    refused(
        &rig,
        &["cutover", "--source", "web", "--no-wait"],
        "--force",
    );
    refused(&rig, &["source", "finalize", "web"], "cut_over");
    refused(&rig, &["source", "archive", "web"], "finalized");
    restart(&mut rig, "web", "ready_for_test");

    // A test launch: testing.
    let snapshot = create_snapshot(&rig.server, "web", "drill-base");
    assert_success(&operator(
        &rig,
        &[
            "launch",
            "create",
            "--source",
            "web",
            "--snapshot",
            &snapshot.name,
            "--name",
            "web-t1",
            "--allow-live",
        ],
    ));
    wait_state(&rig, "web", "testing");
    restart(&mut rig, "web", "testing");

    // The operator confirms the test.
    let ready = operator(&rig, &["source", "mark-ready", "--source", "web"]);
    assert_success(&ready);
    assert!(
        stdout(&ready).contains("ready_for_cutover"),
        "{}",
        stdout(&ready)
    );
    restart(&mut rig, "web", "ready_for_cutover");

    // The cutover request is durable: a restart keeps it, and the agent
    // run after it cuts over.
    assert_success(&operator(
        &rig,
        &["cutover", "--source", "web", "--no-wait"],
    ));
    assert_eq!(state(&rig, "web"), "cutting_over");
    restart(&mut rig, "web", "cutting_over");
    assert!(admin_source(rig.admin(), "web").unwrap().cutover_requested);
    // The workload changed the disk since: the agent's next commit hears
    // of the request.
    std::fs::write(&disk, mixed_image(4 << 20, 8)).unwrap();
    let agent = agent_once(&disk, rig.server.addr, "web", &tls, &[]);
    assert_success(&agent);
    assert!(stdout(&agent).contains("cutover"), "{}", stdout(&agent));
    wait_state(&rig, "web", "cut_over");
    restart(&mut rig, "web", "cut_over");

    // Finalize: snapshots and the test launch released, the cutover launch kept.
    let finalized = operator(&rig, &["source", "finalize", "web"]);
    assert_success(&finalized);
    assert_eq!(state(&rig, "web"), "finalized");
    let (_, body) = admin_request(rig.admin(), "GET", "/v1/launches?source=web", None);
    let launches: Vec<LaunchView> = serde_json::from_str(&body).unwrap();
    let kinds: Vec<&str> = launches.iter().map(|l| l.kind.as_str()).collect();
    assert_eq!(kinds, ["cutover"], "{body}");
    let (_, body) = admin_request(rig.admin(), "GET", "/v1/snapshots?source=web", None);
    assert_eq!(body.trim(), "[]", "snapshots left after finalize");
    // The agent is told to stop at its next change.
    std::fs::write(&disk, mixed_image(4 << 20, 9)).unwrap();
    let told = agent_once(&disk, rig.server.addr, "web", &tls, &[]);
    assert!(!told.status.success());
    assert!(
        stderr(&told).contains("stop this agent"),
        "{}",
        stderr(&told)
    );
    refused(
        &rig,
        &["cutover", "--source", "web", "--reset"],
        "finalized",
    );
    restart(&mut rig, "web", "finalized");

    // Archived: hidden from the default listing, shown with --all.
    assert_success(&operator(&rig, &["source", "archive", "web"]));
    restart(&mut rig, "web", "archived");
    let listed = operator(&rig, &["status"]);
    assert!(!stdout(&listed).contains("web "), "{}", stdout(&listed));
    let all = operator(&rig, &["status", "--all"]);
    assert!(stdout(&all).contains("archived"), "{}", stdout(&all));

    // Every step, in order, with who asked.
    let steps: Vec<(String, String)> = history(&rig, "web")
        .iter()
        .map(|e| (e.to.clone(), e.by.clone()))
        .collect();
    let expected = [
        ("ready_for_test", "server"),
        ("testing", "alice (admin token)"),
        ("ready_for_cutover", "alice (admin token)"),
        ("cutting_over", "alice (admin token)"),
        ("cut_over", "server"),
        ("finalized", "alice (admin token)"),
        ("archived", "alice (admin token)"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(steps, expected);
    let text = stdout(&operator(&rig, &["source", "history", "web"]));
    assert!(
        text.contains("finalized") && text.contains("alice"),
        "{text}"
    );

    // A forced cutover without a test is allowed and recorded as forced.
    let db = rig.work.path().join("db.raw");
    std::fs::write(&db, mixed_image(2 << 20, 9)).unwrap();
    assert_success(&agent_once(&db, rig.server.addr, "db", &tls, &[]));
    wait_state(&rig, "db", "ready_for_test");
    assert_success(&operator(
        &rig,
        &["cutover", "--source", "db", "--no-wait", "--force"],
    ));
    let last = history(&rig, "db").pop().unwrap();
    assert_eq!(
        (last.to.as_str(), last.forced),
        ("cutting_over", true),
        "{last:?}"
    );
    assert!(last.note.contains("forced"), "{last:?}");
    // Cut over, then reset: back to ready for cutover, replicating again.
    std::fs::write(&db, blockrep_testkit::random_bytes(2 << 20, 10)).unwrap();
    let agent = agent_once(&db, rig.server.addr, "db", &tls, &[]);
    assert_success(&agent);
    assert!(stdout(&agent).contains("cutover"), "{}", stdout(&agent));
    wait_state(&rig, "db", "cut_over");
    assert_success(&operator(&rig, &["cutover", "--source", "db", "--reset"]));
    assert_eq!(state(&rig, "db"), "ready_for_cutover");
    let last = history(&rig, "db").pop().unwrap();
    assert_eq!(
        (last.from.as_str(), last.to.as_str()),
        ("cut_over", "ready_for_cutover")
    );
    let epoch = admin_source(rig.admin(), "db").unwrap().epoch;
    std::fs::write(&db, blockrep_testkit::random_bytes(2 << 20, 11)).unwrap();
    assert_success(&agent_once(&db, rig.server.addr, "db", &tls, &[]));
    assert!(admin_source(rig.admin(), "db").unwrap().epoch > epoch);
    assert_eq!(state(&rig, "db"), "ready_for_cutover");
}

/// Whether the server closed `stream` cleanly (end of stream, not a reset).
fn closed_cleanly(stream: &mut TcpStream) -> bool {
    use std::io::Read;
    let mut byte = [0; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("the connection was not closed cleanly: {e}"),
        }
    }
}

#[test]
fn an_expired_drill_disconnects_its_client_and_its_writes_go_with_it() {
    if !(have_tool("qemu-io") && have_tool("nbdcopy")) {
        return;
    }
    let rig = nbd_rig(&["web"]);
    let (_, snapshot) = synced_web(&rig, 3);
    // Long enough for the writes and the client below on a loaded machine.
    let made = launch_web(&rig, &snapshot, "drill", &["--ttl", "10s", "--json"]);
    assert_success(&made);
    let launch: LaunchView = serde_json::from_str(stdout(&made).lines().next().unwrap()).unwrap();
    let expires = launch.expires_unix_ms.unwrap();
    assert!(expires > launch.created_unix_ms && expires <= launch.created_unix_ms + 11_000);
    // The drill writes blocks of its own.
    let uri = launch.nbd_uri.clone().unwrap();
    let written = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", &uri])
        .output()
        .unwrap();
    assert_success(&written);
    // A client stays attached until the expiry.
    let mut client = TcpStream::connect(rig.server.nbd_addr.unwrap()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert!(greeted(&mut client));
    enter_transmission(&mut client, "drill");
    assert!(
        closed_cleanly(&mut client),
        "the client was not disconnected"
    );
    let gone = wait_until(Duration::from_secs(20), || {
        let (_, body) = admin_request(rig.admin(), "GET", "/v1/launches", None);
        body.trim() == "[]"
    });
    assert!(gone, "the expired launch is still listed");
    assert!(
        rig.server
            .wait_for_log("test launch expired", Duration::from_secs(5))
    );
    let (_, metrics) = admin_request(rig.admin(), "GET", "/metrics", None);
    assert!(
        metrics.contains("blockrep_launches_expired_total 1"),
        "{metrics}"
    );
    // What it wrote (in its overlay, not yet folded) went with it.
    let overlays = rig.work.path().join("data").join("overlays");
    assert!(
        !overlays.join("drill").exists(),
        "the expired drill's overlay is still there"
    );
}

#[test]
fn launch_checks_are_recorded_and_gate_the_cutover() {
    if !have_tool("nbdinfo") {
        return;
    }
    let rig = nbd_rig(&["web"]);
    let (_, snapshot) = synced_web(&rig, 5);
    wait_state(&rig, "web", "ready_for_test");
    let create = |name: &str, check: &str| {
        launch_web(&rig, &snapshot, name, &["--must-succeed", "--check", check])
    };
    // A check that reads the launch through its URL passes, and the test
    // launch's passing checks make the source ready for cutover.
    let size = (4u64 << 20).to_string();
    let good = create(
        "good",
        &format!("test \"$(nbdinfo --size \"$BLOCKREP_NBD_URL\")\" = {size}"),
    );
    assert_success(&good);
    assert!(
        stdout(&good).contains("check cmd1 passed"),
        "{}",
        stdout(&good)
    );
    wait_state(&rig, "web", "ready_for_cutover");
    // A failing must-succeed check fails the command and blocks the cutover.
    let bad = create("bad", "echo the service did not answer; exit 3");
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("did not answer"), "{}", stderr(&bad));
    refused(
        &rig,
        &["cutover", "--source", "web", "--no-wait"],
        "launch bad: cmd1 failed",
    );
    let (_, body) = admin_request(rig.admin(), "GET", "/v1/launches?source=web", None);
    let launches: Vec<LaunchView> = serde_json::from_str(&body).unwrap();
    let bad = launches.iter().find(|l| l.name == "bad").unwrap();
    let check = &bad.checks[0];
    assert_eq!(
        (check.passed, check.exit_code),
        (false, Some(3)),
        "{check:?}"
    );
    assert!(check.output_tail.contains("did not answer"), "{check:?}");
    // Deleting the failed drill does not lift its gate: the failure stands
    // until a later test passes (or a step is forced).
    let (code, body) = admin_request(rig.admin(), "DELETE", "/v1/launches/bad", None);
    assert_eq!(code, 200, "{body}");
    refused(
        &rig,
        &["cutover", "--source", "web", "--no-wait"],
        "launch bad (deleted): cmd1 failed",
    );
    assert_success(&create("good-again", "true"));
    assert_success(&operator(
        &rig,
        &["cutover", "--source", "web", "--no-wait"],
    ));
    assert_eq!(state(&rig, "web"), "cutting_over");
    // A retried request changes nothing.
    let steps = history(&rig, "web").len();
    assert_success(&operator(
        &rig,
        &["cutover", "--source", "web", "--no-wait"],
    ));
    assert_eq!(history(&rig, "web").len(), steps);
    assert_eq!(state(&rig, "web"), "cutting_over");
    let (_, metrics) = admin_request(rig.admin(), "GET", "/metrics", None);
    assert!(
        metrics.contains("blockrep_launch_checks_failed_total 1")
            && metrics.contains(
                "blockrep_source_migration_state{source=\"web\",state=\"cutting_over\"} 1"
            ),
        "{metrics}"
    );
    // A check is killed at its time-out with all it started, and one that
    // leaves a process behind does not hold the run.
    let started = std::time::Instant::now();
    let slow = launch_web(
        &rig,
        &snapshot,
        "slow",
        &["--check", "sleep 60", "--check-timeout", "1s"],
    );
    assert!(!slow.status.success());
    assert!(stderr(&slow).contains("killed after"), "{}", stderr(&slow));
    let left = launch_web(
        &rig,
        &snapshot,
        "left",
        &["--check", "sleep 60 & echo started"],
    );
    assert_success(&left);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// The launch `name` as the API lists it.
fn launch_view(rig: &AgentRig, name: &str) -> LaunchView {
    let (_, body) = admin_request(rig.admin(), "GET", "/v1/launches", None);
    let launches: Vec<LaunchView> = serde_json::from_str(&body).unwrap();
    launches.into_iter().find(|l| l.name == name).unwrap()
}

/// The bytes of the export at `uri`, read by nbdcopy.
fn read_export(rig: &AgentRig, uri: &str, file: &str) -> Vec<u8> {
    let out = rig.work.path().join(file);
    let copied = std::process::Command::new("nbdcopy")
        .args([uri, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&copied);
    std::fs::read(out).unwrap()
}

#[test]
fn a_warm_standby_follows_until_it_is_written() {
    if !(have_tool("qemu-io") && have_tool("nbdcopy")) {
        return;
    }
    let rig = nbd_rig(&["web"]);
    let tls = rig.pki.path().to_owned();
    let (disk, snapshot) = synced_web(&rig, 11);
    let made = launch_web(
        &rig,
        &snapshot,
        "standby",
        &["--kind", "standby", "--follow"],
    );
    assert_success(&made);
    let uri = launch_view(&rig, "standby").nbd_uri.unwrap();
    // Three more commits: the standby reads as the newest each time.
    for seed in 12..15 {
        std::fs::write(&disk, mixed_image(4 << 20, seed)).unwrap();
        assert_success(&agent_once(&disk, rig.server.addr, "web", &tls, &[]));
        let epoch = admin_source(rig.admin(), "web").unwrap().epoch;
        let moved = wait_until(Duration::from_secs(20), || {
            launch_view(&rig, "standby").followed_epoch == Some(epoch)
        });
        assert!(moved, "the standby did not follow epoch {epoch}");
        let head = rig.work.path().join(format!("head-{seed}.raw"));
        assert_success(&export(&rig.work.path().join("data"), "web", &head));
        assert!(
            read_export(&rig, &uri, "standby.raw") == std::fs::read(&head).unwrap(),
            "the standby differs from the head at epoch {epoch}"
        );
    }
    // A failover writes it: from then on it keeps its own data.
    let before = read_export(&rig, &uri, "before-write.raw");
    let written = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 64k",
            "-c",
            "flush",
            &uri,
        ])
        .output()
        .unwrap();
    assert_success(&written);
    // From the moment its write is flushed, it says it no longer follows.
    assert!(!launch_view(&rig, "standby").following);
    std::fs::write(&disk, mixed_image(4 << 20, 20)).unwrap();
    assert_success(&agent_once(&disk, rig.server.addr, "web", &tls, &[]));
    let stopped = wait_until(Duration::from_secs(20), || {
        !launch_view(&rig, "standby").following
    });
    assert!(stopped, "the written standby still follows");
    assert!(
        rig.server
            .wait_for_log("it stops following", Duration::from_secs(5))
    );
    let after = read_export(&rig, &uri, "after-write.raw");
    assert!(
        after[..65_536].iter().all(|&b| b == 0x77),
        "the write is gone"
    );
    assert!(
        after[65_536..] == before[65_536..],
        "the written standby moved"
    );
}

#[test]
fn a_silent_agent_shows_its_source_disconnected_until_it_is_back() {
    let rig = rig(&["web"], &["--retention", "off", "--stall-after", "1s"]);
    let tls = rig.pki.path().to_owned();
    let disk = rig.work.path().join("web.raw");
    std::fs::write(&disk, mixed_image(1 << 20, 4)).unwrap();
    assert_success(&agent_once(&disk, rig.server.addr, "web", &tls, &[]));
    let gone = wait_until(Duration::from_secs(10), || {
        state(&rig, "web") == "disconnected"
    });
    assert!(gone, "web is {}", state(&rig, "web"));
    let (_, body) = admin_request(rig.admin(), "GET", "/v1/sources/web", None);
    let view: blockrep_server::SourceView = serde_json::from_str(&body).unwrap();
    assert_eq!(view.migration_recorded, "ready_for_test");
    let (_, metrics) = admin_request(rig.admin(), "GET", "/metrics", None);
    assert!(
        metrics
            .contains("blockrep_source_migration_state{source=\"web\",state=\"disconnected\"} 1"),
        "{metrics}"
    );
    // The agent is back: the recorded state shows again.
    let mut agent = blockrep_testkit::AgentProcess::start(
        &bin(),
        &disk,
        rig.server.addr,
        "web",
        &tls,
        &["--interval", "200ms"],
    );
    let back = wait_until(Duration::from_secs(10), || {
        state(&rig, "web") == "ready_for_test"
    });
    agent.stop();
    assert!(back, "web is {}", state(&rig, "web"));
}

#[test]
fn the_servers_default_ttl_expires_a_test_launch_made_without_one() {
    let rig = rig(
        &["web"],
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--retention",
            "off",
            "--test-launch-ttl",
            "5s",
        ],
    );
    let (_, snapshot) = synced_web(&rig, 6);
    assert_success(&launch_web(&rig, &snapshot, "drill", &[]));
    let drill = launch_view(&rig, "drill");
    let expires = drill.expires_unix_ms.expect("the server's TTL applies");
    assert!(expires > drill.created_unix_ms && expires <= drill.created_unix_ms + 6_000);
    let gone = wait_until(Duration::from_secs(20), || {
        let (_, body) = admin_request(rig.admin(), "GET", "/v1/launches", None);
        body.trim() == "[]"
    });
    assert!(gone, "the test launch outlived the server's TTL");
}

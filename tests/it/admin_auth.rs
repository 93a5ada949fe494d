//! The plain-HTTP admin API, attacked with curl as a browser page, a DNS
//! rebinding page and a local user would: every state change needs the admin
//! token, a same-origin `Host`/`Origin` and a JSON content type; unknown
//! sources are 404 and never created; `/metrics` and `/health` stay open.
//!
//! | attack | answer | what did not happen |
//! |---|---|---|
//! | browser `POST .../cutover` with a foreign `Origin` | 403 | no cutover requested |
//! | rebinding name in `Host` | 421 | nothing read, no cutover |
//! | no token / wrong token | 401 | no cutover, no list |
//! | form-encoded `POST` (a browser's simple request) | 415 | no cutover, no snapshot |
//! | `POST /v1/sources/ghost-1/reset` | 404 | no `ghost-1` in the API or on disk |
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::common::*;
use blockrep_testkit::{Pki, ServerProcess, mixed_image};

const MIB: usize = 1 << 20;

/// `blockrep server` on 127.0.0.1:0 with the admin API on `admin_listen`,
/// the token taken from `tls` whatever the environment says.
fn server_command(admin_listen: &str, data: &Path, tls: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            admin_listen,
        ])
        .args(extra)
        .arg("--data")
        .arg(data)
        .arg("--tls-dir")
        .arg(tls)
        .env_remove("BLOCKREP_ADMIN_TOKEN_FILE");
    command
}

/// A server whose source `b` has one committed epoch; `None` (the test
/// skips) where curl is missing.
fn fixture() -> Option<AgentRig> {
    if !have_curl() {
        return None;
    }
    let rig = rig(&["b"], &["--retention", "off"]);
    let disk = rig.disk("disk.raw", &mixed_image(2 * MIB, 7));
    assert_success(&rig.agent_once(&disk, "b", &[]));
    Some(rig)
}

fn token(f: &AgentRig) -> String {
    std::fs::read_to_string(f.pki.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The `Authorization` header that carries the server's admin token.
fn auth(f: &AgentRig) -> String {
    bearer(&token(f))
}

fn admin_url(f: &AgentRig, path: &str) -> String {
    format!("http://{}{path}", f.admin())
}

/// A JSON `POST` of `url` with the admin token and `header`, by curl.
fn post_json(f: &AgentRig, header: &str, url: &str) -> (u16, String) {
    curl(&[
        "-X",
        "POST",
        "-H",
        &auth(f),
        "-H",
        "Content-Type: application/json",
        "-H",
        header,
        // A forced cutover: these sources never ran a test launch.
        "-d",
        r#"{"force":true}"#,
        url,
    ])
}

/// `POST /v1/snapshots` of `body` as `content_type` with the admin token, by
/// curl.
fn post_snapshot(f: &AgentRig, content_type: &str, body: &str) -> (u16, String) {
    curl(&[
        "-H",
        &auth(f),
        "-H",
        content_type,
        "-d",
        body,
        &admin_url(f, "/v1/snapshots"),
    ])
}

/// Whether the server has been asked to cut `b` over.
fn cutover_requested(f: &AgentRig) -> bool {
    admin_source(f.admin(), "b").unwrap().cutover_requested
}

/// Runs curl with `args`; returns the HTTP status and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = stdout(&output);
    let (body, code) = text.rsplit_once('\n').unwrap();
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl {args:?}: {text:?} {}", stderr(&output)));
    (code, body.to_owned())
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// The tests need curl; CI (BLOCKREP_REQUIRE_TOOLS) fails rather than skips.
fn have_curl() -> bool {
    have_tool("curl")
}

#[test]
fn a_foreign_origin_cannot_start_a_cutover() {
    let Some(f) = fixture() else { return };
    let url = admin_url(&f, "/v1/sources/b/cutover");
    // What a page on another site sends: a simple form POST, no token.
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Origin: http://evil.example",
        "-d",
        "x=1",
        &url,
    ]);
    assert_eq!(code, 403, "{body}");
    // Even with everything else right, a foreign origin is refused.
    for origin in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        let (code, body) = post_json(&f, &format!("Origin: {origin}"), &url);
        assert_eq!(code, 403, "{origin}: {body}");
    }
    let (code, body) = post_json(&f, "Sec-Fetch-Site: cross-site", &url);
    assert_eq!(code, 403, "{body}");
    assert!(
        !cutover_requested(&f),
        "a refused request started a cutover"
    );
    let (_, metrics) = curl(&[&admin_url(&f, "/metrics")]);
    assert!(
        metrics.contains(r#"blockrep_admin_requests_refused_total{reason="foreign_origin"} 5"#),
        "{metrics}"
    );
    // The same request from the API's own origin goes through.
    let own = format!("Origin: http://{}", f.admin());
    let (code, body) = post_json(&f, &own, &url);
    assert_eq!(code, 202, "{body}");
    assert!(cutover_requested(&f));
}

#[test]
fn a_rebinding_host_is_refused_before_anything_runs() {
    let Some(f) = fixture() else { return };
    let port = f.admin().port();
    let evil = format!("Host: evil.example:{port}");
    let (code, body) = curl(&["-H", &evil, "-H", &auth(&f), &admin_url(&f, "/v1/sources")]);
    assert_eq!(code, 421, "{body}");
    assert!(!body.contains("\"b\""), "{body}");
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &evil,
        "-H",
        &auth(&f),
        "-H",
        "Content-Type: application/json",
        &admin_url(&f, "/v1/sources/b/cutover"),
    ]);
    assert_eq!(code, 421, "{body}");
    assert!(
        !cutover_requested(&f),
        "a rebinding request started a cutover"
    );
    // The open endpoints are not open to a rebinding page either.
    let (code, _) = curl(&["-H", &evil, &admin_url(&f, "/metrics")]);
    assert_eq!(code, 421);
    // The names the API answers to: its address, localhost, --admin-host.
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let (code, body) = curl(&[
            "-H",
            &format!("Host: {host}"),
            "-H",
            &auth(&f),
            &admin_url(&f, "/v1/sources"),
        ]);
        assert_eq!(code, 200, "{host}: {body}");
    }
    let named = ServerProcess::start_with(
        &bin(),
        &f.work.path().join("data2"),
        f.pki.path(),
        &["--retention", "off", "--admin-host", "Replica.Example"],
    );
    let url = format!("http://{}/v1/sources", named.admin_addr.unwrap());
    let (code, body) = curl(&["-H", "Host: replica.example:7444", "-H", &auth(&f), &url]);
    assert_eq!(code, 200, "{body}");
    let (code, _) = curl(&["-H", "Host: other.example", "-H", &auth(&f), &url]);
    assert_eq!(code, 421);
}

#[test]
fn state_changes_and_lists_need_the_admin_token() {
    let Some(f) = fixture() else { return };
    let url = admin_url(&f, "/v1/sources/b/cutover");
    let json = "Content-Type: application/json";
    let (code, body) = curl(&["-X", "POST", "-H", json, &url]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("admin token"), "{body}");
    let wrong = bearer(&"0".repeat(64));
    let (code, body) = curl(&["-X", "POST", "-H", json, "-H", &wrong, &url]);
    assert_eq!(code, 401, "{body}");
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-H",
        "Authorization: Basic Yjpi",
        &url,
    ]);
    assert_eq!(code, 401);
    assert!(
        !cutover_requested(&f),
        "a request without the token started a cutover"
    );
    // Lists show root ids: they need the token too.
    for path in [
        "/v1/sources",
        "/v1/sources/b",
        "/v1/snapshots",
        "/v1/launches",
    ] {
        let (code, body) = curl(&[&admin_url(&f, path)]);
        assert_eq!(code, 401, "{path}: {body}");
        assert!(!body.contains("root"), "{path}: {body}");
    }
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-H",
        "Authorization: bearer not-the-token",
        &admin_url(&f, "/v1/snapshots"),
        "-d",
        r#"{"source":"b","name":"nope"}"#,
    ]);
    assert_eq!(code, 401, "{body}");
    assert!(!f.work.path().join("data/sources/b/snapshots/nope").exists());
    let (_, metrics) = curl(&[&admin_url(&f, "/metrics")]);
    assert!(
        metrics.contains(r#"blockrep_admin_requests_refused_total{reason="wrong_token"} 2"#)
            && metrics.contains(r#"blockrep_admin_requests_refused_total{reason="no_token"} 6"#),
        "{metrics}"
    );
    // With the token it works.
    let force = r#"{"force":true}"#;
    let (code, body) = curl(&["-X", "POST", "-H", json, "-H", &auth(&f), "-d", force, &url]);
    assert_eq!(code, 202, "{body}");
    assert!(cutover_requested(&f));
}

#[test]
fn a_form_encoded_state_change_is_refused() {
    let Some(f) = fixture() else { return };
    // curl -d sends application/x-www-form-urlencoded, as an HTML form does.
    let (code, body) = curl(&[
        "-H",
        &auth(&f),
        "-d",
        "go=1",
        &admin_url(&f, "/v1/sources/b/cutover"),
    ]);
    assert_eq!(code, 415, "{body}");
    assert!(!cutover_requested(&f), "a form POST started a cutover");
    let (code, body) = post_snapshot(
        &f,
        "Content-Type: text/plain",
        r#"{"source":"b","name":"plain"}"#,
    );
    assert_eq!(code, 415, "{body}");
    assert!(
        !f.work
            .path()
            .join("data/sources/b/snapshots/plain")
            .exists()
    );
    let (code, body) = curl(&["-X", "POST", "-H", &auth(&f), &admin_url(&f, "/v1/gc")]);
    assert_eq!(code, 415, "{body}");
    let (code, body) = post_snapshot(
        &f,
        "Content-Type: application/json; charset=utf-8",
        r#"{"source":"b","name":"json"}"#,
    );
    assert_eq!(code, 201, "{body}");
}

#[test]
fn unknown_sources_are_404_and_never_created() {
    let Some(f) = fixture() else { return };
    let json = "Content-Type: application/json";
    for n in 1..=3 {
        for action in ["reset", "cutover", "failback/complete"] {
            let url = admin_url(&f, &format!("/v1/sources/ghost-{n}/{action}"));
            let (code, body) = curl(&["-X", "POST", "-H", json, "-H", &auth(&f), &url]);
            assert_eq!(code, 404, "{action}: {body}");
        }
    }
    let sources: Vec<String> = admin_sources(f.admin())
        .into_iter()
        .map(|s| s.source)
        .collect();
    assert_eq!(sources, ["b"]);
    let on_disk: Vec<_> = std::fs::read_dir(f.work.path().join("data/sources"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(on_disk, ["b"]);
    // A known source's reset still works.
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        json,
        "-H",
        &auth(&f),
        &admin_url(&f, "/v1/sources/b/reset"),
    ]);
    assert_eq!(code, 200, "{body}");
}

#[test]
fn metrics_and_health_are_open_read_only() {
    let Some(f) = fixture() else { return };
    let (code, body) = curl(&[&admin_url(&f, "/metrics")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("blockrep_connections_total"), "{body}");
    let (code, body) = curl(&[&admin_url(&f, "/health")]);
    assert_eq!(code, 200, "{body}");
    // Open for reading only: anything else there needs the token.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        &admin_url(&f, "/metrics"),
    ]);
    assert_eq!(code, 401);
}

/// This machine's own address on its default route, if it has one that is
/// not loopback (a UDP connect sends nothing; it only picks the route).
fn own_non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.200:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn the_cli_never_sends_the_token_in_clear_off_loopback() {
    let Some(ip) = own_non_loopback_ip() else {
        eprintln!("no non-loopback address on this machine: nothing to refuse");
        return;
    };
    let tls = Pki::new(&[]);
    let token = std::fs::read_to_string(tls.path().join("admin.token")).unwrap();
    // Whatever listens there (a mistyped address, or someone waiting for
    // tokens) records every byte it is sent.
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut bytes = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut bytes);
        bytes
    });
    let out = Command::new(BIN)
        .args(["status", "--admin", &addr.to_string()])
        .env("BLOCKREP_ADMIN_TOKEN_FILE", tls.path().join("admin.token"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to send the admin token"),
        "{}",
        stderr(&out)
    );
    let received = received.join().unwrap();
    assert!(
        !String::from_utf8_lossy(&received).contains(token.trim()),
        "the token crossed the network in clear"
    );
}

#[test]
fn the_cli_finds_the_token_by_itself() {
    let work = tempfile::tempdir().unwrap();
    let run = |args: &[&str], dir: &Path| {
        Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env_remove("BLOCKREP_ADMIN_TOKEN_FILE")
            .output()
            .unwrap()
    };
    // The README's setup: `cert init --dir tls` writes tls/admin.token, 0600.
    assert_success(&run(&["cert", "init", "--dir", "tls"], work.path()));
    let token = work.path().join("tls/admin.token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let tls = work.path().join("tls");
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("data"),
        &tls,
        &["--retention", "off"],
    );
    let admin = server.admin_addr.unwrap().to_string();
    let status = run(&["status", "--admin", &admin], work.path());
    assert_success(&status);
    assert!(
        stdout(&status).contains("no sources yet"),
        "{}",
        stdout(&status)
    );
    let snapshot = run(&["snapshot", "list", "--admin", &admin], work.path());
    assert_success(&snapshot);
    // Elsewhere, without the file, the CLI says what it needs.
    let elsewhere = tempfile::tempdir().unwrap();
    let refused = run(&["status", "--admin", &admin], elsewhere.path());
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--admin-token"),
        "{}",
        stderr(&refused)
    );
    let named = run(
        &[
            "status",
            "--admin",
            &admin,
            "--admin-token",
            token.to_str().unwrap(),
        ],
        elsewhere.path(),
    );
    assert_success(&named);
    let via_env = Command::new(BIN)
        .args(["status", "--admin", &admin])
        .current_dir(elsewhere.path())
        .env("BLOCKREP_ADMIN_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert_success(&via_env);
}

#[test]
fn the_server_makes_a_missing_token_and_refuses_one_others_can_read() {
    let pki = Pki::new(&[]);
    let work = tempfile::tempdir().unwrap();
    let token = pki.path().join("admin.token");
    std::fs::remove_file(&token).unwrap();
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("data"),
        pki.path(),
        &["--retention", "off"],
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the token others could read");
    let (code, body) = admin_request(server.admin_addr.unwrap(), "GET", "/v1/sources", None);
    assert_eq!(code, 200, "{body}");
    drop(server);
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let refused = server_command("127.0.0.1:0", &work.path().join("data"), pki.path(), &[])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("chmod 600"),
        "{}",
        stderr(&refused)
    );
}

/// A plain-HTTP admin API off loopback would send its token across the
/// network in clear: the server refuses to start and says why; over
/// `--admin-tls` the same address is fine.
#[test]
fn a_plain_admin_api_off_loopback_refuses_to_start() {
    let pki = Pki::new(&[]);
    let work = tempfile::tempdir().unwrap();
    let refused = server_command("0.0.0.0:0", &work.path().join("data"), pki.path(), &[])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let text = stderr(&refused);
    assert!(
        text.contains("over plain HTTP") && text.contains("--admin-tls"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    blockrep_pki::issue_admin(pki.path()).unwrap();
    let mut over_tls = server_command(
        "0.0.0.0:0",
        &work.path().join("data"),
        pki.path(),
        &["--admin-tls"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // It gets as far as listening (the refusal above comes before any bind).
    let mut log = std::io::BufReader::new(over_tls.stdout.take().unwrap());
    let mut listening = false;
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut log, &mut line).unwrap_or(0) > 0 {
        if line.contains("listening") {
            listening = true;
            break;
        }
        line.clear();
    }
    over_tls.kill().unwrap();
    over_tls.wait().unwrap();
    assert!(
        listening,
        "the server over --admin-tls did not start: {line}"
    );
}

//! Who may open which launch over NBD (and fail back from it), and what one
//! client may cost: driven as an attacker would, with real clients (nbdinfo,
//! nbdcopy, qemu-io) and the real server binary.
//!
//! With `--nbd-tls` a launch opens only for its own source's certificate and
//! the admin certificate; another source's certificate is told the launch does
//! not exist. Without TLS only a loopback listener is allowed. One address
//! gets a share of the connection slots, and an idle connection is closed.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use blockrep_testkit::{Pki, ServerProcess, mixed_image, random_bytes};

const DISK_BYTES: usize = 4 << 20;

/// Replicates `disk` as `source` and makes the launch `launch` of it.
fn launch_of(server: &ServerProcess, pki: &Pki, disk: &Path, source: &str, launch: &str) {
    assert_success(&agent_once(disk, server.addr, source, pki.path(), &[]));
    let snapshot = create_snapshot(server, source, &format!("{launch}-base"));
    create_launch(server, source, &snapshot.name, launch);
}

/// The `nbds://` URI of `export` on `server` with the certificates in `certs`.
fn tls_uri(server: &ServerProcess, export: &str, certs: &Path) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        server.nbd_addr.unwrap(),
        certs.display()
    )
}

/// qemu-io on `export` at `nbd` over TLS with the certificates in `certs`,
/// running `command`; its output whether it succeeded or not.
fn qemu_io_tls(nbd: SocketAddr, certs: &Path, export: &str, command: &str) -> Output {
    run_output(
        "qemu-io",
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                certs.display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host={},server.port={},export={export},tls-creds=tls0",
                nbd.ip(),
                nbd.port()
            ),
            "-c",
            command,
        ],
    )
}

/// Two sources `a` and `b`, each with one launch (`alpha` and `bravo`), served
/// over NBD with TLS, and client certificate directories for a, b and admin.
struct Fixture {
    work: tempfile::TempDir,
    pki: Pki,
    server: ServerProcess,
    disk_b: PathBuf,
    certs_a: PathBuf,
    certs_b: PathBuf,
    certs_admin: PathBuf,
}

fn two_sources_over_tls() -> Fixture {
    let pki = Pki::new(&["a", "b"]);
    blockrep_pki::issue_admin(pki.path()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("data"),
        pki.path(),
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--nbd-tls",
            "--retention",
            "off",
        ],
    );
    let disk_a = work.path().join("a.raw");
    let disk_b = work.path().join("b.raw");
    std::fs::write(&disk_a, mixed_image(DISK_BYTES, 21)).unwrap();
    std::fs::write(&disk_b, mixed_image(DISK_BYTES, 22)).unwrap();
    launch_of(&server, &pki, &disk_a, "a", "alpha");
    launch_of(&server, &pki, &disk_b, "b", "bravo");
    let certs_a = client_dir(&pki, work.path(), Some("a"));
    let certs_b = client_dir(&pki, work.path(), Some("b"));
    let certs_admin = client_dir(&pki, work.path(), Some("admin"));
    Fixture {
        work,
        pki,
        server,
        disk_b,
        certs_a,
        certs_b,
        certs_admin,
    }
}

fn have_nbd_clients() -> bool {
    have_tool("nbdinfo") && have_tool("nbdcopy")
}

/// Export names in `nbdinfo --list` output.
fn listed(server: &ServerProcess, certs: &Path) -> Vec<String> {
    let text = run_tool("nbdinfo", &["--list", &tls_uri(server, "", certs)]);
    // Lines such as `export="alpha":`.
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export=\""))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_source_certificate_lists_only_its_own_launches() {
    if !have_nbd_clients() {
        return;
    }
    let f = two_sources_over_tls();
    assert_eq!(listed(&f.server, &f.certs_a), ["alpha"]);
    assert_eq!(listed(&f.server, &f.certs_b), ["bravo"]);
    assert_eq!(listed(&f.server, &f.certs_admin), ["alpha", "bravo"]);
}

#[test]
fn a_source_certificate_cannot_read_another_sources_launch() {
    if !have_nbd_clients() {
        return;
    }
    let f = two_sources_over_tls();
    let stolen = f.work.path().join("stolen.raw");
    let copy = run_output(
        "nbdcopy",
        &[
            &tls_uri(&f.server, "bravo", &f.certs_a),
            stolen.to_str().unwrap(),
        ],
    );
    assert!(!copy.status.success(), "a copied b's launch");
    assert!(
        std::fs::read(&stolen).unwrap_or_default() != std::fs::read(&f.disk_b).unwrap(),
        "b's bytes reached a's copy"
    );
    // Refused exactly as a name that exists nowhere (NBD_REP_ERR_UNKNOWN,
    // which libnbd reports as ENOENT): no oracle for names.
    let refused = all_output(&run_output(
        "nbdinfo",
        &[&tls_uri(&f.server, "bravo", &f.certs_a)],
    ));
    let absent = all_output(&run_output(
        "nbdinfo",
        &[&tls_uri(&f.server, "nonexistent", &f.certs_a)],
    ));
    assert!(refused.contains("No such file or directory"), "{refused}");
    assert_eq!(
        refused.replace("bravo", "NAME"),
        absent.replace("nonexistent", "NAME")
    );

    // The owner and the admin read it whole.
    for (who, certs) in [("b", &f.certs_b), ("admin", &f.certs_admin)] {
        let out = f.work.path().join(format!("by-{who}.raw"));
        run_tool(
            "nbdcopy",
            &[&tls_uri(&f.server, "bravo", certs), out.to_str().unwrap()],
        );
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&f.disk_b).unwrap(),
            "{who} read other bytes than b's disk"
        );
    }
}

#[test]
fn failback_from_another_sources_launch_is_told_it_does_not_exist() {
    if !have_nbd_clients() {
        return;
    }
    let f = two_sources_over_tls();
    let before = std::fs::read(&f.disk_b).unwrap();
    let said = |launch: &str| {
        let out = failback_once(&f.disk_b, f.server.addr, "a", launch, f.pki.path(), &[]);
        assert!(!out.status.success(), "a failed back from {launch}");
        all_output(&out).replace(launch, "NAME")
    };
    // b's launch and a name that exists nowhere get the same answer, which
    // names neither b nor its launch.
    let refused = said("bravo");
    assert_eq!(refused, said("nonexistent"));
    assert!(refused.contains("no launch named"), "{refused}");
    assert!(
        !refused.contains("source b") && !refused.contains("belongs"),
        "{refused}"
    );
    assert_eq!(
        std::fs::read(&f.disk_b).unwrap(),
        before,
        "the disk changed"
    );
}

#[test]
fn a_source_certificate_cannot_write_another_sources_launch() {
    if !(have_nbd_clients() && have_tool("qemu-io")) {
        return;
    }
    let f = two_sources_over_tls();
    let junk = f.work.path().join("junk.raw");
    std::fs::write(&junk, random_bytes(DISK_BYTES, 23)).unwrap();
    let write = run_output(
        "nbdcopy",
        &[
            junk.to_str().unwrap(),
            &tls_uri(&f.server, "bravo", &f.certs_a),
        ],
    );
    assert!(
        !write.status.success(),
        "a's nbdcopy into b's launch succeeded"
    );
    let nbd = f.server.nbd_addr.unwrap();
    let qemu = qemu_io_tls(nbd, &f.certs_a, "bravo", "write -P 0xaa 0 65536");
    let text = all_output(&qemu);
    assert!(
        !qemu.status.success() || !text.contains("wrote"),
        "a's qemu-io wrote into b's launch: {text}"
    );

    // b's launch still holds b's disk, byte for byte, as the admin reads it.
    let check = f.work.path().join("bravo-after.raw");
    run_tool(
        "nbdcopy",
        &[
            &tls_uri(&f.server, "bravo", &f.certs_admin),
            check.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&check).unwrap() == std::fs::read(&f.disk_b).unwrap(),
        "b's launch changed"
    );

    // a's own launch takes a's writes (the same qemu-io, its own export).
    let own = qemu_io_tls(nbd, &f.certs_a, "alpha", "write -P 0xaa 0 65536");
    let own_text = all_output(&own);
    assert!(
        own.status.success() && own_text.contains("wrote 65536"),
        "{own_text}"
    );
    run_tool(
        "nbdcopy",
        &[
            junk.to_str().unwrap(),
            &tls_uri(&f.server, "alpha", &f.certs_a),
        ],
    );
    let alpha = f.work.path().join("alpha-after.raw");
    run_tool(
        "nbdcopy",
        &[
            &tls_uri(&f.server, "alpha", &f.certs_admin),
            alpha.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&alpha).unwrap() == std::fs::read(&junk).unwrap(),
        "a's writes to its own launch did not land"
    );
}

#[test]
fn an_nbd_tls_client_without_a_certificate_gets_no_export() {
    if !have_nbd_clients() {
        return;
    }
    let f = two_sources_over_tls();
    let no_cert = client_dir(&f.pki, f.work.path(), None);
    let info = run_output("nbdinfo", &["--list", &tls_uri(&f.server, "", &no_cert)]);
    let text = all_output(&info);
    assert!(
        !info.status.success(),
        "listed without a certificate: {text}"
    );
    assert!(!text.contains("alpha") && !text.contains("bravo"), "{text}");
    let copy = run_output(
        "nbdcopy",
        &[&tls_uri(&f.server, "alpha", &no_cert), "null:"],
    );
    assert!(!copy.status.success(), "copied without a certificate");
    // Plain NBD on a TLS listener gets nothing either.
    let plain = format!("nbd://{}/alpha", f.server.nbd_addr.unwrap());
    assert!(!run_output("nbdinfo", &[&plain]).status.success());
}

/// Starts `blockrep server` with `extra` and waits up to 30 s for it to exit.
/// `None` if it was still running (then it is killed).
fn exit_of_server(pki: &Pki, data: &Path, extra: &[&str]) -> Option<Output> {
    let mut child = Command::new(bin())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data)
        .arg("--tls-dir")
        .arg(pki.path())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn nbd_without_tls_refuses_a_non_loopback_address() {
    let pki = Pki::new(&[]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let output = exit_of_server(&pki, &data, &["--nbd-listen", "0.0.0.0:0"])
        .expect("the server started serving NBD to the network without TLS");
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("without TLS") && text.contains("--nbd-tls"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    // With TLS the same address is fine.
    let server = ServerProcess::start_with(
        &bin(),
        &data,
        pki.path(),
        &["--nbd-listen", "0.0.0.0:0", "--nbd-tls"],
    );
    assert!(server.nbd_addr.is_some());
}

/// A raw NBD client: greeting, fixed newstyle, then `NBD_OPT_EXPORT_NAME`, so
/// the connection sits in transmission. Connects from `from`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads the greeting; `false` if the server closed the connection instead.
pub(crate) fn greeted(stream: &mut TcpStream) -> bool {
    let mut greeting = [0; blockrep_nbd::wire::GREETING_LEN];
    match stream.read_exact(&mut greeting) {
        Ok(()) => {
            assert_eq!(&greeting[..8], b"NBDMAGIC");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("reading the greeting: {e}"),
    }
}

/// From a greeted connection into transmission on `export`.
pub(crate) fn enter_transmission(stream: &mut TcpStream, export: &str) {
    use blockrep_nbd::wire;
    let flags = wire::CLIENT_FLAG_FIXED_NEWSTYLE | wire::CLIENT_FLAG_NO_ZEROES;
    let mut out = flags.to_be_bytes().to_vec();
    out.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    stream.write_all(&out).unwrap();
    // Size and transmission flags; no padding, since NO_ZEROES was asked.
    let mut reply = [0; 10];
    stream.read_exact(&mut reply).unwrap();
}

/// Whether the server has closed `stream` (EOF or reset) within its read timeout.
fn closed(stream: &mut TcpStream) -> bool {
    use std::io::ErrorKind;
    let mut byte = [0; 1];
    loop {
        return match stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            // A signal to the test process (children exiting) is not the server.
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // The read time-out ran out: still open.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            // Reset or aborted by the server: closed all the same.
            Err(_) => true,
        };
    }
}

/// A plain NBD server on loopback with one launch, `web`, and `extra` flags.
fn plain_server_with_launch(work: &Path, pki: &Pki, extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--nbd-listen", "127.0.0.1:0", "--retention", "off"];
    args.extend_from_slice(extra);
    let server = ServerProcess::start_with(&bin(), &work.join("data"), pki.path(), &args);
    let disk = work.join("web.raw");
    std::fs::write(&disk, mixed_image(1 << 20, 31)).unwrap();
    launch_of(&server, pki, &disk, "web", "web");
    server
}

#[test]
fn one_address_cannot_hold_every_nbd_slot() {
    if !have_tool("nbdinfo") {
        return;
    }
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let server = plain_server_with_launch(
        work.path(),
        &pki,
        &[
            "--nbd-connections-max",
            "6",
            "--nbd-connections-per-address",
            "3",
        ],
    );
    let nbd = server.nbd_addr.unwrap();
    // 127.0.0.2 takes its whole share and keeps it (in transmission, so no
    // handshake time-out frees it).
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = connect_from("127.0.0.2", nbd);
            assert!(greeted(&mut stream));
            enter_transmission(&mut stream, "web");
            stream
        })
        .collect();
    let mut over = connect_from("127.0.0.2", nbd);
    assert!(
        !greeted(&mut over),
        "a fourth connection from one address was served"
    );
    // Another address still gets in, with a real client.
    let info = run_tool("nbdinfo", &["--size", &format!("nbd://{nbd}/web")]);
    assert_eq!(info.trim(), (1u64 << 20).to_string());
    // A freed slot is the address's again.
    held.pop();
    let mut again = connect_from("127.0.0.2", nbd);
    let served = wait_until(Duration::from_secs(10), || {
        greeted(&mut again) || {
            again = connect_from("127.0.0.2", nbd);
            false
        }
    });
    assert!(served, "the address did not get its freed slot back");
}

#[test]
fn an_idle_nbd_connection_is_closed() {
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let server = plain_server_with_launch(work.path(), &pki, &["--nbd-idle-timeout", "1s"]);
    let mut stream = connect_from("127.0.0.1", server.nbd_addr.unwrap());
    assert!(greeted(&mut stream));
    // Timed from before the option is sent: the server's idle clock starts
    // only after it has answered, so this lower bound holds however late the
    // answer is read.
    let started = Instant::now();
    enter_transmission(&mut stream, "web");
    assert!(closed(&mut stream), "the idle connection was not closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(15),
        "closed after {waited:?}; server log:\n{}",
        server.log.lock().unwrap()
    );
}

/// A connection opened before its certificate was revoked loses its export
/// when the server reloads the list: qemu-io's next read fails, with no
/// restart and without waiting for the connection to close.
#[test]
fn a_revoked_certificate_loses_its_open_nbd_connection() {
    if !(have_nbd_clients() && have_tool("qemu-io")) {
        return;
    }
    let pki = Pki::new(&["a", "spare"]);
    // A list in force from the start (it revokes a certificate nobody uses).
    blockrep_pki::revoke_cert(pki.path(), &pki.cert("spare")).unwrap();
    let crl = pki.path().join("crl.pem");
    let AgentRig {
        pki, work, server, ..
    } = rig_with(
        pki,
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--nbd-tls",
            "--crl",
            crl.to_str().unwrap(),
            "--crl-poll-interval",
            "1h",
            "--retention",
            "off",
        ],
    );
    let disk = work.path().join("a.raw");
    std::fs::write(&disk, mixed_image(DISK_BYTES, 31)).unwrap();
    launch_of(&server, &pki, &disk, "a", "alpha");
    let certs_a = client_dir(&pki, work.path(), Some("a"));
    let nbd = server.nbd_addr.unwrap();
    // Line-buffered, so that the first read's result can be seen while
    // qemu-io still runs.
    let mut qemu = Command::new("stdbuf")
        .args([
            "-oL",
            "qemu-io",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                certs_a.display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host={},server.port={},export=alpha,tls-creds=tls0",
                nbd.ip(),
                nbd.port()
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = qemu.stdin.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (mut out, seen) = (qemu.stdout.take().unwrap(), std::sync::Arc::clone(&seen));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    input.write_all(b"read 0 4096\n").unwrap();
    input.flush().unwrap();
    // The first read completes on the open connection before the revocation.
    assert!(
        wait_until(Duration::from_secs(30), || seen
            .lock()
            .unwrap()
            .contains("read 4096/4096 bytes")),
        "the first read did not complete: {}",
        seen.lock().unwrap()
    );
    blockrep_pki::revoke_cert(pki.path(), &pki.cert("a")).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(
        server.wait_for_log("revocation list reloaded", Duration::from_secs(10)),
        "the server did not reload the list: {}",
        server.log()
    );
    input.write_all(b"read 0 4096\nquit\n").unwrap();
    drop(input);
    let output = qemu.wait_with_output().unwrap();
    reader.join().unwrap();
    let text = format!("{}{}", seen.lock().unwrap(), all_output(&output));
    assert_eq!(
        text.matches("read 4096/4096 bytes").count(),
        1,
        "the read before the revocation must succeed and the one after it fail: {text}"
    );
    assert!(text.contains("failed"), "{text}");
}

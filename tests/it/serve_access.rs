//! Who may open the disk an agent serves to its workload over TLS (`agent
//! --serve HOST:PORT --serve-tls`): the source's own certificate and the
//! admin's read it; another source's certificate from the same CA is told
//! there is no such export and lists none; a revoked certificate of the
//! source itself (`--serve-crl`) does not finish its handshake, whether the
//! list revoked it before the agent started or while it serves. Driven with
//! nbdinfo and nbdcopy against the real binaries.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use blockrep_testkit::{Pki, ServerProcess, random_bytes};

/// Copies the certificate of `source` to `stem` and issues the source a new
/// one: an earlier certificate of the same source, to revoke.
fn keep_aside_and_reissue(pki: &Pki, source: &blockrep_core::SourceId, stem: &str) {
    std::fs::copy(pki.cert(source.as_str()), pki.cert(stem)).unwrap();
    std::fs::copy(pki.key(source.as_str()), pki.key(stem)).unwrap();
    blockrep_pki::issue_source(pki.path(), source).unwrap();
}

/// The address in the agent's "serving the disk over NBD address=..." line.
fn served_address(stderr: &str) -> Option<String> {
    let line = stderr
        .lines()
        .find(|line| line.contains("serving the disk over NBD"))?;
    let rest = line.split("address=").nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

#[test]
fn only_the_sources_own_and_the_admin_certificate_open_the_served_disk() {
    if !(have_tool("nbdinfo") && have_tool("nbdcopy")) {
        return;
    }
    let pki = Pki::new(&["db", "other"]);
    blockrep_pki::issue_admin(pki.path()).unwrap();
    // An earlier certificate of db itself, kept aside and then revoked: only
    // the list can refuse it, as it names the right source.
    let source = blockrep_core::SourceId::new("db").unwrap();
    keep_aside_and_reissue(&pki, &source, "db-old");
    blockrep_pki::revoke_cert(pki.path(), &pki.cert("db-old")).unwrap();
    // And one of db revoked only while the agent serves.
    keep_aside_and_reissue(&pki, &source, "db-later");
    // The agent serves with a server certificate for the address its clients
    // dial (a loopback address that is not the replication server's, whose
    // names a serving certificate may not take): its own client certificate
    // names a source and nothing else.
    blockrep_pki::issue_serve(pki.path(), &source, &["127.0.0.2".into()]).unwrap();
    let work = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with(
        &bin(),
        &work.path().join("data"),
        pki.path(),
        &["--retention", "off"],
    );
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(4 << 20, 31)).unwrap();
    let crl = pki.path().join(blockrep_pki::CRL_FILE_NAME);
    let agent = spawn_agent(
        &disk,
        server.addr,
        "db",
        pki.path(),
        &[
            "--serve",
            "127.0.0.2:0",
            "--serve-tls",
            "--serve-crl",
            crl.to_str().unwrap(),
            "--interval",
            "200ms",
            "--chunk-size",
            "64KiB",
        ],
    );
    let mut address = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            address = served_address(&agent.stderr.lock().unwrap());
            address.is_some()
        }),
        "the agent does not serve: {}",
        agent.stderr.lock().unwrap()
    );
    let address = address.unwrap();
    let uri = |certs: &Path, export: &str| {
        format!(
            "nbds://{address}/{export}?tls-certificates={}",
            certs.display()
        )
    };
    let original = std::fs::read(&disk).unwrap();

    // The source's own certificate and the admin's read the disk whole.
    for who in ["db", "admin"] {
        let certs = client_dir(&pki, work.path(), Some(who));
        let copy = work.path().join(format!("by-{who}.raw"));
        let out = run_output("nbdcopy", &[&uri(&certs, "db"), copy.to_str().unwrap()]);
        assert!(out.status.success(), "{who}: {out:?}");
        assert!(
            std::fs::read(&copy).unwrap() == original,
            "{who} read other bytes"
        );
        let listed = run_output("nbdinfo", &["--list", &uri(&certs, "")]);
        assert!(
            String::from_utf8_lossy(&listed.stdout).contains("export=\"db\""),
            "{listed:?}"
        );
    }

    // Another source's certificate, from the same CA: no export by name or
    // by default, none listed, and not a byte of the disk.
    let certs = client_dir(&pki, work.path(), Some("other"));
    for export in ["db", ""] {
        let stolen = work.path().join("stolen.raw");
        let out = run_output("nbdcopy", &[&uri(&certs, export), stolen.to_str().unwrap()]);
        assert!(
            !out.status.success(),
            "another source copied the disk ({export:?})"
        );
        assert!(std::fs::read(&stolen).unwrap_or_default() != original);
    }
    let info = run_output("nbdinfo", &[&uri(&certs, "db")]);
    let said = all_output(&info);
    assert!(
        !info.status.success() && said.contains("No such file or directory"),
        "{said}"
    );
    let listed = run_output("nbdinfo", &["--list", &uri(&certs, "")]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("export="),
        "{listed:?}"
    );
    assert!(
        agent
            .stderr
            .lock()
            .unwrap()
            .contains("another source's certificate"),
        "the refusal is not logged"
    );

    // A revoked certificate of the source itself does not finish its
    // handshake: refused by the list, not told the export is missing.
    let certs = client_dir(&pki, work.path(), Some("db-old"));
    let out = run_output("nbdinfo", &[&uri(&certs, "db")]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !said.contains("No such file or directory"),
        "a revoked certificate opened the disk, or was refused by name: {said}"
    );
    // Revoked while the agent serves: the changed list applies to the next
    // connection, without a restart.
    let certs = client_dir(&pki, work.path(), Some("db-later"));
    let opens = || {
        run_output("nbdinfo", &[&uri(&certs, "db")])
            .status
            .success()
    };
    assert!(opens(), "a valid certificate of db was refused");
    blockrep_pki::revoke_cert(pki.path(), &pki.cert("db-later")).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !opens()),
        "a certificate revoked while serving still opens the disk: {}",
        agent.stderr.lock().unwrap()
    );
    drop(agent);

    // A source with no serving certificate is told how to get one, before
    // anything is served.
    let (d, t) = (disk.to_str().unwrap(), pki.path().to_str().unwrap());
    let addr = server.addr.to_string();
    let mut args = vec!["agent"];
    args.extend(agent_args(d, &addr, "other", t));
    args.extend(["--serve", "127.0.0.1:0", "--serve-tls"]);
    let out = Command::new(bin()).args(&args).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("--serve-name"),
        "{said}"
    );
}

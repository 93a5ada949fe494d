//! Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-img, qemu-io) against the
//! server over a file-backed export on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use blockrep_nbd::{Limits, NbdServer};
use common::{MapRegistry, TestServer, Tls, file_export, image, pattern, run, run_ok, tool};

/// An odd size (not a power of two, not a multiple of 64 KiB) so that the
/// clients' tail handling is exercised.
const DISK_BYTES: usize = 3 * 1024 * 1024 + 4096 + 512;

fn serve_one(path: &std::path::Path, read_only: bool) -> TestServer {
    let registry = MapRegistry::default().with("disk", "test disk", file_export(path, read_only));
    TestServer::with_registry(registry, Limits::default())
}

#[test]
fn nbdinfo_reports_size_flags_and_block_sizes() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let (_dir, path) = image(&pattern(DISK_BYTES, 1));
    let server = serve_one(&path, false);

    let size = run_ok(&nbdinfo, &["--size", &server.uri("disk")]);
    assert_eq!(size.trim(), DISK_BYTES.to_string());

    let details = run_ok(&nbdinfo, &[&server.uri("disk")]);
    assert!(
        details.contains(&format!("export-size: {DISK_BYTES}")),
        "{details}"
    );
    assert!(details.contains("is_read_only: false"), "{details}");
    assert!(details.contains("can_flush: true"), "{details}");
    assert!(details.contains("can_fua: true"), "{details}");
    assert!(details.contains("can_multi_conn: true"), "{details}");
    assert!(
        details.contains("block_size_maximum: 33554432"),
        "{details}"
    );
}

#[test]
fn nbdinfo_sees_a_read_only_export_as_read_only() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let (_dir, path) = image(&pattern(DISK_BYTES, 2));
    let server = serve_one(&path, true);
    let details = run_ok(&nbdinfo, &[&server.uri("disk")]);
    assert!(details.contains("is_read_only: true"), "{details}");
    assert!(details.contains("can_trim: false"), "{details}");
}

#[test]
fn nbdinfo_list_names_every_export() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let (_dir_a, path_a) = image(&pattern(64 * 1024, 3));
    let (_dir_b, path_b) = image(&pattern(128 * 1024, 4));
    let registry = MapRegistry::default()
        .with("alpha", "first launch", file_export(&path_a, true))
        .with("beta", "second launch", file_export(&path_b, false));
    let server = TestServer::with_registry(registry, Limits::default());
    let list = run_ok(&nbdinfo, &["--list", &format!("nbd://{}", server.addr)]);
    assert!(list.contains("export=\"alpha\""), "{list}");
    assert!(list.contains("export=\"beta\""), "{list}");
    assert!(list.contains("second launch"), "{list}");
    // --list also asks each export for its details with NBD_OPT_INFO.
    assert!(list.contains("export-size: 131072"), "{list}");
}

#[test]
fn nbdcopy_out_of_the_export_is_byte_identical() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    let bytes = pattern(DISK_BYTES, 5);
    let (dir, path) = image(&bytes);
    let server = serve_one(&path, true);
    let out = dir.path().join("out.raw");
    run_ok(&nbdcopy, &[&server.uri("disk"), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == bytes, "copy differs");
}

#[test]
fn nbdcopy_into_the_export_stores_every_byte() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    let (dir, path) = image(&pattern(DISK_BYTES, 6));
    // Zeroed runs let nbdcopy use WRITE_ZEROES (or TRIM) as well as WRITE.
    let mut source_bytes = pattern(DISK_BYTES, 7);
    source_bytes[..256 * 1024].fill(0);
    source_bytes[1024 * 1024..2 * 1024 * 1024].fill(0);
    let source = dir.path().join("source.raw");
    std::fs::write(&source, &source_bytes).unwrap();
    let server = serve_one(&path, false);
    run_ok(&nbdcopy, &[source.to_str().unwrap(), &server.uri("disk")]);
    assert!(
        std::fs::read(&path).unwrap() == source_bytes,
        "backing file differs"
    );
}

#[test]
fn qemu_img_compare_says_identical_and_spots_a_difference() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let bytes = pattern(DISK_BYTES, 8);
    let (dir, path) = image(&bytes);
    let twin = dir.path().join("twin.raw");
    std::fs::write(&twin, &bytes).unwrap();
    let server = serve_one(&path, true);
    let uri = server.uri("disk");
    let twin = twin.to_str().unwrap();
    let same = run_ok(
        &qemu_img,
        &["compare", "-f", "raw", "-F", "raw", &uri, twin],
    );
    assert!(same.contains("Images are identical"), "{same}");

    let mut changed = bytes;
    changed[DISK_BYTES - 1] ^= 0xff;
    std::fs::write(twin, &changed).unwrap();
    let differ = run(
        &qemu_img,
        &["compare", "-f", "raw", "-F", "raw", &uri, twin],
    );
    assert_eq!(differ.status.code(), Some(1), "{differ:?}");
}

#[test]
fn qemu_io_writes_with_and_without_fua_then_reads_back_after_flush() {
    let Some(qemu_io) = tool("qemu-io") else {
        return;
    };
    let (_dir, path) = image(&pattern(DISK_BYTES, 9));
    let server = serve_one(&path, false);
    let uri = server.uri("disk");
    run_ok(
        &qemu_io,
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 12345 70000",
            "-c",
            "write -f -P 0xcd 200000 4096",
            "-c",
            "flush",
            &uri,
        ],
    );
    let output = run_ok(
        &qemu_io,
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 12345 70000",
            "-c",
            "read -P 0xcd 200000 4096",
            &uri,
        ],
    );
    assert!(!output.contains("Pattern verification failed"), "{output}");

    let backing = std::fs::read(&path).unwrap();
    assert!(backing[12345..12345 + 70000].iter().all(|&b| b == 0xab));
    assert!(backing[200_000..200_000 + 4096].iter().all(|&b| b == 0xcd));
    // The bytes around the writes are untouched.
    let original = pattern(DISK_BYTES, 9);
    assert_eq!(backing[12344], original[12344]);
    assert_eq!(backing[12345 + 70000], original[12345 + 70000]);

    // The verification itself can fail: a wrong pattern is reported.
    let wrong = run(&qemu_io, &["-f", "raw", "-c", "read -P 0xab 0 512", &uri]);
    let text = String::from_utf8_lossy(&wrong.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");
}

#[test]
fn qemu_io_zeroes_and_discards() {
    let Some(qemu_io) = tool("qemu-io") else {
        return;
    };
    let (_dir, path) = image(&pattern(DISK_BYTES, 10));
    let server = serve_one(&path, false);
    run_ok(
        &qemu_io,
        &[
            "-f",
            "raw",
            "-c",
            "write -z 65536 131072",
            "-c",
            "discard 1048576 65536",
            "-c",
            "read -P 0 65536 131072",
            &server.uri("disk"),
        ],
    );
    let backing = std::fs::read(&path).unwrap();
    assert!(backing[65536..65536 + 131_072].iter().all(|&b| b == 0));
}

#[test]
fn qemu_io_cannot_write_a_read_only_export() {
    let Some(qemu_io) = tool("qemu-io") else {
        return;
    };
    let bytes = pattern(DISK_BYTES, 11);
    let (_dir, path) = image(&bytes);
    let server = serve_one(&path, true);
    let output = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 4096",
            &server.uri("disk"),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success() || text.contains("failed"),
        "{text}"
    );
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "read-only export changed"
    );
}

#[test]
fn nbdinfo_over_required_tls_with_certificates() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let tls = Tls::new();
    let (_dir, path) = image(&pattern(DISK_BYTES, 12));
    let registry = MapRegistry::default().with("disk", "", file_export(&path, true));
    let server = NbdServer::new(Arc::new(registry), Limits::default())
        .with_tls(Arc::clone(&tls.config), true);
    let server = TestServer::start(server);

    let details = run_ok(&nbdinfo, &[&tls.uri(server.addr, "disk")]);
    assert!(
        details.contains(&format!("export-size: {DISK_BYTES}")),
        "{details}"
    );
    assert!(details.contains("with TLS"), "{details}");

    // Without TLS the same export is refused.
    let plain = run(&nbdinfo, &[&server.uri("disk")]);
    assert!(!plain.status.success(), "plain connection was served");
}

/// Shows `disk` only to a TLS client whose verified certificate is `owner`,
/// and remembers every client it was asked about.
struct OwnerRegistry {
    owner: rustls::pki_types::CertificateDer<'static>,
    export: Arc<dyn blockrep_nbd::Export>,
    seen: std::sync::Mutex<Vec<blockrep_nbd::Client>>,
}

impl OwnerRegistry {
    fn allowed(&self, client: &blockrep_nbd::Client) -> bool {
        self.seen.lock().unwrap().push(client.clone());
        client.tls() && client.certificates().and_then(|c| c.first()) == Some(&self.owner)
    }
}

impl blockrep_nbd::Registry for OwnerRegistry {
    fn lookup(
        &self,
        client: &blockrep_nbd::Client,
        name: &str,
    ) -> Option<Arc<dyn blockrep_nbd::Export>> {
        (name == "disk" && self.allowed(client)).then(|| Arc::clone(&self.export))
    }
    fn list(&self, client: &blockrep_nbd::Client) -> Vec<(String, String)> {
        if self.allowed(client) {
            vec![("disk".into(), String::new())]
        } else {
            Vec::new()
        }
    }
}

#[test]
fn the_registry_decides_with_the_certificate_each_client_verified() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let tls = Tls::new();
    let (_dir, path) = image(&pattern(DISK_BYTES, 13));
    let registry = Arc::new(OwnerRegistry {
        owner: blockrep_pki::read_certs(&tls.client_cert)
            .unwrap()
            .remove(0),
        export: file_export(&path, true),
        seen: std::sync::Mutex::new(Vec::new()),
    });
    // Offered, not required: a plain client reaches the registry too, without certificates.
    let server = NbdServer::new(Arc::clone(&registry) as _, Limits::default())
        .with_tls(Arc::clone(&tls.config), false);
    let server = TestServer::start(server);

    let plain = run(&nbdinfo, &["--list", &format!("nbd://{}", server.addr)]);
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains("export=\"disk\""),
        "a plain client saw the export"
    );
    let refused = run(&nbdinfo, &[&server.uri("disk")]);
    assert!(
        !refused.status.success(),
        "a plain client opened the export"
    );

    let details = run_ok(&nbdinfo, &[&tls.uri(server.addr, "disk")]);
    assert!(
        details.contains(&format!("export-size: {DISK_BYTES}")),
        "{details}"
    );

    let seen = registry.seen.lock().unwrap();
    assert!(seen.iter().any(|c| !c.tls() && c.certificates().is_none()));
    let verified = seen
        .iter()
        .find(|c| c.tls())
        .expect("a TLS client was seen");
    assert_eq!(verified.certificates().unwrap()[0], registry.owner);
    assert!(verified.addr().unwrap().ip().is_loopback());
}

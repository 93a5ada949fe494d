//! The protocol byte by byte over raw TCP: replies real clients never provoke,
//! malformed input, limits. After every misbehaving client the server must
//! still serve the next one.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_nbd::wire::{self, ClientFlags, Command, InfoRequest, OptionType, Request};
use blockrep_nbd::{Limits, NbdServer};
use common::{MapRegistry, RawClient, TestServer, file_export, image, pattern, request};

const DISK_BYTES: usize = 1024 * 1024;
const REQUEST_BYTES_MAX: u32 = 64 * 1024;

struct Fixture {
    server: TestServer,
    bytes: Vec<u8>,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A server with a writable "disk", a read-only "ro", and small limits.
fn fixture(limits: Limits) -> Fixture {
    let bytes = pattern(DISK_BYTES, 42);
    let (dir, path) = image(&bytes);
    let ro_path = dir.path().join("ro.raw");
    std::fs::write(&ro_path, &bytes).unwrap();
    let registry = MapRegistry::default()
        .with("disk", "writable", file_export(&path, false))
        .with("ro", "read-only", file_export(&ro_path, true));
    Fixture {
        server: TestServer::with_registry(registry, limits),
        bytes,
        path,
        _dir: dir,
    }
}

fn small_limits() -> Limits {
    Limits {
        request_bytes_max: REQUEST_BYTES_MAX,
        ..Limits::default()
    }
}

/// Proves the server is alive and correct: a fresh client reads 4 KiB.
fn assert_serves(addr: SocketAddr, expected: &[u8]) {
    let (mut client, size, _) = RawClient::go(addr, "disk");
    assert_eq!(size, DISK_BYTES as u64);
    client.send_request(&request(Command::Read, 99, 8192, 4096), &[]);
    assert_eq!(client.read_reply(), (0, 99));
    assert!(client.read_vec(4096) == expected[8192..8192 + 4096]);
}

#[test]
fn handshake_announces_fixed_newstyle_and_no_zeroes() {
    let f = fixture(small_limits());
    // RawClient::connect asserts the 18-byte greeting.
    let _client = RawClient::connect(f.server.addr);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let f = fixture(small_limits());
    let mut client = RawClient::connect(f.server.addr);
    client.send(&[0, 0, 0, 0x84]);
    assert!(client.is_closed());
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    client.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert!(client.is_closed());
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn unknown_and_unsupported_options_get_err_unsup_and_negotiation_goes_on() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    for option in [
        OptionType::Other(0x4242),
        OptionType::StructuredReply,
        // NBD_OPT_SET_META_CONTEXT, with some data to be skipped.
        OptionType::Other(10),
    ] {
        client.send_option(option, b"ignored data");
        let (reply, _) = client.read_option_reply(option);
        assert_eq!(reply, wire::REPLY_ERR_UNSUP, "{option:?}");
    }
    client.send_go("disk");
    let (reply, data) = client.read_option_reply(OptionType::Go);
    assert_eq!(reply, wire::REPLY_INFO);
    assert_eq!(&data[..2], &[0, 0], "NBD_INFO_EXPORT comes first");
}

#[test]
fn info_and_go_for_an_unknown_export_get_err_unknown() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    for option in [OptionType::Info, OptionType::Go] {
        let data = wire::encode_info_request(&InfoRequest {
            name: "nope".into(),
            info_types: vec![],
        });
        client.send_option(option, &data);
        let (reply, message) = client.read_option_reply(option);
        assert_eq!(reply, wire::REPLY_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&message).contains("nope"));
    }
}

#[test]
fn info_reports_export_name_and_block_size_then_acks() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    let data = wire::encode_info_request(&InfoRequest {
        name: "ro".into(),
        info_types: vec![wire::INFO_NAME, wire::INFO_BLOCK_SIZE, 0x7777],
    });
    client.send_option(OptionType::Info, &data);
    let mut infos = Vec::new();
    loop {
        let (reply, data) = client.read_option_reply(OptionType::Info);
        if reply == wire::REPLY_ACK {
            break;
        }
        assert_eq!(reply, wire::REPLY_INFO);
        infos.push(data);
    }
    let flags = wire::TRANSMISSION_FLAG_HAS_FLAGS
        | wire::TRANSMISSION_FLAG_READ_ONLY
        | wire::TRANSMISSION_FLAG_SEND_FLUSH
        | wire::TRANSMISSION_FLAG_SEND_FUA
        | wire::TRANSMISSION_FLAG_CAN_MULTI_CONN;
    assert_eq!(
        infos,
        vec![
            wire::encode_info_export(DISK_BYTES as u64, flags).to_vec(),
            wire::encode_info_name("ro"),
            wire::encode_info_block_size(1, 4096, REQUEST_BYTES_MAX).to_vec(),
        ]
    );
    // INFO does not end negotiation: GO still works on the same connection.
    client.send_go("disk");
    let (reply, _) = client.read_option_reply(OptionType::Go);
    assert_eq!(reply, wire::REPLY_INFO);
}

#[test]
fn malformed_option_data_gets_err_invalid() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    // Name length runs past the data.
    client.send_option(OptionType::Go, &[0, 0, 0, 200, b'd']);
    assert_eq!(
        client.read_option_reply(OptionType::Go).0,
        wire::REPLY_ERR_INVALID
    );
    // LIST takes no data.
    client.send_option(OptionType::List, b"x");
    assert_eq!(
        client.read_option_reply(OptionType::List).0,
        wire::REPLY_ERR_INVALID
    );
    // The connection is still usable.
    client.send_option(OptionType::List, &[]);
    let mut names = Vec::new();
    loop {
        let (reply, data) = client.read_option_reply(OptionType::List);
        if reply == wire::REPLY_ACK {
            break;
        }
        assert_eq!(reply, wire::REPLY_SERVER);
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "ro"]);
}

#[test]
fn oversized_option_data_closes_the_connection() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    client.send(&wire::encode_option_header(wire::OptionHeader {
        option: OptionType::Other(0x4242),
        length: u32::MAX,
    }));
    assert!(client.is_closed());
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn too_many_options_close_the_connection() {
    let f = fixture(Limits {
        options_max: 3,
        ..small_limits()
    });
    let mut client = RawClient::negotiating(f.server.addr);
    for _ in 0..3 {
        client.send_option(OptionType::StructuredReply, &[]);
        assert_eq!(
            client.read_option_reply(OptionType::StructuredReply).0,
            wire::REPLY_ERR_UNSUP
        );
    }
    client.send_option(OptionType::StructuredReply, &[]);
    assert!(client.is_closed());
}

#[test]
fn starttls_without_tls_configured_gets_err_policy() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    client.send_option(OptionType::StartTls, &[]);
    assert_eq!(
        client.read_option_reply(OptionType::StartTls).0,
        wire::REPLY_ERR_POLICY
    );
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    client.send_option(OptionType::Abort, &[]);
    assert_eq!(
        client.read_option_reply(OptionType::Abort).0,
        wire::REPLY_ACK
    );
    assert!(client.is_closed());
}

#[test]
fn export_name_replies_with_or_without_zero_padding() {
    let f = fixture(small_limits());
    for no_zeroes in [false, true] {
        let mut client = RawClient::connect(f.server.addr);
        client.send(&wire::encode_client_flags(ClientFlags {
            fixed_newstyle: true,
            no_zeroes,
        }));
        client.send_option(OptionType::ExportName, b"disk");
        let reply = client.read_vec(10);
        assert_eq!(
            u64::from_be_bytes(reply[..8].try_into().unwrap()),
            DISK_BYTES as u64
        );
        if !no_zeroes {
            assert!(client.read_vec(124).iter().all(|&b| b == 0));
        }
        // The next bytes are transmission: a read proves the framing lines up.
        client.send_request(&request(Command::Read, 5, 0, 512), &[]);
        assert_eq!(client.read_reply(), (0, 5));
        assert!(client.read_vec(512) == f.bytes[..512]);
    }
}

#[test]
fn export_name_for_an_unknown_export_closes_the_connection() {
    let f = fixture(small_limits());
    let mut client = RawClient::negotiating(f.server.addr);
    client.send_option(OptionType::ExportName, b"nope");
    assert!(client.is_closed());
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn reads_past_the_end_or_over_the_limit_get_einval_and_the_connection_goes_on() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    let end = DISK_BYTES as u64;
    client.send_request(&request(Command::Read, 1, end - 100, 200), &[]);
    assert_eq!(client.read_reply(), (22, 1));
    client.send_request(&request(Command::Read, 2, u64::MAX - 10, 100), &[]);
    assert_eq!(client.read_reply(), (22, 2));
    client.send_request(&request(Command::Read, 3, 0, REQUEST_BYTES_MAX + 1), &[]);
    assert_eq!(client.read_reply(), (22, 3));
    // No payload followed the errors: the next reply is the next request's.
    client.send_request(&request(Command::Read, 4, end - 100, 100), &[]);
    assert_eq!(client.read_reply(), (0, 4));
    assert!(client.read_vec(100) == f.bytes[DISK_BYTES - 100..]);
}

#[test]
fn writes_are_stored_and_bad_writes_get_enospc_or_eperm_with_payload_skipped() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    let data = pattern(4096, 77);
    // Past the end: ENOSPC, payload consumed.
    client.send_request(
        &request(Command::Write, 1, DISK_BYTES as u64 - 100, 4096),
        &data,
    );
    assert_eq!(client.read_reply(), (28, 1));
    // A good write with FUA.
    let fua = Request {
        flags: wire::COMMAND_FLAG_FUA,
        ..request(Command::Write, 2, 4096, 4096)
    };
    client.send_request(&fua, &data);
    assert_eq!(client.read_reply(), (0, 2));
    assert!(std::fs::read(&f.path).unwrap()[4096..8192] == data[..]);

    let (mut ro, _, flags) = RawClient::go(f.server.addr, "ro");
    assert_ne!(flags & wire::TRANSMISSION_FLAG_READ_ONLY, 0);
    ro.send_request(&request(Command::Write, 3, 0, 4096), &data);
    assert_eq!(ro.read_reply(), (1, 3));
    for command in [Command::Trim, Command::WriteZeroes] {
        ro.send_request(&request(command, 4, 0, 4096), &[]);
        assert_eq!(ro.read_reply(), (1, 4), "{command:?}");
    }
    ro.send_request(&request(Command::Read, 5, 0, 16), &[]);
    assert_eq!(ro.read_reply(), (0, 5));
    assert!(ro.read_vec(16) == f.bytes[..16]);
}

#[test]
fn an_oversized_write_closes_the_connection() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    client.send_request(&request(Command::Write, 1, 0, REQUEST_BYTES_MAX + 1), &[]);
    assert!(client.is_closed());
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    // NBD_CMD_CACHE and NBD_CMD_BLOCK_STATUS are not offered.
    client.send_request(&request(Command::Other(5), 1, 0, 4096), &[]);
    assert_eq!(client.read_reply(), (22, 1));
    client.send_request(&request(Command::Other(7), 2, 0, 4096), &[]);
    assert_eq!(client.read_reply(), (22, 2));
    // NBD_CMD_FLAG_DF was not offered; NO_HOLE is only for WRITE_ZEROES.
    let df = Request {
        flags: 1 << 2,
        ..request(Command::Read, 3, 0, 512)
    };
    client.send_request(&df, &[]);
    assert_eq!(client.read_reply(), (22, 3));
    let no_hole = Request {
        flags: wire::COMMAND_FLAG_NO_HOLE,
        ..request(Command::WriteZeroes, 4, 0, 512)
    };
    client.send_request(&no_hole, &[]);
    assert_eq!(client.read_reply(), (0, 4));
    client.send_request(&request(Command::Flush, 5, 0, 0), &[]);
    assert_eq!(client.read_reply(), (0, 5));
    assert!(
        std::fs::read(&f.path).unwrap()[..512]
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    let mut header = wire::encode_request(&request(Command::Read, 1, 0, 512));
    header[3] ^= 0xff;
    client.send(&header);
    assert!(client.is_closed());
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn random_garbage_never_takes_the_server_down() {
    let f = fixture(small_limits());
    for seed in 1..=8 {
        let garbage = pattern(4096, seed);
        // Garbage during negotiation...
        let mut client = RawClient::connect(f.server.addr);
        let _ = std::io::Write::write_all(&mut client.stream, &garbage);
        assert!(client.is_closed());
        // ...and during transmission.
        let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
        let _ = std::io::Write::write_all(&mut client.stream, &garbage);
        assert!(client.is_closed());
    }
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn pipelined_requests_are_all_answered() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    let mut batch = Vec::new();
    for handle in 0..64u64 {
        batch.extend_from_slice(&wire::encode_request(&request(
            Command::Read,
            handle,
            handle * 4096,
            4096,
        )));
    }
    client.send(&batch);
    let mut seen = Vec::new();
    for _ in 0..64 {
        let (error, handle) = client.read_reply();
        assert_eq!(error, 0);
        let start = handle as usize * 4096;
        assert!(
            client.read_vec(4096) == f.bytes[start..start + 4096],
            "handle {handle}"
        );
        seen.push(handle);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..64).collect::<Vec<_>>());
}

#[test]
fn disconnect_answers_requests_in_flight_then_closes() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    let mut batch = wire::encode_request(&request(Command::Read, 1, 0, 4096)).to_vec();
    batch.extend_from_slice(&wire::encode_request(&request(Command::Disc, 2, 0, 0)));
    client.send(&batch);
    assert_eq!(client.read_reply(), (0, 1));
    assert!(client.read_vec(4096) == f.bytes[..4096]);
    assert!(client.is_closed());
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let f = fixture(Limits {
        handshake_timeout: Duration::from_millis(300),
        ..small_limits()
    });
    let mut client = RawClient::negotiating(f.server.addr);
    let started = Instant::now();
    assert!(client.is_closed());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn an_idle_client_is_dropped_after_the_idle_timeout() {
    let f = fixture(Limits {
        idle_timeout: Duration::from_millis(300),
        ..small_limits()
    });
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    assert!(client.is_closed());
}

#[test]
fn connections_over_the_limit_wait_for_a_free_slot() {
    let f = fixture(Limits {
        connections_max: 1,
        ..small_limits()
    });
    let (first, _, _) = RawClient::go(f.server.addr, "disk");
    // The second connection is accepted by the kernel but not served yet.
    let mut second = std::net::TcpStream::connect(f.server.addr).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0; 1];
    let waiting = std::io::Read::read(&mut second, &mut byte);
    assert!(
        waiting.is_err(),
        "second connection was served: {waiting:?}"
    );
    // Freeing the slot lets the waiting connection in: it gets the greeting.
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0; wire::GREETING_LEN];
    std::io::Read::read_exact(&mut second, &mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    drop(second);
    assert_serves(f.server.addr, &f.bytes);
}

#[test]
fn stopping_the_server_closes_idle_connections() {
    let f = fixture(small_limits());
    let (mut client, _, _) = RawClient::go(f.server.addr, "disk");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f.server.stop();
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("run returned after shutdown");
    assert!(client.is_closed());
}

#[test]
fn required_tls_refuses_options_before_starttls() {
    let bytes = pattern(DISK_BYTES, 5);
    let (_dir, path) = image(&bytes);
    let registry = MapRegistry::default().with("disk", "", file_export(&path, true));
    // Any valid rustls config will do: these tests never finish a TLS handshake.
    let pki = tempfile::tempdir().unwrap();
    blockrep_pki::init_ca(pki.path(), &["localhost".into()], false).unwrap();
    let config = blockrep_pki::server_config(
        &pki.path().join("ca.crt"),
        &pki.path().join("server.crt"),
        &pki.path().join("server.key"),
    )
    .unwrap();
    let server = TestServer::start(
        NbdServer::new(Arc::new(registry), small_limits()).with_tls(Arc::new(config), true),
    );
    let mut client = RawClient::negotiating(server.addr);
    for option in [
        OptionType::List,
        OptionType::Go,
        OptionType::Info,
        OptionType::Other(99),
    ] {
        let data = wire::encode_info_request(&InfoRequest {
            name: "disk".into(),
            info_types: vec![],
        });
        let data = if option == OptionType::List {
            Vec::new()
        } else {
            data
        };
        client.send_option(option, &data);
        assert_eq!(
            client.read_option_reply(option).0,
            wire::REPLY_ERR_TLS_REQD,
            "{option:?}"
        );
    }
    client.send_option(OptionType::ExportName, b"disk");
    assert!(client.is_closed());

    // STARTTLS is accepted; the server then expects a TLS hello.
    let mut client = RawClient::negotiating(server.addr);
    client.send_option(OptionType::StartTls, &[]);
    assert_eq!(
        client.read_option_reply(OptionType::StartTls).0,
        wire::REPLY_ACK
    );
}

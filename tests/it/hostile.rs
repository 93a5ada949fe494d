//! Hostile peers: chunks and pages addressed past the end of the disk,
//! certificates naming two identities, and floods of idle connections and
//! stalled handshakes. Each is refused, writes nothing, and leaves the server
//! replicating for everyone else within its limits.
//! (zstd bombs and source ids with path tricks: tests/rejections.rs.)
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::{Duration, Instant};

use crate::common::*;
use blockrep_core::ChunkId;
use blockrep_proto::{Codec, ErrorCode, Message};
use blockrep_testkit::raw::*;
use blockrep_testkit::{Pki, RawClient, ServerProcess, random_bytes, write_at};
use bytes::Bytes;

const CHUNK: u32 = SMALL_CHUNK_BYTES;
const DISK: u64 = SMALL_DISK_BYTES;

async fn client(server: &ServerProcess, pki: &Pki, name: &str) -> RawClient {
    RawClient::connect_as(server.addr, pki, name).await
}

/// The session must end with an `Error` of `code`; returns its message.
async fn expect_error(client: &mut RawClient, code: ErrorCode) -> String {
    loop {
        match client.recv().await {
            Ok(Some(Message::Error { code: got, message })) => {
                assert_eq!(got, code, "{message}");
                return message;
            }
            Ok(Some(Message::Welcome { .. } | Message::Page { .. })) => continue,
            other => panic!("expected an Error with {code:?}, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_and_pages_past_the_end_of_the_disk_are_refused() {
    let rig = rig(&["a", "victim"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    // A committed replica of `a`'s geometry, so that refusals are tested on a
    // source with a head as well as on one without.
    let victim = work.path().join("victim.raw");
    std::fs::write(&victim, random_bytes(DISK as usize, 1)).unwrap();
    assert_success(&agent_once(&victim, server.addr, "victim", pki.path(), &[]));
    let victim_head = rig.head("victim").unwrap();

    let data = random_bytes(CHUNK as usize, 2);
    let id = ChunkId::from(blake3::hash(&data));
    let short = random_bytes(1000, 3);
    let short_id = ChunkId::from(blake3::hash(&short));
    let chunk = |index: u64, codec: Codec, raw_len: u32, data: &[u8], id: ChunkId| Message::Chunk {
        index,
        id,
        codec,
        raw_len,
        data: Bytes::copy_from_slice(data),
    };
    let cases: Vec<(&str, Message, ErrorCode, &str)> = vec![
        (
            "first index past the end",
            chunk(17, Codec::Raw, CHUNK, &data, id),
            ErrorCode::BadChunk,
            "beyond the end of the disk",
        ),
        (
            "largest index",
            chunk(u64::MAX, Codec::Raw, CHUNK, &data, id),
            ErrorCode::BadChunk,
            "beyond the end of the disk",
        ),
        (
            "zero chunk past the end",
            chunk(1 << 40, Codec::Zero, CHUNK, &[], ChunkId::ZERO),
            ErrorCode::BadChunk,
            "beyond the end of the disk",
        ),
        (
            "reference past the end",
            chunk(18, Codec::Ref, CHUNK, &[0; 32], id),
            ErrorCode::BadChunk,
            "beyond the end of the disk",
        ),
        (
            "full chunk in the short last slot",
            chunk(16, Codec::Raw, CHUNK, &data, id),
            ErrorCode::BadChunk,
            "expected 1000",
        ),
        (
            "short chunk in a full slot",
            chunk(3, Codec::Raw, 1000, &short, short_id),
            ErrorCode::BadChunk,
            "expected 65536",
        ),
        (
            "page past the end",
            Message::GetPages { indices: vec![1] },
            ErrorCode::BadFrame,
            "page 1 does not exist",
        ),
    ];
    for source in ["a", "victim"] {
        for (what, message, code, text) in &cases {
            let mut client = client(server, pki, source).await;
            client.send(&small_hello(source)).await.unwrap();
            // Refused as soon as it arrives: no Commit is needed (one sent
            // after the refusal could reset the connection before the Error
            // is read).
            client.send(message).await.unwrap();
            let got = match client.recv().await {
                Ok(Some(Message::Welcome { .. })) => client.recv().await,
                other => other,
            };
            let Ok(Some(Message::Error {
                code: got_code,
                message: got,
            })) = got
            else {
                panic!(
                    "{what} ({source}): no Error frame but {got:?}; log: {}",
                    server.log()
                );
            };
            assert_eq!(got_code, *code, "{what}: {got}");
            assert!(got.contains(text), "{what}: {got}");
        }
    }
    assert!(rig.head("a").is_none(), "a replica was written for a");
    assert_eq!(rig.head("victim").unwrap(), victim_head, "victim changed");
    // The victim's replica still equals its disk.
    rig.assert_replica_is("victim", &victim);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_naming_two_identities_is_refused() {
    let rig = rig(&["a", "b"], &[]);
    let (pki, server) = (&rig.pki, &rig.server);
    let pairs: [(&str, &[&str]); 2] = [
        (
            "two-sources",
            &["urn:blockrep:source:a", "urn:blockrep:source:b"],
        ),
        (
            "source-and-admin",
            &["urn:blockrep:source:a", "urn:blockrep:admin"],
        ),
    ];
    for (stem, uris) in pairs {
        pki.issue_with(stem, uris, |_| {});
        for claimed in ["a", "b"] {
            let mut client = client(server, pki, stem).await;
            client.send(&small_hello(claimed)).await.unwrap();
            let message = expect_error(&mut client, ErrorCode::Unauthorized).await;
            assert!(message.contains("more than one identity"), "{message}");
        }
    }
    assert!(
        server.wait_for_log("more than one identity", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    assert!(rig.head("a").is_none() && rig.head("b").is_none());
}

/// The soft limit on open files of this process.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Idle TCP connections (10,000 where the open-file limit allows, else as many
/// as it does), stalled TLS handshakes, and finished handshakes that never say
/// Hello: the server keeps `--connections-max`, drops each at the handshake
/// time-out, keeps its memory bounded, and an agent keeps replicating.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_and_stalled_handshakes_do_not_stop_replication() {
    const CONNECTIONS_MAX: usize = 300;
    const STALLED: usize = 50;
    const SILENT_TLS: usize = 20;
    let idle_target = 10_000.min(open_files_limit().saturating_sub(1_000));
    let rig = rig(
        &["live", "late"],
        &[
            "--connections-max",
            &CONNECTIONS_MAX.to_string(),
            // This test is of the listener's own limit: one address may hold all.
            "--connections-per-address",
            &CONNECTIONS_MAX.to_string(),
            "--handshake-timeout",
            "3s",
        ],
    );
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let admin = server.admin_addr.unwrap();
    let disk = work.path().join("live.raw");
    std::fs::write(&disk, random_bytes(4 << 20, 1)).unwrap();
    let agent = spawn_agent(
        &disk,
        server.addr,
        "live",
        pki.path(),
        &["--interval", "200ms"],
    );
    let first = disk_root(&disk, CHUNK);
    agent.wait_for_root(&first, Duration::from_secs(20), "no first epoch");

    let flood_started = Instant::now();
    // Handshakes that start and stall: a TLS record header promising a
    // ClientHello, and a few of its bytes.
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut tcp = std::net::TcpStream::connect(server.addr).unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
            .unwrap();
        stalled.push(tcp);
    }
    // Finished handshakes (valid certificate) that never send Hello.
    let mut silent = Vec::new();
    for _ in 0..SILENT_TLS {
        silent.push(client(server, pki, "late").await);
    }
    // Idle connections that send nothing at all, in batches that fit the
    // kernel's accept queue (beyond it, connects complete before the server
    // even sees them, which is the kernel's SYN-flood defence, not ours).
    // Each batch comes from its own loopback address: a new connection from a
    // port whose old connection the server closed (it sits in TIME_WAIT on the
    // server's side) would stall a second in SYN retries.
    let mut open_max = 0f64;
    let mut handled = || {
        let (_, text) = admin_request(admin, "GET", "/metrics", None);
        open_max = open_max.max(metric(&text, "blockrep_connections"));
        metric(&text, "blockrep_connections_total")
            + metric(&text, "blockrep_connections_refused_total")
    };
    let before = handled();
    let mut idle = Vec::with_capacity(idle_target);
    for batch in 0u8.. {
        if idle.len() >= idle_target {
            break;
        }
        let from = std::net::SocketAddr::from(([127, 0, 1, batch], 0));
        for _ in 0..(idle_target - idle.len()).min(500) {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(from).unwrap();
            match socket.connect(server.addr).await {
                Ok(tcp) => idle.push(tcp),
                Err(e) => panic!("connect {} failed: {e}", idle.len()),
            }
        }
        let want = before + idle.len() as f64;
        assert!(
            wait_until(Duration::from_secs(10), || handled() >= want),
            "the server stopped accepting"
        );
    }
    let flood_ms = flood_started.elapsed().as_millis();

    // Meanwhile the agent replicates a change over its session.
    write_at(&disk, 1 << 20, &random_bytes(CHUNK as usize, 2));
    let changed = disk_root(&disk, CHUNK);
    agent.wait_for_root(
        &changed,
        Duration::from_secs(15),
        "the agent stopped replicating under the flood",
    );
    // Every connection of the flood is handled, within the limit or refused
    // at once, and the limit holds at every sample meanwhile. (Connections
    // wait in the kernel's accept queue while it is full, so this takes a
    // moment after the connects return.)
    let flood = (STALLED + SILENT_TLS + idle_target) as f64;
    let mut refused = 0f64;
    let all_handled = wait_until(Duration::from_secs(60), || {
        let (_, text) = admin_request(admin, "GET", "/metrics", None);
        let open = metric(&text, "blockrep_connections");
        open_max = open_max.max(open);
        refused = metric(&text, "blockrep_connections_refused_total");
        let accepted = metric(&text, "blockrep_connections_total");
        // Besides the flood: the agent's session.
        accepted + refused >= flood + 1.0
    });
    assert!(all_handled, "the server did not handle the whole flood");
    assert!(
        open_max <= CONNECTIONS_MAX as f64,
        "{open_max} connections open, limit {CONNECTIONS_MAX}"
    );
    assert!(refused > 0.0, "the flood never reached the limit");

    // Everything the flood holds is dropped at the handshake time-out, and
    // the server takes new agents again.
    let timeouts = r#"blockrep_handshake_failures_total{reason="timeout"}"#;
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (_, text) = admin_request(admin, "GET", "/metrics", None);
            metric(&text, timeouts) >= STALLED as f64
                && metric(&text, "blockrep_connections") <= 1.0
        }),
        "flood connections were not dropped: {}",
        admin_request(admin, "GET", "/metrics", None).1
    );
    for mut client in silent {
        // The server ended the silent sessions: EOF or a reset, no message.
        assert!(matches!(client.recv().await, Ok(None) | Err(_)));
    }
    let late = work.path().join("late.raw");
    std::fs::write(&late, random_bytes(1 << 20, 3)).unwrap();
    let output = agent_once(&late, server.addr, "late", pki.path(), &[]);
    assert!(
        output.status.success(),
        "a new agent after the flood failed: {}\nserver log tail: {}",
        stderr(&output),
        server
            .log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let peak = peak_rss_bytes(server.pid());
    println!(
        "flood: {idle_target} idle + {STALLED} stalled + {SILENT_TLS} silent TLS connections in \
         {flood_ms} ms; at most {open_max} open (limit {CONNECTIONS_MAX}); refused {refused}; \
         server peak RSS {} MiB; flood to drained {} ms",
        peak >> 20,
        flood_started.elapsed().as_millis()
    );
    assert!(peak < 200 << 20, "server peak RSS {} MiB", peak >> 20);
    drop(idle);
    drop(stalled);
}

/// Regression (found by the session fuzz target): a `Hello` claiming a huge
/// disk made the server allocate 32 bytes per chunk of it, 2 GiB for 260 GiB
/// at 4 KiB chunks, before any data. Sessions now reserve that memory (160
/// bytes per chunk, with the sets of ids a session may reference) from
/// `--session-memory-max` first.
#[tokio::test(flavor = "multi_thread")]
async fn hello_claiming_a_disk_beyond_the_memory_budget_is_refused() {
    let rig = rig(&["huge", "a", "b"], &["--session-memory-max", "8MiB"]);
    let (pki, server) = (&rig.pki, &rig.server);
    let claim = |source: &str, disk_size_bytes: u64| hello(source, disk_size_bytes, 4096);
    // 1 TiB at 4 KiB chunks: 40 GiB of ids could never fit.
    let mut huge = client(server, pki, "huge").await;
    huge.send(&claim("huge", 1 << 40)).await.unwrap();
    let message = expect_error(&mut huge, ErrorCode::GeometryMismatch).await;
    assert!(message.contains("--session-memory-max"), "{message}");
    // 160 MiB at 4 KiB chunks (6.25 MiB of ids) fits once, not twice.
    let mut first = client(server, pki, "a").await;
    first.send(&claim("a", 160 << 20)).await.unwrap();
    assert!(matches!(
        first.recv().await.unwrap(),
        Some(Message::Welcome { .. })
    ));
    let mut second = client(server, pki, "b").await;
    second.send(&claim("b", 160 << 20)).await.unwrap();
    let message = expect_error(&mut second, ErrorCode::Busy).await;
    assert!(message.contains("retry later"), "{message}");
    // When the first session ends, its share is free again.
    drop(first);
    let disk = rig.path("b.raw");
    std::fs::write(&disk, random_bytes(160 << 20, 1)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        agent_once(
            &disk,
            server.addr,
            "b",
            pki.path(),
            &["--chunk-size", "4KiB"],
        )
        .status
        .success()
    }));
    let peak = peak_rss_bytes(server.pid());
    assert!(peak < 200 << 20, "server peak RSS {} MiB", peak >> 20);
    assert!(rig.head("huge").is_none() && rig.head("a").is_none());
}

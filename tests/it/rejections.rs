//! Every way a peer can be wrong gets a clear error, writes nothing to any replica,
//! and leaves the server serving other sources.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use crate::common::*;
use blockrep_core::{ChunkId, SourceId};
use blockrep_proto::{Codec, ErrorCode, FRAME_LEN_MAX, Message, PROTOCOL_VERSION};
use blockrep_testkit::{Pki, RawClient, mixed_image, random_bytes};
use bytes::Bytes;

/// A server with certificates for `good`, `a` and `victim`, whose `victim`
/// has a replica.
fn fixture() -> AgentRig {
    let rig = rig(&["good", "a", "victim"], &[]);
    // A replica that must stay untouched by every rejected attempt.
    let victim = rig.disk("victim.raw", &mixed_image(3 << 20, 3));
    assert_success(&rig.agent_once(&victim, "victim", &[]));
    rig
}

/// After a rejection: the server still replicates another source, the victim's
/// replica is unchanged, and `rejected` has no replica at all.
fn assert_unharmed(f: &AgentRig, rejected: &str) {
    let victim_head = f.head("victim").unwrap();
    let disk = f.disk("good.raw", &random_bytes(1 << 20, rand_seed()));
    assert_success(&f.agent_once(&disk, "good", &[]));
    f.assert_replica_is("good", &disk);
    assert_eq!(
        f.head("victim").unwrap(),
        victim_head,
        "victim replica changed"
    );
    f.assert_replica_is("victim", &f.path("victim.raw"));
    if !rejected.is_empty() {
        assert!(
            f.head(rejected).is_none(),
            "a replica was written for {rejected}"
        );
    }
}

async fn connect(f: &AgentRig, name: &str) -> RawClient {
    RawClient::connect_as(f.server.addr, &f.pki, name).await
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn hello(source: &str, version: u16) -> Message {
    Message::Hello {
        version_min: version,
        version_max: version,
        source: SourceId::new(source).unwrap(),
        disk_size_bytes: 1 << 20,
        chunk_size_bytes: 65_536,
    }
}

/// The session must end with an `Error` frame of `code`.
async fn expect_error(client: &mut RawClient, code: ErrorCode) -> String {
    loop {
        match client.recv().await {
            Ok(Some(Message::Error { code: got, message })) => {
                assert_eq!(got, code, "error message: {message}");
                return message;
            }
            Ok(Some(Message::Welcome { .. })) => continue,
            other => panic!("expected an Error frame with {code:?}, got {other:?}"),
        }
    }
}

/// The TLS session must fail before any message arrives.
async fn expect_tls_failure(result: std::io::Result<RawClient>) {
    let Ok(mut client) = result else { return };
    // TLS 1.3: the client's handshake completes before the server checks its
    // certificate, so the rejection arrives as an alert on the first read.
    let _ = client.send(&hello("good", PROTOCOL_VERSION)).await;
    match client.recv().await {
        Err(_) | Ok(None) => {}
        Ok(Some(message)) => panic!("server answered a rejected certificate with {message:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificate_from_another_ca_is_rejected() {
    let f = fixture();
    let foreign = Pki::new(&["good"]);
    expect_tls_failure(
        RawClient::connect(
            f.server.addr,
            &f.pki.cert("ca"),
            Some((&foreign.cert("good"), &foreign.key("good"))),
        )
        .await,
    )
    .await;
    // The real agent with the foreign certificate fails with a clear message.
    let disk = f.work.path().join("d.raw");
    std::fs::write(&disk, random_bytes(1 << 20, 1)).unwrap();
    let output = Command::new(BIN)
        .args(["agent", "--once", "--disk"])
        .arg(&disk)
        .args([
            "--to",
            &f.server.addr.to_string(),
            "--source",
            "good",
            "--ca",
        ])
        .arg(f.pki.cert("ca"))
        .arg("--cert")
        .arg(foreign.cert("good"))
        .arg("--key")
        .arg(foreign.key("good"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("certificate"),
        "unclear error: {}",
        stderr(&output)
    );
    assert!(
        f.server
            .wait_for_log("TLS handshake rejected", std::time::Duration::from_secs(5))
    );
    assert_unharmed(&f, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_client_certificate_is_rejected() {
    let f = fixture();
    expect_tls_failure(RawClient::connect(f.server.addr, &f.pki.cert("ca"), None).await).await;
    assert!(
        f.server
            .wait_for_log("TLS handshake rejected", std::time::Duration::from_secs(5)),
        "{}",
        f.server.log()
    );
    assert_unharmed(&f, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_for_one_source_cannot_write_another() {
    let f = fixture();
    let mut client = connect(&f, "a").await;
    client
        .send(&hello("victim", PROTOCOL_VERSION))
        .await
        .unwrap();
    let message = expect_error(&mut client, ErrorCode::SourceMismatch).await;
    assert!(message.contains("certificate"), "{message}");
    // The same through the agent binary: --source b with the certificate of a.
    let disk = f.work.path().join("d.raw");
    std::fs::write(&disk, random_bytes(1 << 20, 2)).unwrap();
    let output = Command::new(BIN)
        .args(["agent", "--once", "--disk"])
        .arg(&disk)
        .args(["--to", &f.server.addr.to_string(), "--source", "b", "--ca"])
        .arg(f.pki.cert("ca"))
        .arg("--cert")
        .arg(f.pki.cert("a"))
        .arg("--key")
        .arg(f.pki.key("a"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("does not match certificate"),
        "{}",
        stderr(&output)
    );
    assert_unharmed(&f, "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn source_ids_with_path_tricks_are_rejected_everywhere() {
    let f = fixture();
    let long = "a".repeat(65);
    for bad in ["a/b", "..", "../victim", "a\0b", long.as_str()] {
        // The CLI refuses them before doing anything (a NUL cannot even be passed
        // as an argument; the id type's unit tests cover it).
        if !bad.contains('\0') {
            let output = Command::new(BIN)
                .args(["cert", "issue", "--dir"])
                .arg(f.pki.path())
                .args(["--source", bad])
                .output()
                .unwrap();
            assert!(!output.status.success(), "cert issue accepted {bad:?}");
            assert!(
                stderr(&output).contains("invalid source id"),
                "{}",
                stderr(&output)
            );
            let output = agent_once(
                Path::new("/nonexistent"),
                f.server.addr,
                bad,
                f.pki.path(),
                &[],
            );
            assert!(
                stderr(&output).contains("invalid source id"),
                "{}",
                stderr(&output)
            );
        }
        // A certificate carrying such an id (signed by the real CA) is refused by
        // the server, which never builds a path from it.
        f.pki
            .issue_raw_uri("tricky", &format!("urn:blockrep:source:{bad}"));
        let mut client = connect(&f, "tricky").await;
        client.send(&hello("good", PROTOCOL_VERSION)).await.unwrap();
        let message = expect_error(&mut client, ErrorCode::Unauthorized).await;
        assert!(message.contains("invalid source id"), "{message}");
    }
    let sources: Vec<_> = std::fs::read_dir(f.data().join("sources"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(sources, vec![std::ffi::OsString::from("victim")]);
    assert!(!f.work.path().join("victim").exists());
    assert_unharmed(&f, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn frame_longer_than_the_limit_is_rejected() {
    let f = fixture();
    let mut client = connect(&f, "a").await;
    let mut frame = (FRAME_LEN_MAX + 1).to_le_bytes().to_vec();
    frame.push(5);
    client.send_raw(&frame).await.unwrap();
    let message = expect_error(&mut client, ErrorCode::BadFrame).await;
    assert!(message.contains("frame length"), "{message}");
    // Also mid-session, after a valid Hello.
    let mut client = connect(&f, "a").await;
    client.send(&hello("a", PROTOCOL_VERSION)).await.unwrap();
    client.send_raw(&u32::MAX.to_le_bytes()).await.unwrap();
    expect_error(&mut client, ErrorCode::BadFrame).await;
    assert_unharmed(&f, "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn chunk_that_does_not_hash_to_its_id_is_rejected() {
    let f = fixture();
    let mut client = connect(&f, "a").await;
    client.send(&hello("a", PROTOCOL_VERSION)).await.unwrap();
    let data = Bytes::from(random_bytes(65_536, 3));
    let wrong_id = ChunkId::from(blake3::hash(b"something else"));
    client
        .send(&Message::Chunk {
            index: 0,
            id: wrong_id,
            codec: Codec::Raw,
            raw_len: 65_536,
            data,
        })
        .await
        .unwrap();
    client
        .send(&Message::Commit {
            epoch: 1,
            root: ChunkId([1; 32]),
            scan_started_unix_ms: 0,
            complete: true,
            last: false,
            consistency: blockrep_core::Consistency::Live,
        })
        .await
        .unwrap();
    let message = expect_error(&mut client, ErrorCode::BadChunk).await;
    assert!(message.contains("does not hash to its id"), "{message}");
    // A zstd bomb: a tiny frame that decompresses far beyond the chunk size.
    let mut client = connect(&f, "a").await;
    client.send(&hello("a", PROTOCOL_VERSION)).await.unwrap();
    let bomb = zstd_bomb();
    let id = ChunkId::from(blake3::hash(&vec![7u8; 65_536]));
    client
        .send(&Message::Chunk {
            index: 1,
            id,
            codec: Codec::Zstd,
            raw_len: 65_536,
            data: Bytes::from(bomb),
        })
        .await
        .unwrap();
    let message = expect_error(&mut client, ErrorCode::BadChunk).await;
    assert!(message.contains("decompress"), "{message}");
    assert_unharmed(&f, "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_frames_and_zero_chunks_with_an_id_are_rejected() {
    let f = fixture();
    // A Commit whose scan start was damaged before it was sealed into TLS:
    // well-formed, and once accepted as is; now its checksum refuses it.
    let mut client = connect(&f, "a").await;
    client.send(&hello("a", PROTOCOL_VERSION)).await.unwrap();
    let mut frame = bytes::BytesMut::new();
    blockrep_proto::encode(
        &Message::Commit {
            epoch: 1,
            root: ChunkId([1; 32]),
            scan_started_unix_ms: 1_795_000_000_000,
            complete: true,
            last: false,
            consistency: blockrep_core::Consistency::Live,
        },
        &mut frame,
    );
    let scan_start_byte = frame.len() - 4;
    frame[scan_start_byte] ^= 0x20;
    client.send_raw(&frame).await.unwrap();
    let message = expect_error(&mut client, ErrorCode::BadFrame).await;
    assert!(message.contains("checksum"), "{message}");
    // A zero chunk carries the zero id; any other id is refused.
    let mut client = connect(&f, "a").await;
    client.send(&hello("a", PROTOCOL_VERSION)).await.unwrap();
    client
        .send(&Message::Chunk {
            index: 0,
            id: ChunkId([9; 32]),
            codec: Codec::Zero,
            raw_len: 65_536,
            data: Bytes::new(),
        })
        .await
        .unwrap();
    let message = expect_error(&mut client, ErrorCode::BadChunk).await;
    assert!(message.contains("zero id"), "{message}");
    assert_unharmed(&f, "a");
}

/// A few KiB that claim to be a chunk but decompress to 64 MiB.
fn zstd_bomb() -> Vec<u8> {
    zstd::bulk::compress(&vec![7u8; 64 << 20], 3).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_protocol_version_is_rejected() {
    let f = fixture();
    let mut client = connect(&f, "a").await;
    client.send(&hello("a", 99)).await.unwrap();
    let message = expect_error(&mut client, ErrorCode::UnsupportedVersion).await;
    assert!(message.contains("99"), "{message}");
    assert_unharmed(&f, "a");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_concurrent_session_for_a_source_is_refused() {
    let f = fixture();
    let mut first = connect(&f, "a").await;
    first.send(&hello("a", PROTOCOL_VERSION)).await.unwrap();
    assert!(matches!(
        first.recv().await.unwrap(),
        Some(Message::Welcome { .. })
    ));
    let mut second = connect(&f, "a").await;
    second.send(&hello("a", PROTOCOL_VERSION)).await.unwrap();
    let message = expect_error(&mut second, ErrorCode::Busy).await;
    assert!(message.contains("another session"), "{message}");
    drop(first);
    assert_unharmed(&f, "a");
}

//! Consistency labels end to end: every recovery point says how it was taken
//! (`crash-consistent`, `quiesced` or `live`), in `status`, `snapshot list`,
//! `launch list`, their JSON and the metrics; a `live` point is launched only
//! with `--allow-live`; a Commit with a label no version wrote is refused.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use crate::common::*;
use blockrep_core::{ChunkId, Consistency, Geometry, Root};
use blockrep_proto::{Codec, ErrorCode, Message};
use blockrep_testkit::raw::{expect_committed, hello};
use blockrep_testkit::{Pki, RawClient, ServerProcess, random_bytes};
use bytes::Bytes;

const CHUNK: u32 = 65_536;
/// Four chunks of 64 KiB.
const DISK: u64 = 4 * CHUNK as u64;

fn server(pki: &Pki, work: &Path) -> ServerProcess {
    // No automatic snapshots: the tests' own are the only ones.
    ServerProcess::start_with(
        &bin(),
        &work.join("data"),
        pki.path(),
        &["--retention", "off"],
    )
}

/// The CLI's `--json` answer, parsed; the command must succeed.
fn cli_json(server: &ServerProcess, pki: &Pki, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = cli(server, pki, &args);
    assert_success(&output);
    serde_json::from_str(&stdout(&output))
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", stdout(&output)))
}

/// The `consistency` of the element of a JSON list whose `key` is `value`.
fn label_in(list: &serde_json::Value, key: &str, value: &str) -> String {
    let item = list
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item[key] == value)
        .unwrap_or_else(|| panic!("no {key}={value} in {list}"));
    item["consistency"]
        .as_str()
        .unwrap_or_else(|| panic!("no consistency in {item}"))
        .to_owned()
}

#[test]
fn a_live_read_is_labelled_live_everywhere_and_launches_only_when_allowed() {
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let server = server(&pki, work.path());
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(DISK as usize, 1)).unwrap();
    // The agent reads the live disk (no frozen view): its points are live.
    // Said explicitly: the default, auto, would clone where the temporary
    // directory's file system can. It says so once, at start.
    let output = agent_once(
        &disk,
        server.addr,
        "web",
        pki.path(),
        &["--snapshot", "none"],
    );
    assert_success(&output);
    let log = stderr(&output);
    assert_eq!(
        log.matches("reading the disk live (--snapshot none)")
            .count(),
        1,
        "{log}"
    );

    let sources = cli_json(&server, &pki, &["status"]);
    assert_eq!(label_in(&sources, "source", "web"), "live");
    let table = stdout(&cli(&server, &pki, &["status"]));
    assert!(
        table.contains("CONSISTENCY") && table.contains(" live "),
        "{table}"
    );

    assert_success(&cli(
        &server,
        &pki,
        &["snapshot", "create", "--source", "web", "--name", "s1"],
    ));
    let snapshots = cli_json(&server, &pki, &["snapshot", "list"]);
    assert_eq!(label_in(&snapshots, "name", "s1"), "live");
    let table = stdout(&cli(&server, &pki, &["snapshot", "list"]));
    assert!(
        table.contains("CONSISTENCY") && table.contains(" live "),
        "{table}"
    );

    // A live point is not launched by mistake...
    let launch = [
        "launch",
        "create",
        "--source",
        "web",
        "--snapshot",
        "s1",
        "--name",
        "drill",
    ];
    let refused = cli(&server, &pki, &launch);
    assert!(!refused.status.success(), "{}", stdout(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("s1 of web is live") && message.contains("--allow-live"),
        "{message}"
    );
    assert!(!work.path().join("data/launches/drill").exists());
    // ... nor through the API without allow_live.
    let (code, body) = admin_request(
        server.admin_addr.unwrap(),
        "POST",
        "/v1/launches",
        Some(r#"{"source":"web","snapshot":"s1","name":"drill"}"#),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("is live"), "{body}");

    // With --allow-live it is made, labelled live, and the CLI warns.
    let mut allowed = launch.to_vec();
    allowed.push("--allow-live");
    let made = cli(&server, &pki, &allowed);
    assert_success(&made);
    assert!(stderr(&made).contains("warning"), "{}", stderr(&made));
    assert!(stdout(&made).contains("(live)"), "{}", stdout(&made));
    let launches = cli_json(&server, &pki, &["launch", "list"]);
    assert_eq!(label_in(&launches, "name", "drill"), "live");
    let table = stdout(&cli(&server, &pki, &["launch", "list"]));
    assert!(
        table.contains("CONSISTENCY") && table.contains(" live "),
        "{table}"
    );

    let text = metrics(&server);
    assert!(
        text.contains("blockrep_head_consistency{source=\"web\",consistency=\"live\"} 1\n"),
        "{text}"
    );
}

fn geometry() -> Geometry {
    Geometry::new(DISK, CHUNK).unwrap()
}

fn commit(epoch: u64, ids: &[ChunkId], complete: bool, consistency: Consistency) -> Message {
    Message::Commit {
        epoch,
        root: Root::from_chunk_ids(geometry(), ids).id(),
        scan_started_unix_ms: 1_795_000_000_000,
        complete,
        last: false,
        consistency,
    }
}

/// Commits epoch `epoch` of `ids`; the server must answer `Committed`.
async fn commit_and_expect(
    client: &mut RawClient,
    epoch: u64,
    ids: &[ChunkId],
    complete: bool,
    consistency: Consistency,
) {
    client
        .send(&commit(epoch, ids, complete, consistency))
        .await
        .unwrap();
    expect_committed(client, epoch).await;
}

/// Sends one chunk of `data` at `index`; returns its id.
async fn send_chunk(client: &mut RawClient, index: u64, data: &[u8]) -> ChunkId {
    let id = ChunkId::from(blake3::hash(data));
    client
        .send(&Message::Chunk {
            index,
            id,
            codec: Codec::Raw,
            raw_len: data.len() as u32,
            data: Bytes::copy_from_slice(data),
        })
        .await
        .unwrap();
    id
}

async fn connect(server: &ServerProcess, pki: &Pki) -> RawClient {
    let mut client = RawClient::connect_as(server.addr, pki, "db").await;
    client.send(&hello("db", DISK, CHUNK)).await.unwrap();
    match client.recv().await.unwrap() {
        Some(Message::Welcome { .. }) => client,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

fn head_label(server: &ServerProcess) -> Option<String> {
    admin_source(server.admin_addr.unwrap(), "db")
        .unwrap()
        .consistency
}

/// An agent that read a frozen view commits `crash-consistent`: shown so, and
/// launched without a flag. An intermediate step is live whatever it claims;
/// a frozen scan that finds the head unchanged raises its label.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_consistent_commit_is_shown_and_launched_without_a_flag() {
    let pki = Pki::new(&["db"]);
    let work = tempfile::tempdir().unwrap();
    let server = server(&pki, work.path());
    let mut client = connect(&server, &pki).await;
    let mut ids = vec![ChunkId::ZERO; 4];
    ids[0] = send_chunk(&mut client, 0, &random_bytes(CHUNK as usize, 2)).await;
    commit_and_expect(&mut client, 1, &ids, true, Consistency::CrashConsistent).await;
    assert_eq!(head_label(&server).as_deref(), Some("crash-consistent"));

    assert_success(&cli(
        &server,
        &pki,
        &["snapshot", "create", "--source", "db", "--name", "point"],
    ));
    let snapshots = cli_json(&server, &pki, &["snapshot", "list", "--source", "db"]);
    assert_eq!(label_in(&snapshots, "name", "point"), "crash-consistent");
    let made = cli(
        &server,
        &pki,
        &[
            "launch",
            "create",
            "--source",
            "db",
            "--snapshot",
            "point",
            "--name",
            "drill",
        ],
    );
    assert_success(&made);
    assert!(!stderr(&made).contains("warning"), "{}", stderr(&made));
    let launches = cli_json(&server, &pki, &["launch", "list", "--source", "db"]);
    assert_eq!(label_in(&launches, "name", "drill"), "crash-consistent");
    let text = metrics(&server);
    assert!(
        text.contains(
            "blockrep_head_consistency{source=\"db\",consistency=\"crash-consistent\"} 1\n"
        ),
        "{text}"
    );

    // An intermediate step of epoch 2 mixes the head with part of a scan: live.
    ids[1] = send_chunk(&mut client, 1, &random_bytes(CHUNK as usize, 3)).await;
    commit_and_expect(&mut client, 2, &ids, false, Consistency::CrashConsistent).await;
    assert_eq!(head_label(&server).as_deref(), Some("live"));
    // The complete scan that follows found nothing more to send: the head is
    // that frozen point, and its label rises.
    commit_and_expect(&mut client, 2, &ids, true, Consistency::Quiesced).await;
    assert_eq!(head_label(&server).as_deref(), Some("quiesced"));
    // A later live scan of the same disk does not lower it.
    commit_and_expect(&mut client, 2, &ids, true, Consistency::Live).await;
    assert_eq!(head_label(&server).as_deref(), Some("quiesced"));
    drop(client);

    // The label is on disk: a restarted server shows it.
    drop(server);
    let server = self::server(&pki, work.path());
    assert_eq!(head_label(&server).as_deref(), Some("quiesced"));
    let launches = cli_json(&server, &pki, &["launch", "list"]);
    assert_eq!(label_in(&launches, "name", "drill"), "crash-consistent");
}

/// A Commit whose label byte no version wrote is refused with a clear error,
/// and nothing is committed.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_with_an_unknown_label_is_refused() {
    let pki = Pki::new(&["db"]);
    let work = tempfile::tempdir().unwrap();
    let server = server(&pki, work.path());
    let mut client = connect(&server, &pki).await;
    let mut ids = vec![ChunkId::ZERO; 4];
    ids[2] = send_chunk(&mut client, 2, &random_bytes(CHUNK as usize, 4)).await;
    let mut frame = bytes::BytesMut::new();
    blockrep_proto::encode(&commit(1, &ids, true, Consistency::Live), &mut frame);
    let label_at = frame.len() - 1;
    frame[label_at] = 0x07;
    // Resealed, so that it is the label, not the checksum, that is refused.
    client
        .send_raw(&blockrep_proto::fuzzing::reseal(&frame))
        .await
        .unwrap();
    let message = loop {
        match client.recv().await {
            Ok(Some(Message::Error { code, message })) => {
                assert_eq!(code, ErrorCode::BadFrame, "{message}");
                break message;
            }
            Ok(Some(Message::Progress { .. })) => continue,
            other => panic!("expected an Error, got {other:?}"),
        }
    };
    assert!(
        message.contains("unknown consistency label 0x07"),
        "{message}"
    );
    assert!(!work.path().join("data/sources/db/head").exists());
    assert_eq!(
        admin_source(server.admin_addr.unwrap(), "db").and_then(|s| s.consistency),
        None
    );
}

/// The cutover commit after a pre-cutover command is `quiesced`: the cutover
/// snapshot and launch keep it (made by the server, with no gate).
#[test]
fn a_cutover_after_the_pre_cutover_command_is_quiesced() {
    let pki = Pki::new(&["app"]);
    let work = tempfile::tempdir().unwrap();
    let server = server(&pki, work.path());
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, random_bytes(DISK as usize, 5)).unwrap();
    assert_success(&agent_once(
        &disk,
        server.addr,
        "app",
        pki.path(),
        &["--cutover", "--pre-cutover-cmd", "true"],
    ));
    let snapshots = cli_json(&server, &pki, &["snapshot", "list", "--source", "app"]);
    let cutover = &snapshots.as_array().unwrap()[0];
    assert_eq!(cutover["kind"], "cutover", "{snapshots}");
    assert_eq!(cutover["consistency"], "quiesced", "{snapshots}");
    let launches = cli_json(&server, &pki, &["launch", "list", "--source", "app"]);
    let launch = &launches.as_array().unwrap()[0];
    assert_eq!(launch["kind"], "cutover", "{launches}");
    assert_eq!(launch["consistency"], "quiesced", "{launches}");
    assert_eq!(
        admin_source(server.admin_addr.unwrap(), "app")
            .unwrap()
            .consistency
            .as_deref(),
        Some("quiesced")
    );
}

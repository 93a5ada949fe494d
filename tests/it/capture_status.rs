//! Write capture's figures on the server: an agent in capture mode sends a
//! `Capture` frame before each complete `Commit`; the source is then in mode
//! `capture` and `status` (table and JSON) and `/metrics` (checked with
//! promtool) show the figures, which outlive the session. A session that
//! commits without reporting puts the source back in mode `scan`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use blockrep_core::clock::now_unix_ms;
use blockrep_core::{ChunkId, Consistency, Geometry, Root};
use blockrep_proto::{Codec, Message};
use blockrep_testkit::raw::expect_committed;
use blockrep_testkit::{Pki, RawClient, ServerProcess, random_bytes};
use bytes::Bytes;

const CHUNK: u32 = 65_536;
/// Four chunks of 64 KiB.
const DISK: u64 = 4 * CHUNK as u64;

/// `status --json`, the element of `source`.
fn status_json(server: &ServerProcess, pki: &Pki, source: &str) -> serde_json::Value {
    let output = cli(server, pki, &["status", "--json"]);
    assert_success(&output);
    let all: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == source)
        .unwrap_or_else(|| panic!("no source {source} in {all}"))
        .clone()
}

fn geometry() -> Geometry {
    Geometry::new(DISK, CHUNK).unwrap()
}

/// A session of source `db` speaking raw frames with its real certificate.
async fn connect(server: &ServerProcess, pki: &Pki) -> RawClient {
    let mut client = RawClient::connect_as(server.addr, pki, "db").await;
    client.hello("db", DISK, CHUNK).await;
    match client.recv().await.unwrap() {
        Some(Message::Welcome { .. }) => client,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// One complete epoch that changes chunk `index` of `ids` to random data,
/// preceded by `report` when given (as a capture agent does).
async fn epoch(client: &mut RawClient, epoch: u64, ids: &mut [ChunkId], report: Option<Message>) {
    let data = random_bytes(CHUNK as usize, epoch);
    let index = epoch % 4;
    let id = ChunkId::from(blake3::hash(&data));
    ids[index as usize] = id;
    client
        .send(&Message::Chunk {
            index,
            id,
            codec: Codec::Raw,
            raw_len: CHUNK,
            data: Bytes::from(data),
        })
        .await
        .unwrap();
    if let Some(report) = report {
        client.send(&report).await.unwrap();
    }
    client
        .send(&Message::Commit {
            epoch,
            root: Root::from_chunk_ids(geometry(), ids).id(),
            scan_started_unix_ms: now_unix_ms(),
            complete: true,
            last: false,
            consistency: Consistency::CrashConsistent,
        })
        .await
        .unwrap();
    expect_committed(client, epoch).await;
}

fn capture(cuts: u64, writes: u64) -> Message {
    Message::Capture {
        dirty_bytes: 12_288,
        preserved_bytes: 4096,
        cuts,
        writes,
        write_p50_us: 250,
        write_p99_us: 1_500,
    }
}

fn disconnected(server: &ServerProcess, source: &str) -> bool {
    wait_until(Duration::from_secs(10), || {
        admin_source(server.admin_addr.unwrap(), source).is_some_and(|s| !s.connected)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_reports_show_in_status_json_table_and_metrics_and_outlive_the_session() {
    let rig = rig(&["db", "web"], &["--retention", "off"]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    // A source replicated by scanning, for contrast.
    let disk = work.path().join("web.raw");
    std::fs::write(&disk, random_bytes(DISK as usize, 9)).unwrap();
    assert_success(&agent_once(&disk, server.addr, "web", pki.path(), &[]));

    let mut ids = vec![ChunkId::ZERO; 4];
    let mut client = connect(server, pki).await;
    epoch(&mut client, 1, &mut ids, Some(capture(1, 40))).await;
    epoch(&mut client, 2, &mut ids, Some(capture(2, 75))).await;

    let db = status_json(server, pki, "db");
    assert_eq!(db["mode"], "capture", "{db}");
    assert_eq!(
        db["capture"],
        serde_json::json!({
            "dirty_bytes": 12_288, "preserved_bytes": 4096, "cuts": 2, "writes": 75,
            "write_p50_us": 250, "write_p99_us": 1_500,
        }),
        "{db}"
    );
    let web = status_json(server, pki, "web");
    assert_eq!(web["mode"], "scan", "{web}");
    assert!(web["capture"].is_null(), "{web}");

    let table = stdout(&cli(server, pki, &["status"]));
    let db_row = table.lines().find(|l| l.starts_with("db ")).unwrap();
    let web_row = table.lines().find(|l| l.starts_with("web ")).unwrap();
    assert!(table.lines().next().unwrap().contains(" MODE "), "{table}");
    assert!(db_row.contains(" capture "), "{table}");
    assert!(web_row.contains(" scan "), "{table}");
    assert!(
        table.contains(
            "db: capture 12.0KiB dirty, 4.0KiB preserved, 2 cuts, 75 writes, write latency p50 250us p99 1500us"
        ),
        "{table}"
    );
    assert!(!table.contains("web: capture"), "{table}");

    let text = metrics(server);
    if have_tool("promtool") {
        promtool_check_metrics(&text);
    }
    for line in [
        "blockrep_capture_dirty_bytes{source=\"db\"} 12288\n",
        "blockrep_capture_preserved_bytes{source=\"db\"} 4096\n",
        "blockrep_capture_cuts_total{source=\"db\"} 2\n",
        "blockrep_capture_writes_total{source=\"db\"} 75\n",
        "blockrep_capture_write_latency_seconds{source=\"db\",quantile=\"0.5\"} 0.00025\n",
        "blockrep_capture_write_latency_seconds{source=\"db\",quantile=\"0.99\"} 0.0015\n",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(!text.contains("blockrep_capture_cuts_total{source=\"web\"}"));

    // The agent goes away: its last figures stay, with the time since contact.
    drop(client);
    assert!(disconnected(server, "db"));
    let db = status_json(server, pki, "db");
    assert_eq!(db["mode"], "capture", "{db}");
    assert_eq!(db["capture"]["cuts"], 2, "{db}");
    assert!(db["seconds_since_contact"].as_f64().is_some(), "{db}");
    assert!(metrics(server).contains("blockrep_capture_cuts_total{source=\"db\"} 2\n"));

    // A restarted agent counts from 0 again; the server's counters go on.
    let mut client = connect(server, pki).await;
    epoch(&mut client, 3, &mut ids, Some(capture(1, 10))).await;
    let text = metrics(server);
    assert!(
        text.contains("blockrep_capture_cuts_total{source=\"db\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("blockrep_capture_writes_total{source=\"db\"} 85\n"),
        "{text}"
    );
    assert_eq!(status_json(server, pki, "db")["capture"]["cuts"], 1);
    drop(client);
    assert!(disconnected(server, "db"));

    // A session that commits a complete epoch without a report scans: mode
    // scan, no capture figures, no capture series.
    let mut client = connect(server, pki).await;
    epoch(&mut client, 4, &mut ids, None).await;
    let db = status_json(server, pki, "db");
    assert_eq!(db["mode"], "scan", "{db}");
    assert!(db["capture"].is_null(), "{db}");
    let text = metrics(server);
    assert!(
        !text.contains("blockrep_capture_cuts_total{source=\"db\"}"),
        "{text}"
    );
    if have_tool("promtool") {
        promtool_check_metrics(&text);
    }
}

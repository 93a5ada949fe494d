//! Replays every input of every fuzz corpus (`fuzz/corpus/TARGET/`) through
//! the same checks as the cargo-fuzz targets, on stable: a crasher the fuzzer
//! found, once added to its corpus, fails `cargo test` until it is fixed.
//!
//! The seed inputs (files named `seed-*`) are generated here; with
//! `BLOCKREP_UPDATE_FUZZ_SEEDS=1` this test rewrites them. Each seed is also
//! checked to still reach the state it was made for (a session seed that no
//! longer commits would leave the fuzzer exploring nothing).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use blockrep_core::{ChunkId, Consistency, Geometry, Root, SourceId};
use blockrep_proto::{Codec, ErrorCode, Message, PROTOCOL_VERSION, encode};
use bytes::{Bytes, BytesMut};

const TARGETS: [&str; 5] = [
    "frame_decode",
    "session",
    "nbd_wire",
    "index",
    "capture_export",
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn run_check(target: &str, data: &[u8]) {
    match target {
        "frame_decode" => {
            blockrep_proto::fuzzing::check_decode_round_trip(data);
        }
        "index" => blockrep_core::fuzzing::check_index_parsing(data),
        "nbd_wire" => blockrep_nbd::fuzzing::check_wire_parsing(data),
        "session" => {
            let dir = tempfile::tempdir().unwrap();
            blockrep_server::fuzzing::drive_session(&dir.path().join("data"), data);
        }
        "capture_export" => {
            let dir = tempfile::tempdir().unwrap();
            blockrep_agent::capture::fuzzing::drive_capture_export(dir.path(), data);
        }
        other => panic!("unknown fuzz target {other}"),
    }
}

#[test]
fn every_corpus_input_passes_its_target_checks() {
    for target in TARGETS {
        let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
            .unwrap_or_else(|e| panic!("corpus of {target}: {e}"))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "the corpus of {target} is empty");
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| run_check(target, &data));
            assert!(outcome.is_ok(), "{target}: {} fails", file.display());
        }
    }
}

#[test]
fn seed_inputs_are_current_and_reach_their_states() {
    let update = std::env::var_os("BLOCKREP_UPDATE_FUZZ_SEEDS").is_some();
    for (target, name, data) in seeds() {
        let path = corpus_dir(target).join(format!("seed-{name}"));
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &data).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_default();
        assert!(
            stored == data,
            "{} is missing or stale: run BLOCKREP_UPDATE_FUZZ_SEEDS=1 cargo test --test fuzz_corpus",
            path.display()
        );
    }
    // The session seeds drive the session where they were meant to.
    let committed = |data: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        blockrep_server::fuzzing::drive_session(&dir.path().join("data"), data)
            .iter()
            .filter(|m| matches!(m, Message::Committed { .. }))
            .count()
    };
    assert_eq!(committed(&three_epochs()), 3);
    assert_eq!(committed(&page_fetch_session()), 2);
    assert_eq!(committed(&patch_session()), 2);
    let dir = tempfile::tempdir().unwrap();
    let replies = blockrep_server::fuzzing::drive_session(&dir.path().join("data"), &cutover());
    assert!(
        replies
            .iter()
            .any(|m| matches!(m, Message::CutoverReady { .. })),
        "{replies:?}"
    );
    let frames = blockrep_proto::fuzzing::check_decode_round_trip(&three_epochs());
    assert_eq!(frames, 11);
    // The capture seeds write through the export and check cuts after them.
    for (name, data) in blockrep_agent::capture::fuzzing::seeds() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = blockrep_agent::capture::fuzzing::drive_capture_export(dir.path(), &data);
        assert!(
            outcome.writes > 0 && outcome.cuts_checked > 1,
            "{name}: {outcome:?}"
        );
    }
}

/// Regression: an `Error` frame whose message was not UTF-8 was decoded with
/// replacement characters, so it re-encoded to other bytes than it came from.
#[test]
fn error_frame_with_invalid_utf8_is_rejected() {
    let mut frame = BytesMut::new();
    encode(
        &Message::Error {
            code: ErrorCode::Busy,
            message: "ab".into(),
        },
        &mut frame,
    );
    let len = frame.len();
    frame[len - 1] = 0xff;
    // Resealed: the frame checksum would refuse it before the UTF-8 check.
    let mut frame = BytesMut::from(&blockrep_proto::fuzzing::reseal(&frame)[..]);
    let error = blockrep_proto::decode(&mut frame).unwrap_err();
    assert_eq!(error.kind(), blockrep_proto::ProtoErrorKind::Malformed);
}

const CHUNK: u32 = 4096;
/// Two full chunks and a short one.
const DISK: u64 = 2 * CHUNK as u64 + 100;

fn frames(messages: &[Message]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for message in messages {
        encode(message, &mut out);
    }
    out.to_vec()
}

fn hello() -> Message {
    Message::Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        source: SourceId::new(blockrep_server::fuzzing::FUZZ_SOURCE).unwrap(),
        disk_size_bytes: DISK,
        chunk_size_bytes: CHUNK,
    }
}

fn chunk_data(index: u64, byte: u8) -> Vec<u8> {
    let len = Geometry::new(DISK, CHUNK)
        .unwrap()
        .chunk_len(index)
        .unwrap();
    (0..len).map(|i| byte ^ (i % 251) as u8).collect()
}

fn raw(index: u64, data: &[u8]) -> Message {
    Message::Chunk {
        index,
        id: ChunkId::from(blake3::hash(data)),
        codec: Codec::Raw,
        raw_len: data.len() as u32,
        data: Bytes::copy_from_slice(data),
    }
}

fn root(ids: &[ChunkId]) -> ChunkId {
    Root::from_chunk_ids(Geometry::new(DISK, CHUNK).unwrap(), ids).id()
}

fn commit(epoch: u64, root: ChunkId, last: bool) -> Message {
    Message::Commit {
        epoch,
        root,
        scan_started_unix_ms: 1,
        complete: true,
        last,
        consistency: Consistency::CrashConsistent,
    }
}

fn backlog() -> Message {
    Message::Backlog {
        scan_started_unix_ms: 1,
        chunks_pending: 3,
        bytes_pending: DISK,
    }
}

/// Epoch 1: a raw chunk, a zstd chunk and a zero chunk; epoch 2: an offer and
/// a reference to a chunk the server holds; epoch 3: the short last chunk.
fn three_epochs() -> Vec<u8> {
    let (a, b) = (chunk_data(0, 1), chunk_data(1, 2));
    let (id_a, id_b) = (
        ChunkId::from(blake3::hash(&a)),
        ChunkId::from(blake3::hash(&b)),
    );
    let zstd_b = Message::Chunk {
        index: 1,
        id: id_b,
        codec: Codec::Zstd,
        raw_len: b.len() as u32,
        data: Bytes::from(zstd::bulk::compress(&b, 1).unwrap()),
    };
    let zero = Message::Chunk {
        index: 2,
        id: ChunkId::ZERO,
        codec: Codec::Zero,
        raw_len: 100,
        data: Bytes::new(),
    };
    let c = chunk_data(2, 3);
    let id_c = ChunkId::from(blake3::hash(&c));
    // The source's own chunk: its proof is not checked (and the nonce is
    // random per session), so any 32 bytes do.
    let reference = Message::Chunk {
        index: 1,
        id: id_a,
        codec: Codec::Ref,
        raw_len: CHUNK,
        data: Bytes::from_static(&[0; 32]),
    };
    frames(&[
        hello(),
        backlog(),
        raw(0, &a),
        zstd_b,
        zero,
        commit(1, root(&[id_a, id_b, ChunkId::ZERO]), false),
        Message::Offer { ids: vec![id_a] },
        reference,
        Message::Commit {
            epoch: 2,
            root: root(&[id_a, id_a, ChunkId::ZERO]),
            scan_started_unix_ms: 2,
            complete: true,
            last: false,
            consistency: Consistency::Live,
        },
    ])
    .into_iter()
    .chain(frames(&[
        raw(2, &c),
        commit(3, root(&[id_a, id_a, id_c]), false),
    ]))
    .collect()
}

/// An epoch, then `GetPages` (as an agent that reconnected would send) before
/// the next epoch.
fn page_fetch_session() -> Vec<u8> {
    let a = chunk_data(0, 9);
    let id_a = ChunkId::from(blake3::hash(&a));
    let c = chunk_data(2, 7);
    let id_c = ChunkId::from(blake3::hash(&c));
    frames(&[
        hello(),
        raw(0, &a),
        commit(1, root(&[id_a, ChunkId::ZERO, ChunkId::ZERO]), false),
        Message::GetPages { indices: vec![0] },
        raw(2, &c),
        commit(2, root(&[id_a, ChunkId::ZERO, id_c]), false),
    ])
}

/// An epoch, then the block values of its chunk and a patch of that chunk.
fn patch_session() -> Vec<u8> {
    let a = chunk_data(0, 6);
    let id_a = ChunkId::from(blake3::hash(&a));
    let mut b = a.clone();
    b[1000..1010].copy_from_slice(b"0123456789");
    let id_b = ChunkId::from(blake3::hash(&b));
    frames(&[
        hello(),
        raw(0, &a),
        commit(1, root(&[id_a, ChunkId::ZERO, ChunkId::ZERO]), false),
        Message::GetBlockValues { ids: vec![id_a] },
        Message::Patch {
            index: 0,
            base: id_a,
            id: id_b,
            codec: Codec::Raw,
            raw_len: CHUNK,
            ranges: vec![(1000, 10)],
            data: Bytes::from_static(b"0123456789"),
        },
        commit(2, root(&[id_b, ChunkId::ZERO, ChunkId::ZERO]), false),
    ])
}

/// A final (cutover) commit, then the agent's downtime report.
fn cutover() -> Vec<u8> {
    let a = chunk_data(0, 5);
    let id_a = ChunkId::from(blake3::hash(&a));
    frames(&[
        hello(),
        backlog(),
        raw(0, &a),
        commit(1, root(&[id_a, ChunkId::ZERO, ChunkId::ZERO]), true),
        Message::CutoverReport {
            hook_ms: 1,
            scan_ms: 2,
            transfer_ms: 3,
            total_ms: 4,
        },
    ])
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = vec![
        ("session", "three-epochs", three_epochs()),
        ("session", "page-fetch", page_fetch_session()),
        ("session", "cutover", cutover()),
        ("session", "hello-only", frames(&[hello()])),
        ("session", "patch", patch_session()),
        ("frame_decode", "session-stream", three_epochs()),
    ];
    let id = ChunkId::from(blake3::hash(b"x"));
    let one_of_each: [(&str, Message); 15] = [
        ("hello", hello()),
        (
            "welcome",
            Message::Welcome {
                version: 1,
                nonce: [5; 32],
                head_epoch: 3,
                head_root: Bytes::from_static(b"root"),
                id_key: None,
            },
        ),
        (
            "get-pages",
            Message::GetPages {
                indices: vec![0, 7],
            },
        ),
        (
            "page",
            Message::Page {
                index: 1,
                ids: Bytes::copy_from_slice(id.as_bytes()),
            },
        ),
        ("chunk", raw(0, &chunk_data(0, 4))),
        ("commit", commit(1, id, false)),
        ("backlog", backlog()),
        ("offer", Message::Offer { ids: vec![id, id] }),
        (
            "have",
            Message::Have {
                bits: Bytes::from_static(&[1]),
            },
        ),
        (
            "committed",
            Message::Committed {
                epoch: 1,
                root: id,
                chunks_received: 2,
                bytes_received: 3,
                chunks_stored: 4,
                cutover_requested: true,
            },
        ),
        (
            "error",
            Message::Error {
                code: ErrorCode::BadChunk,
                message: "chunk 3 does not hash to its id".into(),
            },
        ),
        (
            "failback-plan",
            Message::FailbackPlan {
                target_root: Bytes::from_static(b"target"),
                base_root: Bytes::from_static(b"base"),
            },
        ),
        (
            "get-block-values",
            Message::GetBlockValues { ids: vec![id] },
        ),
        (
            "block-values",
            Message::BlockValues {
                values: vec![Bytes::from_static(&[7; 32]), Bytes::new()],
            },
        ),
        (
            "patch",
            Message::Patch {
                index: 1,
                base: id,
                id,
                codec: Codec::Raw,
                raw_len: CHUNK,
                ranges: vec![(0, 4), (100, 2)],
                data: Bytes::from_static(b"abcdef"),
            },
        ),
    ];
    for (name, message) in one_of_each {
        out.push(("frame_decode", name, frames(&[message])));
    }
    let geometry = Geometry::new(3000 * 4096 - 7, 4096).unwrap();
    let ids: Vec<ChunkId> = (0..3000u32)
        .map(|i| {
            if i % 5 == 0 {
                ChunkId::ZERO
            } else {
                ChunkId::from(blake3::hash(&i.to_le_bytes()))
            }
        })
        .collect();
    let (root, pages) = Root::build(geometry, &ids);
    out.push(("index", "root-3-pages", root.encode()));
    out.push(("index", "page-last", pages[2].encode()));
    out.push((
        "index",
        "root-empty-disk",
        Root::from_chunk_ids(Geometry::new(0, 65_536).unwrap(), &[]).encode(),
    ));
    out.push(("nbd_wire", "read-request", nbd_request(0, 0, 4096, 1 << 20)));
    out.push((
        "nbd_wire",
        "write-request",
        nbd_request(1, 1 << 20, 512, 1 << 20),
    ));
    out.push(("nbd_wire", "trim-request", nbd_request(4, 0, 4096, 8192)));
    let mut go = b"IHAVEOPT".to_vec();
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&12u32.to_be_bytes());
    out.push(("nbd_wire", "option-go", go));
    for (name, data) in blockrep_agent::capture::fuzzing::seeds() {
        out.push(("capture_export", name, data));
    }
    out.push((
        "nbd_wire",
        "info-request",
        blockrep_nbd::wire::encode_info_request(&blockrep_nbd::wire::InfoRequest {
            name: "test-1".into(),
            info_types: vec![3, 1],
        }),
    ));
    out
}

/// An NBD request header followed by the export it is checked against
/// (size, cap, read-only flag), as the nbd_wire target reads them.
fn nbd_request(command: u16, offset: u64, length: u32, size: u64) -> Vec<u8> {
    let request = blockrep_nbd::wire::Request {
        flags: 0,
        command: blockrep_nbd::wire::Command::from_u16(command),
        handle: 42,
        offset,
        length,
    };
    let mut out = blockrep_nbd::wire::encode_request(&request).to_vec();
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&(1u32 << 20).to_le_bytes());
    out.push(0);
    out
}

//! A driver for the real session state machine, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/session.rs`) and the corpus replay test
//! (`tests/it/fuzz_corpus.rs`). Not part of the API: panics are the point.
//!
//! The bytes an agent would send after the TLS handshake are fed to a
//! [`crate::session`] over an in-memory stream, against a fresh store, with the
//! certificate identity fixed to [`FUZZ_SOURCE`]. Afterwards the store must
//! agree with what the session told the agent:
//!
//! - the head is exactly the last epoch acknowledged (`Committed` or
//!   `CutoverReady`), or absent when none was: nothing unacknowledged is
//!   committed and nothing acknowledged is missing;
//! - every blob reachable from the head verifies (crc, decoding, blake3);
//! - every reply is a well-formed frame, and the session ends by itself.
//!
//! The frame checksums of the input are recomputed first
//! ([`blockrep_proto::fuzzing::reseal`]): a mutated input would otherwise stop
//! at its first damaged frame, and the session behind the codec would go
//! unexplored. The codec's tests and `tests/stream_corruption.rs` cover the
//! checksum itself.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockrep_core::SourceId;
use blockrep_proto::{Message, decode};
use blockrep_store::Store;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ServerConfig;
use crate::in_memory::InMemoryServer;

/// The source the driven session's (imaginary) certificate names.
pub const FUZZ_SOURCE: &str = "fuzz";

/// A session that has not ended this long after its input ended is stuck.
const SESSION_TIME_MAX: Duration = Duration::from_secs(20);

/// Runs one session fed with `agent_bytes` against a new store in `data_dir`
/// (which must be empty or absent), checks the store against the replies, and
/// returns the replies.
pub fn drive_session(data_dir: &Path, agent_bytes: &[u8]) -> Vec<Message> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(Store::open(data_dir).expect("open a new store"));
    let mut config = ServerConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir.to_owned(),
        data_dir.to_owned(),
    );
    // An input that stops mid-epoch must end the session soon, not in minutes.
    config.idle_timeout = Duration::from_secs(2);
    config.handshake_timeout = Duration::from_secs(2);
    config.retention = None;
    // Claims of huge disks are refused rather than allocated: 2^20 chunks.
    config.session_memory_max_bytes = 33 << 20;
    let server = InMemoryServer::new(Arc::clone(&store), config);
    let source = SourceId::new(FUZZ_SOURCE).expect("valid id");
    let agent_bytes = blockrep_proto::fuzzing::reseal(agent_bytes);
    let replies = runtime.block_on(async {
        let (mut agent, stream) = tokio::io::duplex(1 << 20);
        let session = tokio::spawn(server.serve(stream, source.clone()));
        let (mut reader, mut writer) = tokio::io::split(&mut agent);
        let feed = async {
            // The session may stop reading early (after an error); that is fine.
            let _ = writer.write_all(&agent_bytes).await;
            let _ = writer.shutdown().await;
        };
        let mut received = Vec::new();
        let drain = reader.read_to_end(&mut received);
        let (_, drained) =
            tokio::time::timeout(SESSION_TIME_MAX, async { tokio::join!(feed, drain) })
                .await
                .expect("the session neither ended nor closed its stream");
        drained.expect("reading the session's replies");
        tokio::time::timeout(SESSION_TIME_MAX, session)
            .await
            .expect("the session did not end")
            .expect("the session panicked");
        received
    });
    let mut buf = BytesMut::from(&replies[..]);
    let mut messages = Vec::new();
    while let Some(message) = decode(&mut buf).expect("the server sent a malformed frame") {
        messages.push(message);
    }
    assert!(buf.is_empty(), "the server sent a partial frame");
    check_store(&store, &source, &messages);
    messages
}

fn check_store(store: &Store, source: &SourceId, replies: &[Message]) {
    let acknowledged = replies.iter().rev().find_map(|m| match m {
        Message::Committed { epoch, root, .. } | Message::CutoverReady { epoch, root, .. } => {
            Some((*epoch, *root))
        }
        _ => None,
    });
    let head = store.head(source).expect("read the head");
    match (acknowledged, head) {
        (None, None) => {}
        (Some((epoch, root)), Some(head)) => {
            assert_eq!(
                (head.epoch, head.root),
                (epoch, root),
                "the head is not the last acknowledged epoch"
            );
        }
        (None, Some(head)) => panic!("epoch {} committed without acknowledgement", head.epoch),
        (Some((epoch, _)), None) => panic!("acknowledged epoch {epoch} has no head"),
    }
    let report = store.verify(None, None).expect("verify the store");
    assert!(report.is_clean(), "damaged store: {:?}", report.damaged);
}

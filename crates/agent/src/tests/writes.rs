//! How the agent's frames reach the stream (TLS, in production).

use std::sync::Arc;

use blockrep_core::SourceId;

use super::CutAfter;
use crate::AgentConfig;
use crate::connection::Connection;

/// A whole-chunk frame goes to the stream as it is, in a write of its own,
/// after the small frames buffered before it: it is not first copied into
/// the write buffer. Small frames still gather.
#[tokio::test]
async fn a_whole_chunk_frame_is_written_as_it_is_and_small_ones_gather() {
    let (ours, _peer) = tokio::io::duplex(1 << 20);
    let writes = Arc::default();
    let stream = CutAfter {
        inner: ours,
        budget: usize::MAX,
        writes: Arc::clone(&writes),
        taken: Arc::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig::new(
        dir.path().join("disk.raw"),
        "in-memory:0".into(),
        SourceId::new("web-1").unwrap(),
        dir.path().join("ca.crt"),
        dir.path().join("agent.crt"),
        dir.path().join("agent.key"),
    );
    let mut connection = Connection::new(stream, &config);
    let chunk_frame = vec![7u8; blockrep_proto::CHUNK_HEADER_LEN + 65_536];
    for _ in 0..3 {
        connection.write_raw(&[1u8; 100]).await.unwrap();
    }
    connection.write_raw(&chunk_frame).await.unwrap();
    connection.flush().await.unwrap();
    assert_eq!(
        *writes.lock().unwrap(),
        vec![300, chunk_frame.len()],
        "the small frames in one write, then the chunk's frame alone"
    );
}

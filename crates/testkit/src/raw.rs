//! Protocol sessions opened by hand with [`RawClient`], as an agent or a
//! hostile peer would open them: the small disk most such tests claim, the
//! `Hello` for it, and reading past the server's unprompted messages.

use blockrep_core::{Geometry, SourceId};
use blockrep_proto::{Message, PROTOCOL_VERSION};

use crate::{Pki, RawClient, ServerProcess};

/// The chunk size of [`SMALL_DISK_BYTES`].
pub const SMALL_CHUNK_BYTES: u32 = 65_536;
/// 16 chunks of 64 KiB and a short 17th.
pub const SMALL_DISK_BYTES: u64 = 16 * SMALL_CHUNK_BYTES as u64 + 1000;

/// The geometry of the small disk.
pub fn small_geometry() -> Geometry {
    Geometry::new(SMALL_DISK_BYTES, SMALL_CHUNK_BYTES).unwrap()
}

/// The `Hello` of this protocol version for `source` and a disk of that
/// geometry.
pub fn hello(source: &str, disk_size_bytes: u64, chunk_size_bytes: u32) -> Message {
    Message::Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        source: SourceId::new(source).unwrap(),
        disk_size_bytes,
        chunk_size_bytes,
    }
}

/// The `Hello` for `source` and the small disk.
pub fn small_hello(source: &str) -> Message {
    hello(source, SMALL_DISK_BYTES, SMALL_CHUNK_BYTES)
}

/// The next message, skipping the server's unprompted `Progress` beats.
pub async fn next(client: &mut RawClient) -> Option<Message> {
    loop {
        match client.recv().await.unwrap() {
            Some(Message::Progress { .. }) => continue,
            other => return other,
        }
    }
}

/// What the server's `Welcome` told a session.
#[derive(Debug)]
pub struct Welcome {
    /// The head epoch of the source (0 without one).
    pub head_epoch: u64,
    /// The session's nonce, the key of its proofs of possession.
    pub nonce: [u8; 32],
}

/// Connects to `server` as `source` and says the small disk's `Hello`; the
/// client past the `Welcome`, and what it said. Fails with what came instead
/// and the server's log.
pub async fn small_session(
    server: &ServerProcess,
    pki: &Pki,
    source: &str,
) -> (RawClient, Welcome) {
    let mut client = RawClient::connect_as(server.addr, pki, source).await;
    client.send(&small_hello(source)).await.unwrap();
    match next(&mut client).await {
        Some(Message::Welcome {
            head_epoch, nonce, ..
        }) => (client, Welcome { head_epoch, nonce }),
        other => panic!("no Welcome for {source}: {other:?}; log: {}", server.log()),
    }
}

/// The server's answer to a `Commit` must be `Committed` of `epoch` (after
/// any `Progress` beats).
pub async fn expect_committed(client: &mut RawClient, epoch: u64) {
    match next(client).await {
        Some(Message::Committed { epoch: got, .. }) => assert_eq!(got, epoch),
        other => panic!("expected Committed of epoch {epoch}, got {other:?}"),
    }
}

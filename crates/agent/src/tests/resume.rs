//! An epoch cut mid-transfer resumes from what the server acknowledged.
//!
//! The agent's contract: every intermediate commit the server acknowledged
//! (`Committed` for a step of a large epoch) is durable, and a new session
//! learns it as the head, so the next epoch sends only what differs from it;
//! anything sent after the last acknowledged step is sent again.

use std::sync::Arc;

use super::{CHUNK, CutAfter, Rig, ended};
use crate::Error;

/// Chunks of the test disk.
const CHUNKS: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_cut_mid_transfer_resumes_without_resending_what_was_acknowledged() {
    let mut rig = Rig::new(CHUNKS, 3);
    // An intermediate commit every four chunks.
    rig.config.step_bytes = 4 * u64::from(CHUNK);
    let scan = rig.scan().await;
    let root = Rig::root_of(&scan);
    let geometry = scan.geometry;
    let ids = scan.ids.clone();

    // The connection dies after about half the disk's bytes.
    let budget = (CHUNKS / 2 * u64::from(CHUNK)) as usize;
    let (mut session, served) = rig
        .connect_with(geometry, |inner| CutAfter {
            inner,
            budget,
            writes: Arc::default(),
            taken: Arc::default(),
        })
        .await;
    let cut = session.epoch(&rig.config, scan, false).await;
    assert!(matches!(cut, Err(Error::Lost(_))), "{cut:?}");
    drop(session);
    ended(served).await;

    // What the server acknowledged: some steps, not the whole epoch.
    let (step_epoch, step_root) = rig.head().expect("a step was committed before the cut");
    assert_ne!(step_root, root, "the cut came before the final commit");
    let acknowledged = rig
        .head_ids()
        .iter()
        .zip(&ids)
        .filter(|(head, disk)| head == disk)
        .count() as u64;
    assert!(
        0 < acknowledged && acknowledged < CHUNKS,
        "{acknowledged} of {CHUNKS} chunks acknowledged"
    );

    // A new connection: the agent learns that head and sends the rest only.
    let scan = rig.scan().await;
    let (mut session, served) = rig.connect(geometry).await;
    assert_eq!(session.head_root_id(), Some(step_root));
    let report = session
        .epoch(&rig.config, scan, false)
        .await
        .expect("the resumed epoch commits")
        .expect("the rest of the disk is sent");
    session.close().await;
    ended(served).await;
    assert_eq!(
        report.chunks_sent,
        CHUNKS - acknowledged,
        "the acknowledged chunks are not sent again: {report:?}"
    );
    assert_eq!(report.server_chunks_received, CHUNKS - acknowledged);
    assert_eq!(
        report.zero_chunks_sent + report.ref_chunks_sent,
        0,
        "not even a reference to an acknowledged chunk: {report:?}"
    );
    assert_eq!(report.root, root);
    assert_eq!(rig.head(), Some((report.epoch, root)));
    assert!(report.epoch > step_epoch);
}

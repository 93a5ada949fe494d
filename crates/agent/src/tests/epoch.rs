//! Epochs: the first commits the whole disk, later ones only what changed.

use super::{Rig, ended};

/// Chunks of the test disk.
const CHUNKS: u64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_epoch_commits_the_disk_as_the_servers_head() {
    let rig = Rig::new(CHUNKS, 1);
    let scan = rig.scan().await;
    let root = Rig::root_of(&scan);
    let (mut session, served) = rig.connect(scan.geometry).await;
    assert_eq!(session.head_root_id(), None, "a new source has no head");

    let report = session
        .epoch(&rig.config, scan, false)
        .await
        .expect("the epoch commits")
        .expect("a disk with data is sent");
    session.close().await;
    ended(served).await;

    assert_eq!((report.epoch, report.root), (1, root));
    assert_eq!(rig.head(), Some((1, root)), "the store's head is the disk");
    assert_eq!(report.chunks_sent, CHUNKS, "every chunk travels once");
    assert_eq!(report.server_chunks_stored, CHUNKS);
    let verified = rig.store().verify(None, None).expect("verify the store");
    assert!(verified.is_clean(), "damaged: {:?}", verified.damaged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_epochs_send_only_the_changed_chunks() {
    let mut rig = Rig::new(CHUNKS, 2);
    let first = rig.scan().await;
    let geometry = first.geometry;
    let (mut session, served) = rig.connect(geometry).await;
    session
        .epoch(&rig.config, first, false)
        .await
        .expect("the first epoch commits");

    // In the same session: the diff is against the ids it committed.
    rig.rewrite_chunk(3);
    rig.rewrite_chunk(17);
    let second = rig.scan().await;
    let root = Rig::root_of(&second);
    let report = session
        .epoch(&rig.config, second, false)
        .await
        .expect("the second epoch commits")
        .expect("a changed disk is sent");
    assert_eq!((report.epoch, report.root), (2, root));
    assert_eq!(
        report.chunks_sent, 2,
        "only the two changed chunks: {report:?}"
    );
    assert_eq!(report.zero_chunks_sent + report.ref_chunks_sent, 0);
    assert_eq!(report.server_chunks_received, 2);
    assert_eq!(rig.head(), Some((2, root)));

    // Unchanged: nothing to send, nothing committed.
    let idle = rig.scan().await;
    let nothing = session.epoch(&rig.config, idle, false).await;
    assert!(matches!(nothing, Ok(None)), "{nothing:?}");
    session.close().await;
    ended(served).await;

    // In a new session: the diff is against the head's pages, fetched.
    rig.rewrite_chunk(9);
    let third = rig.scan().await;
    let root = Rig::root_of(&third);
    let (mut session, served) = rig.connect(geometry).await;
    let report = session
        .epoch(&rig.config, third, false)
        .await
        .expect("the third epoch commits")
        .expect("a changed disk is sent");
    session.close().await;
    ended(served).await;
    assert_eq!((report.epoch, report.root), (3, root));
    assert_eq!(report.chunks_sent, 1, "only the changed chunk: {report:?}");
    assert_eq!(
        report.zero_chunks_sent + report.ref_chunks_sent,
        0,
        "not even a reference to an unchanged chunk: {report:?}"
    );
    assert_eq!(report.server_chunks_received, 1);
    assert_eq!(rig.head(), Some((3, root)));
}

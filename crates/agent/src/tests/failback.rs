//! Failback: the disk takes a launch's content back from the server.

use tokio::sync::watch;

use super::{Rig, ended};
use crate::failback::failback_session;
use crate::{Error, FailbackOptions};

/// Chunks of the test disk.
const CHUNKS: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_from_the_head_rewrites_a_changed_disk_back_to_the_replica() {
    let mut rig = Rig::new(CHUNKS, 4);
    let first = rig.scan().await;
    let geometry = first.geometry;
    let replica_root = Rig::root_of(&first);
    let (mut session, served) = rig.connect(geometry).await;
    session
        .epoch(&rig.config, first, false)
        .await
        .expect("the epoch commits");
    session.close().await;
    ended(served).await;
    let replica = rig.disk_bytes();

    // A launch of the head, as a cutover makes; then the disk changes.
    let store = rig.store();
    let now = blockrep_core::clock::now_unix_ms();
    store
        .create_snapshot(&rig.source, Some("before"), None, now)
        .expect("snapshot the head");
    store
        .create_launch(
            &rig.source,
            "before",
            "restore",
            blockrep_store::LaunchKind::Test,
            now,
        )
        .expect("launch the snapshot");
    rig.rewrite_chunk(2);
    rig.rewrite_chunk(11);
    let changed = rig.disk_bytes();
    assert_ne!(changed, replica);

    let (_never, shutdown) = watch::channel(false);
    let mut options = FailbackOptions {
        launch: "restore".into(),
        once: true,
        overwrite_source_changes: false,
    };

    // The disk's own changes since the launch's base are not overwritten
    // unless asked for.
    let scan = rig.scan().await;
    let (session, served) = rig.connect(geometry).await;
    let refused = failback_session(
        &rig.config,
        &options,
        shutdown.clone(),
        |_| {},
        session,
        scan,
    )
    .await;
    ended(served).await;
    match refused {
        Err(Error::Conflict(message)) => assert!(message.contains("2 chunks"), "{message}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        rig.disk_bytes(),
        changed,
        "nothing written before the check"
    );

    options.overwrite_source_changes = true;
    let scan = rig.scan().await;
    let (session, served) = rig.connect(geometry).await;
    let passes = failback_session(&rig.config, &options, shutdown, |_| {}, session, scan)
        .await
        .expect("the failback completes");
    ended(served).await;
    assert_eq!(passes.len(), 1);
    let pass = &passes[0];
    assert_eq!(pass.target_root, replica_root);
    assert_eq!(pass.chunks_written, 2, "only the changed chunks: {pass:?}");
    assert_eq!(pass.source_changes_overwritten, 2);
    assert!(pass.finalized);
    assert!(rig.disk_bytes() == replica, "the disk is the replica again");
}

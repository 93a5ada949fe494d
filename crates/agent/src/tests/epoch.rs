//! Epochs: the first commits the whole disk, later ones only what changed.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use blockrep_core::SourceId;
use blockrep_proto::Message;
use bytes::BytesMut;

use super::{CHUNK, CutAfter, Rig, ended};
use crate::view::take_live;

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

/// A disk of `CHUNKS` chunks whose chunks 5 to 7 are zero and whose chunk 10
/// repeats chunk 0, with an agent certificate for its source (in `tenant`,
/// if given): what decides whether a first sync may skip its scan.
fn first_sync_rig(seed: u64, tenant: Option<&str>) -> Rig {
    let mut rig = Rig::new(CHUNKS, seed);
    let zeros = vec![0u8; 3 * CHUNK as usize];
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&rig.disk)
        .unwrap();
    file.write_all_at(&zeros, 5 * u64::from(CHUNK)).unwrap();
    let mut first = vec![0u8; CHUNK as usize];
    file.read_exact_at(&mut first, 0).unwrap();
    file.write_all_at(&first, 10 * u64::from(CHUNK)).unwrap();
    let tls = rig.disk.with_file_name("tls");
    blockrep_pki::init_ca(&tls, &[], false).expect("make a CA");
    let tenant = tenant.map(|t| SourceId::new(t).expect("a tenant id"));
    let (cert, key) = blockrep_pki::issue_source_in_tenant(&tls, &rig.source, tenant.as_ref())
        .expect("issue the agent's certificate");
    rig.config.cert_path = cert;
    rig.config.key_path = key;
    rig
}

/// A first sync of the rig's disk taken as it starts (not hashed yet), in
/// one session: its report, and the view it read (which counts its reads).
async fn first_sync(rig: &Rig) -> (crate::EpochReport, Arc<crate::view::View>) {
    first_sync_over(rig, |stream| stream).await
}

/// [`first_sync`] over the stream `wrap` makes of the agent's end.
async fn first_sync_over<S: crate::connection::Transport>(
    rig: &Rig,
    wrap: impl FnOnce(tokio::io::DuplexStream) -> S,
) -> (crate::EpochReport, Arc<crate::view::View>) {
    let scan = take_live(&rig.config, CHUNK).await.expect("take the disk");
    assert!(scan.pending && scan.ids.is_empty(), "nothing hashed yet");
    let disk = Arc::clone(&scan.disk);
    let (mut session, served) = rig.connect_with(scan.geometry, wrap).await;
    let report = session
        .epoch(&rig.config, scan, false)
        .await
        .expect("the epoch commits")
        .expect("a disk with data is sent");
    session.close().await;
    ended(served).await;
    (report, disk)
}

/// The first sync of a source without a tenant hashes each chunk as it sends
/// it: the disk is read once (not scanned, then read again), zeros are not
/// sent, a repeated chunk travels as a reference, and the head is the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_reads_the_disk_once() {
    let rig = first_sync_rig(4, None);
    let (report, disk) = first_sync(&rig).await;

    let size = CHUNKS * u64::from(CHUNK);
    assert_eq!(disk.bytes_read(), size, "every byte read once");
    let root = Rig::root_of(&rig.scan().await);
    assert_eq!((report.epoch, report.root), (1, root));
    assert_eq!(rig.head(), Some((1, root)));
    assert_eq!(report.chunks_sent, CHUNKS - 4, "{report:?}");
    assert_eq!(report.ref_chunks_sent, 1, "the repeat: {report:?}");
    assert_eq!(report.zero_chunks_sent, 0, "zeros stay home: {report:?}");
    assert!(rig.store().verify(None, None).unwrap().is_clean());
}

/// A streamed first sync that commits in steps tells the server again after
/// each step what is left to read: its first `Backlog` counted every chunk,
/// as nothing was scanned, and the server's backlog (and the source's lag)
/// would otherwise stay at the whole disk until the epoch ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_first_sync_tells_the_server_what_is_left_after_each_step() {
    let mut rig = first_sync_rig(7, None);
    rig.config.step_bytes = 4 * u64::from(CHUNK);
    let taken = Arc::new(Mutex::new(Vec::new()));
    first_sync_over(&rig, |inner| CutAfter {
        inner,
        budget: usize::MAX,
        writes: Arc::default(),
        taken: Arc::clone(&taken),
    })
    .await;

    let mut sent = BytesMut::from(&taken.lock().unwrap()[..]);
    let mut backlogs = Vec::new();
    while let Some(message) = blockrep_proto::decode(&mut sent).expect("the agent's frames") {
        if let Message::Backlog {
            chunks_pending,
            bytes_pending,
            ..
        } = message
        {
            backlogs.push((chunks_pending, bytes_pending));
        }
    }
    assert!(sent.is_empty(), "{} bytes left undecoded", sent.len());
    assert_eq!(backlogs[0], (CHUNKS, CHUNKS * u64::from(CHUNK)));
    assert!(
        backlogs.len() >= 3,
        "a Backlog after each step: {backlogs:?}"
    );
    for pair in backlogs.windows(2) {
        assert!(pair[1].0 < pair[0].0, "what is left shrinks: {backlogs:?}");
        assert_eq!(pair[1].1, pair[1].0 * u64::from(CHUNK), "{backlogs:?}");
    }
}

/// A source of a tenant scans first: its `Offer` may find the chunks the
/// tenant's other sources hold, so what it sends is read a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_in_a_tenant_scans_and_offers_first() {
    let rig = first_sync_rig(5, Some("acme"));
    let (report, disk) = first_sync(&rig).await;

    let size = CHUNKS * u64::from(CHUNK);
    let nonzero = (CHUNKS - 3) * u64::from(CHUNK);
    assert_eq!(disk.bytes_read(), size + nonzero, "scanned, then read");
    let root = Rig::root_of(&rig.scan().await);
    assert_eq!(rig.head(), Some((1, root)));
    assert_eq!(report.chunks_sent, CHUNKS - 4, "{report:?}");
}

/// A first sync of a sparse disk leaves its holes unread: they are zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_leaves_the_holes_of_a_sparse_disk_unread() {
    let rig = first_sync_rig(6, None);
    // Chunks 5 to 7 (zeros) become a hole of the file.
    let file = OpenOptions::new().write(true).open(&rig.disk).unwrap();
    rustix::fs::fallocate(
        &file,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        5 * u64::from(CHUNK),
        3 * u64::from(CHUNK),
    )
    .expect("punch a hole");
    drop(file);
    let (report, disk) = first_sync(&rig).await;

    let size = CHUNKS * u64::from(CHUNK);
    assert_eq!(
        disk.bytes_read(),
        size - 3 * u64::from(CHUNK),
        "holes unread"
    );
    let root = Rig::root_of(&rig.scan().await);
    assert_eq!((report.epoch, report.root), (1, root));
    assert_eq!(report.chunks_sent, CHUNKS - 4, "{report:?}");
    assert!(rig.store().verify(None, None).unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_epoch_with_no_next_is_refused_at_the_welcome() {
    let rig = Rig::new(CHUNKS, 3);
    let scan = rig.scan().await;
    let geometry = scan.geometry;
    // A peer that answers any Hello with a head at the last epoch there is,
    // whose root is otherwise a good one for this disk.
    let (agent_end, mut peer_end) = tokio::io::duplex(super::PIPE_BYTES);
    let peer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let welcome = Message::Welcome {
            version: blockrep_proto::PROTOCOL_VERSION,
            nonce: [9; blockrep_proto::NONCE_LEN],
            head_epoch: u64::MAX,
            head_root: blockrep_core::Root::from_chunk_ids(geometry, &scan.ids)
                .encode()
                .into(),
            id_key: None,
        };
        let mut out = BytesMut::new();
        blockrep_proto::encode(&welcome, &mut out);
        peer_end.write_all(&out).await.expect("send the Welcome");
        // Held open until the agent has had its say.
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut peer_end, &mut sink).await;
    });
    let connection = crate::connection::Connection::new(agent_end, &rig.config);
    let refused = crate::epoch::Session::start(connection, &rig.config, geometry).await;
    let Err(crate::Error::Protocol(why)) = refused else {
        panic!("a head epoch of u64::MAX was welcomed: {:?}", refused.err());
    };
    assert!(why.contains("no next epoch"), "{why}");
    peer.abort();
}

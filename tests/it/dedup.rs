//! Deduplication without an oracle: a source references only data it holds.
//!
//! Driven as an attacker would, with the raw protocol client over real mutual
//! TLS against the real server binary: another source's root, pages and
//! chunks cannot be referenced (commit refused), `Have` does not reveal
//! whether another tenant's chunk exists, a reference across a tenant needs a
//! proof of possession, one epoch cannot grow without bound, one `Hello`
//! cannot reserve most of the session memory, and failback streams rather than
//! gathering what a `Want` asks for. Within a tenant, deduplication still
//! saves the bytes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use blockrep_core::{ChunkId, Page, Root, SourceId};
use blockrep_proto::{Codec, ErrorCode, Message, ref_proof};
use blockrep_testkit::raw::*;
use blockrep_testkit::{Pki, RawClient, ServerProcess, random_bytes};
use bytes::Bytes;

const CHUNK: u32 = SMALL_CHUNK_BYTES;
const DISK: u64 = SMALL_DISK_BYTES;

/// Offers `ids`; the bits of the server's `Have`.
async fn have(client: &mut RawClient, ids: &[ChunkId]) -> Bytes {
    client
        .send(&Message::Offer { ids: ids.to_vec() })
        .await
        .unwrap();
    let Message::Have { bits } = next(client).await.unwrap() else {
        panic!("expected Have");
    };
    bits
}

fn chunks_of(disk: &[u8]) -> Vec<&[u8]> {
    let geometry = small_geometry();
    (0..geometry.chunk_count())
        .map(|i| &disk[geometry.chunk_range(i).unwrap()])
        .collect()
}

fn ids_of(disk: &[u8]) -> Vec<ChunkId> {
    chunks_of(disk)
        .iter()
        .map(|c| ChunkId::from(blake3::hash(c)))
        .collect()
}

fn reference(index: u64, id: ChunkId, proof: [u8; 32]) -> Message {
    Message::Chunk {
        index,
        id,
        codec: Codec::Ref,
        raw_len: small_geometry().chunk_len(index).unwrap(),
        data: Bytes::copy_from_slice(&proof),
    }
}

/// The commit of a replica whose chunk `index` is `id`, all else zero.
fn commit_one(index: usize, id: ChunkId) -> Message {
    let mut ids = vec![ChunkId::ZERO; small_geometry().chunk_count() as usize];
    ids[index] = id;
    Message::Commit {
        epoch: 1,
        root: Root::from_chunk_ids(small_geometry(), &ids).id(),
        scan_started_unix_ms: 1,
        complete: true,
        last: false,
        consistency: blockrep_core::Consistency::Live,
    }
}

/// Sends `frame`; if the server says nothing within a moment (it accepted
/// the frame), sends `commit` too. Returns the server's answer: an `Error`
/// where the frame is refused, `Committed` where it was taken.
async fn send_then_commit(client: &mut RawClient, frame: &Message, commit: &Message) -> Message {
    client.send(frame).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(2), next(client)).await {
        Ok(answer) => answer.unwrap(),
        Err(_) => {
            client.send(commit).await.unwrap();
            next(client).await.unwrap()
        }
    }
}

fn expect_bad_chunk(answer: Message, what: &str, text: &str) {
    match answer {
        Message::Error {
            code: ErrorCode::BadChunk,
            message,
        } => assert!(message.contains(text), "{what}: {message}"),
        other => panic!("{what}: expected BadChunk, got {other:?}"),
    }
}

/// Source `a` knows source `b`'s root id (it is shown in listings and logs),
/// and from it, or from `b`'s disk, the ids of `b`'s pages and chunks. It
/// references each as its own chunk: every one is refused with `BadChunk`,
/// whatever proof comes with it, and `a` never gets a replica (so no launch
/// or failback of `a` can carry `b`'s bytes). Its `Offer` of the same ids is
/// answered with no bit set: `a` does not learn that they exist.
#[tokio::test(flavor = "multi_thread")]
async fn another_sources_root_pages_and_chunks_cannot_be_referenced() {
    let rig = rig(&["a", "b"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let victim = random_bytes(DISK as usize, 7);
    let victim_path = work.path().join("b.raw");
    std::fs::write(&victim_path, &victim).unwrap();
    assert_success(&agent_once(&victim_path, server.addr, "b", pki.path(), &[]));

    let ids = ids_of(&victim);
    let (root, pages) = Root::build(small_geometry(), &ids);
    assert_eq!(
        root.id().to_hex(),
        disk_root(&victim_path, CHUNK),
        "the root the attacker computes is b's"
    );
    let page_id = pages[0].id();
    assert_eq!(page_id, Page::new(ids.clone()).id());
    let chunks = chunks_of(&victim);

    // Each as chunk 0 (a full-size slot), with the best proof the attacker
    // can make: keyed over the bytes it names (it even holds b's chunk).
    let root_bytes = root.encode();
    let page_bytes = pages[0].encode();
    let cases: [(&str, ChunkId, &[u8]); 4] = [
        ("b's root", root.id(), &root_bytes),
        ("b's page", page_id, &page_bytes),
        ("b's chunk 0", ids[0], chunks[0]),
        ("b's chunk 5", ids[5], chunks[5]),
    ];
    for (what, id, bytes) in cases {
        let (mut client, Welcome { nonce, .. }) = small_session(server, pki, "a").await;
        let answer = send_then_commit(
            &mut client,
            &reference(0, id, ref_proof(&nonce, bytes)),
            &commit_one(0, id),
        )
        .await;
        expect_bad_chunk(answer, what, "which this source does not hold");
    }
    // Without a proof at all.
    let (mut client, _) = small_session(server, pki, "a").await;
    let answer = send_then_commit(
        &mut client,
        &reference(0, ids[3], [0; 32]),
        &commit_one(0, ids[3]),
    )
    .await;
    expect_bad_chunk(answer, "b's chunk 3 unproven", "does not hold");
    assert!(rig.head("a").is_none(), "a got a replica of b's data");

    // Have: nothing of b's exists, as far as a can tell.
    let (mut client, _) = small_session(server, pki, "a").await;
    let mut offered = ids.clone();
    offered.extend([root.id(), page_id]);
    client
        .send(&Message::Offer {
            ids: offered.clone(),
        })
        .await
        .unwrap();
    match next(&mut client).await.unwrap() {
        Message::Have { bits } => assert!(
            bits.iter().all(|b| *b == 0),
            "Have reveals b's ids to a: {bits:?}"
        ),
        other => panic!("expected Have, got {other:?}"),
    }
    drop(client);

    // b itself may reference its own chunks (a moved block): no proof needed,
    // and its Have admits them, but never its page or root as a chunk.
    let (mut client, _) = small_session(server, pki, "b").await;
    client.send(&Message::Offer { ids: offered }).await.unwrap();
    let Message::Have { bits } = next(&mut client).await.unwrap() else {
        panic!("expected Have");
    };
    for i in 0..ids.len() {
        assert_ne!(bits[i / 8] & (1 << (i % 8)), 0, "b's own chunk {i}");
    }
    for i in ids.len()..ids.len() + 2 {
        assert_eq!(bits[i / 8] & (1 << (i % 8)), 0, "b's page or root {i}");
    }
    let answer = send_then_commit(
        &mut client,
        &reference(0, root.id(), [0; 32]),
        &commit_one(0, root.id()),
    )
    .await;
    expect_bad_chunk(
        answer,
        "b's own root as a chunk",
        "which this source does not hold",
    );
    // The victim's replica is intact.
    let out = work.path().join("b.export");
    assert_success(&export(&work.path().join("data"), "b", &out));
    assert_eq!(std::fs::read(out).unwrap(), victim);
}

/// Two sources of one tenant with identical disks: the second's initial
/// sync sends references with proofs instead of data, and its replica is
/// byte-identical. A third source of the tenant that references a chunk
/// with a wrong proof is refused; with the right proof it commits.
#[tokio::test(flavor = "multi_thread")]
async fn cross_source_dedup_works_within_a_tenant_with_a_proof() {
    let pki = Pki::new(&["other"]);
    for source in ["t1", "t2", "t3"] {
        pki.issue_in_tenant(source, "acme");
    }
    let rig = rig_with(pki, &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let disk = random_bytes(DISK as usize, 11);
    let (d1, d2) = (work.path().join("t1.raw"), work.path().join("t2.raw"));
    std::fs::write(&d1, &disk).unwrap();
    std::fs::write(&d2, &disk).unwrap();
    let first = agent_once(&d1, server.addr, "t1", pki.path(), &["--compress", "none"]);
    assert_success(&first);
    let second = agent_once(&d2, server.addr, "t2", pki.path(), &["--compress", "none"]);
    assert_success(&second);
    let (sent_first, sent_second) = (
        sum_field(&first, "bytes_sent"),
        sum_field(&second, "bytes_sent"),
    );
    assert!(sent_first >= DISK, "t1 sent {sent_first} bytes");
    assert_eq!(
        sum_field(&second, "ref_chunks_sent"),
        17,
        "{}",
        stdout(&second)
    );
    assert_eq!(sum_field(&second, "chunks_sent"), 0, "{}", stdout(&second));
    // 17 references of 90 bytes, a commit and the backlog: a few KiB.
    assert!(
        sent_second < 16 * 1024,
        "t2 sent {sent_second} bytes, t1 {sent_first}: nothing saved"
    );
    println!("bytes saved by tenant dedup: {}", sent_first - sent_second);
    rig.assert_replica_is("t2", &d2);

    // Another tenant learns nothing of acme's chunks.
    let ids = ids_of(&disk);
    let (mut client, _) = small_session(server, pki, "other").await;
    let bits = have(&mut client, &ids).await;
    assert!(bits.iter().all(|b| *b == 0), "{bits:?}");
    drop(client);

    // t3 of acme: Have admits the tenant's chunks...
    let chunks = chunks_of(&disk);
    let (mut client, Welcome { nonce, .. }) = small_session(server, pki, "t3").await;
    let bits = have(&mut client, &ids).await;
    assert_eq!(bits[0] & 1, 1, "{bits:?}");
    // ...but a reference with a wrong proof is refused...
    let mut wrong = ref_proof(&nonce, chunks[0]);
    wrong[0] ^= 1;
    let answer = send_then_commit(
        &mut client,
        &reference(0, ids[0], wrong),
        &commit_one(0, ids[0]),
    )
    .await;
    expect_bad_chunk(answer, "wrong proof", "proof of possession does not match");
    // ...as is a proof made under another session's nonce...
    let (mut client, _) = small_session(server, pki, "t3").await;
    let answer = send_then_commit(
        &mut client,
        &reference(0, ids[0], ref_proof(&nonce, chunks[0])),
        &commit_one(0, ids[0]),
    )
    .await;
    expect_bad_chunk(
        answer,
        "replayed proof",
        "proof of possession does not match",
    );
    assert!(rig.head("t3").is_none());
    // ...and the right one commits.
    let (mut client, Welcome { nonce, .. }) = small_session(server, pki, "t3").await;
    let answer = send_then_commit(
        &mut client,
        &reference(0, ids[0], ref_proof(&nonce, chunks[0])),
        &commit_one(0, ids[0]),
    )
    .await;
    assert!(
        matches!(answer, Message::Committed { epoch: 1, .. }),
        "{answer:?}"
    );
}

/// A certificate naming another tenant than the one the source was first
/// seen with is refused: a source does not move its data between tenants.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_cannot_change_tenants() {
    let pki = Pki::new(&[]);
    pki.issue_in_tenant("s", "acme");
    let work = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&bin(), &work.path().join("data"), pki.path());
    let disk = work.path().join("s.raw");
    std::fs::write(&disk, random_bytes(DISK as usize, 3)).unwrap();
    assert_success(&agent_once(&disk, server.addr, "s", pki.path(), &[]));
    pki.issue_in_tenant("s", "evil");
    let output = agent_once(&disk, server.addr, "s", pki.path(), &[]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("belongs to tenant acme") && text.contains("names tenant evil"),
        "{text}"
    );
}

/// An epoch that sends chunk 0 again and again, with new data each time,
/// grew the received ids and the packs without bound; the second frame for
/// one index in one epoch is now refused, and nothing is committed, while
/// another source replicates.
#[tokio::test(flavor = "multi_thread")]
async fn resending_a_chunk_within_one_epoch_is_cut_off() {
    let rig = rig(&["attacker", "honest"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let honest = work.path().join("honest.raw");
    std::fs::write(&honest, random_bytes(DISK as usize, 21)).unwrap();
    let honest_agent = {
        let (honest, addr, tls) = (honest.clone(), server.addr, pki.path().to_owned());
        std::thread::spawn(move || agent_once(&honest, addr, "honest", &tls, &[]))
    };
    let (mut client, _) = small_session(server, pki, "attacker").await;
    let mut last = ChunkId::ZERO;
    let mut answer = None;
    for round in 0..64u64 {
        let data = random_bytes(CHUNK as usize, 100 + round);
        last = ChunkId::from(blake3::hash(&data));
        let frame = Message::Chunk {
            index: 0,
            id: last,
            codec: Codec::Raw,
            raw_len: CHUNK,
            data: Bytes::from(data),
        };
        if client.send(&frame).await.is_err() {
            break; // refused and closed
        }
        if round == 1 {
            answer = tokio::time::timeout(Duration::from_secs(5), next(&mut client))
                .await
                .ok()
                .flatten();
            if answer.is_some() {
                break;
            }
        }
    }
    let answer = match answer {
        Some(answer) => answer,
        None => send_then_commit(&mut client, &commit_one(0, last), &commit_one(0, last)).await,
    };
    expect_bad_chunk(answer, "chunk 0 again", "sent twice in one epoch");
    assert!(rig.head("attacker").is_none());
    assert_success(&honest_agent.join().unwrap());
    rig.assert_replica_is("honest", &honest);
}

/// With the default limits, one source's `Hello` could reserve 8 of the 9
/// GiB of session memory. A disk needing more than
/// `--session-memory-per-source-max` (default 3 GiB) is now refused clearly,
/// and other sources go on replicating.
#[tokio::test(flavor = "multi_thread")]
async fn one_hello_cannot_reserve_most_of_the_session_memory() {
    let rig = rig(&["greedy", "honest"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    // 2^25 chunks of 4 KiB (128 GiB): 5 GiB of ids, under the total of 9 GiB.
    let mut client = RawClient::connect_as(server.addr, pki, "greedy").await;
    client.hello("greedy", 4096 << 25, 4096).await;
    match next(&mut client).await {
        Some(Message::Error {
            code: ErrorCode::GeometryMismatch,
            message,
        }) => assert!(
            message.contains("--session-memory-per-source-max"),
            "{message}"
        ),
        other => panic!("expected GeometryMismatch, got {other:?}"),
    }
    let disk = work.path().join("honest.raw");
    std::fs::write(&disk, random_bytes(DISK as usize, 5)).unwrap();
    assert_success(&agent_once(&disk, server.addr, "honest", pki.path(), &[]));
}

/// Failback answered a `Want` by reading every chunk asked for (64 at a time,
/// up to 256 MiB of 4 MiB chunks) before writing any; it now reads, writes
/// and flushes `--session-send-buffer-max` (4 MiB) at a time. The server's
/// peak memory barely moves while 256 MiB flow to the agent.
#[tokio::test(flavor = "multi_thread")]
async fn failback_streams_what_a_want_asks_for() {
    const BIG_CHUNK: u32 = 4 << 20;
    const CHUNKS: u64 = 64;
    let rig = rig(&["fb"], &[]);
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    // One 4 MiB block repeated: stored once, cheap to sync, 256 MiB to send.
    let block = random_bytes(BIG_CHUNK as usize, 9);
    let disk_path = work.path().join("fb.raw");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&disk_path).unwrap();
        for _ in 0..CHUNKS {
            file.write_all(&block).unwrap();
        }
    }
    let output = agent_once(
        &disk_path,
        server.addr,
        "fb",
        pki.path(),
        &["--cutover", "--chunk-size", "4MiB"],
    );
    assert_success(&output);
    let launch = stdout(&output)
        .split_whitespace()
        .find_map(|f| f.strip_prefix("launch="))
        .unwrap()
        .to_owned();
    // The agent's session may still be ending on the server (Busy): retry.
    let mut answers = Vec::new();
    let mut client = loop {
        let mut client = RawClient::connect_as(server.addr, pki, "fb").await;
        client
            .hello("fb", u64::from(BIG_CHUNK) * CHUNKS, BIG_CHUNK)
            .await;
        match client.recv().await.unwrap() {
            Some(Message::Welcome { .. }) => break client,
            other => {
                answers.push(format!("{other:?}"));
                assert!(answers.len() < 50, "no Welcome: {answers:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    client
        .send(&Message::FailbackStart { launch })
        .await
        .unwrap();
    assert!(matches!(
        next(&mut client).await,
        Some(Message::FailbackPlan { .. })
    ));
    let before = peak_rss_bytes(server.pid());
    client
        .send(&Message::Want {
            indices: (0..CHUNKS).collect(),
        })
        .await
        .unwrap();
    let id = ChunkId::from(blake3::hash(&block));
    for index in 0..CHUNKS {
        match next(&mut client).await {
            Some(Message::Chunk {
                index: got,
                id: got_id,
                data,
                ..
            }) => {
                assert_eq!((got, got_id), (index, id));
                assert_eq!(data.len(), BIG_CHUNK as usize);
            }
            other => panic!("expected chunk {index}, got {other:?}"),
        }
    }
    let grown = peak_rss_bytes(server.pid()).saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "the server's peak memory grew by {} MiB answering one Want",
        grown >> 20
    );
}

/// A replica committed before these checks may name another blob than a
/// chunk where a chunk belongs (here: source `b`'s root, as `a`'s chunk 0).
/// Failback sent whatever the store returned for the id; it now sends only
/// chunks of the kind and length the position needs, and refuses the rest.
#[tokio::test(flavor = "multi_thread")]
async fn failback_sends_only_chunks_of_the_expected_kind_and_length() {
    let pki = Pki::new(&["a", "b"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut server = ServerProcess::start(&bin(), &data, pki.path());
    let victim = random_bytes(DISK as usize, 13);
    let victim_path = work.path().join("b.raw");
    std::fs::write(&victim_path, &victim).unwrap();
    assert_success(&agent_once(&victim_path, server.addr, "b", pki.path(), &[]));
    server.kill();
    // What the old server let `a` commit: b's root named as a's chunk 0.
    let (b_root, _) = Root::build(small_geometry(), &ids_of(&victim));
    {
        let store = blockrep_store::Store::open(&data).unwrap();
        let a = SourceId::new("a").unwrap();
        let mut ids = vec![ChunkId::ZERO; small_geometry().chunk_count() as usize];
        ids[0] = b_root.id();
        let (root, pages) = Root::build(small_geometry(), &ids);
        store
            .commit(&a, 1, &root, &pages, 1, blockrep_core::clock::now_unix_ms())
            .unwrap();
        store.create_snapshot(&a, Some("old"), None, 1).unwrap();
        store
            .create_launch(
                &a,
                "old",
                "a-old",
                blockrep_store::LaunchKind::Test,
                blockrep_core::clock::now_unix_ms(),
            )
            .unwrap();
    }
    let server = ServerProcess::start(&bin(), &data, pki.path());
    let (mut client, _) = small_session(&server, &pki, "a").await;
    client
        .send(&Message::FailbackStart {
            launch: "a-old".into(),
        })
        .await
        .unwrap();
    assert!(matches!(
        next(&mut client).await,
        Some(Message::FailbackPlan { .. })
    ));
    client
        .send(&Message::Want { indices: vec![0] })
        .await
        .unwrap();
    match next(&mut client).await {
        Some(Message::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Internal, "{message}");
            assert!(message.contains("not a chunk of 65536 bytes"), "{message}");
        }
        other => panic!("b's root was sent as a's chunk: {other:?}"),
    }
}

//! Sub-chunk patches against a real server over real TLS, sent the way an
//! agent (or a hostile peer) would: block values only for the source's own
//! chunks, a valid patch rebuilt and stored, and every bad patch (a base the
//! server does not hold, another tenant's or a tenant peer's chunk, a wrong
//! id, overlapping or out-of-chunk ranges, data of the wrong length) refused
//! with its reason, with nothing stored and the replicas unchanged.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use crate::common::*;
use blockrep_core::{ChunkId, PATCH_BLOCK_BYTES, Root, hash_with_block_values, scan_buffer};
use blockrep_proto::{Codec, ErrorCode, Message, patch_frame};
use blockrep_testkit::raw::*;
use blockrep_testkit::{Pki, ServerProcess, random_bytes};
use bytes::Bytes;

const CHUNK: u32 = SMALL_CHUNK_BYTES;
const DISK: u64 = SMALL_DISK_BYTES;

/// The block values `source` is given for `ids` (`GetBlockValues`), in a
/// session of its own.
async fn block_values(
    server: &ServerProcess,
    pki: &Pki,
    source: &str,
    ids: Vec<ChunkId>,
) -> Vec<Bytes> {
    let (mut client, _) = small_session(server, pki, source).await;
    client.send(&Message::GetBlockValues { ids }).await.unwrap();
    let Ok(Some(Message::BlockValues { values })) = client.recv().await else {
        panic!("no BlockValues for {source}; log: {}", server.log());
    };
    values
}

fn chunk_of(disk: &[u8], index: usize) -> &[u8] {
    let start = index * CHUNK as usize;
    &disk[start..(start + CHUNK as usize).min(disk.len())]
}

/// The ranges' bytes of `chunk`, concatenated: a patch's data.
fn range_bytes(chunk: &[u8], ranges: &[(u32, u32)]) -> Vec<u8> {
    ranges
        .iter()
        .flat_map(|&(offset, len)| chunk[offset as usize..(offset + len) as usize].to_vec())
        .collect()
}

fn blob_count(data: &Path) -> usize {
    blockrep_store::Store::open_read_only(data)
        .unwrap()
        .blob_count()
}

fn stored(data: &Path, id: &ChunkId) -> bool {
    blockrep_store::Store::open_read_only(data)
        .unwrap()
        .contains(id)
}

fn assert_export_equals(data: &Path, source: &str, expected: &[u8], work: &Path) {
    let out = work.join(format!("{source}.export"));
    assert_success(&export(data, source, &out));
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "the replica of {source} differs from what it should hold"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn patches_are_applied_only_when_valid_and_refused_with_their_reason() {
    // `a` and `c` share a tenant (they may reference each other's chunks
    // with a proof of possession); `b` is a tenant of its own.
    let pki = Pki::new(&["a", "b", "c"]);
    pki.issue_in_tenant("a", "t");
    pki.issue_in_tenant("c", "t");
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let server = ServerProcess::start(&bin(), &data, pki.path());
    let (disk_a, disk_b) = (
        random_bytes(DISK as usize, 1),
        random_bytes(DISK as usize, 2),
    );
    let disk_c = random_bytes(DISK as usize, 3);
    for (source, disk) in [("a", &disk_a), ("b", &disk_b), ("c", &disk_c)] {
        let path = work.path().join(format!("{source}.raw"));
        std::fs::write(&path, disk).unwrap();
        assert_success(&agent_once(&path, server.addr, source, pki.path(), &[]));
    }

    // Chunk 3 of `a` with blocks 1, 2 and 9 rewritten.
    let base = chunk_of(&disk_a, 3).to_vec();
    let (base_id, base_values) = hash_with_block_values(&base);
    let mut new = base.clone();
    for block in [1usize, 2, 9] {
        let start = block * PATCH_BLOCK_BYTES as usize;
        new[start..start + 100].copy_from_slice(&random_bytes(100, block as u64 + 10));
    }
    let (new_id, new_values) = hash_with_block_values(&new);
    let ranges = blockrep_core::changed_blocks(&base_values, &new_values, CHUNK).unwrap();
    assert_eq!(ranges, vec![(4096, 8192), (9 * 4096, 4096)]);
    let patch_data = range_bytes(&new, &ranges);
    let patch =
        |base: ChunkId, id: ChunkId, ranges: Vec<(u32, u32)>, data: Vec<u8>| Message::Patch {
            index: 3,
            base,
            id,
            codec: Codec::Raw,
            raw_len: CHUNK,
            ranges,
            data: Bytes::from(data),
        };

    // Block values: the source's own chunk gets them; another tenant's chunk
    // and an id nobody stored get an empty entry, the same answer.
    let b_chunk_id = ChunkId::from(blake3::hash(chunk_of(&disk_b, 3)));
    let unknown = ChunkId::from(blake3::hash(b"never stored"));
    let values = block_values(&server, &pki, "a", vec![base_id, b_chunk_id, unknown]).await;
    assert_eq!(values.len(), 3);
    assert_eq!(&values[0][..], &base_values.concat()[..]);
    assert!(
        values[1].is_empty(),
        "another tenant's chunk got block values"
    );
    assert!(values[2].is_empty());
    let values = block_values(&server, &pki, "b", vec![base_id]).await;
    assert_eq!(values, vec![Bytes::new()], "b got the values of a's chunk");
    // A patch reads its base without a proof: not even a tenant peer's.
    let values = block_values(&server, &pki, "c", vec![base_id]).await;
    assert_eq!(values, vec![Bytes::new()], "c got the values of a's chunk");

    let blobs_before = blob_count(&data);
    let wrong_id = ChunkId::from(blake3::hash(b"some other chunk"));
    let cases: Vec<(&str, &str, Message, String)> = vec![
        (
            "a base the server does not hold",
            "a",
            patch(unknown, new_id, ranges.clone(), patch_data.clone()),
            format!("patch base {unknown} is not a chunk of this source"),
        ),
        (
            "another tenant's chunk as the base",
            "b",
            patch(base_id, new_id, ranges.clone(), patch_data.clone()),
            format!("patch base {base_id} is not a chunk of this source"),
        ),
        (
            "a tenant peer's chunk as the base",
            "c",
            patch(base_id, new_id, ranges.clone(), patch_data.clone()),
            format!("patch base {base_id} is not a chunk of this source"),
        ),
        (
            "a wrong new id",
            "a",
            patch(base_id, wrong_id, ranges.clone(), patch_data.clone()),
            format!("patch for chunk 3 produced {new_id}, expected {wrong_id}"),
        ),
        (
            "overlapping ranges",
            "a",
            patch(
                base_id,
                new_id,
                vec![(4096, 8192), (8192, 4096)],
                vec![1; 12_288],
            ),
            "overlaps".into(),
        ),
        (
            "a range beyond the chunk",
            "a",
            patch(base_id, new_id, vec![(61_440, 8192)], vec![1; 8192]),
            "ends beyond the chunk's 65536 bytes".into(),
        ),
        (
            "data shorter than the ranges",
            "a",
            patch(
                base_id,
                new_id,
                ranges.clone(),
                patch_data[..patch_data.len() - 1].to_vec(),
            ),
            format!(
                "carries {} data bytes, its ranges cover {}",
                patch_data.len() - 1,
                patch_data.len()
            ),
        ),
    ];
    for (what, source, message, reason) in &cases {
        let (mut client, _) = small_session(&server, &pki, source).await;
        client.send(message).await.unwrap();
        let got = client.recv().await;
        let Ok(Some(Message::Error { code, message })) = got else {
            panic!("{what}: no Error but {got:?}; log: {}", server.log());
        };
        assert_eq!(code, ErrorCode::BadChunk, "{what}: {message}");
        assert!(message.contains(reason.as_str()), "{what}: {message}");
    }
    assert_eq!(
        blob_count(&data),
        blobs_before,
        "a refused patch stored a blob"
    );
    assert!(!stored(&data, &new_id));
    assert_export_equals(&data, "a", &disk_a, work.path());
    assert_export_equals(&data, "b", &disk_b, work.path());
    assert_export_equals(&data, "c", &disk_c, work.path());

    // A valid epoch of two patches, the second zstd-compressed and built with
    // the agent's frame builder: committed, and the replica is the new disk.
    let mut expected = disk_a.clone();
    let start = 3 * CHUNK as usize;
    expected[start..start + CHUNK as usize].copy_from_slice(&new);
    let last = chunk_of(&disk_a, 16).to_vec();
    let (last_id, last_values) = hash_with_block_values(&last);
    let mut last_new = last.clone();
    last_new[999] ^= 0xFF;
    let (last_new_id, last_new_values) = hash_with_block_values(&last_new);
    let last_ranges = blockrep_core::changed_blocks(&last_values, &last_new_values, 1000).unwrap();
    assert_eq!(last_ranges, vec![(0, 1000)]);
    let compressed = zstd::bulk::compress(&range_bytes(&last_new, &last_ranges), 1).unwrap();
    expected[16 * CHUNK as usize..].copy_from_slice(&last_new);
    let root =
        Root::from_chunk_ids(small_geometry(), &scan_buffer(&expected, small_geometry())).id();
    let (mut client, Welcome { head_epoch, .. }) = small_session(&server, &pki, "a").await;
    client
        .send(&patch(base_id, new_id, ranges.clone(), patch_data.clone()))
        .await
        .unwrap();
    client
        .send_raw(&patch_frame(
            16,
            &last_id,
            &last_new_id,
            Codec::Zstd,
            1000,
            &last_ranges,
            &compressed,
        ))
        .await
        .unwrap();
    client
        .send(&Message::Commit {
            epoch: head_epoch + 1,
            root,
            scan_started_unix_ms: 1,
            complete: true,
            last: false,
            consistency: blockrep_core::Consistency::Live,
        })
        .await
        .unwrap();
    match client.recv().await {
        Ok(Some(Message::Committed {
            root: committed,
            chunks_received,
            chunks_stored,
            ..
        })) => {
            assert_eq!(committed, root);
            assert_eq!((chunks_received, chunks_stored), (2, 2));
        }
        other => panic!(
            "the valid patches were not committed: {other:?}; log: {}",
            server.log()
        ),
    }
    drop(client);
    assert!(stored(&data, &new_id) && stored(&data, &last_new_id));
    assert_export_equals(&data, "a", &expected, work.path());

    // The patched chunk is now the source's own: its block values (cached when
    // it was rebuilt) are those of the new bytes.
    let (mut client, _) = small_session(&server, &pki, "a").await;
    client
        .send(&Message::GetBlockValues { ids: vec![new_id] })
        .await
        .unwrap();
    let Ok(Some(Message::BlockValues { values })) = client.recv().await else {
        panic!("no BlockValues; log: {}", server.log());
    };
    assert_eq!(&values[0][..], &new_values.concat()[..]);
}

//! The bucket primitives against a real S3-compatible store, SeaweedFS on
//! loopback: conditional writes with exactly one winner, ranged reads,
//! sealed multipart uploads, and leases that fence a paused holder out.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use blockrep_objects::{Bucket, Error, Lease, PART_BYTES, S3Location, S3Service};
use blockrep_testkit::seaweedfs::{ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedFs};
use bytes::Bytes;

fn open_bucket(weed: &SeaweedFs, prefix: &str) -> Bucket {
    let service = S3Service {
        endpoint: Some(weed.endpoint.clone()),
        region: Some("us-east-1".into()),
        credentials: Some((ACCESS_KEY_ID.into(), SECRET_ACCESS_KEY.into())),
    };
    let location = S3Location::parse(&format!("s3://blockrep/{prefix}")).unwrap();
    Bucket::s3(&location, &service).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn conditional_writes_refuse_what_changed_and_reads_take_ranges() {
    let Some(weed) = SeaweedFs::start("conditional writes") else {
        return;
    };
    runtime().block_on(async {
        let bucket = open_bucket(&weed, "conditional");
        let first = bucket
            .put_new("heads/web", Bytes::from_static(b"epoch 1"))
            .await
            .unwrap();
        let again = bucket.put_new("heads/web", Bytes::from_static(b"x")).await;
        assert!(matches!(again, Err(Error::Exists(_))), "{again:?}");
        let second = bucket
            .put_if("heads/web", Bytes::from_static(b"epoch 2"), &first)
            .await
            .unwrap();
        // A writer still at the first version is refused.
        let stale = bucket
            .put_if("heads/web", Bytes::from_static(b"late"), &first)
            .await;
        assert!(matches!(stale, Err(Error::Conflict(_))), "{stale:?}");
        let (data, version) = bucket.get("heads/web").await.unwrap().unwrap();
        assert_eq!((&data[..], &version), (&b"epoch 2"[..], &second));
        assert_eq!(
            &bucket.get_range("heads/web", 2..5).await.unwrap()[..],
            b"och"
        );
        // A conditional write of a key that does not exist is a conflict
        // too (SeaweedFS answers 412 where AWS answers 404).
        let gone = bucket
            .put_if("heads/none", Bytes::from_static(b"x"), &first)
            .await;
        assert!(matches!(gone, Err(Error::Conflict(_))), "{gone:?}");
        assert!(bucket.get("heads/none").await.unwrap().is_none());
        // The prefix keeps buckets' users apart.
        assert!(
            open_bucket(&weed, "other")
                .get("heads/web")
                .await
                .unwrap()
                .is_none()
        );
    });
}

#[test]
fn of_writers_racing_to_create_a_key_exactly_one_wins() {
    let Some(weed) = SeaweedFs::start("racing creates") else {
        return;
    };
    runtime().block_on(async {
        let bucket = Arc::new(open_bucket(&weed, "race"));
        for round in 0..5 {
            let key = format!("leases/source-{round}");
            let writers: Vec<_> = (0..8)
                .map(|writer| {
                    let (bucket, key) = (Arc::clone(&bucket), key.clone());
                    tokio::spawn(async move {
                        let data = Bytes::from(format!("writer {writer}"));
                        bucket.put_new(&key, data).await.map(|_| writer)
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for writer in writers {
                match writer.await.unwrap() {
                    Ok(writer) => winners.push(writer),
                    Err(Error::Exists(_)) => {}
                    Err(e) => panic!("round {round}: {e}"),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
            let (data, _) = bucket.get(&key).await.unwrap().unwrap();
            assert_eq!(data, Bytes::from(format!("writer {}", winners[0])));
        }
    });
}

#[test]
fn a_lease_has_one_holder_and_a_holder_paused_past_its_expiry_is_fenced_out() {
    let Some(weed) = SeaweedFs::start("leases") else {
        return;
    };
    runtime().block_on(async {
        let bucket = open_bucket(&weed, "leases");
        let now = 1_000_000;
        let mut a = Lease::take(&bucket, "web", "server-a", 10_000, now)
            .await
            .unwrap();
        assert_eq!(a.record().generation, 1);
        // B is refused while A's lease runs, and told who holds it.
        match Lease::take(&bucket, "web", "server-b", 10_000, now + 5_000).await {
            Err(Error::Held {
                holder,
                expires_unix_ms,
                ..
            }) => assert_eq!(
                (holder.as_str(), expires_unix_ms),
                ("server-a", now + 10_000)
            ),
            other => panic!("{other:?}"),
        }
        // A renews in time; B is still refused after A's first expiry.
        a.renew(&bucket, 10_000, now + 8_000).await.unwrap();
        let refused = Lease::take(&bucket, "web", "server-b", 10_000, now + 12_000).await;
        assert!(matches!(refused, Err(Error::Held { .. })), "{refused:?}");
        // A is paused past its expiry: B takes the lease, one generation on.
        let b = Lease::take(&bucket, "web", "server-b", 10_000, now + 19_000)
            .await
            .unwrap();
        assert_eq!(b.record().generation, 2);
        // A wakes up: its renewal is refused, so it knows it lost the lease.
        let lost = a.renew(&bucket, 10_000, now + 20_000).await;
        assert!(matches!(lost, Err(Error::Conflict(_))), "{lost:?}");
        // Releasing lets the next holder in at once.
        b.release(&bucket).await.unwrap();
        let c = Lease::take(&bucket, "web", "server-c", 10_000, now + 20_500)
            .await
            .unwrap();
        assert_eq!(
            (c.record().holder.as_str(), c.record().generation),
            ("server-c", 3)
        );
        // Other sources' leases are their own.
        let other = Lease::take(&bucket, "db", "server-a", 10_000, now + 20_500)
            .await
            .unwrap();
        assert_eq!(other.record().generation, 1);
    });
}

#[test]
fn a_file_uploads_sealed_in_parts_and_reads_back_by_ranges() {
    let Some(weed) = SeaweedFs::start("sealed uploads") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Two whole parts and a short third, and a file of one small PUT.
    let big = blockrep_testkit::random_bytes(2 * PART_BYTES + 1234, 7);
    let small = blockrep_testkit::random_bytes(1000, 8);
    let (big_path, small_path) = (dir.path().join("big.pack"), dir.path().join("small.pack"));
    std::fs::write(&big_path, &big).unwrap();
    std::fs::write(&small_path, &small).unwrap();
    runtime().block_on(async {
        let bucket = open_bucket(&weed, "uploads");
        bucket.upload_file("packs/1", &big_path).await.unwrap();
        bucket.upload_file("packs/2", &small_path).await.unwrap();
        let mut listed = bucket.list("packs").await.unwrap();
        listed.sort();
        assert_eq!(
            listed,
            [
                ("packs/1".to_owned(), big.len() as u64),
                ("packs/2".to_owned(), small.len() as u64)
            ]
        );
        let (data, _) = bucket.get("packs/1").await.unwrap().unwrap();
        assert!(data == big, "the multipart upload differs");
        // Ranges inside a part, across the parts' seam, and at the end.
        let seam = PART_BYTES as u64;
        let end = big.len() as u64;
        for range in [5..70_000, seam - 100..seam + 100, end - 1234..end] {
            let got = bucket.get_range("packs/1", range.clone()).await.unwrap();
            let want = &big[range.start as usize..range.end as usize];
            assert!(got == want, "range {range:?} differs");
        }
        // A file that cannot be read is an I/O error, and names nothing.
        let missing = bucket
            .upload_file("packs/3", &dir.path().join("missing.pack"))
            .await;
        assert!(matches!(missing, Err(Error::Io { .. })), "{missing:?}");
        assert!(bucket.get("packs/3").await.unwrap().is_none());
        bucket.delete("packs/2").await.unwrap();
        bucket.delete("packs/2").await.unwrap();
        assert!(bucket.get("packs/2").await.unwrap().is_none());
    });
}

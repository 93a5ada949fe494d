//! The frame codec's tests: every message round-trips, and every damage,
//! unknown type, trailing byte and oversized count is refused.

use super::*;
use proptest::prelude::*;

fn id_strategy() -> impl Strategy<Value = ChunkId> {
    any::<[u8; 32]>().prop_map(ChunkId)
}

fn message_strategy() -> impl Strategy<Value = Message> {
    let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            "[a-z0-9][a-z0-9._-]{0,20}",
            any::<u64>(),
            any::<u32>()
        )
            .prop_filter_map("valid id", |(a, b, s, d, c)| {
                Some(Message::Hello {
                    version_min: a,
                    version_max: b,
                    source: SourceId::new(&s).ok()?,
                    disk_size_bytes: d,
                    chunk_size_bytes: c,
                })
            }),
        (
            any::<u16>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            bytes(300),
            any::<Option<[u8; 32]>>()
        )
            .prop_map(|(v, n, e, r, id_key)| Message::Welcome {
                version: v,
                nonce: n,
                head_epoch: e,
                head_root: r,
                id_key,
            }),
        proptest::collection::vec(any::<u32>(), 0..50)
            .prop_map(|indices| Message::GetPages { indices }),
        (
            any::<u32>(),
            proptest::collection::vec(any::<[u8; 32]>(), 0..5)
        )
            .prop_map(|(index, ids)| Message::Page {
                index,
                ids: Bytes::from(ids.concat())
            }),
        (any::<u64>(), id_strategy(), 1usize..1000, any::<bool>()).prop_map(
            |(index, id, len, zstd)| Message::Chunk {
                index,
                id,
                codec: if zstd { Codec::Zstd } else { Codec::Raw },
                raw_len: len as u32,
                data: Bytes::from(vec![0xA5; len]),
            }
        ),
        (any::<u64>(), id_strategy()).prop_map(|(index, id)| Message::Chunk {
            index,
            id,
            codec: Codec::Zero,
            raw_len: 4096,
            data: Bytes::new(),
        }),
        (any::<u64>(), id_strategy(), any::<[u8; 32]>()).prop_map(|(index, id, proof)| {
            Message::Chunk {
                index,
                id,
                codec: Codec::Ref,
                raw_len: 4096,
                data: Bytes::copy_from_slice(&proof),
            }
        }),
        (
            any::<u64>(),
            id_strategy(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            0u8..3
        )
            .prop_map(|(epoch, root, t, complete, last, label)| Message::Commit {
                epoch,
                root,
                scan_started_unix_ms: t,
                complete,
                last,
                consistency: Consistency::from_byte(label).expect("a known label"),
            }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Message::Backlog {
            scan_started_unix_ms: a,
            chunks_pending: b,
            bytes_pending: c
        }),
        (
            (any::<u64>(), any::<u64>(), any::<u64>()),
            (any::<u64>(), any::<u64>(), any::<u64>())
        )
            .prop_map(|((a, b, c), (d, e, f))| Message::Capture {
                dirty_bytes: a,
                preserved_bytes: b,
                cuts: c,
                writes: d,
                write_p50_us: e,
                write_p99_us: f,
            }),
        (
            any::<u16>(),
            "[a-z0-9][a-z0-9._-]{0,20}",
            any::<u32>(),
            proptest::collection::vec(("[a-z0-9][a-z0-9_-]{0,12}", any::<u64>()), 0..5),
            any::<bool>()
        )
            .prop_filter_map("valid names", |(v, s, c, volumes, removal)| {
                Some(Message::MachineHello {
                    version_min: v,
                    version_max: v,
                    source: SourceId::new(&s).ok()?,
                    chunk_size_bytes: c,
                    volumes: volumes
                        .into_iter()
                        .map(|(n, size)| Some((VolumeName::new(&n).ok()?, size)))
                        .collect::<Option<_>>()?,
                    allow_volume_removal: removal,
                })
            }),
        (
            any::<u16>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            id_strategy(),
            any::<Option<[u8; 32]>>()
        )
            .prop_map(|(v, n, e, head_root, id_key)| Message::MachineWelcome {
                version: v,
                nonce: n,
                head_epoch: e,
                head_root,
                id_key,
            }),
        (any::<u16>(), bytes(200)).prop_map(|(index, root)| Message::VolumeHead { index, root }),
        any::<u16>().prop_map(|index| Message::SelectVolume { index }),
        proptest::collection::vec(id_strategy(), 0..20).prop_map(|ids| Message::Offer { ids }),
        bytes(40).prop_map(|bits| Message::Have { bits }),
        (
            any::<u64>(),
            id_strategy(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(epoch, root, a, b, c, cutover)| Message::Committed {
                epoch,
                root,
                chunks_received: a,
                bytes_received: b,
                chunks_stored: c,
                cutover_requested: cutover,
            }),
        any::<u64>().prop_map(|bytes_received| Message::Progress { bytes_received }),
        (1u16..20, "[ -~]{0,100}").prop_map(|(code, message)| Message::Error {
            code: ErrorCode::from_u16(code),
            message
        }),
        lifecycle_strategy(),
    ]
}

fn lifecycle_strategy() -> impl Strategy<Value = Message> {
    let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from);
    prop_oneof![
        (
            any::<u64>(),
            id_strategy(),
            "[a-z0-9-]{0,30}",
            "[a-z0-9-]{0,30}",
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(epoch, root, snapshot, launch, commit_ms, launch_ms)| {
                Message::CutoverReady {
                    epoch,
                    root,
                    snapshot,
                    launch,
                    commit_ms,
                    launch_ms,
                }
            }),
        "[a-z0-9-]{0,40}".prop_map(|launch| Message::FailbackStart { launch }),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c, d)| {
            Message::CutoverReport {
                hook_ms: a,
                scan_ms: b,
                transfer_ms: c,
                total_ms: d,
            }
        }),
        (bytes(100), bytes(100)).prop_map(|(target_root, base_root)| Message::FailbackPlan {
            target_root,
            base_root
        }),
        proptest::collection::vec(any::<u32>(), 0..20)
            .prop_map(|indices| Message::GetBasePages { indices }),
        proptest::collection::vec(any::<u64>(), 0..20)
            .prop_map(|indices| Message::Want { indices }),
        (id_strategy(), any::<bool>())
            .prop_map(|(root, finalize)| Message::FailbackDone { root, finalize }),
        (any::<bool>(), any::<bool>()).prop_map(|(matches, finalize_requested)| {
            Message::FailbackAck {
                matches,
                finalize_requested,
            }
        }),
        proptest::collection::vec(id_strategy(), 0..20)
            .prop_map(|ids| Message::GetBlockValues { ids }),
        proptest::collection::vec(
            (
                any::<u64>(),
                id_strategy(),
                proptest::collection::vec(any::<[u8; 16]>(), 0..5)
            ),
            0..5
        )
        .prop_map(|entries| Message::WantPatched {
            entries: entries
                .into_iter()
                .map(|(index, id, values)| (index, id, Bytes::from(values.concat())))
                .collect()
        }),
        proptest::collection::vec(proptest::collection::vec(any::<[u8; 16]>(), 0..5), 0..5)
            .prop_map(|values| Message::BlockValues {
                values: values
                    .into_iter()
                    .map(|v| Bytes::from(v.concat()))
                    .collect()
            }),
        (
            any::<u64>(),
            id_strategy(),
            id_strategy(),
            any::<bool>(),
            any::<u32>(),
            proptest::collection::vec(any::<(u32, u32)>(), 0..10),
            bytes(300)
        )
            .prop_map(|(index, base, id, zstd, raw_len, ranges, data)| {
                Message::Patch {
                    index,
                    base,
                    id,
                    codec: if zstd { Codec::Zstd } else { Codec::Raw },
                    raw_len: raw_len % (CHUNK_SIZE_MAX_BYTES + 1),
                    ranges,
                    data,
                }
            }),
    ]
}

proptest! {
    #[test]
    fn decode_inverts_encode(messages in proptest::collection::vec(message_strategy(), 1..8)) {
        let mut buf = BytesMut::new();
        for message in &messages {
            encode(message, &mut buf);
        }
        // Feed the stream back one byte at a time: incomplete frames wait.
        let wire = buf.split().freeze();
        let mut input = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in wire.iter() {
            input.put_u8(*byte);
            while let Some(message) = decode(&mut input).unwrap() {
                decoded.push(message);
            }
        }
        prop_assert!(input.is_empty());
        prop_assert_eq!(decoded, messages);
    }

    /// Every chunk decoded carries the crc32 of its data, from the frame's
    /// own checksum; no other message carries one.
    #[test]
    fn a_decoded_chunk_carries_the_crc_of_its_data(
        messages in proptest::collection::vec(message_strategy(), 1..8)
    ) {
        let mut buf = BytesMut::new();
        for message in &messages {
            encode(message, &mut buf);
        }
        while let Some(Decoded { message, data_crc }) = decode_frame(&mut buf).unwrap() {
            match &message {
                Message::Chunk { data, .. } => {
                    prop_assert_eq!(data_crc, Some(crc32fast::hash(data)));
                }
                _ => prop_assert_eq!(data_crc, None),
            }
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut buf = BytesMut::from(&raw[..]);
        while let Ok(Some(_)) = decode(&mut buf) {}
    }

    #[test]
    fn random_bodies_never_panic(kind in 0u8..25, body in proptest::collection::vec(any::<u8>(), 0..200)) {
        // Sealed, so that the body parsers run rather than the checksum refusing.
        let mut buf = sealed_frame(kind, &body);
        let _ = decode(&mut buf);
    }

    #[test]
    fn any_damage_to_a_frame_is_refused(
        message in message_strategy(),
        position in any::<usize>(),
        masks in proptest::collection::vec(1u8..=255, 1..5),
    ) {
        let mut frame = BytesMut::new();
        encode(&message, &mut frame);
        let start = position % frame.len();
        for (byte, mask) in frame[start..].iter_mut().zip(&masks) {
            *byte ^= mask;
        }
        // A length made larger waits for more bytes; whatever comes, the
        // checksum of the frame it completes does not match.
        frame.put_slice(&[0u8; 64]);
        let decoded = decode(&mut frame);
        prop_assert!(!matches!(decoded, Ok(Some(_))), "damaged frame decoded: {decoded:?}");
    }
}

/// A frame of type `kind` with `body`, sealed with its checksum.
fn sealed_frame(kind: u8, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32_le(body.len() as u32 + FRAME_LEN_MIN);
    buf.put_u32_le(0);
    buf.put_u8(kind);
    buf.put_slice(body);
    seal(&mut buf);
    buf
}

#[test]
fn oversized_frame_is_rejected_before_buffering() {
    let mut buf = BytesMut::new();
    buf.put_u32_le(FRAME_LEN_MAX + 1);
    buf.put_u8(5);
    let err = decode(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ProtoErrorKind::FrameTooLarge);
    assert!(buf.capacity() < 1024 * 1024);
}

#[test]
fn unknown_type_and_trailing_bytes_are_rejected() {
    let mut buf = sealed_frame(99, &[]);
    assert_eq!(
        decode(&mut buf).unwrap_err().kind(),
        ProtoErrorKind::UnknownType
    );
    let mut buf = BytesMut::new();
    encode(&Message::GetPages { indices: vec![1] }, &mut buf);
    buf[0] += 1;
    buf.put_u8(0);
    seal(&mut buf);
    assert_eq!(
        decode(&mut buf).unwrap_err().kind(),
        ProtoErrorKind::Malformed
    );
}

#[test]
fn oversized_counts_are_rejected() {
    let mut buf = sealed_frame(3, &u32::MAX.to_le_bytes());
    assert_eq!(
        decode(&mut buf).unwrap_err().kind(),
        ProtoErrorKind::LimitExceeded
    );
}

#[test]
fn chunk_header_matches_full_encoding() {
    let data = Bytes::from_static(b"hello world");
    let id = ChunkId([3; 32]);
    let mut full = BytesMut::new();
    encode(
        &Message::Chunk {
            index: 9,
            id,
            codec: Codec::Raw,
            raw_len: 11,
            data: data.clone(),
        },
        &mut full,
    );
    let mut split = BytesMut::new();
    encode_chunk_header(&mut split, 9, &id, Codec::Raw, 11, &data);
    split.put_slice(&data);
    assert_eq!(full, split);
}

/// Every single-bit error in a frame is caught (crc32 detects all of
/// them), including in the fields that nothing else checks: a Commit's
/// flags and scan time, a Backlog's counters.
#[test]
fn every_single_bit_flip_is_refused() {
    let messages = [
        Message::Commit {
            epoch: 3,
            root: ChunkId([7; 32]),
            scan_started_unix_ms: 1_795_000_000_000,
            complete: true,
            last: false,
            consistency: Consistency::CrashConsistent,
        },
        Message::Backlog {
            scan_started_unix_ms: 1_795_000_000_000,
            chunks_pending: 12,
            bytes_pending: 12 << 16,
        },
        Message::Chunk {
            index: 4,
            id: ChunkId([1; 32]),
            codec: Codec::Raw,
            raw_len: 300,
            data: Bytes::from(vec![0x5A; 300]),
        },
    ];
    for message in &messages {
        let mut frame = BytesMut::new();
        encode(message, &mut frame);
        assert_eq!(decode(&mut frame.clone()).unwrap().as_ref(), Some(message));
        for bit in 0..frame.len() * 8 {
            let mut damaged = frame.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            damaged.put_slice(&[0u8; 64]);
            let decoded = decode(&mut damaged);
            assert!(
                !matches!(decoded, Ok(Some(_))),
                "{} with bit {bit} flipped decoded: {decoded:?}",
                message.name()
            );
        }
    }
}

/// A reference carries its proof and nothing else: none, or more, is
/// malformed (a version 2 reference, with no data, is refused).
#[test]
fn a_reference_carries_exactly_its_proof() {
    for len in [0usize, 31, 33, 64] {
        let mut buf = BytesMut::new();
        encode(
            &Message::Chunk {
                index: 1,
                id: ChunkId([9; 32]),
                codec: Codec::Ref,
                raw_len: 4096,
                data: Bytes::from(vec![7; len]),
            },
            &mut buf,
        );
        assert_eq!(
            decode(&mut buf).unwrap_err().kind(),
            ProtoErrorKind::Malformed,
            "a reference with {len} data bytes"
        );
    }
}

/// A Commit's consistency label is one of the known bytes: any other,
/// even in an intact frame, is refused and named in the error.
#[test]
fn an_unknown_consistency_label_is_malformed() {
    let mut frame = BytesMut::new();
    encode(
        &Message::Commit {
            epoch: 1,
            root: ChunkId([3; 32]),
            scan_started_unix_ms: 5,
            complete: true,
            last: false,
            consistency: Consistency::Live,
        },
        &mut frame,
    );
    let label_at = frame.len() - 1;
    for label in [3u8, 0x80, 0xFF] {
        let mut damaged = frame.clone();
        damaged[label_at] = label;
        seal(&mut damaged);
        let error = decode(&mut damaged).unwrap_err();
        assert_eq!(error.kind(), ProtoErrorKind::Malformed);
        assert!(
            error.to_string().contains("unknown consistency label"),
            "{error}"
        );
    }
}

#[test]
fn checksum_mismatch_has_its_own_kind() {
    let mut buf = BytesMut::new();
    encode(&Message::GetPages { indices: vec![1] }, &mut buf);
    let last = buf.len() - 1;
    buf[last] ^= 0x10;
    assert_eq!(
        decode(&mut buf).unwrap_err().kind(),
        ProtoErrorKind::Checksum
    );
}

#[test]
fn a_machine_hello_of_too_many_volumes_is_refused() {
    let volumes = (0..=blockrep_core::VOLUMES_MAX)
        .map(|i| (VolumeName::new(&format!("v{i}")).unwrap(), 4096))
        .collect();
    let mut out = BytesMut::new();
    encode(
        &Message::MachineHello {
            version_min: crate::PROTOCOL_VERSION,
            version_max: crate::PROTOCOL_VERSION,
            source: SourceId::new("web").unwrap(),
            chunk_size_bytes: 4096,
            volumes,
            allow_volume_removal: false,
        },
        &mut out,
    );
    let err = decode(&mut out).unwrap_err();
    assert_eq!(err.kind(), ProtoErrorKind::LimitExceeded, "{err}");
}

/// Frames of 64 KiB arriving in 16 KiB reads, each decoded frame kept (as a
/// server keeps a chunk queued for its verifier): the buffer cannot grow in
/// place, and a growth copies the partial frame it holds. It grows by a
/// megabyte at least, so it moves once per many frames, not once per frame.
#[test]
fn a_buffer_whose_frames_are_held_moves_once_per_many_frames() {
    const FRAMES: usize = 64;
    let data = Bytes::from(vec![7u8; 64 * 1024]);
    let mut wire = BytesMut::new();
    for index in 0..FRAMES as u64 {
        let message = Message::Chunk {
            index,
            id: ChunkId([1; 32]),
            codec: Codec::Raw,
            raw_len: data.len() as u32,
            data: data.clone(),
        };
        encode(&message, &mut wire);
    }
    let wire = wire.freeze();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let (mut held, mut moves) = (Vec::new(), 0);
    for piece in wire.chunks(16 * 1024) {
        // As a socket read fills the spare capacity (tokio's `read_buf`
        // reserves 64 bytes when there is none).
        let mut piece = piece;
        while !piece.is_empty() {
            if buf.capacity() == buf.len() {
                buf.reserve(64);
            }
            let take = piece.len().min(buf.capacity() - buf.len());
            buf.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
            loop {
                let before = buf.as_ptr();
                let had = buf.len();
                let decoded = decode(&mut buf).unwrap();
                if decoded.is_none() && had > 0 && buf.as_ptr() != before {
                    moves += 1;
                }
                match decoded {
                    Some(message) => held.push(message),
                    None => break,
                }
            }
        }
    }
    assert_eq!(held.len(), FRAMES);
    assert!(moves <= FRAMES / 8, "{moves} moves for {FRAMES} frames");
}

#[test]
fn the_largest_failback_plan_that_fits_is_one_frame_and_a_byte_more_does_not_fit() {
    let roots = FRAME_LEN_MAX as usize - (FRAME_HEADER_LEN - 4) - 8;
    let (target, base) = (roots / 2, roots - roots / 2);
    assert!(failback_plan_fits(target, base));
    assert!(!failback_plan_fits(target, base + 1));
    let plan = Message::FailbackPlan {
        target_root: Bytes::from(vec![1; target]),
        base_root: Bytes::from(vec![2; base]),
    };
    let mut frame = BytesMut::new();
    encode(&plan, &mut frame);
    assert_eq!(decode(&mut frame).unwrap(), Some(plan));
}

//! Frame codec: `encode`/`decode` of `Chunk` frames with 64 KiB of data, next to
//! a plain copy of the same bytes, and of small frames (`Commit`, an `Offer` of
//! 8192 ids).
//!
//! Target: `chunk_frame_64KiB/decode` costs about one `chunk_frame_64KiB/memcpy`:
//! decoding slices the receive buffer instead of copying chunk data, and reads
//! each byte once for the frame checksum (crc32, far cheaper than the blake3
//! that verifying the chunk costs).
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use blockrep_core::ChunkId;
use blockrep_proto::{Codec, Message, OFFER_IDS_MAX, decode, encode, encode_chunk_header};
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const CHUNK_BYTES: usize = 64 << 10;

fn chunk_message() -> Message {
    let data: Vec<u8> = (0..CHUNK_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    Message::Chunk {
        index: 12_345,
        id: ChunkId::from(blake3::hash(&data)),
        codec: Codec::Raw,
        raw_len: CHUNK_BYTES as u32,
        data: Bytes::from(data),
    }
}

fn frame_of(message: &Message) -> BytesMut {
    let mut frame = BytesMut::new();
    encode(message, &mut frame);
    frame
}

/// Decodes one frame that must be complete.
fn decode_one(buf: &mut BytesMut) -> Message {
    decode(buf).unwrap().unwrap()
}

/// Fails the bench unless decoding a chunk frame hands out a slice of the receive
/// buffer: otherwise `decode` would be measuring something it does not claim.
fn check_zero_copy(frame: &BytesMut) {
    let mut buf = frame.clone();
    let range = buf.as_ptr_range();
    let Message::Chunk { data, .. } = decode_one(&mut buf) else {
        panic!("not a chunk frame");
    };
    assert!(
        range.contains(&data.as_ptr()),
        "decoded chunk data was copied out of the receive buffer"
    );
}

fn chunk_frames(c: &mut Criterion) {
    let message = chunk_message();
    let frame = frame_of(&message);
    check_zero_copy(&frame);
    let Message::Chunk {
        index, id, data, ..
    } = &message
    else {
        unreachable!()
    };
    let mut group = c.benchmark_group("chunk_frame_64KiB");
    group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
    let mut out = BytesMut::with_capacity(frame.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            encode(black_box(&message), &mut out);
        })
    });
    // What the agent sends with: the header alone, the data written after it.
    group.bench_function("encode_chunk_header", |b| {
        b.iter(|| {
            out.clear();
            encode_chunk_header(&mut out, *index, id, Codec::Raw, CHUNK_BYTES as u32, data);
        })
    });
    // The receive buffer is rebuilt outside the timing; the decoded message is
    // dropped outside it too.
    group.bench_function("decode", |b| {
        b.iter_batched_ref(
            || frame.clone(),
            |buf| decode_one(black_box(buf)),
            BatchSize::SmallInput,
        )
    });
    let mut copy = vec![0u8; CHUNK_BYTES];
    group.bench_function("memcpy", |b| {
        b.iter(|| copy.copy_from_slice(black_box(&data[..])))
    });
    group.finish();
}

fn small_frames(c: &mut Criterion) {
    let commit = Message::Commit {
        epoch: 7,
        root: ChunkId([9; 32]),
        scan_started_unix_ms: 1_795_000_000_000,
        complete: true,
        last: true,
        consistency: blockrep_core::Consistency::Live,
    };
    let offer = Message::Offer {
        ids: (0..OFFER_IDS_MAX)
            .map(|n| ChunkId::from(blake3::hash(&n.to_le_bytes())))
            .collect(),
    };
    for (name, message) in [("commit", commit), ("offer_8192_ids", offer)] {
        let frame = frame_of(&message);
        let mut group = c.benchmark_group(format!("frame_{name}"));
        group.throughput(Throughput::Bytes(frame.len() as u64));
        let mut out = BytesMut::with_capacity(frame.len());
        group.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                encode(black_box(&message), &mut out);
            })
        });
        group.bench_function("decode", |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |buf| decode_one(black_box(buf)),
                BatchSize::SmallInput,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, chunk_frames, small_frames);
criterion_main!(benches);

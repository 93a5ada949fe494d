//! Wire bodies of the sub-chunk patch messages (protocol 4): `GetBlockValues`
//! (type 21), `BlockValues` (22) and `Patch` (23). All integers little-endian.
//!
//! | message | body |
//! |---|---|
//! | `GetBlockValues` | u32 count (<= [`BLOCK_VALUES_IDS_MAX`]), count x 32-byte id |
//! | `BlockValues` | u32 count (<= [`BLOCK_VALUES_IDS_MAX`]), count x (u32 len, len bytes): len a multiple of 16, at most [`BLOCK_VALUES_LEN_MAX`] |
//! | `Patch` | u64 index, 32-byte base id, 32-byte new id, u8 codec (raw or zstd), u32 raw_len (<= chunk size max), u32 range count (<= [`PATCH_RANGES_MAX`]), count x (u32 offset, u32 len), u32 data len (<= chunk size max), data |
//!
//! Decoding checks counts and lengths; whether the ranges fit the chunk is
//! the receiver's check ([`blockrep_core::apply_patch`]), which knows the base.

use blockrep_core::{BLOCK_VALUE_LEN, CHUNK_SIZE_MAX_BYTES, ChunkId, PATCH_BLOCK_BYTES};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::{CHECKSUM_OFFSET, FRAME_HEADER_LEN, Reader, frame_checksum_parts, malformed};
use crate::message::{Codec, Message, MessageType, ProtoError, ProtoErrorKind};

/// Most chunk ids in one `GetBlockValues` (and entries in its `BlockValues`).
/// 256 values of a 4 MiB chunk fill 4 MiB, well inside a frame.
pub const BLOCK_VALUES_IDS_MAX: usize = 256;

/// Most ranges in one `Patch`: one per block of the largest chunk.
pub const PATCH_RANGES_MAX: usize = (CHUNK_SIZE_MAX_BYTES / PATCH_BLOCK_BYTES) as usize;

/// Longest entry of a `BlockValues`: the values of the largest chunk.
pub const BLOCK_VALUES_LEN_MAX: usize = PATCH_RANGES_MAX * BLOCK_VALUE_LEN;

fn limit(message: String) -> ProtoError {
    ProtoError::new(ProtoErrorKind::LimitExceeded, message)
}

/// Appends the body of a patch message (the caller wrote the header).
pub(crate) fn encode_body(message: &Message, out: &mut BytesMut) {
    match message {
        Message::GetBlockValues { ids } => {
            out.put_u32_le(ids.len() as u32);
            for id in ids {
                out.put_slice(id.as_bytes());
            }
        }
        Message::BlockValues { values } => {
            out.put_u32_le(values.len() as u32);
            for entry in values {
                out.put_u32_le(entry.len() as u32);
                out.put_slice(entry);
            }
        }
        Message::Patch {
            index,
            base,
            id,
            codec,
            raw_len,
            ranges,
            data,
        } => {
            put_patch_fields(out, *index, base, id, *codec, *raw_len, ranges, data.len());
            out.put_slice(data);
        }
        other => unreachable!("{} is not a patch message", other.name()),
    }
}

#[allow(clippy::too_many_arguments)]
fn put_patch_fields(
    out: &mut BytesMut,
    index: u64,
    base: &ChunkId,
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    ranges: &[(u32, u32)],
    data_len: usize,
) {
    out.put_u64_le(index);
    out.put_slice(base.as_bytes());
    out.put_slice(id.as_bytes());
    out.put_u8(codec.to_wire());
    out.put_u32_le(raw_len);
    out.put_u32_le(ranges.len() as u32);
    for &(offset, len) in ranges {
        out.put_u32_le(offset);
        out.put_u32_le(len);
    }
    out.put_u32_le(data_len as u32);
}

/// A complete `Patch` frame (header, checksum, fields and `payload`, the
/// ranges' new bytes encoded with `codec`), for a sender that builds frames
/// itself as it does with [`crate::chunk_header`]: [`crate::decode`] reads it
/// back as [`Message::Patch`]. The payload is copied once, into the frame.
pub fn patch_frame(
    index: u64,
    base: &ChunkId,
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    ranges: &[(u32, u32)],
    payload: &[u8],
) -> Bytes {
    let fields_len = 8 + 32 + 32 + 1 + 4 + 4 + ranges.len() * 8 + 4;
    let mut out = BytesMut::with_capacity(FRAME_HEADER_LEN + fields_len + payload.len());
    let body_len = (FRAME_HEADER_LEN - 4 + fields_len + payload.len()) as u32;
    out.put_u32_le(body_len);
    out.put_u32_le(0); // the checksum, once the frame is complete
    out.put_u8(MessageType::Patch.to_wire());
    put_patch_fields(
        &mut out,
        index,
        base,
        id,
        codec,
        raw_len,
        ranges,
        payload.len(),
    );
    out.put_slice(payload);
    let checksum = frame_checksum_parts(&out, &[]);
    out[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&checksum.to_le_bytes());
    out.freeze()
}

/// Decodes the body of a patch message of type `message_type`.
pub(crate) fn decode_body(
    message_type: MessageType,
    r: &mut Reader<'_>,
) -> Result<Message, ProtoError> {
    Ok(match message_type {
        MessageType::GetBlockValues => {
            let count = r.u32("id count")? as usize;
            if count > BLOCK_VALUES_IDS_MAX {
                return Err(limit(format!(
                    "GetBlockValues of {count} ids exceeds the limit of {BLOCK_VALUES_IDS_MAX}"
                )));
            }
            r.need(count * 32, "block value ids")?;
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                ids.push(r.id("block value id")?);
            }
            Message::GetBlockValues { ids }
        }
        MessageType::BlockValues => {
            let count = r.u32("entry count")? as usize;
            if count > BLOCK_VALUES_IDS_MAX {
                return Err(limit(format!(
                    "BlockValues of {count} entries exceeds the limit of {BLOCK_VALUES_IDS_MAX}"
                )));
            }
            let mut values = Vec::with_capacity(count);
            for i in 0..count {
                let len = r.u32("block values length")? as usize;
                let entry = r.bytes(len, BLOCK_VALUES_LEN_MAX, "block values")?;
                if !len.is_multiple_of(BLOCK_VALUE_LEN) {
                    return Err(malformed(format!(
                        "block values entry {i} of {len} bytes is not a multiple of \
                         {BLOCK_VALUE_LEN}"
                    )));
                }
                values.push(entry);
            }
            Message::BlockValues { values }
        }
        MessageType::Patch => {
            let index = r.u64("chunk index")?;
            let base = r.id("base id")?;
            let id = r.id("chunk id")?;
            let codec_byte = r.u8("codec")?;
            let codec = match Codec::from_wire(codec_byte) {
                Some(codec @ (Codec::Raw | Codec::Zstd)) => codec,
                _ => {
                    return Err(malformed(format!(
                        "patch codec {codec_byte} is not raw or zstd"
                    )));
                }
            };
            let raw_len = r.u32("chunk length")?;
            if raw_len > CHUNK_SIZE_MAX_BYTES {
                return Err(limit(format!(
                    "chunk length {raw_len} exceeds {CHUNK_SIZE_MAX_BYTES}"
                )));
            }
            let count = r.u32("range count")? as usize;
            if count > PATCH_RANGES_MAX {
                return Err(limit(format!(
                    "patch of {count} ranges exceeds the limit of {PATCH_RANGES_MAX}"
                )));
            }
            r.need(count * 8, "patch ranges")?;
            let ranges = (0..count)
                .map(|_| (r.0.get_u32_le(), r.0.get_u32_le()))
                .collect();
            let data_len = r.u32("data length")? as usize;
            let data = r.bytes(data_len, CHUNK_SIZE_MAX_BYTES as usize, "patch data")?;
            Message::Patch {
                index,
                base,
                id,
                codec,
                raw_len,
                ranges,
                data,
            }
        }
        other => unreachable!("type {other} is not a patch message"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    fn round_trip(message: &Message) -> Message {
        let mut buf = BytesMut::new();
        encode(message, &mut buf);
        let decoded = decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        decoded
    }

    fn patch() -> Message {
        Message::Patch {
            index: 77,
            base: ChunkId([1; 32]),
            id: ChunkId([2; 32]),
            codec: Codec::Raw,
            raw_len: 65_536,
            ranges: vec![(0, 4096), (12_288, 8192)],
            data: Bytes::from(vec![0xAB; 12_288]),
        }
    }

    #[test]
    fn patch_messages_round_trip() {
        let messages = [
            Message::GetBlockValues {
                ids: vec![ChunkId([4; 32]), ChunkId([5; 32])],
            },
            Message::BlockValues {
                values: vec![Bytes::from(vec![3; 64]), Bytes::new()],
            },
            patch(),
        ];
        for message in &messages {
            assert_eq!(&round_trip(message), message);
        }
    }

    #[test]
    fn patch_frame_is_the_encoding_of_the_message() {
        let Message::Patch {
            index,
            base,
            id,
            codec,
            raw_len,
            ranges,
            data,
        } = patch()
        else {
            unreachable!()
        };
        let frame = patch_frame(index, &base, &id, codec, raw_len, &ranges, &data);
        let mut full = BytesMut::new();
        encode(&patch(), &mut full);
        assert_eq!(&frame[..], &full[..]);
        let mut buf = BytesMut::from(&frame[..]);
        assert_eq!(decode(&mut buf).unwrap(), Some(patch()));
    }

    fn decode_error(message: &Message) -> ProtoError {
        let mut buf = BytesMut::new();
        encode(message, &mut buf);
        decode(&mut buf).unwrap_err()
    }

    #[test]
    fn limits_are_enforced_on_decode() {
        let too_many_ids = Message::GetBlockValues {
            ids: vec![ChunkId([1; 32]); BLOCK_VALUES_IDS_MAX + 1],
        };
        assert_eq!(
            decode_error(&too_many_ids).kind(),
            ProtoErrorKind::LimitExceeded
        );
        let too_many_entries = Message::BlockValues {
            values: vec![Bytes::new(); BLOCK_VALUES_IDS_MAX + 1],
        };
        assert_eq!(
            decode_error(&too_many_entries).kind(),
            ProtoErrorKind::LimitExceeded
        );
        let ragged = Message::BlockValues {
            values: vec![Bytes::from(vec![0; 17])],
        };
        let error = decode_error(&ragged);
        assert_eq!(error.kind(), ProtoErrorKind::Malformed);
        assert!(
            error.to_string().contains("not a multiple of 16"),
            "{error}"
        );
        let too_long = Message::BlockValues {
            values: vec![Bytes::from(vec![0; BLOCK_VALUES_LEN_MAX + 16])],
        };
        assert_eq!(
            decode_error(&too_long).kind(),
            ProtoErrorKind::LimitExceeded
        );
        let Message::Patch {
            index,
            base,
            id,
            raw_len,
            data,
            ..
        } = patch()
        else {
            unreachable!()
        };
        let many = vec![(0u32, 1u32); PATCH_RANGES_MAX + 1];
        let mut buf =
            BytesMut::from(&patch_frame(index, &base, &id, Codec::Raw, raw_len, &many, &data)[..]);
        assert_eq!(
            decode(&mut buf).unwrap_err().kind(),
            ProtoErrorKind::LimitExceeded
        );
        for codec in [Codec::Zero, Codec::Ref] {
            let mut buf = BytesMut::from(
                &patch_frame(index, &base, &id, codec, raw_len, &[(0, 1)], &data)[..],
            );
            let error = decode(&mut buf).unwrap_err();
            assert!(error.to_string().contains("not raw or zstd"), "{error}");
        }
        let mut buf = BytesMut::from(
            &patch_frame(
                index,
                &base,
                &id,
                Codec::Raw,
                CHUNK_SIZE_MAX_BYTES + 1,
                &[(0, 1)],
                &data,
            )[..],
        );
        assert_eq!(
            decode(&mut buf).unwrap_err().kind(),
            ProtoErrorKind::LimitExceeded
        );
    }
}

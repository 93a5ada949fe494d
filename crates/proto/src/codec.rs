//! Encoding and decoding of whole frames: [`encode`] appends one, [`decode`]
//! takes one from the front of a buffer; the body of every message but the
//! patch messages (`crate::patch`) is written and read here.

use blockrep_core::{
    CHUNK_SIZE_MAX_BYTES, ChunkId, Consistency, SourceId, VOLUMES_MAX, VolumeName,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::{
    CHECKSUM_OFFSET, FRAME_HEADER_LEN, FRAME_LEN_MIN, Reader, frame_checksum,
    frame_checksum_and_tail, frame_checksum_parts, malformed, seal,
};
use crate::message::{
    Codec, ErrorCode, Message, MessageType, ProtoError, ProtoErrorKind, REF_PROOF_LEN,
};
use crate::{
    BLOCK_VALUES_LEN_MAX, ERROR_MESSAGE_MAX_LEN, FRAME_LEN_MAX, OFFER_IDS_MAX, WANT_PATCHED_MAX,
};

/// Appends the frame for `message` to `out`.
pub fn encode(message: &Message, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32_le(0); // patched below
    out.put_u32_le(0); // the checksum, once the frame is complete
    out.put_u8(message.type_byte());
    match message {
        Message::Hello {
            version_min,
            version_max,
            source,
            disk_size_bytes,
            chunk_size_bytes,
        } => {
            out.put_u16_le(*version_min);
            out.put_u16_le(*version_max);
            put_short_string(out, source.as_str());
            out.put_u64_le(*disk_size_bytes);
            out.put_u32_le(*chunk_size_bytes);
        }
        Message::Welcome {
            version,
            nonce,
            head_epoch,
            head_root,
            id_key,
        } => {
            out.put_u16_le(*version);
            out.put_slice(nonce);
            out.put_u64_le(*head_epoch);
            out.put_u32_le(head_root.len() as u32);
            out.put_slice(head_root);
            put_id_key(out, id_key.as_ref());
        }
        Message::GetPages { indices } => put_page_indices(out, indices),
        Message::Page { index, ids } => {
            out.put_u32_le(*index);
            out.put_u32_le(ids.len() as u32);
            out.put_slice(ids);
        }
        Message::Chunk {
            index,
            id,
            codec,
            raw_len,
            data,
        } => {
            put_chunk_fields(out, *index, id, *codec, *raw_len, data.len());
            out.put_slice(data);
        }
        Message::Commit {
            epoch,
            root,
            scan_started_unix_ms,
            complete,
            last,
            consistency,
        } => {
            out.put_u64_le(*epoch);
            out.put_slice(root.as_bytes());
            out.put_u64_le(*scan_started_unix_ms);
            out.put_u8(u8::from(*last) | (u8::from(*complete) << 1));
            out.put_u8(consistency.to_byte());
        }
        Message::Backlog {
            scan_started_unix_ms,
            chunks_pending,
            bytes_pending,
        } => {
            out.put_u64_le(*scan_started_unix_ms);
            out.put_u64_le(*chunks_pending);
            out.put_u64_le(*bytes_pending);
        }
        Message::MachineHello {
            version_min,
            version_max,
            source,
            chunk_size_bytes,
            volumes,
            allow_volume_removal,
        } => {
            out.put_u16_le(*version_min);
            out.put_u16_le(*version_max);
            put_short_string(out, source.as_str());
            out.put_u32_le(*chunk_size_bytes);
            out.put_u16_le(volumes.len() as u16);
            for (name, size) in volumes {
                put_short_string(out, name.as_str());
                out.put_u64_le(*size);
            }
            out.put_u8(u8::from(*allow_volume_removal));
        }
        Message::MachineWelcome {
            version,
            nonce,
            head_epoch,
            head_root,
            id_key,
        } => {
            out.put_u16_le(*version);
            out.put_slice(nonce);
            out.put_u64_le(*head_epoch);
            out.put_slice(head_root.as_bytes());
            put_id_key(out, id_key.as_ref());
        }
        Message::VolumeHead { index, root } => {
            out.put_u16_le(*index);
            out.put_u32_le(root.len() as u32);
            out.put_slice(root);
        }
        Message::SelectVolume { index } => out.put_u16_le(*index),
        Message::Capture {
            dirty_bytes,
            preserved_bytes,
            cuts,
            writes,
            write_p50_us,
            write_p99_us,
        } => {
            for value in [
                dirty_bytes,
                preserved_bytes,
                cuts,
                writes,
                write_p50_us,
                write_p99_us,
            ] {
                out.put_u64_le(*value);
            }
        }
        Message::Offer { ids } => {
            out.put_u32_le(ids.len() as u32);
            for id in ids {
                out.put_slice(id.as_bytes());
            }
        }
        Message::Have { bits } => {
            out.put_u32_le(bits.len() as u32);
            out.put_slice(bits);
        }
        Message::Committed {
            epoch,
            root,
            chunks_received,
            bytes_received,
            chunks_stored,
            cutover_requested,
        } => {
            out.put_u64_le(*epoch);
            out.put_slice(root.as_bytes());
            out.put_u64_le(*chunks_received);
            out.put_u64_le(*bytes_received);
            out.put_u64_le(*chunks_stored);
            out.put_u8(u8::from(*cutover_requested));
        }
        Message::CutoverReady {
            epoch,
            root,
            snapshot,
            launch,
            commit_ms,
            launch_ms,
        } => {
            out.put_u64_le(*epoch);
            out.put_slice(root.as_bytes());
            put_short_string(out, snapshot);
            put_short_string(out, launch);
            out.put_u64_le(*commit_ms);
            out.put_u64_le(*launch_ms);
        }
        Message::FailbackStart { launch } => put_short_string(out, launch),
        Message::CutoverReport {
            hook_ms,
            scan_ms,
            transfer_ms,
            total_ms,
        } => {
            for value in [hook_ms, scan_ms, transfer_ms, total_ms] {
                out.put_u64_le(*value);
            }
        }
        Message::FailbackPlan {
            target_root,
            base_root,
        } => {
            out.put_u32_le(target_root.len() as u32);
            out.put_slice(target_root);
            out.put_u32_le(base_root.len() as u32);
            out.put_slice(base_root);
        }
        Message::GetBasePages { indices } => put_page_indices(out, indices),
        Message::Want { indices } => {
            out.put_u32_le(indices.len() as u32);
            for index in indices {
                out.put_u64_le(*index);
            }
        }
        Message::FailbackDone { root, finalize } => {
            out.put_slice(root.as_bytes());
            out.put_u8(u8::from(*finalize));
        }
        Message::FailbackAck {
            matches,
            finalize_requested,
        } => {
            out.put_u8(u8::from(*matches));
            out.put_u8(u8::from(*finalize_requested));
        }
        Message::Progress { bytes_received } => out.put_u64_le(*bytes_received),
        Message::GetBlockValues { .. } | Message::BlockValues { .. } | Message::Patch { .. } => {
            crate::patch::encode_body(message, out)
        }
        Message::WantPatched { entries } => {
            out.put_u32_le(entries.len() as u32);
            for (index, id, values) in entries {
                out.put_u64_le(*index);
                out.put_slice(id.as_bytes());
                out.put_u32_le(values.len() as u32);
                out.put_slice(values);
            }
        }
        Message::Error { code, message } => {
            out.put_u16_le(code.to_wire());
            let text = truncate_utf8(message, ERROR_MESSAGE_MAX_LEN);
            out.put_u16_le(text.len() as u16);
            out.put_slice(text.as_bytes());
        }
    }
    let body_len = (out.len() - start - 4) as u32;
    debug_assert!(body_len <= FRAME_LEN_MAX, "encoded frame exceeds the limit");
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    seal(&mut out[start..]);
}

/// Whether a `FailbackPlan` whose roots encode to `target_len` and
/// `base_len` bytes fits in one frame: its two roots, each after its
/// 4-byte length, follow the frame's checksum and type byte, and the frame's
/// length field counts all of that up to [`FRAME_LEN_MAX`].
pub fn failback_plan_fits(target_len: usize, base_len: usize) -> bool {
    let body = (FRAME_HEADER_LEN - 4) + 4 + target_len + 4 + base_len;
    body <= FRAME_LEN_MAX as usize
}

/// Bytes of a `Chunk` frame before its data.
pub const CHUNK_HEADER_LEN: usize = FRAME_HEADER_LEN + 8 + 32 + 1 + 4 + 4;

/// The header of a `Chunk` frame carrying `data`, as an array: a sender can
/// write it in front of data already in its buffer, so that chunk data is
/// copied once (into the frame) and never again. The header's checksum covers
/// `data`, which must be exactly the bytes that follow it.
pub fn chunk_header(
    index: u64,
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    data: &[u8],
) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    let body_len = (CHUNK_HEADER_LEN - 4 + data.len()) as u32;
    out[0..4].copy_from_slice(&body_len.to_le_bytes());
    out[8] = MessageType::Chunk.to_wire();
    out[9..17].copy_from_slice(&index.to_le_bytes());
    out[17..49].copy_from_slice(id.as_bytes());
    out[49] = codec.to_wire();
    out[50..54].copy_from_slice(&raw_len.to_le_bytes());
    out[54..58].copy_from_slice(&(data.len() as u32).to_le_bytes());
    let checksum = frame_checksum_parts(&out, data);
    out[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&checksum.to_le_bytes());
    out
}

/// Appends the header of a `Chunk` frame carrying `data` (see
/// [`chunk_header`]); the caller appends `data` after it.
pub fn encode_chunk_header(
    out: &mut BytesMut,
    index: u64,
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    data: &[u8],
) {
    out.put_slice(&chunk_header(index, id, codec, raw_len, data));
}

fn put_chunk_fields(
    out: &mut BytesMut,
    index: u64,
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    data_len: usize,
) {
    out.put_u64_le(index);
    out.put_slice(id.as_bytes());
    out.put_u8(codec.to_wire());
    out.put_u32_le(raw_len);
    out.put_u32_le(data_len as u32);
}

fn put_page_indices(out: &mut BytesMut, indices: &[u32]) {
    out.put_u32_le(indices.len() as u32);
    for index in indices {
        out.put_u32_le(*index);
    }
}

fn put_id_key(out: &mut BytesMut, key: Option<&[u8; 32]>) {
    out.put_u8(u8::from(key.is_some()));
    if let Some(key) = key {
        out.put_slice(key);
    }
}

fn put_short_string(out: &mut BytesMut, text: &str) {
    let text = truncate_utf8(text, u8::MAX as usize);
    out.put_u8(text.len() as u8);
    out.put_slice(text.as_bytes());
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The least a buffer grows by when a frame does not fit in it: see
/// [`decode`].
const DECODE_GROWTH_MIN: usize = 1024 * 1024;

/// One decoded frame, and what checking it computed that a receiver can
/// use again.
#[derive(Debug)]
pub struct Decoded {
    pub message: Message,
    /// For a `Chunk` frame: the crc32 (IEEE) of its data, computed as part
    /// of the frame's checksum. A store whose records carry a crc32 of the
    /// same bytes need not compute it again.
    pub data_crc: Option<u32>,
}

/// Decodes one frame from the front of `buf` (see [`decode_frame`]).
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
    Ok(decode_frame(buf)?.map(|decoded| decoded.message))
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and call
/// again). The frame length is checked before waiting for or reserving its body, so a
/// peer cannot make us buffer more than [`FRAME_LEN_MAX`] bytes (and at most a
/// megabyte of room besides); the checksum is
/// checked before any field is read, so a frame damaged before it was sealed into
/// TLS is refused whole, whatever field the damage hit.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Decoded>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let body_len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(FRAME_LEN_MIN..=FRAME_LEN_MAX).contains(&body_len) {
        return Err(ProtoError::new(
            ProtoErrorKind::FrameTooLarge,
            format!("frame length {body_len} outside {FRAME_LEN_MIN}..={FRAME_LEN_MAX}"),
        ));
    }
    let frame_len = 4 + body_len as usize;
    if buf.len() < frame_len {
        let missing = frame_len - buf.len();
        if buf.capacity() - buf.len() < missing {
            // The buffer's earlier frames are usually still held (a chunk
            // queued for its verifier), so it cannot grow in place: growing
            // copies this partial frame into a new allocation. Growing by a
            // megabyte or more does that once per many frames, not per frame.
            buf.reserve(missing.max(DECODE_GROWTH_MIN));
        }
        return Ok(None);
    }
    let sent = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    // A chunk's data is checksummed apart and the two crcs combined, so
    // that the data's own crc comes out of the same single pass.
    let chunk = buf[FRAME_HEADER_LEN - 1] == MessageType::Chunk as u8;
    let (computed, data_crc) = if chunk && frame_len >= CHUNK_HEADER_LEN {
        let (frame, data) = frame_checksum_and_tail(&buf[..frame_len], CHUNK_HEADER_LEN);
        (frame, Some(data))
    } else {
        (frame_checksum(&buf[..frame_len]), None)
    };
    if sent != computed {
        return Err(ProtoError::new(
            ProtoErrorKind::Checksum,
            format!(
                "frame checksum {sent:#010x} does not match its bytes ({computed:#010x}): \
                 the frame was damaged before it was sent"
            ),
        ));
    }
    buf.advance(FRAME_HEADER_LEN - 1);
    let mut body = buf.split_to(body_len as usize - 4).freeze();
    let message_type = body.get_u8();
    let message = decode_body(message_type, &mut body)?;
    if body.has_remaining() {
        return Err(malformed(format!(
            "{} bytes trailing a {} frame",
            body.remaining(),
            message.name()
        )));
    }
    // A frame of the chunk type that decoded is a chunk whose data is all
    // that follows its header.
    let data_crc = data_crc.filter(|_| matches!(message, Message::Chunk { .. }));
    Ok(Some(Decoded { message, data_crc }))
}

fn decode_body(type_byte: u8, body: &mut Bytes) -> Result<Message, ProtoError> {
    let message_type = MessageType::try_from(type_byte).map_err(|other| {
        ProtoError::new(
            ProtoErrorKind::UnknownType,
            format!("unknown message type {other}"),
        )
    })?;
    let mut r = Reader(body);
    let message = match message_type {
        MessageType::Hello => {
            let version_min = r.u16("version")?;
            let version_max = r.u16("version")?;
            let len = r.u8("source id")? as usize;
            let raw = r.bytes(len, u8::MAX as usize, "source id")?;
            let text = std::str::from_utf8(&raw).map_err(|_| malformed("source id not UTF-8"))?;
            let source = SourceId::new(text).map_err(|e| malformed(e.to_string()))?;
            Message::Hello {
                version_min,
                version_max,
                source,
                disk_size_bytes: r.u64("disk size")?,
                chunk_size_bytes: r.u32("chunk size")?,
            }
        }
        MessageType::Welcome => {
            let version = r.u16("version")?;
            let nonce = r.id("nonce")?.0;
            let head_epoch = r.u64("epoch")?;
            let len = r.u32("root length")? as usize;
            let head_root = r.bytes(len, FRAME_LEN_MAX as usize, "head root")?;
            Message::Welcome {
                version,
                nonce,
                head_epoch,
                head_root,
                id_key: r.id_key()?,
            }
        }
        MessageType::GetPages => Message::GetPages {
            indices: r.page_indices("GetPages")?,
        },
        MessageType::Page => {
            let index = r.u32("page index")?;
            let len = r.u32("page length")? as usize;
            let ids = r.bytes(len, blockrep_core::CHUNKS_PER_PAGE * 32, "page")?;
            if !len.is_multiple_of(32) {
                return Err(malformed("page length is not a multiple of 32"));
            }
            Message::Page { index, ids }
        }
        MessageType::Chunk => {
            let index = r.u64("chunk index")?;
            let id = r.id("chunk id")?;
            let codec_byte = r.u8("codec")?;
            let codec = Codec::from_wire(codec_byte)
                .ok_or_else(|| malformed(format!("unknown chunk codec {codec_byte}")))?;
            let raw_len = r.u32("chunk length")?;
            if raw_len > CHUNK_SIZE_MAX_BYTES {
                return Err(ProtoError::new(
                    ProtoErrorKind::LimitExceeded,
                    format!("chunk length {raw_len} exceeds {CHUNK_SIZE_MAX_BYTES}"),
                ));
            }
            let data_len = r.u32("data length")? as usize;
            let data = r.bytes(data_len, CHUNK_SIZE_MAX_BYTES as usize, "chunk data")?;
            let data_ok = match codec {
                Codec::Raw | Codec::Zstd => !data.is_empty() || raw_len == 0,
                Codec::Zero => data.is_empty(),
                // A reference carries exactly its proof of possession.
                Codec::Ref => data.len() == REF_PROOF_LEN,
            };
            if !data_ok {
                return Err(malformed(format!(
                    "{codec:?} chunk {index} with {data_len} data bytes"
                )));
            }
            Message::Chunk {
                index,
                id,
                codec,
                raw_len,
                data,
            }
        }
        MessageType::Commit => {
            let epoch = r.u64("epoch")?;
            let root = r.id("root")?;
            let scan_started_unix_ms = r.u64("scan start")?;
            let flags = r.u8("commit flags")?;
            if flags & !0b11 != 0 {
                return Err(malformed(format!("unknown commit flags {flags:#04x}")));
            }
            let label = r.u8("consistency label")?;
            let consistency = Consistency::from_byte(label).ok_or_else(|| {
                malformed(format!(
                    "unknown consistency label {label:#04x} in Commit \
                     (0 live, 1 crash-consistent, 2 quiesced)"
                ))
            })?;
            Message::Commit {
                epoch,
                root,
                scan_started_unix_ms,
                complete: flags & 0b10 != 0,
                last: flags & 0b01 != 0,
                consistency,
            }
        }
        MessageType::Backlog => Message::Backlog {
            scan_started_unix_ms: r.u64("scan start")?,
            chunks_pending: r.u64("chunk count")?,
            bytes_pending: r.u64("byte count")?,
        },
        MessageType::MachineHello => {
            let version_min = r.u16("version")?;
            let version_max = r.u16("version")?;
            let source = r.short_string("source id")?;
            let source = SourceId::new(&source).map_err(|e| malformed(e.to_string()))?;
            let chunk_size_bytes = r.u32("chunk size")?;
            let count = usize::from(r.u16("volume count")?);
            if count > VOLUMES_MAX {
                return Err(ProtoError::new(
                    ProtoErrorKind::LimitExceeded,
                    format!("{count} volumes, at most {VOLUMES_MAX}"),
                ));
            }
            let mut volumes = Vec::with_capacity(count);
            for _ in 0..count {
                let name = r.short_string("volume name")?;
                let name = VolumeName::new(&name).map_err(|e| malformed(e.to_string()))?;
                volumes.push((name, r.u64("volume size")?));
            }
            Message::MachineHello {
                version_min,
                version_max,
                source,
                chunk_size_bytes,
                volumes,
                allow_volume_removal: r.flag("volume removal flag")?,
            }
        }
        MessageType::MachineWelcome => Message::MachineWelcome {
            version: r.u16("version")?,
            nonce: r.id("nonce")?.0,
            head_epoch: r.u64("epoch")?,
            head_root: r.id("head root")?,
            id_key: r.id_key()?,
        },
        MessageType::VolumeHead => {
            let index = r.u16("volume index")?;
            let len = r.u32("root length")? as usize;
            let root = r.bytes(len, FRAME_LEN_MAX as usize, "volume root")?;
            Message::VolumeHead { index, root }
        }
        MessageType::SelectVolume => Message::SelectVolume {
            index: r.u16("volume index")?,
        },
        MessageType::Capture => Message::Capture {
            dirty_bytes: r.u64("dirty bytes")?,
            preserved_bytes: r.u64("preserved bytes")?,
            cuts: r.u64("cut count")?,
            writes: r.u64("write count")?,
            write_p50_us: r.u64("write p50")?,
            write_p99_us: r.u64("write p99")?,
        },
        MessageType::Offer => {
            let count = r.u32("offer count")? as usize;
            if count > OFFER_IDS_MAX {
                return Err(ProtoError::new(
                    ProtoErrorKind::LimitExceeded,
                    format!("Offer of {count} ids exceeds the limit of {OFFER_IDS_MAX}"),
                ));
            }
            r.need(count * 32, "offered ids")?;
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                ids.push(r.id("offered id")?);
            }
            Message::Offer { ids }
        }
        MessageType::Have => {
            let len = r.u32("bitmap length")? as usize;
            let bits = r.bytes(len, OFFER_IDS_MAX.div_ceil(8), "bitmap")?;
            Message::Have { bits }
        }
        MessageType::Committed => Message::Committed {
            epoch: r.u64("epoch")?,
            root: r.id("root")?,
            chunks_received: r.u64("chunk count")?,
            bytes_received: r.u64("byte count")?,
            chunks_stored: r.u64("chunk count")?,
            cutover_requested: r.flag("cutover flag")?,
        },
        MessageType::CutoverReady => Message::CutoverReady {
            epoch: r.u64("epoch")?,
            root: r.id("root")?,
            snapshot: r.short_string("snapshot name")?,
            launch: r.short_string("launch name")?,
            commit_ms: r.u64("commit time")?,
            launch_ms: r.u64("launch time")?,
        },
        MessageType::CutoverReport => Message::CutoverReport {
            hook_ms: r.u64("hook time")?,
            scan_ms: r.u64("scan time")?,
            transfer_ms: r.u64("transfer time")?,
            total_ms: r.u64("total time")?,
        },
        MessageType::FailbackStart => Message::FailbackStart {
            launch: r.short_string("launch name")?,
        },
        MessageType::FailbackPlan => {
            let len = r.u32("root length")? as usize;
            let target_root = r.bytes(len, FRAME_LEN_MAX as usize, "target root")?;
            let len = r.u32("root length")? as usize;
            let base_root = r.bytes(len, FRAME_LEN_MAX as usize, "base root")?;
            Message::FailbackPlan {
                target_root,
                base_root,
            }
        }
        MessageType::Want => {
            let count = r.u32("chunk count")? as usize;
            if count > OFFER_IDS_MAX {
                return Err(ProtoError::new(
                    ProtoErrorKind::LimitExceeded,
                    format!("Want of {count} chunks exceeds the limit of {OFFER_IDS_MAX}"),
                ));
            }
            r.need(count * 8, "chunk indices")?;
            let indices = (0..count).map(|_| r.0.get_u64_le()).collect();
            Message::Want { indices }
        }
        MessageType::FailbackDone => Message::FailbackDone {
            root: r.id("root")?,
            finalize: r.flag("finalize flag")?,
        },
        MessageType::FailbackAck => Message::FailbackAck {
            matches: r.flag("match flag")?,
            finalize_requested: r.flag("finalize flag")?,
        },
        MessageType::GetBasePages => Message::GetBasePages {
            indices: r.page_indices("GetBasePages")?,
        },
        MessageType::Progress => Message::Progress {
            bytes_received: r.u64("byte count")?,
        },
        MessageType::GetBlockValues | MessageType::BlockValues | MessageType::Patch => {
            crate::patch::decode_body(message_type, &mut r)?
        }
        MessageType::WantPatched => {
            let count = r.u32("entry count")? as usize;
            if count > WANT_PATCHED_MAX {
                return Err(ProtoError::new(
                    ProtoErrorKind::LimitExceeded,
                    format!(
                        "WantPatched of {count} chunks exceeds the limit of {WANT_PATCHED_MAX}"
                    ),
                ));
            }
            r.need(count * (8 + 32 + 4), "entries")?;
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let index = r.u64("chunk index")?;
                let id = r.id("disk chunk id")?;
                let len = r.u32("block values length")? as usize;
                let values = r.bytes(len, BLOCK_VALUES_LEN_MAX, "block values")?;
                if !len.is_multiple_of(blockrep_core::BLOCK_VALUE_LEN) {
                    return Err(malformed(format!(
                        "block values of chunk {index} are {len} bytes, not whole 16-byte values"
                    )));
                }
                entries.push((index, id, values));
            }
            Message::WantPatched { entries }
        }
        MessageType::Error => {
            let code = ErrorCode::from_wire(r.u16("error code")?);
            let len = r.u16("message length")? as usize;
            // Strict UTF-8, like every other string: a lossy decode would log
            // and act on text other than the bytes received.
            let raw = r.bytes(len, ERROR_MESSAGE_MAX_LEN, "error message")?;
            let message = String::from_utf8(raw.to_vec())
                .map_err(|_| malformed("error message is not UTF-8"))?;
            Message::Error { code, message }
        }
    };
    Ok(message)
}

#[cfg(test)]
mod tests;

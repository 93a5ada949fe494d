use blockrep_core::{CHUNK_SIZE_MAX_BYTES, ChunkId, Consistency, SourceId};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::message::{Codec, ErrorCode, Message, ProtoError, ProtoErrorKind, REF_PROOF_LEN};
use crate::{
    BLOCK_VALUES_LEN_MAX, ERROR_MESSAGE_MAX_LEN, FRAME_LEN_MAX, GET_PAGES_MAX, OFFER_IDS_MAX,
    WANT_PATCHED_MAX,
};

/// Bytes before a frame's body: the length field, the checksum and the type byte.
pub const FRAME_HEADER_LEN: usize = 9;

/// Offset of the checksum in a frame.
pub(crate) const CHECKSUM_OFFSET: usize = 4;
/// The shortest frame length field: a checksum and a type byte, no body.
const FRAME_LEN_MIN: u32 = 5;

/// The checksum of a frame: crc32 (IEEE) of every byte of `frame` but the
/// checksum field itself. `frame` is one whole frame.
fn frame_checksum(frame: &[u8]) -> u32 {
    frame_checksum_parts(frame, &[])
}

/// [`frame_checksum`] of a frame whose bytes are `head` then `tail`, with the
/// checksum field inside `head`.
pub(crate) fn frame_checksum_parts(head: &[u8], tail: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[..CHECKSUM_OFFSET]);
    hasher.update(&head[CHECKSUM_OFFSET + 4..]);
    hasher.update(tail);
    hasher.finalize()
}

/// Writes the checksum of a whole frame whose length field is set.
pub(crate) fn seal(frame: &mut [u8]) {
    let checksum = frame_checksum(frame);
    frame[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&checksum.to_le_bytes());
}

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
        } => {
            out.put_u16_le(*version);
            out.put_slice(nonce);
            out.put_u64_le(*head_epoch);
            out.put_u32_le(head_root.len() as u32);
            out.put_slice(head_root);
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
            out.put_u16_le(code.to_u16());
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
    out[8] = 5;
    out[9..17].copy_from_slice(&index.to_le_bytes());
    out[17..49].copy_from_slice(id.as_bytes());
    out[49] = codec as u8;
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
    out.put_u8(codec as u8);
    out.put_u32_le(raw_len);
    out.put_u32_le(data_len as u32);
}

fn put_page_indices(out: &mut BytesMut, indices: &[u32]) {
    out.put_u32_le(indices.len() as u32);
    for index in indices {
        out.put_u32_le(*index);
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

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and call
/// again). The frame length is checked before waiting for or reserving its body, so a
/// peer cannot make us buffer more than [`FRAME_LEN_MAX`] bytes; the checksum is
/// checked before any field is read, so a frame damaged before it was sealed into
/// TLS is refused whole, whatever field the damage hit.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
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
        buf.reserve(frame_len - buf.len());
        return Ok(None);
    }
    let sent = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let computed = frame_checksum(&buf[..frame_len]);
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
    Ok(Some(message))
}

pub(crate) fn malformed(message: impl Into<String>) -> ProtoError {
    ProtoError::new(ProtoErrorKind::Malformed, message)
}

/// Bounded reader over a frame body: every read checks the remaining length.
pub(crate) struct Reader<'a>(pub(crate) &'a mut Bytes);

impl Reader<'_> {
    pub(crate) fn need(&self, n: usize, what: &str) -> Result<(), ProtoError> {
        if self.0.remaining() < n {
            Err(malformed(format!("frame truncated in {what}")))
        } else {
            Ok(())
        }
    }
    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, ProtoError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }
    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        self.need(2, what)?;
        Ok(self.0.get_u16_le())
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        self.need(4, what)?;
        Ok(self.0.get_u32_le())
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, ProtoError> {
        self.need(8, what)?;
        Ok(self.0.get_u64_le())
    }
    pub(crate) fn id(&mut self, what: &str) -> Result<ChunkId, ProtoError> {
        self.need(32, what)?;
        let mut id = [0u8; 32];
        self.0.copy_to_slice(&mut id);
        Ok(ChunkId(id))
    }
    /// A counted list of page indices, at most [`GET_PAGES_MAX`].
    fn page_indices(&mut self, what: &str) -> Result<Vec<u32>, ProtoError> {
        let count = self.u32("page count")? as usize;
        if count > GET_PAGES_MAX {
            return Err(ProtoError::new(
                ProtoErrorKind::LimitExceeded,
                format!("{what} of {count} pages exceeds the limit of {GET_PAGES_MAX}"),
            ));
        }
        self.need(count * 4, "page indices")?;
        Ok((0..count).map(|_| self.0.get_u32_le()).collect())
    }
    fn flag(&mut self, what: &str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed(format!("{what} {other} is not 0 or 1"))),
        }
    }
    fn short_string(&mut self, what: &str) -> Result<String, ProtoError> {
        let len = self.u8(what)? as usize;
        let raw = self.bytes(len, u8::MAX as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
    }
    pub(crate) fn bytes(
        &mut self,
        len: usize,
        limit: usize,
        what: &str,
    ) -> Result<Bytes, ProtoError> {
        if len > limit {
            return Err(ProtoError::new(
                ProtoErrorKind::LimitExceeded,
                format!("{what} of {len} bytes exceeds the limit of {limit}"),
            ));
        }
        self.need(len, what)?;
        Ok(self.0.split_to(len))
    }
}

fn decode_body(message_type: u8, body: &mut Bytes) -> Result<Message, ProtoError> {
    let mut r = Reader(body);
    let message = match message_type {
        1 => {
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
        2 => {
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
            }
        }
        3 => Message::GetPages {
            indices: r.page_indices("GetPages")?,
        },
        4 => {
            let index = r.u32("page index")?;
            let len = r.u32("page length")? as usize;
            let ids = r.bytes(len, blockrep_core::CHUNKS_PER_PAGE * 32, "page")?;
            if !len.is_multiple_of(32) {
                return Err(malformed("page length is not a multiple of 32"));
            }
            Message::Page { index, ids }
        }
        5 => {
            let index = r.u64("chunk index")?;
            let id = r.id("chunk id")?;
            let codec_byte = r.u8("codec")?;
            let codec = Codec::from_u8(codec_byte)
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
        6 => {
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
        9 => Message::Backlog {
            scan_started_unix_ms: r.u64("scan start")?,
            chunks_pending: r.u64("chunk count")?,
            bytes_pending: r.u64("byte count")?,
        },
        25 => Message::Capture {
            dirty_bytes: r.u64("dirty bytes")?,
            preserved_bytes: r.u64("preserved bytes")?,
            cuts: r.u64("cut count")?,
            writes: r.u64("write count")?,
            write_p50_us: r.u64("write p50")?,
            write_p99_us: r.u64("write p99")?,
        },
        10 => {
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
        11 => {
            let len = r.u32("bitmap length")? as usize;
            let bits = r.bytes(len, OFFER_IDS_MAX.div_ceil(8), "bitmap")?;
            Message::Have { bits }
        }
        7 => Message::Committed {
            epoch: r.u64("epoch")?,
            root: r.id("root")?,
            chunks_received: r.u64("chunk count")?,
            bytes_received: r.u64("byte count")?,
            chunks_stored: r.u64("chunk count")?,
            cutover_requested: r.flag("cutover flag")?,
        },
        12 => Message::CutoverReady {
            epoch: r.u64("epoch")?,
            root: r.id("root")?,
            snapshot: r.short_string("snapshot name")?,
            launch: r.short_string("launch name")?,
            commit_ms: r.u64("commit time")?,
            launch_ms: r.u64("launch time")?,
        },
        19 => Message::CutoverReport {
            hook_ms: r.u64("hook time")?,
            scan_ms: r.u64("scan time")?,
            transfer_ms: r.u64("transfer time")?,
            total_ms: r.u64("total time")?,
        },
        13 => Message::FailbackStart {
            launch: r.short_string("launch name")?,
        },
        14 => {
            let len = r.u32("root length")? as usize;
            let target_root = r.bytes(len, FRAME_LEN_MAX as usize, "target root")?;
            let len = r.u32("root length")? as usize;
            let base_root = r.bytes(len, FRAME_LEN_MAX as usize, "base root")?;
            Message::FailbackPlan {
                target_root,
                base_root,
            }
        }
        15 => {
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
        16 => Message::FailbackDone {
            root: r.id("root")?,
            finalize: r.flag("finalize flag")?,
        },
        17 => Message::FailbackAck {
            matches: r.flag("match flag")?,
            finalize_requested: r.flag("finalize flag")?,
        },
        18 => Message::GetBasePages {
            indices: r.page_indices("GetBasePages")?,
        },
        20 => Message::Progress {
            bytes_received: r.u64("byte count")?,
        },
        21..=23 => crate::patch::decode_body(message_type, &mut r)?,
        24 => {
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
        8 => {
            let code = ErrorCode::from_u16(r.u16("error code")?);
            let len = r.u16("message length")? as usize;
            // Strict UTF-8, like every other string: a lossy decode would log
            // and act on text other than the bytes received.
            let raw = r.bytes(len, ERROR_MESSAGE_MAX_LEN, "error message")?;
            let message = String::from_utf8(raw.to_vec())
                .map_err(|_| malformed("error message is not UTF-8"))?;
            Message::Error { code, message }
        }
        other => {
            return Err(ProtoError::new(
                ProtoErrorKind::UnknownType,
                format!("unknown message type {other}"),
            ));
        }
    };
    Ok(message)
}

#[cfg(test)]
mod tests {
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
            (any::<u16>(), any::<[u8; 32]>(), any::<u64>(), bytes(300)).prop_map(|(v, n, e, r)| {
                Message::Welcome {
                    version: v,
                    nonce: n,
                    head_epoch: e,
                    head_root: r,
                }
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
}

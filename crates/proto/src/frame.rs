//! The frame around every message: its header (length, checksum, type
//! byte), the checksum that seals it, and the bounded reader that every body
//! decoder reads fields with. Below both the message codec and the patch
//! bodies, which share it.

use blockrep_core::ChunkId;
use bytes::{Buf, Bytes};

use crate::GET_PAGES_MAX;
use crate::message::{ProtoError, ProtoErrorKind};

/// Bytes before a frame's body: the length field, the checksum and the type byte.
pub const FRAME_HEADER_LEN: usize = 9;

/// Offset of the checksum in a frame.
pub(crate) const CHECKSUM_OFFSET: usize = 4;
/// The shortest frame length field: a checksum and a type byte, no body.
pub(crate) const FRAME_LEN_MIN: u32 = 5;

/// The checksum of a frame: crc32 (IEEE) of every byte of `frame` but the
/// checksum field itself. `frame` is one whole frame.
pub(crate) fn frame_checksum(frame: &[u8]) -> u32 {
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

/// [`frame_checksum`] of a whole `frame`, and the crc32 of its bytes from
/// `tail_at` on (a chunk's data), each computed once: the frame's checksum
/// is the head's crc combined with the tail's.
pub(crate) fn frame_checksum_and_tail(frame: &[u8], tail_at: usize) -> (u32, u32) {
    let mut tail = crc32fast::Hasher::new();
    tail.update(&frame[tail_at..]);
    let tail_crc = tail.clone().finalize();
    let mut whole = crc32fast::Hasher::new();
    whole.update(&frame[..CHECKSUM_OFFSET]);
    whole.update(&frame[CHECKSUM_OFFSET + 4..tail_at]);
    whole.combine(&tail);
    (whole.finalize(), tail_crc)
}

/// Writes the checksum of a whole frame whose length field is set.
pub(crate) fn seal(frame: &mut [u8]) {
    let checksum = frame_checksum(frame);
    frame[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&checksum.to_le_bytes());
}

/// A [`ProtoErrorKind::Malformed`] error.
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
    pub(crate) fn page_indices(&mut self, what: &str) -> Result<Vec<u32>, ProtoError> {
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
    pub(crate) fn flag(&mut self, what: &str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed(format!("{what} {other} is not 0 or 1"))),
        }
    }
    /// An optional id key: a flag, then the key when set.
    pub(crate) fn id_key(&mut self) -> Result<Option<[u8; 32]>, ProtoError> {
        Ok(if self.flag("id key flag")? {
            Some(self.id("id key")?.0)
        } else {
            None
        })
    }
    pub(crate) fn short_string(&mut self, what: &str) -> Result<String, ProtoError> {
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

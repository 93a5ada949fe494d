//! The blockrep wire protocol: frames, messages, limits and version negotiation.
//!
//! No I/O happens here: [`decode`] takes bytes already read into a buffer and
//! returns `Ok(None)` while a frame is incomplete; [`encode`] appends a frame to a
//! buffer. Every length a peer controls is checked against a limit before any
//! memory is reserved for it, unknown message types are errors, and trailing bytes
//! inside a frame are errors.
//!
//! # Frame layout (all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | frame length `n`: bytes after this field, 5 ..= [`FRAME_LEN_MAX`] |
//! | 4 | 4 | checksum: crc32 (IEEE) of every byte of the frame but these four |
//! | 8 | 1 | message type |
//! | 9 | n - 5 | message body |
//!
//! The checksum is verified before any field is read. TLS protects a frame only
//! once it is sealed into a record; the checksum catches a frame damaged before
//! that (a bug or bad memory on the sender), in the fields that nothing else
//! covers too: flags, epochs, times, counters, offered ids, page lists.
//!
//! ```
//! use blockrep_proto::{decode, encode, Message};
//! use bytes::BytesMut;
//!
//! let mut buf = BytesMut::new();
//! encode(&Message::GetPages { indices: vec![0, 7] }, &mut buf);
//! assert_eq!(decode(&mut buf).unwrap(), Some(Message::GetPages { indices: vec![0, 7] }));
//! assert!(buf.is_empty());
//! ```
#![forbid(unsafe_code)]

mod codec;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod message;
mod patch;

pub use codec::{
    CHUNK_HEADER_LEN, Decoded, chunk_header, decode, decode_frame, encode, encode_chunk_header,
    failback_plan_fits,
};
pub use frame::FRAME_HEADER_LEN;
pub use message::{
    Codec, ErrorCode, IO_TIMEOUT_MIN, Message, MessageType, NONCE_LEN, PROGRESS_INTERVAL,
    PROTOCOL_VERSION, ProtoError, ProtoErrorKind, REF_PROOF_LEN, negotiate_version, ref_proof,
};
pub use patch::{BLOCK_VALUES_IDS_MAX, BLOCK_VALUES_LEN_MAX, PATCH_RANGES_MAX, patch_frame};

/// Largest frame body accepted: a root of [`blockrep_core::PAGE_COUNT_MAX`] pages plus headroom.
pub const FRAME_LEN_MAX: u32 = 8 * 1024 * 1024 + 64 * 1024;
/// Most page indices in one `GetPages`.
pub const GET_PAGES_MAX: usize = 8192;
/// Most chunk ids in one `Offer` (and bits in its `Have`).
pub const OFFER_IDS_MAX: usize = 8192;
/// Most chunks in one `WantPatched` (a failback agent's batch): with the
/// block values of the largest chunks, well within a frame.
pub const WANT_PATCHED_MAX: usize = 256;
/// Longest error message carried in an `Error` frame.
pub const ERROR_MESSAGE_MAX_LEN: usize = 1024;

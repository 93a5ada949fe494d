//! Fault injection below TLS, for tests only: this module exists with the
//! `fault-injection` feature, which only test builds enable (the root package
//! turns it on from its dev-dependencies; a normal or `--release` build of the
//! binary has neither this module nor the hook in [`crate::AgentConfig`]).
//!
//! TLS authenticates every record, so bytes flipped on the wire never reach
//! the server's frame decoder. A bug in the agent (or memory that goes bad
//! beside it) corrupts the *plaintext* before TLS seals it, and TLS then
//! faithfully delivers the damage. To show that the protocol itself catches
//! that, a [`PlaintextTap`] set in [`crate::AgentConfig::plaintext_tap`] sees
//! every plaintext frame the agent writes, before TLS, and may change its
//! bytes or cut the stream short. [`StreamCorrupter`] is a seeded tap that
//! flips bits in one chosen frame or truncates the stream in one.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use blockrep_agent::fault::{Injection, Region, SharedTap, StreamCorrupter};
//!
//! let corrupter = Arc::new(Mutex::new(StreamCorrupter::new(Injection::Flip {
//!     frame_type: 5, // the first Chunk frame
//!     occurrence: 0,
//!     region: Region::Payload,
//!     position: 12_345,
//!     masks: vec![0x01],
//! })));
//! let tap: SharedTap = corrupter.clone();
//! // config.plaintext_tap = Some(tap); run the agent; then:
//! assert!(corrupter.lock().unwrap().applied().is_none()); // nothing written yet
//! # let _ = tap;
//! ```

use std::fmt;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use blockrep_proto::FRAME_HEADER_LEN;
use tokio::io::AsyncWrite;

/// Sees every plaintext frame the agent writes into TLS, in order.
pub trait PlaintextTap: Send + fmt::Debug {
    /// `frame` is the next frame, starting `stream_offset` bytes into the
    /// connection's plaintext; the tap may change it in place. Returns how many
    /// of its bytes go out: fewer than `frame.len()` truncates the stream there
    /// (those bytes are sent, then the connection is closed cleanly, with a TLS
    /// close_notify, and every later write fails).
    fn tap(&mut self, stream_offset: u64, frame: &mut [u8]) -> usize;
}

/// A tap shared between the test that reads its results and the agent.
pub type SharedTap = Arc<Mutex<dyn PlaintextTap>>;

/// Which bytes of a frame an injection lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// The frame header (length, checksum, type) and the fixed-size fields of
    /// the message: indices, counts, codec, lengths, epochs, flags, times,
    /// versions, sizes.
    Header,
    /// What the message carries: chunk ids and data, offered ids, page
    /// indices, roots, source and launch names.
    Payload,
}

/// One fault for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// XOR `masks` into consecutive bytes of the `occurrence`-th frame (from
    /// 0) of type `frame_type`, starting at byte `position % n` of its
    /// `region` (of `n` bytes). Masks past the frame's end are dropped.
    Flip {
        frame_type: u8,
        occurrence: u32,
        region: Region,
        position: u64,
        masks: Vec<u8>,
    },
    /// Send only the first `position % len` bytes of the `frame_number`-th
    /// frame (from 0, any type) of `len` bytes, then close the connection: 0
    /// ends the stream cleanly between two frames.
    Truncate { frame_number: u32, position: u64 },
    /// Change nothing; only record the frames (see [`StreamCorrupter::frames`]).
    Nothing,
}

/// Where an injection landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Type byte of the frame hit.
    pub frame_type: u8,
    /// Length of the frame hit, header included.
    pub frame_len: usize,
    /// Offset of the first byte changed (or of the cut) in the frame.
    pub frame_offset: usize,
    /// The same, from the start of the connection's plaintext.
    pub stream_offset: u64,
    /// Bytes changed (0 for a truncation).
    pub bytes_flipped: usize,
}

/// A frame that went past the tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSeen {
    /// Its type byte.
    pub frame_type: u8,
    /// Its length, header included.
    pub len: usize,
}

/// A [`PlaintextTap`] that applies one [`Injection`] and records where.
#[derive(Debug)]
pub struct StreamCorrupter {
    injection: Injection,
    applied: Option<Applied>,
    frames: Vec<FrameSeen>,
}

impl StreamCorrupter {
    /// A corrupter that will apply `injection` to the stream it is set on.
    pub fn new(injection: Injection) -> Self {
        Self {
            injection,
            applied: None,
            frames: Vec::new(),
        }
    }

    /// Where the injection landed, once it has.
    pub fn applied(&self) -> Option<&Applied> {
        self.applied.as_ref()
    }

    /// Every frame seen so far, in order.
    pub fn frames(&self) -> &[FrameSeen] {
        &self.frames
    }

    fn flip(&mut self, stream_offset: u64, frame: &mut [u8], region: Region) {
        let Injection::Flip {
            position, masks, ..
        } = &self.injection
        else {
            return;
        };
        let frame_type = frame[FRAME_HEADER_LEN - 1];
        let ranges = region_ranges(frame_type, frame.len(), region);
        let region_len: usize = ranges.iter().map(|r| r.len()).sum();
        if region_len == 0 {
            return; // e.g. the payload of a zero chunk: nothing to hit
        }
        let mut skip = (*position % region_len as u64) as usize;
        let mut start = 0;
        for range in &ranges {
            if skip < range.len() {
                start = range.start + skip;
                break;
            }
            skip -= range.len();
        }
        let mut flipped = 0;
        for (byte, mask) in frame[start..].iter_mut().zip(masks) {
            *byte ^= mask;
            flipped += usize::from(*mask != 0);
        }
        self.applied = Some(Applied {
            frame_type,
            frame_len: frame.len(),
            frame_offset: start,
            stream_offset: stream_offset + start as u64,
            bytes_flipped: flipped,
        });
    }
}

impl PlaintextTap for StreamCorrupter {
    fn tap(&mut self, stream_offset: u64, frame: &mut [u8]) -> usize {
        if frame.len() < FRAME_HEADER_LEN {
            return frame.len(); // not a frame of ours: leave it alone
        }
        let frame_type = frame[FRAME_HEADER_LEN - 1];
        let number = self.frames.len() as u32;
        let occurrence = self
            .frames
            .iter()
            .filter(|f| f.frame_type == frame_type)
            .count() as u32;
        self.frames.push(FrameSeen {
            frame_type,
            len: frame.len(),
        });
        if self.applied.is_some() {
            return frame.len();
        }
        match self.injection {
            Injection::Flip {
                frame_type: target,
                occurrence: wanted,
                region,
                ..
            } if target == frame_type && wanted == occurrence => {
                self.flip(stream_offset, frame, region);
                frame.len()
            }
            Injection::Truncate {
                frame_number,
                position,
            } if frame_number == number => {
                let keep = (position % frame.len() as u64) as usize;
                self.applied = Some(Applied {
                    frame_type,
                    frame_len: frame.len(),
                    frame_offset: keep,
                    stream_offset: stream_offset + keep as u64,
                    bytes_flipped: 0,
                });
                keep
            }
            _ => frame.len(),
        }
    }
}

/// The payload bytes of a frame of `frame_type` and `len` bytes (see
/// [`Region`]); the header is everything else. Follows the frame layouts of
/// `blockrep_proto` for the messages an agent sends.
// A list of ranges, most of one range: not a vector of the range's numbers.
#[allow(clippy::single_range_in_vec_init)]
fn region_ranges(frame_type: u8, len: usize, region: Region) -> Vec<Range<usize>> {
    const H: usize = FRAME_HEADER_LEN;
    let clamp = |r: Range<usize>| r.start.min(len)..r.end.min(len);
    let payload: Vec<Range<usize>> = match frame_type {
        // Hello: versions, source id (payload), disk size, chunk size.
        1 => vec![H + 5..len.saturating_sub(12)],
        // GetPages, GetBasePages, Offer, Want: a count, then the list.
        3 | 10 | 15 | 18 => vec![H + 4..len],
        // Chunk: index, id (payload), codec, lengths, data (payload).
        5 => vec![H + 8..H + 40, H + 49..len],
        // Commit: epoch, root (payload), scan start, flags.
        6 => vec![H + 8..H + 40],
        // FailbackStart: the launch name.
        13 => vec![H + 1..len],
        // FailbackDone: root (payload), flag.
        16 => vec![H..H + 32],
        // Backlog, CutoverReport: counters and times only.
        _ => Vec::new(),
    };
    let payload: Vec<Range<usize>> = payload
        .into_iter()
        .map(clamp)
        .filter(|r| !r.is_empty())
        .collect();
    match region {
        Region::Payload => payload,
        Region::Header => {
            let mut header = Vec::new();
            let mut at = 0;
            for range in &payload {
                if range.start > at {
                    header.push(at..range.start);
                }
                at = range.end;
            }
            if at < len {
                header.push(at..len);
            }
            header
        }
    }
}

/// The agent's plaintext writer with a tap in front of it. Without a tap it
/// passes writes straight through.
#[derive(Debug)]
pub(crate) struct Tapped<W> {
    inner: W,
    tap: Option<SharedTap>,
    /// Plaintext bytes handed to the tap so far.
    offset: u64,
    /// Bytes the tap let through, not yet written to `inner`.
    pending: Vec<u8>,
    written: usize,
    /// The tap cut the stream: after `pending`, close and fail every write.
    truncated: bool,
    closed: bool,
}

impl<W: AsyncWrite + Unpin> Tapped<W> {
    pub(crate) fn new(inner: W, tap: Option<SharedTap>) -> Self {
        Self {
            inner,
            tap,
            offset: 0,
            pending: Vec::new(),
            written: 0,
            truncated: false,
            closed: false,
        }
    }

    /// Writes out what the tap let through; after a truncation, closes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        if self.truncated && !self.closed {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            self.closed = true;
        }
        Poll::Ready(Ok(()))
    }

    fn truncated_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "plaintext stream truncated by fault injection",
        )
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tapped<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(tap) = this.tap.clone() else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        ready!(this.poll_drain(cx))?;
        if this.truncated {
            return Poll::Ready(Err(this.truncated_error()));
        }
        // The agent writes each frame with one call, so the tap sees whole frames.
        let mut frame = buf.to_vec();
        let keep = tap
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tap(this.offset, &mut frame)
            .min(frame.len());
        this.offset += buf.len() as u64;
        if keep < frame.len() {
            frame.truncate(keep);
            this.truncated = true;
        }
        this.pending = frame;
        this.written = 0;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.truncated {
            return Poll::Ready(Err(this.truncated_error()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(frame_type: u8, body_len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; FRAME_HEADER_LEN + body_len];
        let n = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&n.to_le_bytes());
        frame[FRAME_HEADER_LEN - 1] = frame_type;
        frame
    }

    #[test]
    fn regions_split_a_chunk_frame_into_header_fields_and_id_plus_data() {
        let len = FRAME_HEADER_LEN + 49 + 100;
        let header = region_ranges(5, len, Region::Header);
        let payload = region_ranges(5, len, Region::Payload);
        let covered: usize = header.iter().chain(&payload).map(|r| r.len()).sum();
        assert_eq!(covered, len);
        assert_eq!(payload.iter().map(|r| r.len()).sum::<usize>(), 32 + 100);
        assert_eq!(header[0], 0..FRAME_HEADER_LEN + 8);
    }

    #[test]
    fn flip_hits_only_the_chosen_frame_and_truncation_cuts_once() {
        let mut corrupter = StreamCorrupter::new(Injection::Flip {
            frame_type: 6,
            occurrence: 1,
            region: Region::Payload,
            position: 3,
            masks: vec![0xFF, 0x01],
        });
        let mut first = frame(6, 49);
        assert_eq!(corrupter.tap(0, &mut first), first.len());
        assert_eq!(first, frame(6, 49));
        let mut second = frame(6, 49);
        corrupter.tap(100, &mut second);
        let applied = corrupter.applied().unwrap().clone();
        assert_eq!(applied.frame_offset, FRAME_HEADER_LEN + 8 + 3);
        assert_eq!(applied.stream_offset, 100 + applied.frame_offset as u64);
        assert_eq!(applied.bytes_flipped, 2);
        assert_eq!(second[applied.frame_offset], 0xFF);
        assert_eq!(second[applied.frame_offset + 1], 0x01);

        let mut cutter = StreamCorrupter::new(Injection::Truncate {
            frame_number: 1,
            position: 7,
        });
        let mut a = frame(1, 30);
        assert_eq!(cutter.tap(0, &mut a), a.len());
        let mut b = frame(9, 24);
        assert_eq!(cutter.tap(a.len() as u64, &mut b), 7);
        assert_eq!(cutter.frames().len(), 2);
    }
}

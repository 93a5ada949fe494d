//! Checks shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay
//! test (`tests/it/fuzz_corpus.rs`), so that a crasher found by the fuzzer fails
//! `cargo test` on stable too. Not part of the API: panics are the point.

use bytes::BytesMut;

use crate::frame::seal;
use crate::{FRAME_LEN_MAX, decode, encode};

/// `data` with the checksum of every whole frame in it recomputed, walking the
/// frames by their length fields (up to the first length out of bounds or a
/// partial frame; the rest is copied as it is). Mutated inputs would almost all
/// stop at the checksum; resealed, they reach the parsers behind it.
pub fn reseal(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut at = 0;
    while out.len() >= at + 8 {
        let n = u32::from_le_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
        let end = at + 4 + n as usize;
        if !(5..=FRAME_LEN_MAX).contains(&n) || end > out.len() {
            break;
        }
        seal(&mut out[at..end]);
        at = end;
    }
    out
}

/// Decodes every frame at the front of `data` until one is incomplete or
/// invalid, then does the same with `data` resealed (see [`reseal`]). Each
/// decoded frame must encode back to exactly the bytes it was decoded from: the
/// codec accepts one encoding per message, so nothing a peer sends can mean
/// something other than what the server logs and acts on. Returns the number
/// of frames decoded from the resealed input.
pub fn check_decode_round_trip(data: &[u8]) -> usize {
    round_trip(data);
    round_trip(&reseal(data))
}

fn round_trip(data: &[u8]) -> usize {
    let mut buf = BytesMut::from(data);
    let mut decoded = 0;
    loop {
        let before = buf.len();
        let start = data.len() - before;
        match decode(&mut buf) {
            Ok(Some(message)) => {
                let consumed = before - buf.len();
                let mut again = BytesMut::new();
                encode(&message, &mut again);
                assert_eq!(
                    &again[..],
                    &data[start..start + consumed],
                    "{} frame does not re-encode to its input",
                    message.name()
                );
                decoded += 1;
            }
            Ok(None) | Err(_) => return decoded,
        }
    }
}

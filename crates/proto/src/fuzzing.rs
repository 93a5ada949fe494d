//! Checks shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay
//! test (`tests/fuzz_corpus.rs`), so that a crasher found by the fuzzer fails
//! `cargo test` on stable too. Not part of the API: panics are the point.

use bytes::BytesMut;

use crate::{decode, encode};

/// Decodes every frame at the front of `data` until one is incomplete or
/// invalid. Each decoded frame must encode back to exactly the bytes it was
/// decoded from: the codec accepts one encoding per message, so nothing a peer
/// sends can mean something other than what the server logs and acts on.
/// Returns the number of frames decoded.
pub fn check_decode_round_trip(data: &[u8]) -> usize {
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

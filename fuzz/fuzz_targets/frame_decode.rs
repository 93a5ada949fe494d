//! Frame decoder: no input panics it, and every decoded frame re-encodes to
//! exactly its input bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blockrep_proto::fuzzing::check_decode_round_trip(data);
});

//! NBD request, option and flag parsers and the request policy.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blockrep_nbd::fuzzing::check_wire_parsing(data);
});

//! Root and index page parsing: no input panics it, and what parses is canonical.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blockrep_core::fuzzing::check_index_parsing(data);
});

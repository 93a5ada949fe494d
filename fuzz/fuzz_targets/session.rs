//! The server's session state machine, fed an agent's byte stream after the
//! TLS handshake; the store must agree with what the session acknowledged.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // tmpfs when there is one: every commit fsyncs.
    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    blockrep_server::fuzzing::drive_session(&dir.path().join("data"), data);
});

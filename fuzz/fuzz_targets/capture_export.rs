//! The agent's write-capture export under an arbitrary NBD client, with cuts
//! taken between its writes: no panic, the disk keeps its size, and every
//! crash-consistent cut reads the disk as of its instant.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // tmpfs when there is one: the capture state is fsynced at open.
    let base = std::path::Path::new("/dev/shm");
    let dir = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    blockrep_agent::capture::fuzzing::drive_capture_export(dir.path(), data);
});

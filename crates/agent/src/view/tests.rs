//! The reflink clones' names, and the sweep of clones a dead agent left.

use super::*;

#[test]
fn clone_names_sit_beside_the_image_and_are_hidden() {
    let path = clone_path(Path::new("/srv/disks/vm.img"), 42, 7).expect("a file name");
    assert_eq!(path, Path::new("/srv/disks/.vm.img.blockrep-view-42-7"));
}

#[test]
fn a_stale_clone_of_a_dead_agent_is_swept_but_a_live_one_is_kept() {
    let directory = tempfile_dir();
    let image = directory.join("disk.img");
    std::fs::write(&image, b"x").expect("image");
    // No process has pid 4194304 + 1 (above the kernel's pid_max limit).
    let dead = clone_path(&image, 4_194_305, 0).expect("name");
    // pid 1 runs (unless this is it, in a container).
    let alive = clone_path(&image, 1, 0).expect("name");
    // This process has made no clone before it sweeps: one with its pid
    // is from an earlier process that had the same pid.
    let own = clone_path(&image, std::process::id(), 0).expect("name");
    std::fs::write(&dead, b"x").expect("dead clone");
    std::fs::write(&alive, b"x").expect("live clone");
    std::fs::write(&own, b"x").expect("earlier clone with this pid");
    sweep_stale_clones(&image);
    assert!(!dead.exists());
    assert_eq!(alive.exists(), std::process::id() != 1);
    assert!(!own.exists());
    assert!(image.exists());
    std::fs::remove_dir_all(&directory).expect("cleanup");
}

#[test]
fn a_taken_clone_name_is_skipped_not_fatal() {
    let directory = tempfile_dir();
    let image = directory.join("disk.img");
    std::fs::write(&image, vec![7u8; 8192]).expect("image");
    let taken = clone_path(&image, std::process::id(), 0).expect("name");
    std::fs::write(&taken, b"not ours").expect("taken name");
    let (_file, path) = match create_clone_file(&image, 0) {
        Ok(made) => made,
        Err(CloneError::Failed(why) | CloneError::Unsupported(why)) => panic!("{why}"),
    };
    assert_ne!(path, taken);
    assert_eq!(std::fs::read(&taken).expect("kept"), b"not ours");
    std::fs::remove_dir_all(&directory).expect("cleanup");
}

#[test]
fn an_image_name_that_is_not_utf8_still_gets_a_clone_name() {
    use std::os::unix::ffi::OsStrExt;
    let image = Path::new("/srv").join(std::ffi::OsStr::from_bytes(b"vm\xff.img"));
    let path = clone_path(&image, 42, 0).expect("a clone name");
    assert_eq!(
        path.file_name().expect("name").as_bytes(),
        b".vm\xff.img.blockrep-view-42-0"
    );
}

fn tempfile_dir() -> PathBuf {
    // Tests run in parallel: a counter keeps their directories apart.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let directory =
        std::env::temp_dir().join(format!("blockrep-view-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    directory
}

//! Tests of `sim.rs`.

use super::*;

fn path(p: &str) -> PathBuf {
    PathBuf::from(p)
}

fn read_all(fs: &SimFs, p: &str) -> Option<Vec<u8>> {
    let file = fs.open(&path(p), OpenMode::Read).ok()?;
    let mut out = vec![0u8; file.len().unwrap() as usize];
    file.read_exact_at(&mut out, 0).unwrap();
    Some(out)
}

#[test]
fn synced_data_and_entries_survive_every_crash() {
    let fs = SimFs::new();
    fs.create_dir(&path("/d")).unwrap();
    fs.sync_dir(&path("/")).unwrap();
    let file = fs.open(&path("/d/f"), OpenMode::CreateNew).unwrap();
    file.write_all_at(b"durable", 0).unwrap();
    file.sync_all().unwrap();
    fs.sync_dir(&path("/d")).unwrap();
    file.write_all_at(b" and pending", 7).unwrap();
    for seed in 0..200 {
        let (image, _) = fs.crash_image(seed);
        let bytes = read_all(&image, "/d/f").expect("a synced name survives");
        assert_eq!(&bytes[..7], b"durable", "seed {seed}");
    }
}

#[test]
fn unsynced_state_is_sometimes_lost_and_sometimes_garbled() {
    let fs = SimFs::new();
    let file = fs.open(&path("/f"), OpenMode::CreateNew).unwrap();
    fs.sync_dir(&path("/")).unwrap();
    file.write_all_at(&[7u8; 64], 0).unwrap();
    let other = fs.open(&path("/g"), OpenMode::CreateNew).unwrap();
    other.sync_all().unwrap();
    let (mut intact, mut lost, mut damaged, mut name_lost) = (0, 0, 0, 0);
    for seed in 0..400 {
        let (image, _) = fs.crash_image(seed);
        match read_all(&image, "/f").unwrap() {
            bytes if bytes == [7u8; 64] => intact += 1,
            bytes if bytes.is_empty() => lost += 1,
            _ => damaged += 1,
        }
        if read_all(&image, "/g").is_none() {
            name_lost += 1;
        }
    }
    assert!(
        intact > 0 && lost > 0 && damaged > 0,
        "{intact} {lost} {damaged}"
    );
    assert!(
        name_lost > 0 && name_lost < 400,
        "fsync of a file kept its name"
    );
}

#[test]
fn a_rename_lands_whole_or_not_at_all() {
    let fs = SimFs::new();
    let old = fs.open(&path("/head"), OpenMode::CreateNew).unwrap();
    old.write_all_at(b"old", 0).unwrap();
    old.sync_all().unwrap();
    fs.sync_dir(&path("/")).unwrap();
    let new = fs.open(&path("/.head.tmp"), OpenMode::CreateNew).unwrap();
    new.write_all_at(b"new", 0).unwrap();
    new.sync_all().unwrap();
    fs.rename(&path("/.head.tmp"), &path("/head")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let (image, _) = fs.crash_image(seed);
        seen.insert(read_all(&image, "/head").expect("head never vanishes"));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn power_off_stops_every_later_operation() {
    let fs = SimFs::new();
    fs.power_off_after(1);
    let file = fs.open(&path("/f"), OpenMode::CreateNew).unwrap();
    assert!(file.write_all_at(b"x", 0).is_err());
    assert!(file.len().is_err());
    assert!(fs.is_powered_off());
    assert_eq!(fs.operations(), 1);
    let (image, _) = fs.crash_image(1);
    assert!(!image.is_powered_off());
}

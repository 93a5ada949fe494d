use super::*;

/// Makes overlays opened on this thread see another boot (as after a power
/// loss) until dropped.
pub(crate) struct Reboot;

impl Reboot {
    pub(crate) fn new() -> Self {
        TEST_BOOT.with(|boot| boot.set(Some([0xee; 16])));
        Reboot
    }
}

impl Drop for Reboot {
    fn drop(&mut self) {
        TEST_BOOT.with(|boot| boot.set(None));
    }
}

const SIZE: u64 = 10 * OVERLAY_BLOCK_BYTES + 100;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; OVERLAY_BLOCK_BYTES as usize]
}

fn read_block(overlay: &Overlay, block: u64) -> Vec<u8> {
    let mut out = vec![0u8; OVERLAY_BLOCK_BYTES as usize];
    overlay
        .reader()
        .read_at(&mut out, block * OVERLAY_BLOCK_BYTES)
        .unwrap();
    out
}

#[test]
fn a_kill_loses_nothing_and_a_power_loss_only_what_no_sync_covered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let mut overlay = Overlay::create(&path, SIZE).unwrap();
    overlay.write_blocks(1, &block(1)).unwrap();
    overlay.zero_blocks(3, 2).unwrap();
    overlay.sync().unwrap();
    overlay.write_blocks(6, &block(6)).unwrap();
    // The short last block.
    overlay.write_blocks(10, &[9; 100]).unwrap();
    drop(overlay);
    // The same boot: the page cache kept every write, and the map's
    // records past the last sync are replayed.
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for file in ["data", "map"] {
        std::fs::copy(path.join(file), copy.join(file)).unwrap();
    }
    let same_boot = Overlay::open(&copy, SIZE).unwrap().unwrap();
    assert_eq!(same_boot.state(6), BlockState::Data);
    assert_eq!(read_block(&same_boot, 6), block(6));
    assert_eq!(same_boot.mapped_blocks(), 5);
    drop(same_boot);
    let _reboot = Reboot::new();
    let overlay = Overlay::open(&path, SIZE).unwrap().unwrap();
    assert_eq!(overlay.state(1), BlockState::Data);
    assert_eq!(read_block(&overlay, 1), block(1));
    assert_eq!(overlay.state(3), BlockState::Zero);
    assert_eq!(overlay.state(4), BlockState::Zero);
    assert_eq!(overlay.state(5), BlockState::Base);
    assert_eq!(
        overlay.state(6),
        BlockState::Base,
        "after a power loss, a write no sync covered reads as the base"
    );
    assert_eq!(overlay.state(10), BlockState::Base);
    assert_eq!(overlay.mapped_blocks(), 3);
}

#[test]
fn a_torn_or_damaged_last_record_is_cut_off_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let mut overlay = Overlay::create(&path, SIZE).unwrap();
    overlay.write_blocks(0, &block(1)).unwrap();
    overlay.sync().unwrap();
    let good_len = overlay.map_len;
    overlay.write_blocks(2, &block(2)).unwrap();
    overlay.sync().unwrap();
    drop(overlay);
    let map = path.join("map");
    // Flip a byte of the second record: its crc fails.
    let mut bytes = std::fs::read(&map).unwrap();
    let last = bytes.len() - 6;
    bytes[last] ^= 0xff;
    std::fs::write(&map, &bytes).unwrap();
    let reboot = Reboot::new();
    let overlay = Overlay::open(&path, SIZE).unwrap().unwrap();
    drop(reboot);
    assert_eq!(overlay.state(0), BlockState::Data);
    assert_eq!(overlay.state(2), BlockState::Base);
    // Cut after the first marker, then a marker of this boot.
    assert_eq!(
        std::fs::metadata(&map).unwrap().len(),
        good_len + MARKER_LEN
    );
    // A record appended after the cut is read back.
    let mut overlay = overlay;
    overlay.write_blocks(4, &block(4)).unwrap();
    overlay.sync().unwrap();
    drop(overlay);
    let overlay = Overlay::open(&path, SIZE).unwrap().unwrap();
    assert_eq!(overlay.state(4), BlockState::Data);
    assert_eq!(read_block(&overlay, 4), block(4));
}

#[test]
fn a_map_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    Overlay::create(&path, SIZE).unwrap();
    let error = Overlay::open(&path, SIZE * 2).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(
        Overlay::open(&dir.path().join("none"), SIZE)
            .unwrap()
            .is_none()
    );
}

#[test]
fn a_damaged_header_is_an_error_even_where_the_size_is_not_known() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let mut overlay = Overlay::create(&path, SIZE).unwrap();
    overlay.write_blocks(0, &block(7)).unwrap();
    overlay.sync().unwrap();
    drop(overlay);
    assert_eq!(mapped_blocks_in(&path).unwrap(), 1);
    // A flipped high byte of the block count: it must not size the maps
    // (2^56 blocks would be an allocation no machine has).
    let map = path.join("map");
    let mut bytes = std::fs::read(&map).unwrap();
    bytes[15] ^= 0x01;
    std::fs::write(&map, bytes).unwrap();
    let error = mapped_blocks_in(&path).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
    assert!(error.to_string().contains("damaged header"), "{error}");
}

#[test]
fn unmapped_blocks_are_punched_only_once_the_unmap_is_durable_and_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let mut overlay = Overlay::create(&path, SIZE).unwrap();
    overlay.write_blocks(0, &[7; 4 * 4096]).unwrap();
    overlay.sync().unwrap();
    overlay.unmap(0, 4).unwrap();
    // Written again before the unmap reached the map: not punched.
    overlay.write_blocks(1, &block(8)).unwrap();
    overlay.sync().unwrap();
    assert_eq!(overlay.state(0), BlockState::Base);
    assert_eq!(
        read_block(&overlay, 0),
        block(0),
        "punched: reads as a hole"
    );
    assert_eq!(read_block(&overlay, 1), block(8));
    drop(overlay);
    let overlay = Overlay::open(&path, SIZE).unwrap().unwrap();
    assert_eq!(overlay.state(0), BlockState::Base);
    assert_eq!(overlay.state(1), BlockState::Data);
    assert_eq!(read_block(&overlay, 1), block(8));
}

#[test]
fn a_long_map_is_compacted_to_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let size = 16384 * OVERLAY_BLOCK_BYTES;
    let mut overlay = Overlay::create(&path, size).unwrap();
    // Every other block: one operation each, about 140 KB per record.
    for b in (0..16384).step_by(2) {
        overlay.write_blocks(b, &block(1)).unwrap();
    }
    overlay.sync().unwrap();
    let one_record = overlay.map_len;
    // Half the blocks stay mapped, then go; the map grows by a record a
    // sync until it is rewritten as its runs.
    let mut syncs = 0;
    loop {
        let before = overlay.map_len;
        overlay.unmap(2, 16382).unwrap();
        for b in (2..16384).step_by(2) {
            overlay.write_blocks(b, &block(1)).unwrap();
        }
        overlay.sync().unwrap();
        syncs += 1;
        if overlay.map_len < before {
            break;
        }
        assert!(syncs < 100, "never compacted: {}", overlay.map_len);
    }
    assert!(before_compaction_grew(syncs, one_record));
    overlay.unmap(2, 16382).unwrap();
    overlay.write_blocks(1, &block(1)).unwrap();
    overlay.zero_blocks(5, 1).unwrap();
    overlay.sync().unwrap();
    drop(overlay);
    let overlay = Overlay::open(&path, size).unwrap().unwrap();
    let states: Vec<_> = (0..8).map(|b| overlay.state(b)).collect();
    assert_eq!(
        states,
        [
            BlockState::Data,
            BlockState::Data,
            BlockState::Base,
            BlockState::Base,
            BlockState::Base,
            BlockState::Zero,
            BlockState::Base,
            BlockState::Base,
        ]
    );
    assert_eq!(overlay.mapped_blocks(), 3);
    assert_eq!(read_block(&overlay, 1), block(1));
}

/// The map passed its compaction size before it was rewritten.
fn before_compaction_grew(syncs: u64, record_bytes: u64) -> bool {
    syncs * record_bytes > MAP_COMPACT_BYTES / 2
}

#[test]
fn a_map_longer_than_a_read_window_replays_whole() {
    // One record per write, 29 bytes each: 40,000 of them are past the
    // reader's first 1 MiB window.
    const WRITES: u64 = 40_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let size = 2 * WRITES * OVERLAY_BLOCK_BYTES;
    let mut overlay = Overlay::create(&path, size).unwrap();
    for n in 0..WRITES {
        overlay.wrote_blocks(2 * n, 1).unwrap();
        if n == WRITES / 2 {
            overlay.sync().unwrap();
        }
    }
    drop(overlay);
    // The last record torn.
    let map = path.join("map");
    let len = std::fs::metadata(&map).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&map)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for file in ["data", "map"] {
        std::fs::copy(path.join(file), copy.join(file)).unwrap();
    }
    let same_boot = Overlay::open(&copy, size).unwrap().unwrap();
    assert_eq!(same_boot.mapped_blocks(), WRITES - 1);
    assert_eq!(same_boot.state(2 * (WRITES - 2)), BlockState::Data);
    assert_eq!(same_boot.state(2 * (WRITES - 1)), BlockState::Base);
    assert_eq!(same_boot.state(1), BlockState::Base);
    drop(same_boot);
    let _reboot = Reboot::new();
    let overlay = Overlay::open(&path, size).unwrap().unwrap();
    assert_eq!(overlay.mapped_blocks(), WRITES / 2 + 1);
    assert_eq!(overlay.state(WRITES), BlockState::Data);
    assert_eq!(overlay.state(WRITES + 2), BlockState::Base);
}

#[test]
fn data_synced_outside_the_lock_is_clean_only_if_not_written_since() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let mut overlay = Overlay::create(&path, SIZE).unwrap();
    assert!(
        overlay.take_dirty_data().unwrap().is_none(),
        "nothing written"
    );
    overlay.write_blocks(1, &block(1)).unwrap();
    let (file, writes) = overlay.take_dirty_data().unwrap().unwrap();
    assert!(overlay.data_dirty(), "dirty until synced");
    // Written while the data synced: still dirty, for the sync under the
    // lock to sync again.
    overlay.write_blocks(2, &block(2)).unwrap();
    overlay.data_synced(&file, writes);
    assert!(overlay.data_dirty());
    let (file, writes) = overlay.take_dirty_data().unwrap().unwrap();
    overlay.data_synced(&file, writes);
    assert!(!overlay.data_dirty());
    // A file that is no longer the overlay's data proves nothing.
    overlay.write_blocks(3, &block(3)).unwrap();
    let (mut io, writes) = overlay.take_dirty_data().unwrap().unwrap();
    io.data = Arc::new(File::open(path.join("map")).unwrap());
    overlay.data_synced(&io, writes);
    assert!(overlay.data_dirty());
}

#[test]
fn a_failed_data_sync_fails_every_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let overlay = Overlay::create(&path, SIZE).unwrap();
    let io = overlay.reader();
    // As a failed write-back sets it (the kernel tells one fdatasync only):
    // every sync after it fails, through whichever handle.
    io.data_sync
        .failed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(io.sync_data().is_err());
    let mut overlay = overlay;
    overlay.write_blocks(1, &block(1)).unwrap();
    assert!(
        overlay.sync().is_err(),
        "no marker over data that may be lost"
    );
}

#[test]
fn after_a_failed_sync_a_restart_in_the_same_boot_keeps_only_what_a_marker_covers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o");
    let mut overlay = Overlay::create(&path, SIZE).unwrap();
    overlay.write_blocks(1, &block(1)).unwrap();
    overlay.sync().unwrap();
    overlay.write_blocks(2, &block(2)).unwrap();
    // The data's fdatasync fails (as the kernel reports a failed
    // write-back): its pages may be gone from the page cache.
    overlay.reader().data_sync.record_failure(&path);
    assert!(overlay.sync().is_err());
    drop(overlay);
    // Reopened in the same boot, the page cache is not trusted past the
    // last marker: block 2 was never promised and may be lost.
    let overlay = Overlay::open(&path, SIZE).unwrap().unwrap();
    assert_eq!(overlay.state(1), BlockState::Data);
    assert_eq!(overlay.state(2), BlockState::Base);
    assert_eq!(read_block(&overlay, 1), block(1));
    assert!(
        !path.join("sync-failed").exists(),
        "the note outlived the replay"
    );
    // And a later restart trusts the page cache again.
    let mut overlay = overlay;
    overlay.write_blocks(3, &block(3)).unwrap();
    drop(overlay);
    let overlay = Overlay::open(&path, SIZE).unwrap().unwrap();
    assert_eq!(overlay.state(3), BlockState::Data);
}

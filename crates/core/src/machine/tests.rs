use super::*;
use proptest::prelude::*;

fn name(s: &str) -> VolumeName {
    VolumeName::new(s).unwrap()
}

fn root_id(seed: u8) -> RootId {
    ChunkId::from(blake3::hash(&[seed]))
}

#[test]
fn round_trips_sorted_by_name() {
    let machine = MachineRoot::new(vec![
        (name("sdb"), root_id(2)),
        (name("sda"), root_id(1)),
        (name("log"), root_id(3)),
    ])
    .unwrap();
    let names: Vec<_> = machine.volumes().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["log", "sda", "sdb"]);
    let bytes = machine.encode();
    assert!(MachineRoot::is_encoding(&bytes));
    assert_eq!(MachineRoot::decode(&bytes).unwrap(), machine);
    assert_eq!(machine.volume("sda"), Some(root_id(1)));
    assert_eq!(machine.volume("sdc"), None);
    // The order given does not change the id: equal machines, equal ids.
    let again = MachineRoot::new(vec![
        (name("log"), root_id(3)),
        (name("sdb"), root_id(2)),
        (name("sda"), root_id(1)),
    ])
    .unwrap();
    assert_eq!(again.id(), machine.id());
    assert_eq!(machine.id(), ChunkId::from(blake3::hash(&bytes)));
}

#[test]
fn a_disk_root_is_not_a_machine_root() {
    let (root, _) = crate::Root::build(crate::Geometry::new(4096, 4096).unwrap(), &[ChunkId::ZERO]);
    assert!(!MachineRoot::is_encoding(&root.encode()));
    assert!(MachineRoot::decode(&root.encode()).is_err());
}

#[test]
fn refuses_no_volumes_too_many_and_repeats() {
    assert!(MachineRoot::new(vec![]).is_err());
    let many = (0..=VOLUMES_MAX)
        .map(|i| (name(&format!("v{i}")), root_id(i as u8)))
        .collect();
    let err = MachineRoot::new(many).unwrap_err().to_string();
    assert!(err.contains("65 volumes"), "{err}");
    let err = MachineRoot::new(vec![(name("a"), root_id(1)), (name("a"), root_id(2))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("volume a named twice"), "{err}");
    // The names alone are checked the same way.
    assert!(MachineRoot::check_names(&[]).is_err());
    let names: Vec<VolumeName> = (0..=VOLUMES_MAX).map(|i| name(&format!("v{i}"))).collect();
    let err = MachineRoot::check_names(&names).unwrap_err().to_string();
    assert!(err.contains("65 volumes"), "{err}");
    let err = MachineRoot::check_names(&[name("b"), name("a"), name("b")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("volume b named twice"), "{err}");
    assert!(MachineRoot::check_names(&names[..VOLUMES_MAX]).is_ok());
}

#[test]
fn decode_refuses_malformed_encodings() {
    let machine = MachineRoot::new(vec![(name("a"), root_id(1)), (name("b"), root_id(2))]).unwrap();
    let good = machine.encode();
    // Every strict prefix is refused, as is any byte appended.
    for len in 0..good.len() {
        assert!(MachineRoot::decode(&good[..len]).is_err(), "prefix {len}");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(MachineRoot::decode(&longer).is_err());
    // Names out of order (b before a), a name that breaks the rule, a count of 0.
    let swapped = {
        let mut out = good[..12].to_vec();
        out.extend_from_slice(&good[12 + 34..]);
        out.extend_from_slice(&good[12..12 + 34]);
        out
    };
    let err = MachineRoot::decode(&swapped).unwrap_err().to_string();
    assert!(err.contains("not sorted"), "{err}");
    let mut bad_name = good.clone();
    bad_name[13] = b'A';
    assert!(MachineRoot::decode(&bad_name).is_err());
    let mut zero = good.clone();
    zero[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(MachineRoot::decode(&zero).is_err());
    let mut huge = good;
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(MachineRoot::decode(&huge).is_err());
}

#[test]
fn volume_names_from_paths() {
    let cases = [
        ("/dev/sda", "sda"),
        ("/dev/disk/by-id/nvme-Samsung_SSD_1", "nvme-samsung_ssd_1"),
        ("/images/Boot Disk.raw", "boot-disk.raw"),
        ("img..raw", "img.raw"),
        ("/x/.hidden", "hidden"),
    ];
    for (path, want) in cases {
        assert_eq!(
            VolumeName::from_path(Path::new(path)).unwrap().as_str(),
            want,
            "{path}"
        );
    }
    assert!(VolumeName::from_path(Path::new("/")).is_err());
    assert!(VolumeName::from_path(Path::new("/x/...")).is_err());
    let long = "a".repeat(100);
    assert_eq!(
        VolumeName::from_path(Path::new(&long))
            .unwrap()
            .as_str()
            .len(),
        VOLUME_NAME_MAX_LEN
    );
}

proptest! {
    /// Whatever the bytes, decoding never panics, and whatever decodes
    /// encodes back to the same bytes (one encoding per machine).
    #[test]
    fn decode_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut input = MACHINE_MAGIC.to_vec();
        input.extend_from_slice(&bytes);
        if let Ok(machine) = MachineRoot::decode(&input) {
            prop_assert_eq!(machine.encode(), input);
        }
    }

    #[test]
    fn any_valid_machine_round_trips(
        names in proptest::collection::btree_set("[a-z][a-z0-9_-]{0,20}", 1..10),
    ) {
        let volumes: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (name(n), root_id(i as u8)))
            .collect();
        let machine = MachineRoot::new(volumes).unwrap();
        prop_assert_eq!(MachineRoot::decode(&machine.encode()).unwrap(), machine);
    }
}

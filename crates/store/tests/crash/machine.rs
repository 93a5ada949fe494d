//! Machines in the crash test: a source of three volumes (of different sizes,
//! one sparse) committed as one machine root. After a crash its head names
//! the old machine with every volume as it was, or the new one with every
//! volume as committed, never a mix.

use blockrep_core::{MachineRoot, VolumeName};
use blockrep_store::VolumeCommit;

use super::*;

/// The machine source.
pub(crate) fn app() -> SourceId {
    SourceId::new("app-1").expect("valid id")
}

/// A machine's volumes: name, geometry and bytes.
pub(crate) type Volumes = Vec<(VolumeName, Geometry, Vec<u8>)>;

/// A committed machine: its head and every volume's bytes.
#[derive(Debug, Clone)]
pub(crate) struct MachineReplica {
    pub(crate) epoch: u64,
    pub(crate) root: ChunkId,
    pub(crate) volumes: Volumes,
}

/// The first volumes of the machine: `boot` of the usual geometry (a short
/// last chunk), `data` a whole number of chunks, `log` sparse.
pub(crate) fn first_volumes(rng: &mut SplitMix64) -> Volumes {
    let shapes = [
        ("boot", DISK_BYTES, 60),
        ("data", 12 * u64::from(CHUNK_BYTES), 80),
        ("log", 16 * u64::from(CHUNK_BYTES), 5),
    ];
    shapes
        .into_iter()
        .map(|(name, bytes, share)| {
            let geometry = Geometry::new(bytes, CHUNK_BYTES).expect("valid geometry");
            let mut disk = vec![0u8; bytes as usize];
            churn(rng, &mut disk, geometry, share);
            (VolumeName::new(name).expect("valid name"), geometry, disk)
        })
        .collect()
}

/// The next epoch's volumes: every volume changed a little, so that a mix of
/// old and new volumes would be told apart from either.
pub(crate) fn next_volumes(rng: &mut SplitMix64, volumes: &Volumes) -> Volumes {
    let mut next = volumes.clone();
    for (_, geometry, disk) in &mut next {
        let before = disk.clone();
        while *disk == before {
            churn(rng, disk, *geometry, 25);
        }
    }
    next
}

/// The machine root the volumes make.
pub(crate) fn machine_root_of(volumes: &Volumes) -> ChunkId {
    let roots = volumes
        .iter()
        .map(|(name, geometry, disk)| {
            let root = Root::from_chunk_ids(*geometry, &scan_buffer(disk, *geometry));
            (name.clone(), root.id())
        })
        .collect();
    MachineRoot::new(roots).expect("a valid machine").id()
}

/// Stores what an agent would send for every volume (the chunks the store
/// lacks), then commits them as one machine.
pub(crate) fn commit_machine_as_agent(
    store: &Store,
    source: &SourceId,
    epoch: u64,
    volumes: &Volumes,
) -> Result<ChunkId, Error> {
    let mut built = Vec::new();
    for (name, geometry, disk) in volumes {
        let ids = scan_buffer(disk, *geometry);
        for (index, id) in ids.iter().enumerate() {
            if id.is_zero() || store.contains(id) {
                continue;
            }
            let range = geometry
                .chunk_range(index as u64)
                .expect("index within the disk");
            let len = range.len() as u32;
            store.insert(BlobKind::Chunk, *id, StoredCodec::Raw, len, &disk[range])?;
        }
        let (root, pages) = Root::build(*geometry, &ids);
        built.push((name, root, pages));
    }
    let commits: Vec<VolumeCommit<'_>> = built
        .iter()
        .map(|(name, root, pages)| VolumeCommit { name, root, pages })
        .collect();
    let stats = store.commit_machine(
        source,
        epoch,
        &commits,
        1,
        true,
        label_of(epoch),
        blockrep_core::clock::now_unix_ms(),
    )?;
    Ok(stats.head.root)
}

/// Every volume of the machine `root` names equals `volumes`, read back
/// through the store.
pub(crate) fn check_volumes(
    store: &Store,
    root: &ChunkId,
    volumes: &Volumes,
) -> Result<(), String> {
    let machine = store.read_machine(root).map_err(|e| e.to_string())?;
    if machine.volumes().len() != volumes.len() {
        return Err(format!(
            "{} volumes, {} committed",
            machine.volumes().len(),
            volumes.len()
        ));
    }
    for (name, _, disk) in volumes {
        let volume_root = machine
            .volume(name.as_str())
            .ok_or_else(|| format!("volume {name} is missing"))?;
        let read = read_disk(store, &volume_root).map_err(|e| format!("volume {name}: {e}"))?;
        if read != *disk {
            return Err(format!("volume {name} reads other bytes than committed"));
        }
    }
    Ok(())
}

/// The machine source's head is the acknowledged machine or the one being
/// committed, and every volume reads as that machine's.
pub(crate) fn check_machines(
    store: &Store,
    model: &Model,
    in_flight: Option<&Step>,
) -> Result<(), String> {
    let source = app();
    let head = store
        .head(&source)
        .map_err(|e| format!("head of {source}: {e}"))?;
    let old = model.machines.get(&source);
    let new = match in_flight {
        Some(Step::CommitMachine {
            source: s,
            epoch,
            volumes,
        }) if *s == source => Some((*epoch, machine_root_of(volumes), volumes)),
        _ => None,
    };
    let volumes = match (head, old, new) {
        (None, None, _) => return Ok(()),
        (None, Some(_), _) => return Err(format!("{source} lost its committed machine")),
        (Some(head), Some(old), _) if head.root == old.root && head.epoch == old.epoch => {
            &old.volumes
        }
        (Some(head), _, Some((epoch, root, volumes)))
            if head.root == root && head.epoch == epoch =>
        {
            volumes
        }
        (Some(head), old, _) => {
            return Err(format!(
                "{source} head is epoch {} root {}, neither the old ({:?}) nor the new machine",
                head.epoch,
                head.root,
                old.map(|o| (o.epoch, o.root))
            ));
        }
    };
    let head = store
        .head(&source)
        .map_err(|e| format!("head of {source}: {e}"))?
        .ok_or_else(|| format!("{source}: head vanished"))?;
    if head.consistency != label_of(head.epoch) {
        return Err(format!(
            "{source} head epoch {} is labelled {}",
            head.epoch, head.consistency
        ));
    }
    check_volumes(store, &head.root, volumes).map_err(|e| format!("{source}: {e}"))
}

/// After the reboot: an interrupted machine commit is resent, then the next
/// epoch of the machine commits and reads back.
pub(crate) fn commit_after_crash(
    store: &Store,
    in_flight: Option<&Step>,
    rng: &mut SplitMix64,
) -> Result<(), String> {
    let source = app();
    if let Some(Step::CommitMachine { volumes, .. }) = in_flight {
        let head = store
            .head(&source)
            .map_err(|e| format!("head of {source}: {e}"))?;
        if head.is_none_or(|head| head.root != machine_root_of(volumes)) {
            let epoch = head.map_or(1, |head| head.epoch + 1);
            let root = commit_machine_as_agent(store, &source, epoch, volumes)
                .map_err(|e| format!("resending the interrupted machine commit fails: {e}"))?;
            check_volumes(store, &root, volumes).map_err(|e| format!("{source} resent: {e}"))?;
        }
    }
    let Some(head) = store
        .head(&source)
        .map_err(|e| format!("head of {source}: {e}"))?
    else {
        return Ok(());
    };
    let machine = store
        .read_machine(&head.root)
        .map_err(|e| format!("{source}: {e}"))?;
    let mut volumes: Volumes = Vec::new();
    for (name, root) in machine.volumes() {
        let disk = read_disk(store, root).map_err(|e| format!("{source} {name}: {e}"))?;
        let geometry = store
            .read_root(root)
            .map_err(|e| format!("{source} {name}: {e}"))?
            .geometry();
        volumes.push((name.clone(), geometry, disk));
    }
    let next = next_volumes(rng, &volumes);
    let root = commit_machine_as_agent(store, &source, head.epoch + 1, &next)
        .map_err(|e| format!("the next machine commit after the crash fails: {e}"))?;
    check_volumes(store, &root, &next).map_err(|e| format!("{source} after the crash: {e}"))
}

/// The states a launch of a machine passes through: its base volumes, then,
/// for each volume `writes` touches (in the order it first does), the
/// volumes after that volume's writes are flushed, with that volume's name.
pub(crate) fn machine_launch_states(
    base: &Volumes,
    writes: &[(VolumeName, u64, Vec<u8>)],
) -> Vec<(Option<VolumeName>, Volumes)> {
    let mut states = vec![(None, base.clone())];
    let mut order: Vec<&VolumeName> = Vec::new();
    for (volume, ..) in writes {
        if !order.contains(&volume) {
            order.push(volume);
        }
    }
    let mut current = base.clone();
    for volume in order {
        let (_, _, disk) = current
            .iter_mut()
            .find(|(name, ..)| name == volume)
            .expect("writes name volumes of the machine");
        for (_, offset, data) in writes.iter().filter(|(v, ..)| v == volume) {
            disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        states.push((Some(volume.clone()), current.clone()));
    }
    states
}

/// Each machine launch is at its acknowledged state, or, for the launch
/// being made, at one of the states it passes through, every volume as that
/// state has it; none is torn, none unacknowledged.
pub(crate) fn check_machine_launches(
    store: &Store,
    model: &Model,
    in_flight: Option<&Step>,
) -> Result<(), String> {
    let making = match in_flight {
        Some(Step::LaunchMachine {
            snapshot,
            name,
            writes,
        }) => Some((snapshot, name, writes)),
        _ => None,
    };
    for info in store
        .list_launches(Some(&app()))
        .map_err(|e| format!("list launches: {e}"))?
    {
        let volumes = match (model.machine_launches.get(&info.name), making) {
            (_, Some((_, name, writes))) if *name == info.name => {
                let base = model
                    .machine_volumes
                    .get(&info.base_root)
                    .ok_or_else(|| format!("launch {} has an unknown base", info.name))?;
                machine_launch_states(base, writes)
                    .into_iter()
                    .map(|(_, volumes)| volumes)
                    .find(|volumes| machine_root_of(volumes) == info.root)
                    .ok_or_else(|| {
                        format!(
                            "launch {} names a machine it never passed through",
                            info.name
                        )
                    })?
            }
            (Some(root), _) if *root == info.root => model.machine_volumes[root].clone(),
            _ => return Err(format!("launch {} is not what was acknowledged", info.name)),
        };
        check_volumes(store, &info.root, &volumes)
            .map_err(|e| format!("launch {}: {e}", info.name))?;
    }
    for name in model.machine_launches.keys() {
        if store.launch(name).ok().flatten().is_none() {
            return Err(format!("acknowledged launch {name} is gone"));
        }
    }
    Ok(())
}

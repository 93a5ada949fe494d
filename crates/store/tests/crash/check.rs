//! Checks of a rebooted store against the model of what was acknowledged.

use super::*;

/// The disk `root` describes, read back through the store: every non-zero
/// chunk read (checked against its id) and of the length its position needs.
pub(crate) fn read_disk(store: &Store, root: &ChunkId) -> Result<Vec<u8>, String> {
    let root = store.read_root(root).map_err(|e| e.to_string())?;
    let geometry = root.geometry();
    let mut disk = vec![0u8; geometry.disk_size_bytes() as usize];
    let ids = store.chunk_ids(&root).map_err(|e| e.to_string())?;
    for (index, id) in ids.iter().enumerate() {
        if id.is_zero() {
            continue;
        }
        let data = store.read_blob(id).map_err(|e| e.to_string())?;
        let range = geometry
            .chunk_range(index as u64)
            .ok_or_else(|| format!("chunk {index} is past the disk"))?;
        if range.len() != data.len() {
            return Err(format!(
                "chunk {index} has {} bytes, the geometry says {}",
                data.len(),
                range.len()
            ));
        }
        disk[range].copy_from_slice(&data);
    }
    Ok(disk)
}

pub(crate) fn check_rebooted(
    image: SimFs,
    model: &Model,
    in_flight: Option<&Step>,
    seed: u64,
) -> Result<(), String> {
    let store = Store::open_with_vfs(&data_dir(), Arc::new(image.clone()))
        .map_err(|e| format!("the store does not open after the crash: {e}"))?;
    let store = Arc::new(store);
    store.set_pack_size_max_bytes(PACK_BYTES_MAX);
    let report = store
        .verify(None, None)
        .map_err(|e| format!("verify fails: {e}"))?;
    if !report.is_clean() {
        return Err(format!("verify finds damage: {}", damage_summary(&report)));
    }
    check_heads(&store, model, in_flight)?;
    check_machines(&store, model, in_flight)?;
    check_snapshots(&store, model, in_flight)?;
    check_launches(&store, model, in_flight)?;
    check_machine_launches(&store, model, in_flight)?;
    check_lifecycles(&store, model, in_flight)?;
    // An agent whose commit was cut short resends it after reconnecting: the
    // chunks the store says it lacks, then the commit.
    if let Some(Step::Commit { source, disk, .. }) = in_flight {
        let head = store
            .head(source)
            .map_err(|e| format!("head of {source}: {e}"))?;
        let root = root_of(disk).0.id();
        if head.is_none_or(|head| head.root != root) {
            let epoch = head.map_or(1, |head| head.epoch + 1);
            let root = commit_as_agent(&store, source, epoch, disk)
                .map_err(|e| format!("resending the interrupted commit of {source} fails: {e}"))?;
            let read = read_disk(&store, &root).map_err(|e| format!("{source}: {e}"))?;
            if read != *disk {
                return Err(format!(
                    "{source}: the resent commit reads back other bytes"
                ));
            }
        }
    }
    // Usable, not just readable: the next epoch of every source commits as an
    // agent would send it, and a collection runs.
    let mut rng = SplitMix64::new(seed ^ 0x00ad_d1ce);
    commit_after_crash(&store, in_flight, &mut rng)?;
    for source in store.sources().map_err(|e| format!("sources: {e}"))? {
        if source == app() {
            continue; // checked and committed as a machine, above
        }
        let head = store
            .head(&source)
            .map_err(|e| format!("head of {source}: {e}"))?
            .ok_or_else(|| format!("{source} listed without a head"))?;
        let mut disk = read_disk(&store, &head.root).map_err(|e| format!("{source}: {e}"))?;
        churn(&mut rng, &mut disk, geometry(), 30);
        let root = commit_as_agent(&store, &source, head.epoch + 1, &disk)
            .map_err(|e| format!("the next commit of {source} after the crash fails: {e}"))?;
        let read = read_disk(&store, &root).map_err(|e| format!("{source}: {e}"))?;
        if read != disk {
            return Err(format!(
                "{source}: the commit after the crash reads back other bytes"
            ));
        }
        // And its lifecycle records still write and reset: a cutover of the
        // new commit, then the operator's reset.
        let record = Lifecycle {
            stage: LifecycleStage::CutOver,
            epoch: head.epoch + 1,
            root,
            snapshot: "after-crash".to_owned(),
            launch: format!("{source}-cutover"),
            cutover_unix_ms: T0_MS,
            downtime: Downtime::default(),
        };
        store
            .set_lifecycle(&source, &record)
            .map_err(|e| format!("recording a cutover of {source} after the crash fails: {e}"))?;
        if store.lifecycle(&source).ok().flatten().as_ref() != Some(&record) {
            return Err(format!(
                "{source}: the cutover recorded after the crash reads back otherwise"
            ));
        }
        store
            .clear_lifecycle(&source)
            .map_err(|e| format!("resetting {source} after the crash fails: {e}"))?;
        if !matches!(store.lifecycle(&source), Ok(None)) {
            return Err(format!("{source}: still fenced after a reset"));
        }
    }
    store
        .gc(&GcOptions::default())
        .map_err(|e| format!("gc after the crash fails: {e}"))?;
    let report = store
        .verify(None, None)
        .map_err(|e| format!("verify after the next commit fails: {e}"))?;
    if !report.is_clean() {
        return Err(format!(
            "verify after the next commit and a gc finds damage: {}",
            damage_summary(&report)
        ));
    }
    Ok(())
}

/// The first damaged blobs of a report, briefly.
pub(crate) fn damage_summary(report: &blockrep_store::VerifyReport) -> String {
    let first: Vec<String> = report
        .damaged
        .iter()
        .take(3)
        .map(|blob| {
            format!(
                "{:?} {} {:?} at {:?}",
                blob.kind, blob.id, blob.damage, blob.place
            )
        })
        .collect();
    format!(
        "{} damaged blobs, first: {}",
        report.damaged.len(),
        first.join("; ")
    )
}

pub(crate) fn check_heads(
    store: &Store,
    model: &Model,
    in_flight: Option<&Step>,
) -> Result<(), String> {
    let mut sources: BTreeSet<SourceId> = model.heads.keys().cloned().collect();
    let mut new_root = None;
    if let Some(Step::Commit {
        source,
        epoch,
        disk,
    }) = in_flight
    {
        sources.insert(source.clone());
        new_root = Some((source.clone(), *epoch, root_of(disk).0.id(), disk));
    }
    let listed = store.sources().map_err(|e| format!("sources: {e}"))?;
    for source in &listed {
        if !sources.contains(source) && *source != app() {
            return Err(format!("{source} has a head nothing committed"));
        }
    }
    for source in &sources {
        let head = store
            .head(source)
            .map_err(|e| format!("head of {source}: {e}"))?;
        let old = model.heads.get(source);
        let new = new_root.as_ref().filter(|(s, ..)| s == source);
        let disk = match (head, old, new) {
            (None, None, Some(_)) => continue,
            (None, ..) => return Err(format!("{source} lost its committed head")),
            (Some(head), Some(old), _) if head.root == old.root && head.epoch == old.epoch => {
                &old.disk
            }
            (Some(head), _, Some((_, epoch, root, disk)))
                if head.root == *root && head.epoch == *epoch =>
            {
                *disk
            }
            (Some(head), old, _) => {
                return Err(format!(
                    "{source} head is epoch {} root {}, neither the old ({:?}) nor the new commit",
                    head.epoch,
                    head.root,
                    old.map(|o| (o.epoch, o.root))
                ));
            }
        };
        let head = store
            .head(source)
            .map_err(|e| format!("head of {source}: {e}"))?
            .ok_or_else(|| format!("{source}: head vanished"))?;
        if head.consistency != label_of(head.epoch) {
            return Err(format!(
                "{source} head epoch {} is labelled {}, committed as {}",
                head.epoch,
                head.consistency,
                label_of(head.epoch)
            ));
        }
        let exported =
            read_disk(store, &head.root).map_err(|e| format!("export of {source} fails: {e}"))?;
        if exported != *disk {
            return Err(format!(
                "export of {source} gives other bytes than committed"
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_snapshots(
    store: &Store,
    model: &Model,
    in_flight: Option<&Step>,
) -> Result<(), String> {
    let listed = store
        .list_snapshots(None)
        .map_err(|e| format!("list snapshots: {e}"))?;
    if let Some(s) = listed.iter().find(|s| s.consistency != label_of(s.epoch)) {
        return Err(format!(
            "snapshot {} of {} (epoch {}) is labelled {}",
            s.name, s.source, s.epoch, s.consistency
        ));
    }
    let found: BTreeMap<(SourceId, String), ChunkId> = listed
        .into_iter()
        .map(|s| ((s.source, s.name), s.root))
        .collect();
    // What the interrupted step may or may not have done.
    let may_be_gone = |key: &(SourceId, String), snapshot: &SnapshotModel| match in_flight {
        Some(Step::DeleteSnapshot { source, name }) => key.0 == *source && key.1 == *name,
        Some(Step::Expire { now_ms }) => {
            snapshot.expires_unix_ms != 0 && *now_ms >= snapshot.expires_unix_ms
        }
        _ => false,
    };
    for (key, snapshot) in &model.snapshots {
        match found.get(key) {
            Some(root) if *root == snapshot.root => {}
            Some(root) => {
                return Err(format!(
                    "snapshot {}/{} names {root}, not {}",
                    key.0, key.1, snapshot.root
                ));
            }
            None if may_be_gone(key, snapshot) => {}
            None => return Err(format!("acknowledged snapshot {}/{} is gone", key.0, key.1)),
        }
    }
    for (key, root) in &found {
        if model.snapshots.contains_key(key) {
            continue;
        }
        let allowed = match in_flight {
            Some(Step::CreateSnapshot { source, name, .. }) => {
                key.0 == *source
                    && key.1 == *name
                    && (model.heads.get(source).is_some_and(|h| h.root == *root)
                        || model.machines.get(source).is_some_and(|m| m.root == *root))
            }
            _ => false,
        };
        if !allowed {
            return Err(format!(
                "snapshot {}/{} was never acknowledged",
                key.0, key.1
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_launches(
    store: &Store,
    model: &Model,
    in_flight: Option<&Step>,
) -> Result<(), String> {
    let found = store
        .list_launches(None)
        .map_err(|e| format!("list launches: {e}"))?;
    for info in &found {
        if info.source == app() {
            continue; // a machine's launch: `check_machine_launches`
        }
        let expected = model.launches.get(&info.name);
        let in_flight_launch =
            matches!(in_flight, Some(Step::Launch { name, .. }) if *name == info.name);
        let disk = match expected {
            Some((root, disk)) if *root == info.root => disk.clone(),
            _ if in_flight_launch => {
                // Created, flushed or not: base root or the flushed writes.
                match model.disks.get(&info.root) {
                    Some(disk) => disk.clone(),
                    None => match in_flight {
                        Some(Step::Launch { writes, .. }) => {
                            let mut disk =
                                model.disks.get(&info.base_root).cloned().ok_or_else(|| {
                                    format!("launch {} has an unknown base", info.name)
                                })?;
                            for (offset, data) in writes {
                                disk[*offset as usize..*offset as usize + data.len()]
                                    .copy_from_slice(data);
                            }
                            if root_of(&disk).0.id() != info.root {
                                return Err(format!("launch {} names an unknown root", info.name));
                            }
                            disk
                        }
                        _ => unreachable!("in_flight_launch"),
                    },
                }
            }
            _ => return Err(format!("launch {} is not what was acknowledged", info.name)),
        };
        let read =
            read_disk(store, &info.root).map_err(|e| format!("launch {}: {e}", info.name))?;
        if read != disk {
            return Err(format!("launch {} reads other bytes", info.name));
        }
    }
    for name in model.launches.keys() {
        if !found.iter().any(|info| info.name == *name) {
            return Err(format!("acknowledged launch {name} is gone"));
        }
    }
    Ok(())
}

/// Each source's lifecycle record is the acknowledged one, or what the
/// interrupted step was writing: never torn, never a third state.
pub(crate) fn check_lifecycles(
    store: &Store,
    model: &Model,
    in_flight: Option<&Step>,
) -> Result<(), String> {
    let new = match in_flight {
        Some(Step::SetLifecycle { source, record }) => Some((source, Some(record))),
        Some(Step::ClearLifecycle { source }) => Some((source, None)),
        _ => None,
    };
    let mut sources: BTreeSet<SourceId> = model.lifecycles.keys().cloned().collect();
    sources.extend([web(), db()]);
    sources.extend(new.map(|(source, _)| source.clone()));
    for source in &sources {
        let found = match store.lifecycle(source) {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::Corrupt => {
                return Err(format!("the lifecycle record of {source} is torn: {e}"));
            }
            Err(e) => return Err(format!("lifecycle of {source}: {e}")),
        };
        let old = model.lifecycles.get(source);
        if found.as_ref() == old {
            continue;
        }
        if new.is_some_and(|(s, record)| s == source && found.as_ref() == record) {
            continue;
        }
        let stage = |record: Option<&Lifecycle>| record.map(|r| r.stage);
        return Err(match (old, &found) {
            (Some(_), None) => format!(
                "the acknowledged lifecycle record of {source} ({:?}) is gone",
                stage(old)
            ),
            _ => format!(
                "the lifecycle record of {source} is {:?} ({found:?}), neither the acknowledged {:?} nor the one being written",
                stage(found.as_ref()),
                stage(old)
            ),
        });
    }
    Ok(())
}

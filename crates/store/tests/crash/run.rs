//! Running a script on the simulated disk up to a crash point, and the crash
//! states (seeded) that the exploration draws.

use super::*;

/// Why a step failed: the store refused or failed, or a launch volume's I/O
/// did.
#[derive(Debug)]
pub(crate) enum Failure {
    Store(Error),
    Volume(String, std::io::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Store(e) => write!(f, "{e}"),
            Failure::Volume(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Store(e)
    }
}

/// How a run went: what was acknowledged, which step (if any) was cut short,
/// and the operation count at the end of each step.
#[derive(Debug)]
pub(crate) struct Run {
    model: Model,
    /// The step that was running when the power went or the error came, with
    /// the model as it was before it.
    interrupted: Option<usize>,
    /// Operation count when opening ended, then after each step.
    ops_after: Vec<u64>,
    /// Whether each GC step compacted something (from the dry run).
    compacted: Vec<bool>,
    error: Option<Failure>,
}

/// Stores what a launch volume or an agent would send: each non-zero chunk the
/// store does not have (the `Offer`/`Have` exchange), then commits.
pub(crate) fn commit_as_agent(
    store: &Store,
    source: &SourceId,
    epoch: u64,
    disk: &[u8],
) -> Result<ChunkId, Error> {
    let geometry = geometry();
    let ids = scan_buffer(disk, geometry);
    for (index, id) in ids.iter().enumerate() {
        if id.is_zero() || store.contains(id) {
            continue;
        }
        let range = geometry
            .chunk_range(index as u64)
            .expect("index within the disk");
        store.insert(
            BlobKind::Chunk,
            *id,
            StoredCodec::Raw,
            range.len() as u32,
            &disk[range],
        )?;
    }
    let (root, pages) = Root::build(geometry, &ids);
    store.commit_labelled(
        source,
        epoch,
        &root,
        &pages,
        1,
        true,
        label_of(epoch),
        blockrep_core::clock::now_unix_ms(),
    )?;
    Ok(root.id())
}

/// The consistency label the harness commits epoch `epoch` with: every label
/// in turn, so that each is seen to survive a power loss with its head and
/// its snapshots.
pub(crate) fn label_of(epoch: u64) -> Consistency {
    Consistency::from_byte((epoch % 3) as u8).expect("0, 1 and 2 are labels")
}

pub(crate) fn run_step(
    store: &Arc<Store>,
    step: &Step,
    model: &mut Model,
) -> Result<bool, Failure> {
    match step {
        Step::Commit {
            source,
            epoch,
            disk,
        } => {
            let root = commit_as_agent(store, source, *epoch, disk)?;
            model.disks.insert(root, disk.clone());
            model.heads.insert(
                source.clone(),
                Replica {
                    epoch: *epoch,
                    root,
                    disk: disk.clone(),
                },
            );
        }
        Step::CommitMachine {
            source,
            epoch,
            volumes,
        } => {
            let root = commit_machine_as_agent(store, source, *epoch, volumes)?;
            model.machine_volumes.insert(root, volumes.clone());
            model.machines.insert(
                source.clone(),
                MachineReplica {
                    epoch: *epoch,
                    root,
                    volumes: volumes.clone(),
                },
            );
        }
        Step::CreateSnapshot {
            source,
            name,
            ttl_ms,
            now_ms,
        } => {
            let snapshot = store.create_snapshot(
                source,
                Some(name),
                ttl_ms.map(Duration::from_millis),
                *now_ms,
            )?;
            model.snapshots.insert(
                (source.clone(), name.clone()),
                SnapshotModel {
                    root: snapshot.root,
                    expires_unix_ms: snapshot.expires_unix_ms,
                },
            );
        }
        Step::DeleteSnapshot { source, name } => {
            store.delete_snapshot(source, name)?;
            model.snapshots.remove(&(source.clone(), name.clone()));
        }
        Step::Expire { now_ms } => {
            for snapshot in store.expire_snapshots(*now_ms)? {
                model.snapshots.remove(&(snapshot.source, snapshot.name));
            }
        }
        Step::Launch {
            source,
            snapshot,
            name,
            writes,
        } => {
            let info = store.create_launch(
                source,
                snapshot,
                name,
                LaunchKind::Test,
                blockrep_core::clock::now_unix_ms(),
            )?;
            let mut disk = model
                .disks
                .get(&info.base_root)
                .cloned()
                .expect("snapshots name committed roots");
            model
                .launches
                .insert(name.clone(), (info.base_root, disk.clone()));
            let volume = store.open_launch(name)?;
            for (offset, data) in writes {
                volume
                    .write(*offset, data)
                    .map_err(|e| Failure::Volume(format!("launch {name}: write"), e))?;
                disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            volume
                .flush(blockrep_core::clock::now_unix_ms())
                .map_err(|e| Failure::Volume(format!("launch {name}: flush"), e))?;
            let root = root_of(&disk).0.id();
            model.disks.insert(root, disk.clone());
            model.launches.insert(name.clone(), (root, disk));
        }
        Step::LaunchMachine {
            snapshot,
            name,
            writes,
        } => {
            let info = store.create_launch(
                &app(),
                snapshot,
                name,
                LaunchKind::Test,
                blockrep_core::clock::now_unix_ms(),
            )?;
            let base = model
                .machine_volumes
                .get(&info.base_root)
                .cloned()
                .expect("snapshots name committed machines");
            model.machine_launches.insert(name.clone(), info.base_root);
            for (volume, volumes) in machine_launch_states(&base, writes).into_iter().skip(1) {
                let volume = volume.expect("every state after the base flushed a volume");
                let handle = store.open_launch_volume(name, Some(volume.as_str()))?;
                for (_, offset, data) in writes.iter().filter(|(v, ..)| *v == volume) {
                    handle.write(*offset, data).map_err(|e| {
                        Failure::Volume(format!("launch {name}/{volume}: write"), e)
                    })?;
                }
                handle
                    .flush(blockrep_core::clock::now_unix_ms())
                    .map_err(|e| Failure::Volume(format!("launch {name}/{volume}: flush"), e))?;
                let root = machine_root_of(&volumes);
                model.machine_volumes.insert(root, volumes);
                model.machine_launches.insert(name.clone(), root);
            }
        }
        Step::Gc { live_share_min } => {
            let report = store.gc(&GcOptions {
                live_share_min: *live_share_min,
                dry_run: false,
            })?;
            return Ok(report.packs_compacted > 0);
        }
        Step::SetLifecycle { source, record } => {
            store.set_lifecycle(source, record)?;
            model.lifecycles.insert(source.clone(), record.clone());
        }
        Step::ClearLifecycle { source } => {
            store.clear_lifecycle(source)?;
            model.lifecycles.remove(source);
        }
        Step::Reopen => unreachable!("`run` reopens the store itself"),
    }
    Ok(false)
}

pub(crate) fn open_store(sim: &SimFs) -> Result<Arc<Store>, Error> {
    let store = Store::open_with_vfs(&data_dir(), Arc::new(sim.clone()))?;
    store.set_pack_size_max_bytes(PACK_BYTES_MAX);
    Ok(Arc::new(store))
}

/// Runs `steps` on `sim` until one fails (a crash or an injected error).
pub(crate) fn run(sim: &SimFs, steps: &[Step]) -> Run {
    let mut run = Run {
        model: Model::default(),
        interrupted: None,
        ops_after: Vec::new(),
        compacted: Vec::new(),
        error: None,
    };
    let mut store = match open_store(sim) {
        Ok(store) => store,
        Err(e) => {
            run.error = Some(e.into());
            return run;
        }
    };
    run.ops_after.push(sim.operations());
    for (index, step) in steps.iter().enumerate() {
        let outcome = if matches!(step, Step::Reopen) {
            drop(store);
            match open_store(sim) {
                Ok(reopened) => {
                    store = reopened;
                    Ok(false)
                }
                Err(e) => {
                    run.error = Some(e.into());
                    run.interrupted = Some(index);
                    return run;
                }
            }
        } else {
            run_step(&store, step, &mut run.model)
        };
        match outcome {
            Ok(compacted) => {
                run.compacted.push(compacted);
                run.ops_after.push(sim.operations());
            }
            Err(e) => {
                run.error = Some(e);
                // The server and the operator retry a lifecycle write that
                // failed while the machine stayed up; an acknowledged retry
                // must be as durable as a first attempt. The run ends there.
                let lifecycle = matches!(
                    step,
                    Step::SetLifecycle { .. } | Step::ClearLifecycle { .. }
                );
                if !(lifecycle
                    && !sim.is_powered_off()
                    && run_step(&store, step, &mut run.model).is_ok())
                {
                    run.interrupted = Some(index);
                }
                return run;
            }
        }
    }
    run
}

/// One crash state, derived from its seed.
#[derive(Debug)]
pub(crate) struct CrashState {
    pub(crate) seed: u64,
    steps: Vec<Step>,
    /// Cut the power after this operation (or fail it, for an I/O error).
    operation: u64,
    pub(crate) io_error: bool,
    pub(crate) area: Area,
    step: Option<usize>,
}

impl fmt::Display for CrashState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<String> = self.steps.iter().map(Step::describe).collect();
        write!(
            f,
            "seed {}: {} at operation {} ({} of step {}) of [{}]",
            self.seed,
            if self.io_error {
                "I/O error"
            } else {
                "power loss"
            },
            self.operation,
            self.area,
            self.step.map_or("open".to_owned(), |s| s.to_string()),
            steps.join(", ")
        )
    }
}

/// A script, the operation count after opening and after each step, and
/// whether each step compacted packs.
pub(crate) type DryRun = (Vec<Step>, Vec<u64>, Vec<bool>);

/// Dry runs, cached per script seed.
#[derive(Default)]
pub(crate) struct Planner {
    dry_runs: HashMap<u64, DryRun>,
}

impl Planner {
    pub(crate) fn state(&mut self, seed: u64) -> CrashState {
        let script_seed = seed / CRASHES_PER_SCRIPT;
        let (steps, ops_after, compacted) = self
            .dry_runs
            .entry(script_seed)
            .or_insert_with(|| {
                let steps = script(script_seed);
                let dry = run(&SimFs::new(), &steps);
                assert!(
                    dry.error.is_none(),
                    "script {script_seed} fails without a crash: {:?}",
                    dry.error
                );
                (steps, dry.ops_after, dry.compacted)
            })
            .clone();
        let total = *ops_after.last().expect("at least the open");
        let mut rng = SplitMix64::new(seed ^ 0xc4a5_4000);
        // Mostly a step chosen evenly, then an operation of it, so that short
        // steps (a snapshot, a collection) are crashed in as often as commits,
        // whose chunk writes make up most operations; sometimes an operation
        // chosen evenly from the whole run, opening included.
        let step = 1 + rng.below(ops_after.len() as u64 - 1) as usize;
        let (start, end) = (ops_after[step - 1], ops_after[step]);
        let operation = if rng.below(16) == 0 || end == start {
            1 + rng.below(total)
        } else {
            start + 1 + rng.below(end - start)
        };
        let io_error = seed % IO_ERROR_EVERY == IO_ERROR_EVERY - 1;
        // The step whose operations include `operation`.
        let step = ops_after.iter().position(|&end| operation <= end);
        let (area, step) = match step {
            Some(0) | None => (Area::Open, None),
            Some(after) => {
                let index = after - 1;
                let area = match &steps[index] {
                    Step::Commit { .. } => Area::Commit,
                    Step::CommitMachine { .. } => Area::MachineCommit,
                    Step::CreateSnapshot { .. }
                    | Step::DeleteSnapshot { .. }
                    | Step::Expire { .. } => Area::Snapshot,
                    Step::Launch { .. } | Step::LaunchMachine { .. } => Area::Launch,
                    Step::SetLifecycle { .. } | Step::ClearLifecycle { .. } => Area::Lifecycle,
                    Step::Gc { .. } if compacted[index] => Area::Compaction,
                    Step::Gc { .. } => Area::Gc,
                    Step::Reopen => Area::Open,
                };
                (area, Some(index))
            }
        };
        CrashState {
            seed,
            steps,
            operation,
            io_error,
            area,
            step,
        }
    }
}

/// Runs one crash state and checks the rebooted store. `Err` says what is wrong.
pub(crate) fn explore(state: &CrashState) -> Result<(), String> {
    let sim = SimFs::new();
    if state.io_error {
        sim.fail_operation(state.operation);
    } else {
        sim.power_off_after(state.operation);
    }
    let run = run(&sim, &state.steps);
    // Power lost after the last operation of the script interrupts nothing.
    // A pack's saved scan is a cache: failing to save one is only reported
    // (the pack is scanned at the next open).
    let absorbed = sim
        .injected_failure()
        .is_some_and(|failed| failed.contains(".idx"));
    if state.io_error && run.error.is_none() && !absorbed {
        return Err(format!(
            "every step succeeded although operation {} failed ({})",
            state.operation,
            sim.injected_failure().unwrap_or_default()
        ));
    }
    if run.error.is_some() && !state.io_error && !sim.is_powered_off() {
        return Err(format!(
            "a step failed before the crash: {}",
            run.error
                .as_ref()
                .map_or(String::new(), ToString::to_string)
        ));
    }
    let (image, _) = sim.crash_image(state.seed);
    let in_flight = run.interrupted.map(|index| &state.steps[index]);
    check_rebooted(image, &run.model, in_flight, state.seed).map_err(|problem| {
        match sim.injected_failure().filter(|_| state.io_error) {
            Some(failed) => format!("{problem} (the failed operation: {failed})"),
            None => problem,
        }
    })
}

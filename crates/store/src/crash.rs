//! Power-loss crash tests: the store on a simulated disk ([`crate::sim`]) loses
//! power at seeded crash points across commits, snapshots, expiry, launches,
//! garbage collection, compaction and lifecycle records (cutover, failback,
//! reset); after each crash the disk is rebooted and the store must open,
//! verify clean, hold each head at the old or the new commit and each
//! lifecycle record at the old or the new state, keep every acknowledged
//! effect, and accept the next commit and the next record.
//!
//! `cargo test -p blockrep-store crash -- --nocapture` prints the summary;
//! `BLOCKREP_CRASH_STATES=N` explores N crash states (default 2,000),
//! `BLOCKREP_CRASH_SEED_BASE=B` starts at seed B, and `BLOCKREP_CRASH_SEED=S`
//! replays one state with details. `scripts/crash-states.sh N` runs a larger
//! exploration in a release build.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_core::{ChunkId, Consistency, Geometry, Root, SourceId, scan_buffer};

use crate::sim::SimFs;
use crate::testutil::{Rng, churn};
use crate::{
    BlobKind, Downtime, Error, ErrorKind, GcOptions, LaunchKind, Lifecycle, LifecycleStage, Store,
    StoredCodec,
};

const CHUNK_BYTES: u32 = 4096;
/// 28 whole chunks and a short last one.
const DISK_BYTES: u64 = 28 * CHUNK_BYTES as u64 + 777;
/// About nine chunks per pack, so that commits roll packs over and sealed
/// packs accumulate dead data for compaction.
const PACK_BYTES_MAX: u64 = 40 * 1024;
/// Crash points taken from one script (its dry run is shared).
const CRASHES_PER_SCRIPT: u64 = 8;
/// One state in this many injects an I/O error instead of cutting the power.
const IO_ERROR_EVERY: u64 = 8;
const T0_MS: u64 = 1_700_000_000_000;

fn data_dir() -> PathBuf {
    PathBuf::from("/data")
}

fn web() -> SourceId {
    SourceId::new("web-1").expect("valid id")
}

fn db() -> SourceId {
    SourceId::new("db-1").expect("valid id")
}

/// What a step does to the store.
#[derive(Debug, Clone)]
enum Step {
    Commit {
        source: SourceId,
        epoch: u64,
        disk: Vec<u8>,
    },
    CreateSnapshot {
        source: SourceId,
        name: String,
        ttl_ms: Option<u64>,
        now_ms: u64,
    },
    DeleteSnapshot {
        source: SourceId,
        name: String,
    },
    Expire {
        now_ms: u64,
    },
    Launch {
        source: SourceId,
        snapshot: String,
        name: String,
        /// Writes made before the flush: offset and bytes.
        writes: Vec<(u64, Vec<u8>)>,
    },
    Gc {
        live_share_min: f64,
    },
    /// Writes a source's lifecycle record: a cutover (the fence), its downtime
    /// report, a failback starting or finishing.
    SetLifecycle {
        source: SourceId,
        record: Lifecycle,
    },
    /// Removes the record (`cutover --reset`).
    ClearLifecycle {
        source: SourceId,
    },
    /// Closes the store and opens it again (a server restart without a
    /// crash): sealed packs get their saved indexes, which later opens load.
    Reopen,
}

/// Which path a crash point falls in, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Area {
    Open,
    Commit,
    Snapshot,
    Launch,
    Lifecycle,
    Gc,
    Compaction,
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Area::Open => "open",
            Area::Commit => "commit",
            Area::Snapshot => "snapshot",
            Area::Launch => "launch",
            Area::Lifecycle => "lifecycle",
            Area::Gc => "gc",
            Area::Compaction => "compaction",
        })
    }
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::Commit { source, epoch, .. } => format!("commit {source} epoch {epoch}"),
            Step::CreateSnapshot {
                source,
                name,
                ttl_ms,
                ..
            } => format!("snapshot {source}/{name} ttl {ttl_ms:?}"),
            Step::DeleteSnapshot { source, name } => format!("delete snapshot {source}/{name}"),
            Step::Expire { now_ms } => format!("expire at +{} ms", now_ms - T0_MS),
            Step::Launch { snapshot, name, .. } => format!("launch {name} from {snapshot}"),
            Step::Gc { live_share_min } => format!("gc live share min {live_share_min}"),
            Step::SetLifecycle { source, record } => {
                format!("lifecycle {source} {:?}", record.stage)
            }
            Step::ClearLifecycle { source } => format!("reset {source}"),
            Step::Reopen => "reopen".to_owned(),
        }
    }
}

/// A committed replica: its head and disk.
#[derive(Debug, Clone)]
struct Replica {
    epoch: u64,
    root: ChunkId,
    disk: Vec<u8>,
}

#[derive(Debug, Clone)]
struct SnapshotModel {
    root: ChunkId,
    expires_unix_ms: u64,
}

/// What the store must hold: the effects of every acknowledged step.
#[derive(Debug, Clone, Default)]
struct Model {
    heads: BTreeMap<SourceId, Replica>,
    snapshots: BTreeMap<(SourceId, String), SnapshotModel>,
    /// Launch name -> (root, disk) of its last acknowledged flush.
    launches: BTreeMap<String, (ChunkId, Vec<u8>)>,
    /// Disk bytes of every root ever committed or flushed.
    disks: HashMap<ChunkId, Vec<u8>>,
    /// Lifecycle records by source; a source not listed has none.
    lifecycles: BTreeMap<SourceId, Lifecycle>,
}

fn root_of(disk: &[u8]) -> (Root, Vec<blockrep_core::Page>) {
    let geometry = geometry();
    Root::build(geometry, &scan_buffer(disk, geometry))
}

fn geometry() -> Geometry {
    Geometry::new(DISK_BYTES, CHUNK_BYTES).expect("valid geometry")
}

/// The next lifecycle step of `source`, whose head is `epoch` with `disk`, as
/// the server and the operator take them: a cutover fences it, the agent's
/// downtime report rewrites the record, a failback starts and finishes, and a
/// reset removes the record at any stage.
fn lifecycle_step(
    rng: &mut Rng,
    source: &SourceId,
    current: Option<&Lifecycle>,
    (epoch, disk): (u64, &[u8]),
    now_ms: u64,
) -> Step {
    let Some(current) = current else {
        return Step::SetLifecycle {
            source: source.clone(),
            record: Lifecycle {
                stage: LifecycleStage::CutOver,
                epoch,
                root: root_of(disk).0.id(),
                snapshot: format!("cutover-{epoch}-{}", rng.below(1000)),
                launch: format!("{source}-cutover"),
                cutover_unix_ms: now_ms,
                downtime: Downtime {
                    scan_ms: rng.below(5_000),
                    commit_ms: rng.below(2_000),
                    launch_ms: rng.below(500),
                    ..Downtime::default()
                },
            },
        };
    };
    let mut record = current.clone();
    match (current.stage, rng.below(4)) {
        (_, 0) | (LifecycleStage::FailedBack, _) => {
            return Step::ClearLifecycle {
                source: source.clone(),
            };
        }
        (LifecycleStage::CutOver, 1) if current.downtime.total_ms == 0 => {
            let d = &mut record.downtime;
            d.hook_ms = 1 + rng.below(3_000);
            d.transfer_ms = rng.below(10_000);
            d.total_ms = d.scan_ms + d.transfer_ms + d.commit_ms + d.launch_ms + 1;
        }
        (LifecycleStage::CutOver, _) => record.stage = LifecycleStage::FailingBack,
        (LifecycleStage::FailingBack, _) => record.stage = LifecycleStage::FailedBack,
    }
    Step::SetLifecycle {
        source: source.clone(),
        record,
    }
}

/// A script: the steps after the first commit, chosen by `seed` so that every
/// area is reached and GC finds dead data in sealed packs.
fn script(seed: u64) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let geometry = geometry();
    let mut disks: BTreeMap<SourceId, (u64, Vec<u8>)> = BTreeMap::new();
    let mut disk = vec![0u8; DISK_BYTES as usize];
    churn(&mut rng, &mut disk, geometry, 80);
    let mut steps = vec![Step::Commit {
        source: web(),
        epoch: 1,
        disk: disk.clone(),
    }];
    disks.insert(web(), (1, disk));
    let mut snapshots: Vec<(SourceId, String, u64)> = Vec::new();
    let mut snapshot_number = 0;
    let mut now_ms = T0_MS;
    let count = 3 + rng.below(5);
    let mut launched = false;
    // The script's view of each source's lifecycle record: a source with one
    // is fenced, and the operator resets it before it replicates again.
    let mut lifecycles: BTreeMap<SourceId, Lifecycle> = BTreeMap::new();
    for _ in 0..count {
        now_ms += 60_000;
        let step = match rng.below(12) {
            0..=2 => {
                let source = if rng.below(3) == 0 { db() } else { web() };
                if lifecycles.contains_key(&source) {
                    steps.push(Step::ClearLifecycle {
                        source: source.clone(),
                    });
                    lifecycles.remove(&source);
                }
                let (epoch, disk) = disks.entry(source.clone()).or_insert_with(|| {
                    // A second source starts from web-1's disk: shared chunks.
                    (0, vec![0u8; DISK_BYTES as usize])
                });
                *epoch += 1;
                churn(&mut rng, disk, geometry, 40);
                Step::Commit {
                    source,
                    epoch: *epoch,
                    disk: disk.clone(),
                }
            }
            3 | 4 => {
                let source = web();
                snapshot_number += 1;
                let name = format!("s{snapshot_number}");
                let ttl_ms = (rng.below(2) == 0).then_some(30_000 + rng.below(120_000));
                snapshots.push((
                    source.clone(),
                    name.clone(),
                    ttl_ms.map_or(0, |ttl| now_ms + ttl),
                ));
                Step::CreateSnapshot {
                    source,
                    name,
                    ttl_ms,
                    now_ms,
                }
            }
            5 if !snapshots.is_empty() => {
                let (source, name, _) =
                    snapshots.remove(rng.below(snapshots.len() as u64) as usize);
                Step::DeleteSnapshot { source, name }
            }
            6 => {
                snapshots.retain(|(_, _, expires)| *expires == 0 || now_ms < *expires);
                Step::Expire { now_ms }
            }
            7 if !launched && !snapshots.is_empty() => {
                launched = true;
                let (source, snapshot, _) =
                    snapshots[rng.below(snapshots.len() as u64) as usize].clone();
                let writes = (0..1 + rng.below(3))
                    .map(|_| {
                        let len = 1 + rng.below(2 * u64::from(CHUNK_BYTES));
                        let offset = rng.below(DISK_BYTES - len);
                        let mut data = vec![0u8; len as usize];
                        rng.fill(&mut data);
                        (offset, data)
                    })
                    .collect();
                Step::Launch {
                    source,
                    snapshot,
                    name: "drill".to_owned(),
                    writes,
                }
            }
            10 | 11 => {
                // A source with a committed head: web-1, or db-1 once it has one.
                let source = if rng.below(3) == 0 && disks.get(&db()).is_some_and(|(e, _)| *e > 0) {
                    db()
                } else {
                    web()
                };
                let (epoch, disk) = &disks[&source];
                let step = lifecycle_step(
                    &mut rng,
                    &source,
                    lifecycles.get(&source),
                    (*epoch, disk),
                    now_ms,
                );
                match &step {
                    Step::SetLifecycle { record, .. } => {
                        lifecycles.insert(source, record.clone());
                    }
                    _ => {
                        lifecycles.remove(&source);
                    }
                }
                step
            }
            _ => Step::Gc {
                live_share_min: [0.0, 0.5, 0.9, 1.0][rng.below(4) as usize],
            },
        };
        let collected = matches!(step, Step::Gc { .. });
        steps.push(step);
        if collected && rng.below(2) == 0 {
            steps.push(Step::Reopen);
        }
    }
    if lifecycles.contains_key(&web()) {
        steps.push(Step::ClearLifecycle { source: web() });
    }
    // End with a collection that has dead data in sealed packs to compact:
    // a commit that replaces much of the disk, then a demanding live share.
    // The reopen before gives the sealed packs saved indexes for it to delete.
    steps.push(Step::Reopen);
    let (epoch, disk) = disks.get_mut(&web()).expect("web-1 committed first");
    *epoch += 1;
    churn(&mut rng, disk, geometry, 70);
    steps.push(Step::Commit {
        source: web(),
        epoch: *epoch,
        disk: disk.clone(),
    });
    steps.push(Step::Gc {
        live_share_min: 0.9,
    });
    steps
}

/// How a run went: what was acknowledged, which step (if any) was cut short,
/// and the operation count at the end of each step.
#[derive(Debug)]
struct Run {
    model: Model,
    /// The step that was running when the power went or the error came, with
    /// the model as it was before it.
    interrupted: Option<usize>,
    /// Operation count when opening ended, then after each step.
    ops_after: Vec<u64>,
    /// Whether each GC step compacted something (from the dry run).
    compacted: Vec<bool>,
    error: Option<Error>,
}

/// Stores what a launch volume or an agent would send: each non-zero chunk the
/// store does not have (the `Offer`/`Have` exchange), then commits.
fn commit_as_agent(
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
    store.commit_labelled(source, epoch, &root, &pages, 1, true, label_of(epoch))?;
    Ok(root.id())
}

/// The consistency label the harness commits epoch `epoch` with: every label
/// in turn, so that each is seen to survive a power loss with its head and
/// its snapshots.
fn label_of(epoch: u64) -> Consistency {
    Consistency::from_byte((epoch % 3) as u8).expect("0, 1 and 2 are labels")
}

fn run_step(store: &Arc<Store>, step: &Step, model: &mut Model) -> Result<bool, Error> {
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
            let info = store.create_launch(source, snapshot, name, LaunchKind::Test)?;
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
                    .map_err(|e| Error::io(format!("launch {name}: write"), e))?;
                disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
            volume
                .flush()
                .map_err(|e| Error::io(format!("launch {name}: flush"), e))?;
            let root = root_of(&disk).0.id();
            model.disks.insert(root, disk.clone());
            model.launches.insert(name.clone(), (root, disk));
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

fn open_store(sim: &SimFs) -> Result<Arc<Store>, Error> {
    let store = Store::open_with_vfs(&data_dir(), Arc::new(sim.clone()))?;
    store.set_pack_size_max_bytes(PACK_BYTES_MAX);
    Ok(Arc::new(store))
}

/// Runs `steps` on `sim` until one fails (a crash or an injected error).
fn run(sim: &SimFs, steps: &[Step]) -> Run {
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
            run.error = Some(e);
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
                    run.error = Some(e);
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
struct CrashState {
    seed: u64,
    steps: Vec<Step>,
    /// Cut the power after this operation (or fail it, for an I/O error).
    operation: u64,
    io_error: bool,
    area: Area,
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
type DryRun = (Vec<Step>, Vec<u64>, Vec<bool>);

/// Dry runs, cached per script seed.
#[derive(Default)]
struct Planner {
    dry_runs: HashMap<u64, DryRun>,
}

impl Planner {
    fn state(&mut self, seed: u64) -> CrashState {
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
        let mut rng = Rng::new(seed ^ 0xc4a5_4000);
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
                    Step::CreateSnapshot { .. }
                    | Step::DeleteSnapshot { .. }
                    | Step::Expire { .. } => Area::Snapshot,
                    Step::Launch { .. } => Area::Launch,
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
fn explore(state: &CrashState) -> Result<(), String> {
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
        return Err(format!("a step failed before the crash: {:?}", run.error));
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

/// The disk `root` describes, read back through the store.
fn read_disk(store: &Store, root: &ChunkId) -> Result<Vec<u8>, Error> {
    let root = store.read_root(root)?;
    let mut disk = vec![0u8; root.geometry().disk_size_bytes() as usize];
    store.export_chunks(&root, &mut |offset, data| {
        disk[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    })?;
    Ok(disk)
}

fn check_rebooted(
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
    check_snapshots(&store, model, in_flight)?;
    check_launches(&store, model, in_flight)?;
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
    let mut rng = Rng::new(seed ^ 0x00ad_d1ce);
    for source in store.sources().map_err(|e| format!("sources: {e}"))? {
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
fn damage_summary(report: &crate::VerifyReport) -> String {
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

fn check_heads(store: &Store, model: &Model, in_flight: Option<&Step>) -> Result<(), String> {
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
        if !sources.contains(source) {
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

fn check_snapshots(store: &Store, model: &Model, in_flight: Option<&Step>) -> Result<(), String> {
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
                    && model.heads.get(source).is_some_and(|h| h.root == *root)
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

fn check_launches(store: &Store, model: &Model, in_flight: Option<&Step>) -> Result<(), String> {
    let found = store
        .list_launches(None)
        .map_err(|e| format!("list launches: {e}"))?;
    for info in &found {
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
fn check_lifecycles(store: &Store, model: &Model, in_flight: Option<&Step>) -> Result<(), String> {
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

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

#[test]
fn crash_states_keep_the_store_consistent() {
    let started = Instant::now();
    let mut planner = Planner::default();
    if let Some(seed) = env_u64("BLOCKREP_CRASH_SEED") {
        let state = planner.state(seed);
        println!("{state}");
        if let Err(problem) = explore(&state) {
            panic!("{state}: {problem}");
        }
        return;
    }
    let count = env_u64("BLOCKREP_CRASH_STATES").unwrap_or(2000);
    let base = env_u64("BLOCKREP_CRASH_SEED_BASE").unwrap_or(0);
    let mut by_area: BTreeMap<Area, u64> = BTreeMap::new();
    let mut io_errors = 0;
    let mut failures: Vec<(CrashState, String)> = Vec::new();
    for seed in base..base + count {
        let state = planner.state(seed);
        *by_area.entry(state.area).or_default() += 1;
        io_errors += u64::from(state.io_error);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| explore(&state)))
            .unwrap_or_else(|panic| {
                Err(format!(
                    "panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("?")
                ))
            });
        if let Err(problem) = outcome {
            failures.push((state, problem));
        }
    }
    let areas: Vec<String> = by_area
        .iter()
        .map(|(area, n)| format!("{area} {n}"))
        .collect();
    println!(
        "crash states explored: {count} ({}; {io_errors} of them I/O errors, the rest power loss); failures: {}; {:.1} s",
        areas.join(", "),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    for (state, problem) in failures.iter().take(10) {
        println!("FAILED {state}\n  {problem}");
        println!(
            "  reproduce: BLOCKREP_CRASH_SEED={} cargo test -p blockrep-store --lib crash -- --nocapture",
            state.seed
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {count} crash states failed; first: seed {}",
        failures.len(),
        failures[0].0.seed
    );
    // Every area must have been reached, or the test explores less than it says.
    for area in [
        Area::Commit,
        Area::Snapshot,
        Area::Lifecycle,
        Area::Gc,
        Area::Compaction,
    ] {
        assert!(
            count < 500 || by_area.get(&area).is_some_and(|&n| n > 0),
            "no crash state in {area}"
        );
    }
}

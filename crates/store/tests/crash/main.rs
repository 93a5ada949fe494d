//! Power-loss crash tests: the store on a simulated disk (`blockrep_store::sim`) loses
//! power at seeded crash points across commits (of one disk and of machines of
//! several volumes), snapshots, expiry, launches,
//! garbage collection, compaction and lifecycle records (cutover, failback,
//! reset); after each crash the disk is rebooted and the store must open,
//! verify clean, hold each head at the old or the new commit and each
//! lifecycle record at the old or the new state, keep every acknowledged
//! effect, and accept the next commit and the next record.
//!
//! `cargo test -p blockrep-store --test crash -- --nocapture` prints the summary;
//! `BLOCKREP_CRASH_STATES=N` explores N crash states (default 2,000),
//! `BLOCKREP_CRASH_SEED_BASE=B` starts at seed B, and `BLOCKREP_CRASH_SEED=S`
//! replays one state with details. `scripts/crash-states.sh N` runs a larger
//! exploration in a release build.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_core::{ChunkId, Consistency, Geometry, Root, SourceId, VolumeName, scan_buffer};

use blockrep_core::rng::SplitMix64;
use blockrep_store::sim::SimFs;
use blockrep_store::{
    BlobKind, Downtime, Error, ErrorKind, GcOptions, LaunchKind, Lifecycle, LifecycleStage, Store,
    StoredCodec,
};

mod check;
mod machine;
mod run;

use check::*;
use machine::*;
use run::*;

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
/// Crash states a plain `cargo test` explores: CI must see at least this many.
const CRASH_STATES_DEFAULT: u64 = 2_000;

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
    /// An epoch of the machine source: every volume in one commit.
    CommitMachine {
        source: SourceId,
        epoch: u64,
        volumes: Volumes,
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
    /// A launch of the machine source's snapshot, then writes to some of
    /// its volumes, each volume flushed in turn.
    LaunchMachine {
        snapshot: String,
        name: String,
        /// Volume, offset and bytes, grouped by volume in flush order.
        writes: Vec<(VolumeName, u64, Vec<u8>)>,
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
    MachineCommit,
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
            Area::MachineCommit => "machine commit",
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
            Step::CommitMachine {
                source,
                epoch,
                volumes,
            } => format!(
                "commit machine {source} epoch {epoch} ({} volumes)",
                volumes.len()
            ),
            Step::CreateSnapshot {
                source,
                name,
                ttl_ms,
                ..
            } => format!("snapshot {source}/{name} ttl {ttl_ms:?}"),
            Step::DeleteSnapshot { source, name } => format!("delete snapshot {source}/{name}"),
            Step::Expire { now_ms } => format!("expire at +{} ms", now_ms - T0_MS),
            Step::Launch { snapshot, name, .. } => format!("launch {name} from {snapshot}"),
            Step::LaunchMachine { snapshot, name, .. } => {
                format!("launch machine {name} from {snapshot}")
            }
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
    /// The machine source's committed machine.
    machines: BTreeMap<SourceId, MachineReplica>,
    /// Volumes of every machine root ever committed or flushed.
    machine_volumes: HashMap<ChunkId, Volumes>,
    /// Machine launch name -> its machine root after its last acknowledged flush.
    machine_launches: BTreeMap<String, ChunkId>,
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
    rng: &mut SplitMix64,
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
    let mut rng = SplitMix64::new(seed);
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
    let mut machine: Option<(u64, Volumes)> = None;
    let mut machine_launched = false;
    for _ in 0..count {
        now_ms += 60_000;
        let step = match rng.below(14) {
            12 | 13 => {
                let (epoch, volumes) = match machine.take() {
                    None => (1, first_volumes(&mut rng)),
                    Some((epoch, volumes)) => (epoch + 1, next_volumes(&mut rng, &volumes)),
                };
                machine = Some((epoch, volumes.clone()));
                if !machine_launched && rng.below(2) == 0 {
                    // Then a snapshot of it, and a launch with writes.
                    machine_launched = true;
                    steps.push(Step::CommitMachine {
                        source: app(),
                        epoch,
                        volumes: volumes.clone(),
                    });
                    let snapshot = format!("m{epoch}");
                    steps.push(Step::CreateSnapshot {
                        source: app(),
                        name: snapshot.clone(),
                        ttl_ms: None,
                        now_ms,
                    });
                    let mut writes = Vec::new();
                    for (name, geometry, _) in &volumes {
                        if rng.below(3) == 0 {
                            continue;
                        }
                        for _ in 0..1 + rng.below(2) {
                            let size = geometry.disk_size_bytes();
                            let len = 1 + rng.below(2 * u64::from(CHUNK_BYTES));
                            let offset = rng.below(size - len);
                            let mut data = vec![0u8; len as usize];
                            rng.fill(&mut data);
                            writes.push((name.clone(), offset, data));
                        }
                    }
                    Step::LaunchMachine {
                        snapshot,
                        name: "mdrill".to_owned(),
                        writes,
                    }
                } else {
                    Step::CommitMachine {
                        source: app(),
                        epoch,
                        volumes,
                    }
                }
            }
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
    let count = env_u64("BLOCKREP_CRASH_STATES").unwrap_or(CRASH_STATES_DEFAULT);
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
            "  reproduce: BLOCKREP_CRASH_SEED={} cargo test -p blockrep-store --test crash -- --nocapture",
            state.seed
        );
    }
    // A plain run (no override) is CI's: it must explore every state it claims.
    let explored: u64 = by_area.values().sum();
    assert!(
        env_u64("BLOCKREP_CRASH_STATES").is_some() || explored >= CRASH_STATES_DEFAULT,
        "only {explored} crash states explored, CI needs {CRASH_STATES_DEFAULT}"
    );
    assert!(
        failures.is_empty(),
        "{} of {count} crash states failed; first: seed {}",
        failures.len(),
        failures[0].0.seed
    );
    // Every area must have been reached, or the test explores less than it says.
    for area in [
        Area::Commit,
        Area::MachineCommit,
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

/// Rewrites about `share_percent` of the chunks of `disk` with fresh random
/// bytes (and some with zeroes).
fn churn(rng: &mut SplitMix64, disk: &mut [u8], geometry: Geometry, share_percent: u64) {
    for index in 0..geometry.chunk_count() {
        if rng.below(100) >= share_percent {
            continue;
        }
        let range = geometry
            .chunk_range(index)
            .expect("index below the chunk count");
        if rng.below(8) == 0 {
            disk[range].fill(0);
        } else {
            rng.fill(&mut disk[range]);
        }
    }
}

//! Process kill loop: the server and the agent are killed with SIGKILL at random
//! moments while a writer changes the disk. Every commit the agent was told is
//! durable (its `--ack-log`) must stay exportable, the server's head must never
//! fall behind an acknowledged epoch, and once the writer stops the replica must
//! equal the disk. Some server kills are followed by start-up kills: a server
//! spawned on the data directory and killed while it opens the store or around
//! the moment it listens, once or twice, before it is started for good.
//!
//! `BLOCKREP_KILL_LOOP=N` sets the number of kills (default 30), and
//! `BLOCKREP_KILL_SEED=N` (decimal or 0x hex) repeats a run's choices of what to
//! kill and when; the writer's timing against them is up to the scheduler.
//! `scripts/kill-loop.sh N` runs it in release with the report printed.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;
use blockrep_core::ChunkId;
use blockrep_core::clock::now_unix_ms;
use blockrep_testkit::ack_log::{Ack, read_acks};
use blockrep_testkit::{Pki, ServerProcess, SplitMix64, StartupKill, write_at};

const SOURCE: &str = "kl";
const DISK_BYTES: u64 = 16 << 20;
const BLOCK_BYTES: u64 = 4096;
const CHUNK: u32 = 65_536;
/// Most of the writes land in the first MiB, as a workload's hot spot would.
const HOT_BYTES: u64 = 1 << 20;
const WRITE_PERIOD: Duration = Duration::from_millis(25);
const INTERVAL: &str = "200ms";
/// Longest random wait between a recovery and the next kill.
const KILL_DELAY_MAX_MS: u64 = 1000;
/// Longest wait between a restart and a kill that does not wait for recovery.
const EARLY_KILL_DELAY_MAX_MS: u64 = 400;
/// One server kill in this many also kills the restarted server during its
/// start-up, once or (half of those) twice, before starting it for good.
const STARTUP_KILL_ONE_IN: u64 = 2;
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Server flags: no GC, so that every acknowledged root (not only the head)
/// stays in the store; no automatic snapshots.
const SERVER_FLAGS: [&str; 4] = ["--gc-interval", "off", "--retention", "off"];

/// Writes a stamped 4 KiB block every `WRITE_PERIOD` (three in four in the hot
/// first MiB) until `stop`; returns the number of writes.
fn spawn_writer(disk: PathBuf, seed: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rng = SplitMix64::new(seed);
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let mut seq = 1u64;
        while !stop.load(Ordering::Relaxed) {
            let span = if rng.below(4) == 0 {
                DISK_BYTES
            } else {
                HOT_BYTES
            };
            let index = rng.below(span / BLOCK_BYTES);
            // No fsync: the agent reads the page cache, as it would a live disk.
            file.write_all_at(&stamped_block(index, seq), index * BLOCK_BYTES)
                .unwrap();
            seq += 1;
            std::thread::sleep(WRITE_PERIOD);
        }
        seq - 1
    })
}

/// Where replication runs: certificates, data directory, disk and ack log.
struct Rig {
    pki: Pki,
    work: tempfile::TempDir,
    listen: String,
}

impl Rig {
    fn data(&self) -> PathBuf {
        self.work.path().join("data")
    }

    fn disk(&self) -> PathBuf {
        self.work.path().join("disk.raw")
    }

    fn ack_log(&self) -> PathBuf {
        self.work.path().join("acks.log")
    }

    fn scratch(&self) -> PathBuf {
        self.work.path().join("export.raw")
    }

    fn start_server(&self) -> ServerProcess {
        ServerProcess::start_on(
            &bin(),
            &self.listen,
            &self.data(),
            self.pki.path(),
            &SERVER_FLAGS,
        )
    }

    /// A server spawned on the data directory and SIGKILLed `after` the spawn.
    fn kill_server_during_startup(&self, after: Duration) -> StartupKill {
        ServerProcess::kill_during_startup(
            &bin(),
            &self.listen,
            &self.data(),
            self.pki.path(),
            &SERVER_FLAGS,
            after,
        )
    }

    fn start_agent(&self) -> AgentProcess {
        spawn_agent(
            &self.disk(),
            self.listen.parse().unwrap(),
            SOURCE,
            self.pki.path(),
            &[
                "--interval",
                INTERVAL,
                "--compress",
                "zstd",
                "--ack-log",
                self.ack_log().to_str().unwrap(),
            ],
        )
    }

    /// `blockrep export --root` of `root` into the scratch file; `Err` with the
    /// reason when the export fails or is not the disk the root names.
    fn export_with_cli(&self, root: &str) -> Result<(), String> {
        let scratch = self.scratch();
        let output = Command::new(BIN)
            .args(["export", "--data"])
            .arg(self.data())
            .args(["--root", root, "--out"])
            .arg(&scratch)
            .output()
            .unwrap();
        if !output.status.success() {
            return Err(format!("export --root {root}: {}", stderr(&output)));
        }
        check_export(&scratch, root)
    }
}

/// Whether the image at `path` has the root `root`: its size is the disk's and
/// its chunks hash to the root's ids.
fn check_export(path: &Path, root: &str) -> Result<(), String> {
    let size = std::fs::metadata(path).unwrap().len();
    if size != DISK_BYTES {
        return Err(format!("export of {root} has {size} bytes"));
    }
    let actual = disk_root(path, CHUNK);
    if actual != root {
        return Err(format!("export of {root} has root {actual}"));
    }
    Ok(())
}

/// Exports each root with the store library's `export_root` (what `export
/// --root` runs) from a read-only store opened beside the running server, and
/// checks the image; returns the failures.
fn export_with_store(
    store: &blockrep_store::Store,
    roots: &[String],
    scratch: &Path,
) -> Vec<String> {
    let mut failures = Vec::new();
    for root in roots {
        let id = ChunkId::from(blake3::Hash::from_hex(root).unwrap());
        let result = store
            .export_root(&id, scratch)
            .map_err(|e| format!("export of {root}: {e}"))
            .and_then(|_| check_export(scratch, root));
        if let Err(failure) = result {
            failures.push(failure);
        }
    }
    failures
}

/// Acknowledged epochs never go back, and an epoch acknowledged twice (an idle
/// epoch repeats the head) has one root: otherwise the server lost a commit
/// and reused its epoch. Returns the lines that break this.
fn ordering_violations(acks: &[Ack]) -> Vec<String> {
    acks.windows(2)
        .filter(|w| w[1].epoch < w[0].epoch || (w[1].epoch == w[0].epoch && w[1].root != w[0].root))
        .map(|w| format!("{:?} then {:?}", w[0], w[1]))
        .collect()
}

/// The first acknowledgement that `wanted` accepts; panics if the agent exits
/// or none comes within `RECOVERY_TIMEOUT`.
fn wait_for_ack(
    log: &Path,
    agent: &mut AgentProcess,
    server: &ServerProcess,
    wanted: impl Fn(&Ack) -> bool,
) -> Ack {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    loop {
        if let Some(ack) = read_acks(log).into_iter().find(&wanted) {
            return ack;
        }
        if let Some(status) = agent.try_wait() {
            panic!(
                "the agent exited ({status}) instead of replicating: {}",
                agent.stderr.lock().unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no acknowledged commit within {RECOVERY_TIMEOUT:?}\nagent: {}\nserver: {}",
            agent.stderr.lock().unwrap(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Nearest-rank percentile of `values` (sorted here), in seconds.
fn percentile(values: &[u64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1] as f64 / 1000.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Server,
    Agent,
}

/// A kill whose recovery (the first ack after the restart) is awaited.
#[derive(Debug)]
struct Pending {
    kill: u64,
    victim: Victim,
    killed_unix_ms: u64,
    ready_unix_ms: u64,
    acknowledged_epoch: u64,
    /// Servers killed during their start-up between the kill and the restart.
    startup_kills: u64,
}

/// What the loop has checked and measured so far.
#[derive(Debug, Default)]
struct Checks {
    /// Roots exported and found whole.
    verified: HashSet<String>,
    failures: Vec<String>,
    cli_exports: u64,
    server_recovery_ms: Vec<u64>,
    agent_recovery_ms: Vec<u64>,
    /// Kills followed by another before they recovered.
    interrupted: u64,
    server_kills: u64,
    /// Servers killed during their start-up, and how many of them had
    /// printed their listening line by then.
    startup_kills: u64,
    startup_kills_listened: u64,
    /// Server kills followed by two start-up kills.
    startup_kills_twice: u64,
    /// Torn pack tails the killed start-ups logged cutting.
    startup_torn_tails: u64,
    /// Recovery of server kills followed by start-up kills.
    startup_recovery_ms: Vec<u64>,
}

impl Checks {
    fn recovered(&mut self, kill: &Pending, ack: &Ack) {
        let recovery_ms = ack.unix_ms.saturating_sub(kill.killed_unix_ms);
        match kill.victim {
            Victim::Server => self.server_recovery_ms.push(recovery_ms),
            Victim::Agent => self.agent_recovery_ms.push(recovery_ms),
        }
        if kill.startup_kills > 0 {
            self.startup_recovery_ms.push(recovery_ms);
        }
        eprintln!(
            "kill {}: {:?} (+{} start-up kills); recovered in {recovery_ms} ms at epoch {} (acknowledged before: {})",
            kill.kill, kill.victim, kill.startup_kills, ack.epoch, kill.acknowledged_epoch
        );
    }

    /// Kills a server during its start-up `after` the spawn; a start that
    /// failed by itself is a failure.
    fn startup_kill(&mut self, rig: &Rig, kill: u64, after: Duration) {
        let outcome = rig.kill_server_during_startup(after);
        self.startup_kills += 1;
        self.startup_kills_listened += u64::from(outcome.listened);
        let torn = outcome.log.matches("dropping torn tail").count() as u64;
        self.startup_torn_tails += torn;
        eprintln!(
            "kill {kill}: start-up killed after {:.1} ms ({}{})",
            after.as_secs_f64() * 1000.0,
            if outcome.listened {
                "listening"
            } else {
                "before listening"
            },
            if torn > 0 { ", cut a torn tail" } else { "" }
        );
        if let Some(status) = outcome.exited {
            self.failures.push(format!(
                "kill {kill}: a server starting after a kill exited by itself ({status}): {}",
                outcome.log
            ));
        }
    }

    /// Fails the test with every failure so far, naming the seed to replay.
    fn assert_none_lost(&self, seed: u64) {
        assert!(
            self.failures.is_empty(),
            "seed {seed:#x}: acknowledged commits lost:\n{}",
            self.failures.join("\n")
        );
    }

    /// Waits for the first acknowledgement after the restart of `previous`
    /// was ready, checks it, and exports every root acknowledged since.
    fn after_recovery(
        &mut self,
        previous: &Pending,
        agent: &mut AgentProcess,
        server: &ServerProcess,
        rig: &Rig,
        store: &blockrep_store::Store,
        rng: &mut SplitMix64,
    ) {
        let recovered = wait_for_ack(&rig.ack_log(), agent, server, |a| {
            a.unix_ms > previous.ready_unix_ms
        });
        self.recovered(previous, &recovered);
        self.exports(rig, store, rng, previous.kill, &recovered);
    }

    /// Every root acknowledged since the last check, exported with the store
    /// library and re-hashed; then through the CLI, `newest` and one older root
    /// at random.
    fn exports(
        &mut self,
        rig: &Rig,
        store: &blockrep_store::Store,
        rng: &mut SplitMix64,
        kill: u64,
        newest: &Ack,
    ) {
        let acks = read_acks(&rig.ack_log());
        let new: Vec<String> = acks
            .iter()
            .map(|a| a.root.clone())
            .filter(|root| self.verified.insert(root.clone()))
            .collect();
        for failure in export_with_store(store, &new, &rig.scratch()) {
            self.failures.push(format!("kill {kill}: {failure}"));
        }
        let older = &acks[rng.below(acks.len() as u64) as usize];
        for root in [&newest.root, &older.root] {
            self.cli_exports += 1;
            if let Err(failure) = rig.export_with_cli(root) {
                self.failures.push(format!("kill {kill}: {failure}"));
            }
        }
    }
}

#[test]
fn acknowledged_commits_survive_sigkill_of_server_and_agent() {
    let kills = env_u64("BLOCKREP_KILL_LOOP").unwrap_or(30);
    let seed = env_u64("BLOCKREP_KILL_SEED").unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        nanos.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    eprintln!("kill loop: {kills} kills, seed {seed:#x} (BLOCKREP_KILL_SEED={seed:#x} repeats it)");
    let mut rng = SplitMix64::new(seed);

    let mut rig = Rig {
        pki: Pki::new(&[SOURCE]),
        work: tempfile::tempdir().unwrap(),
        // Below the ephemeral range: the agent reconnects while the server
        // is down, and must never be given this port as its own.
        listen: closed_addr().to_string(),
    };
    // Every block stamped once: a disk with content, compressible like the writes.
    let image: Vec<u8> = (0..DISK_BYTES / BLOCK_BYTES)
        .flat_map(|index| stamped_block(index, 0))
        .collect();
    std::fs::write(rig.disk(), image).unwrap();
    let mut server = rig.start_server();
    eprintln!(
        "server started in {:.1} ms",
        server.started_in.as_secs_f64() * 1000.0
    );
    // Restarted servers listen where the agent expects its server.
    rig.listen = server.addr.to_string();
    let mut agent = rig.start_agent();
    let log = rig.ack_log();
    let first = wait_for_ack(&log, &mut agent, &server, |_| true);
    eprintln!(
        "initial sync acknowledged: epoch {} root {}",
        first.epoch, first.root
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(rig.disk(), rng.next_u64(), Arc::clone(&stop));

    let store = blockrep_store::Store::open_read_only(&rig.data()).unwrap();
    let mut checks = Checks::default();
    let mut pending: Option<Pending> = None;
    for kill in 1..=kills {
        // One kill in four lands soon after the previous restart, often before
        // it has recovered (the agent backing off, reconnecting, handshaking
        // or scanning); the others at a random moment of steady replication.
        let early = pending.is_some() && rng.below(4) == 0;
        if early {
            std::thread::sleep(Duration::from_millis(
                rng.below(EARLY_KILL_DELAY_MAX_MS + 1),
            ));
            if let Some(previous) = pending.take() {
                match read_acks(&log)
                    .into_iter()
                    .find(|a| a.unix_ms > previous.ready_unix_ms)
                {
                    Some(recovered) => checks.recovered(&previous, &recovered),
                    None => {
                        checks.interrupted += 1;
                        eprintln!(
                            "kill {}/{kills}: {:?}; killed again before it recovered",
                            previous.kill, previous.victim
                        );
                    }
                }
            }
        } else {
            if let Some(previous) = pending.take() {
                checks.after_recovery(&previous, &mut agent, &server, &rig, &store, &mut rng);
                checks.assert_none_lost(seed);
            }
            std::thread::sleep(Duration::from_millis(rng.below(KILL_DELAY_MAX_MS + 1)));
        }
        let victim = if rng.below(2) == 0 {
            Victim::Server
        } else {
            Victim::Agent
        };
        let before = read_acks(&log);
        let acknowledged_epoch = before.iter().map(|a| a.epoch).max().unwrap_or(0);
        let killed_unix_ms = now_unix_ms();
        // After `ready_unix_ms`, an ack can only come from the processes started
        // below: the old agent is dead, or the old server is and the agent's
        // acks are answers of the new one.
        let ready_unix_ms;
        let mut startup_kills = 0;
        match victim {
            Victim::Server => {
                // Start-up kills land at a random moment up to half as long
                // again as the last start took: opening the store, or around
                // the moment the server listens.
                let span_us = server.started_in.as_micros() as u64 * 3 / 2;
                server.kill();
                if rng.below(STARTUP_KILL_ONE_IN) == 0 {
                    startup_kills = 1 + rng.below(2);
                }
                for _ in 0..startup_kills {
                    let after = Duration::from_micros(rng.below(span_us + 1));
                    checks.startup_kill(&rig, kill, after);
                }
                if startup_kills == 2 {
                    checks.startup_kills_twice += 1;
                }
                server = rig.start_server();
                ready_unix_ms = now_unix_ms();
                eprintln!(
                    "kill {kill}: server started in {:.1} ms",
                    server.started_in.as_secs_f64() * 1000.0
                );
                // The restarted server's head is at least every epoch it acknowledged.
                let view = admin_source(server.admin_addr.unwrap(), SOURCE)
                    .expect("the restarted server knows the source");
                let last = before.iter().rev().find(|a| a.epoch == view.epoch);
                if view.epoch < acknowledged_epoch {
                    checks.failures.push(format!(
                        "kill {kill}: server restarted at epoch {}, epoch {acknowledged_epoch} was acknowledged",
                        view.epoch
                    ));
                } else if let Some(last) = last
                    && view.root.as_deref() != Some(last.root.as_str())
                {
                    checks.failures.push(format!(
                        "kill {kill}: server restarted at epoch {} root {:?}, acknowledged root {}",
                        view.epoch, view.root, last.root
                    ));
                }
            }
            Victim::Agent => {
                let _ = agent.child.kill();
                let _ = agent.wait();
                ready_unix_ms = now_unix_ms();
                agent = rig.start_agent();
            }
        }
        if victim == Victim::Server {
            checks.server_kills += 1;
        }
        pending = Some(Pending {
            kill,
            victim,
            killed_unix_ms,
            ready_unix_ms,
            acknowledged_epoch,
            startup_kills,
        });
    }
    if let Some(previous) = pending.take() {
        checks.after_recovery(&previous, &mut agent, &server, &rig, &store, &mut rng);
    }
    checks.assert_none_lost(seed);

    // Stop writing; the replica must then come to equal the disk.
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let stopped_unix_ms = now_unix_ms();
    let expected = disk_root(&rig.disk(), CHUNK);
    let converged = wait_for_ack(&log, &mut agent, &server, |a| {
        a.unix_ms > stopped_unix_ms && a.complete && a.root == expected
    });
    eprintln!("converged at epoch {}", converged.epoch);
    let head = rig.work.path().join("head.raw");
    assert_success(&export(&rig.data(), SOURCE, &head));
    let replica_equals_disk = std::fs::read(&head).unwrap() == std::fs::read(rig.disk()).unwrap();
    assert!(
        replica_equals_disk,
        "seed {seed:#x}: the exported head differs from the disk"
    );

    // At the end, every root ever acknowledged, and the order of the log.
    let acks = read_acks(&log);
    let mut all: Vec<String> = acks.iter().map(|a| a.root.clone()).collect();
    all.sort();
    all.dedup();
    let mut lost = export_with_store(&store, &all, &rig.scratch());
    lost.extend(ordering_violations(&acks));
    assert!(
        lost.is_empty(),
        "seed {seed:#x}: acknowledged commits lost:\n{}",
        lost.join("\n")
    );

    let Checks {
        server_recovery_ms,
        agent_recovery_ms,
        cli_exports,
        interrupted,
        server_kills,
        startup_kills,
        startup_kills_listened,
        startup_kills_twice,
        startup_torn_tails,
        startup_recovery_ms,
        ..
    } = checks;
    let all_recovery: Vec<u64> = server_recovery_ms
        .iter()
        .chain(&agent_recovery_ms)
        .copied()
        .collect();
    println!(
        "kill loop: {kills} kills ({server_kills} server, {} agent; {interrupted} before the previous kill recovered), \
         startup kills {startup_kills} ({} before listening, {startup_kills_listened} listening; {startup_kills_twice} twice in a row; \
         {startup_torn_tails} torn tails cut; recovery p50 {:.2} s p99 {:.2} s), \
         acknowledged commits {} ({} distinct roots, all exported; {cli_exports} exports through the CLI), lost {}; \
         recovery p50 {:.2} s p99 {:.2} s (server kills p50 {:.2} s p99 {:.2} s, agent kills p50 {:.2} s p99 {:.2} s); \
         {writes} writes; converged: {}; seed {seed:#x}",
        kills - server_kills,
        startup_kills - startup_kills_listened,
        percentile(&startup_recovery_ms, 50.0),
        percentile(&startup_recovery_ms, 99.0),
        acks.len(),
        all.len(),
        lost.len(),
        percentile(&all_recovery, 50.0),
        percentile(&all_recovery, 99.0),
        percentile(&server_recovery_ms, 50.0),
        percentile(&server_recovery_ms, 99.0),
        percentile(&agent_recovery_ms, 50.0),
        percentile(&agent_recovery_ms, 99.0),
        if replica_equals_disk { "yes" } else { "no" },
    );
}

#[test]
fn export_root_refuses_unknown_and_malformed_roots() {
    let pki = Pki::new(&[SOURCE]);
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    std::fs::write(&disk, stamped_block(3, 1).repeat(64)).unwrap();
    let data = work.path().join("data");
    let server = ServerProcess::start_with(&bin(), &data, pki.path(), &SERVER_FLAGS);
    let log = work.path().join("acks.log");
    let first = agent_once(
        &disk,
        server.addr,
        SOURCE,
        pki.path(),
        &["--ack-log", log.to_str().unwrap()],
    );
    assert_success(&first);
    // A second epoch moves the head on; the first root stays exportable.
    write_at(&disk, 0, &stamped_block(0, 2));
    assert_success(&agent_once(
        &disk,
        server.addr,
        SOURCE,
        pki.path(),
        &["--ack-log", log.to_str().unwrap()],
    ));
    let acks = read_acks(&log);
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert!(acks.iter().all(|a| a.complete) && acks[1].epoch == acks[0].epoch + 1);
    assert_ne!(acks[0].root, acks[1].root);

    let out = work.path().join("out.raw");
    let export_root = |root: &str| {
        Command::new(BIN)
            .args(["export", "--data"])
            .arg(&data)
            .args(["--root", root, "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let old = export_root(&acks[0].root);
    assert_success(&old);
    assert!(stdout(&old).contains(&acks[0].root), "{}", stdout(&old));
    std::fs::remove_file(&out).unwrap();

    let unknown = ChunkId::from(blake3::hash(b"no such root")).to_hex();
    let refused = export_root(&unknown);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains(&format!("root {unknown} is not in the store")),
        "{}",
        stderr(&refused)
    );
    assert!(!out.exists(), "a refused export left a file");

    let malformed = export_root("abc");
    assert!(!malformed.status.success());
    assert!(
        stderr(&malformed).contains("is not a root id (64 hex digits)"),
        "{}",
        stderr(&malformed)
    );
}

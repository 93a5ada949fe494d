//! Network faults between a real agent and a real server, over real mutual TLS:
//! an in-process proxy (`blockrep_testkit::proxy`) adds latency with jitter, a
//! bandwidth limit, a reset at a random byte, a silent black hole, or tiny
//! segments. Under each the replica must converge, and the chunk data the
//! server receives must stay within the changed bytes plus one in-flight window.
//!
//! `cargo test --test net_faults -- --nocapture` prints one line per fault and
//! a summary table (the figures in docs/reliability.md).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::*;
use blockrep_testkit::{
    BlackHoleFault, DirectionFaults, FaultConfig, FaultProxy, ResetFault, Which, random_bytes,
    write_at,
};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;
/// Each fault's disk: 384 chunks of random (incompressible) data.
const DISK_BYTES: u64 = 24 * MIB;
/// Chunks rewritten after the initial sync: every third one, 8 MiB in all
/// (fewer on the slowest link, to keep the test short).
const DIRTY_CHUNKS: u64 = 128;
/// The agent's `--commit-every`: an intermediate commit after this many bytes
/// of frames. The agent then waits for `Committed` before sending more, so it
/// never has more than this (plus the one frame that crossed the mark) written
/// and unacknowledged: that is its in-flight window here. Its other buffers
/// (16 MiB of encoded frames, the 256 KiB write buffer) hold data not yet
/// acknowledged too, but all of it lies within the step being sent.
const COMMIT_EVERY: u64 = 2 * MIB;
/// The agent's `--io-timeout`: short, so that it notices the black hole within
/// seconds and reconnects. A wait for `Committed` starts when the step's last
/// byte enters the socket, not when it is delivered, and on the slowest links
/// here draining a step from the buffers on the way (the proxy alone queues
/// 4 MiB) takes longer than this: only the server's `Progress` frames, sent
/// while the step arrives, keep the agent from taking a live path for dead.
const AGENT_IO_TIMEOUT: &str = "3s";
/// The slow link: a commit step waits in the buffers for twice the agent's
/// I/O time-out before the last of it arrives.
const SLOW_LINK_BYTES_PER_SECOND: u64 = 256 * 1024;
/// Chunks rewritten for the slow link: 1.5 MiB, six seconds through it.
const SLOW_LINK_DIRTY_CHUNKS: u64 = 24;
/// The server's `--idle-timeout` stays much longer than the agent's, as in the
/// defaults (5 min against 60 s): the reconnecting agent meets its old session
/// still holding the source, and must not have to wait for this to run out...
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// ...because the server's `--supersede-after` lets a new session replace one
/// that has been silent this long.
const SERVER_SUPERSEDE_AFTER: &str = "1s";

struct Fault {
    name: &'static str,
    config: FaultConfig,
    /// The fault must have cut a connection (and the agent reconnected).
    breaks_connection: bool,
    /// The server's session must have been superseded (it never learns that a
    /// black-holed connection is dead before its idle time-out).
    supersedes: bool,
    /// Chunks rewritten after the initial sync.
    dirty_chunks: u64,
}

struct Figures {
    name: &'static str,
    dirty_bytes: u64,
    catch_up: Duration,
    received_bytes: u64,
    ratio: f64,
    bound: f64,
    connections: u64,
    references: u64,
}

impl Figures {
    /// One row of the summary table (also printed as each fault finishes).
    fn row(&self) -> String {
        let mib = |bytes: u64| bytes as f64 / MIB as f64;
        format!(
            "| {} | {:.1} MiB | {:.2} s | {:.1} MiB | {:.3} | {:.2} | {} | {} |",
            self.name,
            mib(self.dirty_bytes),
            self.catch_up.as_secs_f64(),
            mib(self.received_bytes),
            self.ratio,
            self.bound,
            self.connections,
            self.references
        )
    }
}

/// The summary table's header: what [`Figures::row`] prints under.
const TABLE_HEADER: &str = "| fault | dirty | catch-up | received | resend ratio | bound | connections | references |\n|---|---|---|---|---|---|---|---|";

fn faults() -> Vec<Fault> {
    let none = DirectionFaults::default();
    let latency = DirectionFaults {
        latency: Duration::from_millis(30),
        jitter: Duration::from_millis(20),
        ..none
    };
    let tiny = DirectionFaults {
        tiny_segments: true,
        ..none
    };
    vec![
        Fault {
            name: "latency 30ms+-20ms",
            config: FaultConfig {
                seed: 1,
                upstream: latency,
                downstream: latency,
                ..FaultConfig::default()
            },
            breaks_connection: false,
            supersedes: false,
            dirty_chunks: DIRTY_CHUNKS,
        },
        Fault {
            name: "bandwidth 8MiB/s",
            config: FaultConfig {
                seed: 2,
                upstream: DirectionFaults {
                    bytes_per_second: Some(8 * MIB),
                    ..none
                },
                ..FaultConfig::default()
            },
            breaks_connection: false,
            supersedes: false,
            dirty_chunks: DIRTY_CHUNKS,
        },
        Fault {
            name: "reset@random",
            config: FaultConfig {
                seed: 3,
                reset: Some(ResetFault {
                    after_bytes_min: MIB,
                    after_bytes_max: 7 * MIB,
                    which: Which::First,
                }),
                ..FaultConfig::default()
            },
            breaks_connection: true,
            supersedes: false,
            dirty_chunks: DIRTY_CHUNKS,
        },
        Fault {
            name: "black-hole@3MiB",
            config: FaultConfig {
                seed: 4,
                black_hole: Some(BlackHoleFault {
                    after_bytes: Some(3 * MIB),
                    after: None,
                    which: Which::First,
                }),
                ..FaultConfig::default()
            },
            breaks_connection: true,
            supersedes: true,
            dirty_chunks: DIRTY_CHUNKS,
        },
        Fault {
            name: "slow link 256KiB/s",
            config: FaultConfig {
                seed: 6,
                upstream: DirectionFaults {
                    bytes_per_second: Some(SLOW_LINK_BYTES_PER_SECOND),
                    ..none
                },
                ..FaultConfig::default()
            },
            breaks_connection: false,
            supersedes: false,
            dirty_chunks: SLOW_LINK_DIRTY_CHUNKS,
        },
        Fault {
            name: "tiny segments 1-7B",
            config: FaultConfig {
                seed: 5,
                upstream: tiny,
                downstream: tiny,
                ..FaultConfig::default()
            },
            breaks_connection: false,
            supersedes: false,
            dirty_chunks: DIRTY_CHUNKS,
        },
    ]
}

/// `blockrep_chunk_bytes_arrived_total` from the server's `/metrics`.
fn chunk_bytes_arrived(admin: std::net::SocketAddr) -> u64 {
    let (code, body) = admin_request(admin, "GET", "/metrics", None);
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix("blockrep_chunk_bytes_arrived_total "))
        .unwrap_or_else(|| panic!("no blockrep_chunk_bytes_arrived_total in {body}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn replica_converges_under_each_network_fault_and_resends_at_most_one_window() {
    let faults = faults();
    let sources: Vec<String> = (0..faults.len()).map(|i| format!("nf-{i}")).collect();
    let source_refs: Vec<&str> = sources.iter().map(String::as_str).collect();
    let rig = rig(
        &source_refs,
        &[
            "--idle-timeout",
            &format!("{}s", SERVER_IDLE_TIMEOUT.as_secs()),
            "--supersede-after",
            SERVER_SUPERSEDE_AFTER,
            "--retention",
            "off",
            "--gc-interval",
            "off",
        ],
    );
    let (pki, work, server) = (&rig.pki, &rig.work, &rig.server);
    let data = work.path().join("data");
    let admin = server.admin_addr.unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let commit_every = COMMIT_EVERY.to_string();
    let window = COMMIT_EVERY + CHUNK + blockrep_proto::CHUNK_HEADER_LEN as u64;
    let mut table = Vec::new();

    for (i, fault) in faults.iter().enumerate() {
        let source = sources[i].as_str();
        let disk = work.path().join(format!("{source}.raw"));
        // A seed per fault: no chunk of one fault's disk is already held by the
        // server from another's, so nothing travels as a reference by accident.
        std::fs::write(&disk, random_bytes(DISK_BYTES as usize, 100 + i as u64)).unwrap();
        // The initial sync takes the clean path: the fault is for the catch-up.
        assert_success(&agent_once(
            &disk,
            server.addr,
            source,
            pki.path(),
            &["--compress", "none"],
        ));
        for k in 0..fault.dirty_chunks {
            let data = random_bytes(CHUNK as usize, 10_000 * (i as u64 + 1) + k);
            write_at(&disk, k * 3 * CHUNK, &data);
        }
        let dirty_bytes = fault.dirty_chunks * CHUNK;
        let expected = disk_root(&disk, CHUNK as u32);
        let arrived_before = chunk_bytes_arrived(admin);

        let proxy = runtime
            .block_on(FaultProxy::start(server.addr, fault.config.clone()))
            .unwrap();
        let started = Instant::now();
        let mut agent = spawn_agent(
            &disk,
            proxy.addr(),
            source,
            pki.path(),
            &[
                "--compress",
                "none",
                "--interval",
                "200ms",
                "--commit-every",
                &commit_every,
                "--io-timeout",
                AGENT_IO_TIMEOUT,
            ],
        );
        let converged = wait_until(Duration::from_secs(60), || {
            admin_source(admin, source).and_then(|v| v.root).as_deref() == Some(expected.as_str())
        });
        let catch_up = started.elapsed();
        assert!(
            converged,
            "{}: replica did not converge within 60 s; agent stderr:\n{}\nserver log:\n{}",
            fault.name,
            agent.stderr.lock().unwrap(),
            server.log()
        );
        let received_bytes = chunk_bytes_arrived(admin) - arrived_before;
        let connections = proxy.stats().connections();
        // The fault fired, once: a reconnect for any other reason would not do.
        if fault.config.reset.is_some() {
            assert_eq!(proxy.stats().resets(), 1, "{}", fault.name);
        }
        if fault.config.black_hole.is_some() {
            assert_eq!(proxy.stats().black_holes(), 1, "{}", fault.name);
        }
        assert!(
            agent.try_wait().is_none(),
            "{}: the agent exited: {}",
            fault.name,
            agent.stderr.lock().unwrap()
        );
        agent.child.kill().unwrap();
        agent.wait();
        let agent_log = agent.stderr.lock().unwrap().clone();
        // Chunks sent as references: after a broken connection, those the
        // server had already received (and kept) when the agent offered again.
        let references = agent.sum("ref_chunks_sent");
        drop(proxy);

        let out = work.path().join(format!("{source}.export"));
        assert_success(&export(&data, source, &out));
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap(),
            "{}: the export differs from the disk",
            fault.name
        );
        for line in agent_log.lines().filter(|l| l.contains("interrupted")) {
            println!("  {}: {}", fault.name, line.trim());
        }
        if fault.breaks_connection {
            assert!(
                connections >= 2 && agent_log.contains("reconnecting"),
                "{}: the fault did not break a connection ({connections} connections); agent log:\n{agent_log}",
                fault.name
            );
        } else {
            // A slow path that still delivers must not be taken for a dead one.
            assert_eq!(
                connections, 1,
                "{}: the agent reconnected on a live path; agent log:\n{agent_log}",
                fault.name
            );
        }
        if fault.supersedes {
            assert!(
                catch_up < SERVER_IDLE_TIMEOUT
                    && server
                        .log()
                        .contains("superseding the session of this source"),
                "{}: the reconnecting agent waited for the old session's idle time-out ({catch_up:?}); server log:\n{}",
                fault.name,
                server.log()
            );
        }
        let ratio = received_bytes as f64 / dirty_bytes as f64;
        let bound = (dirty_bytes + window) as f64 / dirty_bytes as f64;
        let figures = Figures {
            name: fault.name,
            dirty_bytes,
            catch_up,
            received_bytes,
            ratio,
            bound,
            connections,
            references,
        };
        println!("net fault {}", figures.row());
        assert!(
            received_bytes >= dirty_bytes,
            "{}: the server received {received_bytes} bytes of chunk data for {dirty_bytes} changed",
            fault.name
        );
        assert!(
            ratio <= bound,
            "{}: resend ratio {ratio:.3} over the bound {bound:.3} (window {window} bytes); agent log:\n{agent_log}",
            fault.name
        );
        table.push(figures);
    }

    println!();
    println!("{TABLE_HEADER}");
    for figures in &table {
        println!("{}", figures.row());
    }
}

//! Machines of several disks on the server: a three-volume machine committed
//! to a store (one volume not a chunk multiple, one sparse) is snapshotted and
//! launched through the admin API, each volume is served over NBD as
//! `LAUNCH/VOLUME` to real clients (nbdinfo, nbdcopy, qemu-io), and `export`
//! writes one volume or all of them.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use blockrep_core::{Geometry, MachineRoot, Root, SourceId, VolumeName, scan_buffer};
use blockrep_store::Store;
use blockrep_testkit::{Pki, mixed_image, random_bytes};

pub(crate) const MIB: usize = 1 << 20;
const CHUNK: u32 = 64 * 1024;

/// The three disks: `boot` (mixed data, a chunk multiple), `data` (random,
/// not a chunk multiple), `log` (sparse: two short runs of data).
pub(crate) fn three_disks() -> Vec<(&'static str, Vec<u8>)> {
    let mut log = vec![0u8; 6 * MIB];
    log[MIB..MIB + 5000].copy_from_slice(&random_bytes(5000, 3));
    log[5 * MIB + 77..5 * MIB + 4173].copy_from_slice(&random_bytes(4096, 4));
    vec![
        ("boot", mixed_image(4 * MIB, 1)),
        ("data", random_bytes(3 * MIB + 12_345, 2)),
        ("log", log),
    ]
}

/// Commits the disks as epoch 1 of `source`, one machine, as a server does.
fn commit_machine(data: &Path, source: &str, disks: &[(&str, Vec<u8>)]) {
    let store = Store::open(data).unwrap();
    let source = SourceId::new(source).unwrap();
    blockrep_testkit::store::commit_machine(&store, &source, 1, CHUNK, disks);
}

#[test]
fn a_machines_launch_serves_each_volume_over_nbd() {
    if !(have_tool("nbdinfo") && have_tool("nbdcopy") && have_tool("qemu-io")) {
        return;
    }
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut disks = three_disks();
    commit_machine(&data, "web", &disks);
    let server = nbd_server(&pki, &data);
    let snapshot = create_snapshot(&server, "web", "s1");
    assert_eq!(snapshot.consistency, "crash-consistent");
    let launch = create_launch(&server, "web", &snapshot.name, "drill");
    // One export per volume, and none for the launch as a whole.
    assert_eq!(launch.nbd_uri, None);
    let names: Vec<&str> = launch.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["boot", "data", "log"]);
    let nbd = server.nbd_addr.unwrap();
    let list = run_tool("nbdinfo", &["--list", &format!("nbd://{nbd}")]);
    for name in ["drill/boot", "drill/data", "drill/log"] {
        assert!(list.contains(name), "{name} not listed: {list}");
    }

    // Every volume reads back as its disk.
    for (volume, (name, disk)) in launch.volumes.iter().zip(&disks) {
        let uri = volume.nbd_uri.clone().unwrap();
        assert_eq!(uri, format!("nbd://{nbd}/drill/{name}"));
        let size = run_tool("nbdinfo", &["--size", &uri]);
        assert_eq!(size.trim(), disk.len().to_string());
        let copy = work.path().join(format!("{name}.copy"));
        run_tool("nbdcopy", &[&uri, copy.to_str().unwrap()]);
        assert!(
            std::fs::read(&copy).unwrap() == *disk,
            "volume {name} differs"
        );
    }

    // A write to one volume (flushed) changes that volume only.
    let uri = launch.volumes[2].nbd_uri.clone().unwrap();
    let qemu = run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 2M 64k",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(qemu.contains("wrote 65536"), "{qemu}");
    disks[2].1[2 * MIB..2 * MIB + 65536].fill(0x5a);
    for (volume, (name, disk)) in launch.volumes.iter().zip(&disks) {
        assert_export_is(volume, &work.path().join(format!("{name}.after")), disk);
    }
    // The CLI lists each volume's export under the launch.
    let output = cli(&server, &pki, &["launch", "list"]);
    assert_success(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    for volume in &launch.volumes {
        let uri = volume.nbd_uri.as_deref().unwrap();
        assert!(table.contains(uri), "{uri} not in {table}");
    }
    // A machine's launch has no export of its own name.
    let whole = std::process::Command::new("nbdinfo")
        .arg(format!("nbd://{nbd}/drill"))
        .output()
        .unwrap();
    assert!(!whole.status.success(), "the launch as a whole was served");
}

#[test]
fn export_writes_one_volume_or_every_volume_of_a_machine() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disks = three_disks();
    commit_machine(&data, "web", &disks);
    let data_arg = data.to_str().unwrap();

    let one = work.path().join("data.raw");
    assert_success(
        &std::process::Command::new(bin())
            .args([
                "export", "--data", data_arg, "--source", "web", "--volume", "data", "--out",
            ])
            .arg(&one)
            .output()
            .unwrap(),
    );
    assert!(std::fs::read(&one).unwrap() == disks[1].1);

    let all = work.path().join("all");
    assert_success(
        &std::process::Command::new(bin())
            .args(["export", "--data", data_arg, "--source", "web", "--out"])
            .arg(&all)
            .output()
            .unwrap(),
    );
    for (name, disk) in &disks {
        let image = all.join(format!("{name}.raw"));
        assert!(
            std::fs::read(&image).unwrap() == *disk,
            "{name}.raw differs"
        );
    }

    // An unknown volume is refused with the ones there are, and writes nothing.
    let missing = work.path().join("swap.raw");
    let output = std::process::Command::new(bin())
        .args([
            "export", "--data", data_arg, "--source", "web", "--volume", "swap", "--out",
        ])
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("boot, data, log"), "{stderr}");
    assert!(!missing.exists());
    // Several volumes into a file that exists is refused.
    let output = std::process::Command::new(bin())
        .args(["export", "--data", data_arg, "--source", "web", "--out"])
        .arg(&one)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("must be a directory"), "{stderr}");
    assert!(
        std::fs::read(&one).unwrap() == disks[1].1,
        "the file was touched"
    );
}

#[test]
fn a_one_disk_agent_cannot_continue_a_machine_and_leaves_it_whole() {
    let pki = Pki::new(&["web"]);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let disks = three_disks();
    commit_machine(&data, "web", &disks);
    let head_before = Store::open_read_only(&data)
        .unwrap()
        .head(&SourceId::new("web").unwrap())
        .unwrap()
        .unwrap();
    let server = nbd_server(&pki, &data);
    let disk = work.path().join("boot.raw");
    std::fs::write(&disk, &disks[0].1).unwrap();
    let output = agent_once(&disk, server.addr, "web", pki.path(), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a one-disk epoch was accepted");
    assert!(
        stderr.contains("machine of 3 volumes (boot, data, log)"),
        "{stderr}"
    );
    drop(server);
    let head_after = Store::open_read_only(&data)
        .unwrap()
        .head(&SourceId::new("web").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(head_after, head_before);
}

/// A machine's session opened by hand: `MachineHello` for `disks`, then the
/// `MachineWelcome` and one `VolumeHead` per volume; the client, the head
/// epoch and each volume's head root (empty: none).
async fn machine_session(
    server: &blockrep_testkit::ServerProcess,
    pki: &Pki,
    disks: &[(&str, Vec<u8>)],
) -> (blockrep_testkit::RawClient, u64, Vec<bytes::Bytes>) {
    use blockrep_proto::Message;
    use blockrep_testkit::raw::next;
    let (mut client, first) = open_machine_session_when_free(server, pki, disks).await;
    let head_epoch = match first {
        Some(Message::MachineWelcome { head_epoch, .. }) => head_epoch,
        other => panic!("no MachineWelcome: {other:?}; log: {}", server.log()),
    };
    let mut roots = Vec::new();
    for expected in 0..disks.len() as u16 {
        match next(&mut client).await {
            Some(Message::VolumeHead { index, root }) if index == expected => roots.push(root),
            other => panic!("no VolumeHead {expected}: {other:?}"),
        }
    }
    (client, head_epoch, roots)
}

/// Sends one machine epoch by hand: after each volume's `SelectVolume`, the
/// chunks that differ from `before` (every non-zero chunk without it), then
/// the `Commit` of the machine root. Returns that root.
async fn send_machine_epoch(
    client: &mut blockrep_testkit::RawClient,
    epoch: u64,
    disks: &[(&str, Vec<u8>)],
    before: Option<&[(&str, Vec<u8>)]>,
) -> blockrep_core::ChunkId {
    use blockrep_proto::{Codec, Message};
    let mut roots = Vec::new();
    for (volume, (name, disk)) in disks.iter().enumerate() {
        client
            .send(&Message::SelectVolume {
                index: volume as u16,
            })
            .await
            .unwrap();
        let geometry = Geometry::new(disk.len() as u64, CHUNK).unwrap();
        let ids = scan_buffer(disk, geometry);
        let old = before.map(|b| scan_buffer(&b[volume].1, geometry));
        for (index, id) in ids.iter().enumerate() {
            let changed = old.as_ref().map_or(!id.is_zero(), |old| old[index] != *id);
            if !changed {
                continue;
            }
            let range = geometry.chunk_range(index as u64).unwrap();
            let (codec, data) = if id.is_zero() {
                (Codec::Zero, bytes::Bytes::new())
            } else {
                (
                    Codec::Raw,
                    bytes::Bytes::copy_from_slice(&disk[range.clone()]),
                )
            };
            client
                .send(&Message::Chunk {
                    index: index as u64,
                    id: *id,
                    codec,
                    raw_len: range.len() as u32,
                    data,
                })
                .await
                .unwrap();
        }
        roots.push((
            VolumeName::new(name).unwrap(),
            Root::from_chunk_ids(geometry, &ids).id(),
        ));
    }
    let machine = MachineRoot::new(roots).unwrap().id();
    client.send(&complete_commit(epoch, machine)).await.unwrap();
    machine
}

/// The `Committed` (past `Progress` beats) of `epoch`, naming `root`.
async fn expect_machine_committed(
    client: &mut blockrep_testkit::RawClient,
    epoch: u64,
    root: blockrep_core::ChunkId,
) {
    match blockrep_testkit::raw::next(client).await {
        Some(blockrep_proto::Message::Committed {
            epoch: got,
            root: got_root,
            ..
        }) => assert_eq!((got, got_root), (epoch, root)),
        other => panic!("expected Committed of epoch {epoch}, got {other:?}"),
    }
}

/// The `Error` the server ends a session with.
async fn expect_refusal(client: &mut blockrep_testkit::RawClient) -> String {
    match blockrep_testkit::raw::next(client).await {
        Some(blockrep_proto::Message::Error { message, .. }) => message,
        other => panic!("expected an Error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_session_commits_every_volume_at_once_and_goes_on_from_its_head() {
    let rig = nbd_rig(&["web"]);
    let mut disks = three_disks();
    let (mut client, head_epoch, roots) = machine_session(&rig.server, &rig.pki, &disks).await;
    assert_eq!(head_epoch, 0);
    assert!(roots.iter().all(bytes::Bytes::is_empty));
    let first = send_machine_epoch(&mut client, 1, &disks, None).await;
    expect_machine_committed(&mut client, 1, first).await;

    // The next epoch changes two volumes; `boot` is left alone.
    let before = disks.clone();
    disks[1].1[100_000..100_100].fill(7);
    disks[2].1[..8192].fill(9);
    disks[2].1[MIB..MIB + 5000].fill(0);
    let second = send_machine_epoch(&mut client, 2, &disks, Some(&before)).await;
    expect_machine_committed(&mut client, 2, second).await;
    // An epoch that changed nothing is acknowledged as the head again.
    let again = send_machine_epoch(&mut client, 2, &disks, Some(&disks)).await;
    assert_eq!(again, second);
    expect_machine_committed(&mut client, 2, second).await;
    // A commit whose root the chunks do not give is refused, nothing committed.
    client.send(&complete_commit(3, first)).await.unwrap();
    let refused = expect_refusal(&mut client).await;
    assert!(refused.contains("machine root"), "{refused}");
    drop(client);

    // A new session starts from the head: every volume's root.
    let (client, head_epoch, roots) = machine_session(&rig.server, &rig.pki, &disks).await;
    assert_eq!(head_epoch, 2);
    for ((name, disk), root) in disks.iter().zip(&roots) {
        let geometry = Geometry::new(disk.len() as u64, CHUNK).unwrap();
        let expected = Root::from_chunk_ids(geometry, &scan_buffer(disk, geometry));
        assert_eq!(Root::decode(root).unwrap(), expected, "volume {name}");
    }
    drop(client);
    // Without a volume the head has: refused, naming it.
    let refused = match open_machine_session_when_free(&rig.server, &rig.pki, &disks[..2]).await {
        (_, Some(blockrep_proto::Message::Error { message, .. })) => message,
        (_, other) => panic!("expected an Error, got {other:?}"),
    };
    assert!(
        refused.contains("volume log") && refused.contains("refused"),
        "{refused}"
    );
    // A volume of another size: refused with both sizes.
    let mut grown = disks.clone();
    grown[0].1.extend_from_slice(&[0; 4096]);
    let mut client = open_machine_session(&rig.server, &rig.pki, &grown).await;
    let refused = expect_refusal(&mut client).await;
    let (old, new) = (disks[0].1.len(), grown[0].1.len());
    assert!(
        refused.contains(&old.to_string()) && refused.contains(&new.to_string()),
        "{refused}"
    );

    // The replica is the machine: every volume exports as its disk.
    let store = Store::open_read_only(&rig.data()).unwrap();
    let web = SourceId::new("web").unwrap();
    assert_eq!(store.head(&web).unwrap().unwrap().root, second);
    for (name, disk) in &disks {
        let out = rig.path(&format!("{name}.raw"));
        store.export_volume(&web, Some(name), &out).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *disk,
            "volume {name} differs"
        );
    }
}

/// Connects as source `web` and says the `MachineHello` of `disks`.
/// [`open_machine_session`] once the server let the last session of the
/// source go (a dropped connection ends its session a moment later):
/// the client, with the server's first message.
async fn open_machine_session_when_free(
    server: &blockrep_testkit::ServerProcess,
    pki: &Pki,
    disks: &[(&str, Vec<u8>)],
) -> (blockrep_testkit::RawClient, Option<blockrep_proto::Message>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut client = open_machine_session(server, pki, disks).await;
        let first = blockrep_testkit::raw::next(&mut client).await;
        let busy = matches!(&first, Some(blockrep_proto::Message::Error { message, .. })
            if message.contains("another session for this source is active"));
        if !busy || std::time::Instant::now() >= deadline {
            return (client, first);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn open_machine_session(
    server: &blockrep_testkit::ServerProcess,
    pki: &Pki,
    disks: &[(&str, Vec<u8>)],
) -> blockrep_testkit::RawClient {
    use blockrep_proto::{Message, PROTOCOL_VERSION};
    let mut client = blockrep_testkit::RawClient::connect_as(server.addr, pki, "web").await;
    client
        .send(&Message::MachineHello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            source: SourceId::new("web").unwrap(),
            chunk_size_bytes: CHUNK,
            volumes: disks
                .iter()
                .map(|(name, disk)| (VolumeName::new(name).unwrap(), disk.len() as u64))
                .collect(),
            allow_volume_removal: false,
        })
        .await
        .unwrap();
    client
}

/// Writes each disk to `NAME.img` in the rig's work directory: the
/// agent's arguments for them, `--disk NAME=PATH` each, and the first
/// disk's value (which the rig puts first).
pub(crate) fn machine_disk_args(
    rig: &blockrep_testkit::AgentRig,
    disks: &[(&str, Vec<u8>)],
) -> (String, Vec<String>) {
    let mut values = disks.iter().map(|(name, disk)| {
        let path = rig.disk(&format!("{name}.img"), disk);
        format!("{name}={}", path.display())
    });
    let first = values.next().unwrap();
    let rest = values
        .flat_map(|value| ["--disk".to_owned(), value])
        .collect();
    (first, rest)
}

/// Starts `blockrep agent` for source `web` on every disk of `disks`, with
/// `extra` arguments.
fn spawn_machine_agent(
    rig: &blockrep_testkit::AgentRig,
    disks: &[(&str, Vec<u8>)],
    extra: &[&str],
) -> blockrep_testkit::AgentProcess {
    let (first, mut rest) = machine_disk_args(rig, disks);
    rest.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    rig.spawn_agent(Path::new(&first), "web", &rest)
}

/// `blockrep agent --once` of a machine, which must succeed; its standard
/// output.
pub(crate) fn machine_agent_once(
    rig: &blockrep_testkit::AgentRig,
    disks: &[(&str, Vec<u8>)],
) -> String {
    let (first, rest) = machine_disk_args(rig, disks);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let output = rig.agent_once(Path::new(&first), "web", &rest);
    assert_success(&output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn an_agent_of_three_disks_replicates_them_as_one_machine() {
    let rig = nbd_rig(&["web"]);
    let mut disks = three_disks();
    let stdout = machine_agent_once(&rig, &disks);
    assert!(stdout.contains("replica equals disk: epoch 1"), "{stdout}");
    let head = Store::open_read_only(&rig.data())
        .unwrap()
        .head(&SourceId::new("web").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(head.consistency, blockrep_core::Consistency::Live);
    // Status, the API and the metrics show each volume with its size.
    let view = admin_source(rig.admin(), "web").unwrap();
    let volumes: Vec<(String, u64)> = view
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.disk_size_bytes))
        .collect();
    let sizes: Vec<(String, u64)> = disks
        .iter()
        .map(|(name, disk)| ((*name).to_owned(), disk.len() as u64))
        .collect();
    assert_eq!(volumes, sizes);
    assert_eq!(
        view.disk_size_bytes,
        sizes.iter().map(|(_, s)| s).sum::<u64>()
    );
    let exposition = metrics(&rig.server);
    for (name, size) in &sizes {
        let sample =
            format!("blockrep_volume_size_bytes{{source=\"web\",volume=\"{name}\"}} {size}");
        assert!(exposition.contains(&sample), "{sample} not in the metrics");
        // Committed: nothing pending, and each volume is as recent as the machine.
        let sample = format!("blockrep_volume_bytes_pending{{source=\"web\",volume=\"{name}\"}} 0");
        assert!(exposition.contains(&sample), "{sample} not in the metrics");
    }
    assert!(
        view.volumes
            .iter()
            .all(|v| v.bytes_pending == 0 && v.lag_seconds.is_some()),
        "{:?}",
        view.volumes
    );
    let status = cli(&rig.server, &rig.pki, &["status"]);
    assert_success(&status);
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(table.contains("web: machine of 3 volumes: boot"), "{table}");

    // Every disk changes; the next run sends only their changed chunks.
    disks[0].1[3 * MIB..3 * MIB + 70_000].fill(3);
    disks[2].1[..4096].fill(4);
    disks[1].1[100_000..104_096].copy_from_slice(&random_bytes(4096, 9));
    let stdout = machine_agent_once(&rig, &disks);
    assert!(stdout.contains("replica equals disk: epoch 2"), "{stdout}");
    let (whole, patched) = (
        epoch_sum(&stdout, "chunks_sent"),
        epoch_sum(&stdout, "patches_sent"),
    );
    assert!(
        (1..=4).contains(&(whole + patched)),
        "{whole} chunks and {patched} patches sent for 4 changed: {stdout}"
    );
    // A random block in a random chunk travels as a patch of that block.
    assert!(patched >= 1, "{patched} patches: {stdout}");
    // Nothing changed: no epoch.
    let stdout = machine_agent_once(&rig, &disks);
    assert!(stdout.contains("replica already equals disk"), "{stdout}");

    // Every volume of the replica, its snapshot and its launch is its disk.
    let out = rig.path("export");
    let export = std::process::Command::new(bin())
        .args([
            "export",
            "--data",
            rig.data().to_str().unwrap(),
            "--source",
            "web",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_success(&export);
    let snapshot = create_snapshot(&rig.server, "web", "two");
    let launch = create_launch(&rig.server, "web", &snapshot.name, "web-drill");
    for ((name, disk), volume) in disks.iter().zip(&launch.volumes) {
        assert!(
            std::fs::read(out.join(format!("{name}.raw"))).unwrap() == *disk,
            "export of {name} differs"
        );
        if have_tool("nbdcopy") {
            assert_export_is(volume, &rig.path(&format!("{name}.launch")), disk);
        }
    }
}

#[test]
fn a_machine_agent_refuses_one_capture_state_file_and_names_apart_its_disks() {
    let rig = nbd_rig(&["web"]);
    let a = rig.disk("a.img", &[1; 8192]);
    let b = rig.disk("b.img", &[2; 8192]);
    let run = |extra: &[&str]| {
        let output = rig.agent_once(&a, "web", extra);
        assert!(!output.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let b_arg = format!("a.img={}", b.display());
    let stderr = run(&["--disk", &b_arg]);
    assert!(stderr.contains("two disks are called a.img"), "{stderr}");
    let b_arg = b.to_str().unwrap();
    let stderr = run(&[
        "--disk",
        b_arg,
        "--serve",
        "unix:/nonexistent/blockrep.sock",
        "--capture-state",
        "/nonexistent/state",
    ]);
    assert!(
        stderr.contains("a machine keeps each disk's state beside it"),
        "{stderr}"
    );
    assert!(rig.head("web").is_none(), "something was committed");
}

/// The sum of `key=N` over the epoch lines of an agent's standard output;
/// there must be at least one such line.
pub(crate) fn epoch_sum(stdout: &str, key: &str) -> u64 {
    let values: Vec<u64> = stdout
        .lines()
        .filter(|line| line.starts_with("epoch "))
        .flat_map(str::split_whitespace)
        .filter_map(|field| field.strip_prefix(key)?.strip_prefix('='))
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(!values.is_empty(), "no {key}= in the epoch lines: {stdout}");
    values.iter().sum()
}

/// The machine root of `disks` in chunks of [`CHUNK`].
pub(crate) fn machine_root(disks: &[(&str, Vec<u8>)]) -> blockrep_core::ChunkId {
    let roots = disks
        .iter()
        .map(|(name, disk)| {
            let geometry = Geometry::new(disk.len() as u64, CHUNK).unwrap();
            let root = Root::from_chunk_ids(geometry, &scan_buffer(disk, geometry));
            (VolumeName::new(name).unwrap(), root.id())
        })
        .collect();
    MachineRoot::new(roots).unwrap().id()
}

#[test]
fn a_continuous_machine_agent_follows_a_change_to_one_disk() {
    let rig = nbd_rig(&["web"]);
    let mut disks = three_disks();
    let mut agent = spawn_machine_agent(&rig, &disks, &["--interval", "200ms"]);
    let first = machine_root(&disks).to_hex();
    agent.wait_for_root(&first, Duration::from_secs(60), "the first machine epoch");
    // One disk changes under the running agent.
    let data = rig.path("data.img");
    blockrep_testkit::write_at(&data, 1_000_000, &[0xab; 5000]);
    disks[1].1[1_000_000..1_005_000].fill(0xab);
    let second = machine_root(&disks).to_hex();
    agent.wait_for_root(&second, Duration::from_secs(60), "the change to data");
    // Idle, the machine stays current: each interval's epoch confirms the
    // head, so its lag stays near the interval instead of growing.
    // A lag that grew would be 2.5 s or more by now, and never come back
    // under 2 s; one kept current comes under it at the next confirmation,
    // however late a loaded machine makes it.
    std::thread::sleep(Duration::from_millis(2500));
    let mut lag = f64::MAX;
    assert!(
        wait_until(Duration::from_secs(10), || {
            lag = admin_source(rig.admin(), "web")
                .unwrap()
                .lag_seconds
                .unwrap();
            lag < 2.0
        }),
        "an idle machine lags {lag} s"
    );
    agent.stop_cleanly();
    let store = Store::open_read_only(&rig.data()).unwrap();
    let web = SourceId::new("web").unwrap();
    assert_eq!(store.head(&web).unwrap().unwrap().root.to_hex(), second);
    for (name, disk) in &disks {
        let out = rig.path(&format!("{name}.raw"));
        store.export_volume(&web, Some(name), &out).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *disk,
            "volume {name} differs"
        );
    }
}

#[test]
fn a_server_killed_during_machine_epochs_keeps_every_machine_whole() {
    let mut rig = rig(&["web"], &["--gc-interval", "off"]);
    let mut disks = three_disks();
    let web = SourceId::new("web").unwrap();
    machine_agent_once(&rig, &disks);
    // Every machine the agent was asked to commit, by machine root.
    let mut states = vec![(machine_root(&disks), disks.clone())];
    let mut rng = blockrep_testkit::SplitMix64::new(16);
    // SIGKILLs swept from 10 to 129 ms after the agent starts, which on an
    // idle machine lands before its commit, during it (about 70 ms: start,
    // scan, send, commit) and after it.
    for round in 1..=12 {
        // Most of every disk rewritten: an epoch long enough to be killed in.
        for (_, disk) in &mut disks {
            let len = disk.len() * 3 / 4;
            let at = rng.below((disk.len() - len) as u64) as usize;
            disk[at..at + len].copy_from_slice(&random_bytes(len, rng.next_u64()));
        }
        states.push((machine_root(&disks), disks.clone()));
        let mut agent = spawn_machine_agent(&rig, &disks, &["--once"]);
        std::thread::sleep(Duration::from_millis(10 * round + rng.below(10)));
        rig.server.kill();
        blockrep_testkit::wait_exit(&mut agent, Duration::from_secs(60));
        // A new port: the old one, in the ephemeral range, may have been
        // given to an outgoing connection meanwhile (each round's agent
        // takes the server's address anew).
        rig.server = blockrep_testkit::ServerProcess::start_on(
            &rig.bin,
            "127.0.0.1:0",
            &rig.data(),
            rig.pki.path(),
            &["--gc-interval", "off"],
        );
        // The head is one of the machines asked for, every volume whole.
        let store = Store::open_read_only(&rig.data()).unwrap();
        let head = store.head(&web).unwrap().unwrap();
        let (_, expected) = states
            .iter()
            .find(|(root, _)| *root == head.root)
            .unwrap_or_else(|| panic!("round {round}: the head {} is no machine sent", head.root));
        for (name, disk) in expected {
            let out = rig.path(&format!("{name}.check"));
            store.export_volume(&web, Some(name), &out).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == *disk,
                "round {round}: {name} is torn"
            );
        }
        // And it converges once the server stays up.
        machine_agent_once(&rig, &disks);
    }
    let store = Store::open_read_only(&rig.data()).unwrap();
    assert_eq!(store.head(&web).unwrap().unwrap().root, states[12].0);
    let report = store.verify(None, None).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// Copies a launch volume's NBD export to `copy` with nbdcopy; it must equal
/// `disk`.
pub(crate) fn assert_export_is(
    volume: &blockrep_server::LaunchVolumeView,
    copy: &Path,
    disk: &[u8],
) {
    let uri = volume.nbd_uri.as_deref().unwrap();
    run_tool("nbdcopy", &[uri, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(copy).unwrap() == disk,
        "volume {} read through {uri} differs from its disk",
        volume.name
    );
}

#[test]
fn a_disk_leaves_a_machine_only_when_its_removal_is_allowed() {
    let rig = nbd_rig(&["web"]);
    let disks = three_disks();
    machine_agent_once(&rig, &disks);
    let before = create_snapshot(&rig.server, "web", "three");
    let (first, rest) = machine_disk_args(&rig, &disks[..2]);
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let refused = rig.agent_once(Path::new(&first), "web", &rest);
    assert!(!refused.status.success(), "a volume was dropped silently");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("volume log") && stderr.contains("--allow-volume-removal"),
        "{stderr}"
    );
    let mut allowed = rest.clone();
    allowed.push("--allow-volume-removal");
    assert_success(&rig.agent_once(Path::new(&first), "web", &allowed));
    let store = Store::open_read_only(&rig.data()).unwrap();
    let web = SourceId::new("web").unwrap();
    let head = store.head(&web).unwrap().unwrap();
    let names: Vec<String> = store
        .volume_roots(&head.root)
        .unwrap()
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(names, ["boot", "data"]);
    // The snapshot taken before still holds all three.
    let snapshot = store.snapshot(&web, &before.name).unwrap().unwrap();
    assert_eq!(store.volume_roots(&snapshot.root).unwrap().len(), 3);
}

/// A complete, live `Commit` of `epoch` naming `root`.
fn complete_commit(epoch: u64, root: blockrep_core::ChunkId) -> blockrep_proto::Message {
    blockrep_proto::Message::Commit {
        epoch,
        root,
        scan_started_unix_ms: 1,
        complete: true,
        last: false,
        consistency: blockrep_core::Consistency::Live,
    }
}

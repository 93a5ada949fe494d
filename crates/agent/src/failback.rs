//! Failback: bring the original disk (or every disk of a machine, each from
//! the launch's volume of its name) back to a launch volume's content,
//! sending only the chunks that differ, and (without `once`) keep doing so as
//! the launch changes, until finalized.
//!
//! Before anything is written, chunks that changed on the disk since cutover (they
//! differ from the cutover root *and* from the target) are reported; failback
//! refuses to overwrite them unless told to; a machine's disks are all
//! checked first and reported together. A chunk that already equals the
//! target needs no write and is no conflict, which is also what makes an
//! interrupted failback resume with only what still differs.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use blockrep_core::{ChunkId, Geometry, IdSpace, Root, VolumeName, changed_pages};
use blockrep_proto::{Codec, Message};
use bytes::Bytes;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::connection::{Connection, Transport};
use crate::epoch::Session;
use crate::failback_patch;
use crate::machine::{MachineSession, geometries, machine_root_of, volume_config};
use crate::pages::{PagesOf, fetch_pages};
use crate::view::{Scan, scan_live};
use crate::{AgentConfig, Error};

/// Chunks asked for per `Want`; two requests are kept outstanding.
const WANT_BATCH: usize = 256;
/// Passes that may end with the disk still differing before giving up.
const MISMATCHED_PASSES_MAX: u32 = 3;

/// How to fail back.
#[derive(Debug, Clone)]
pub struct FailbackOptions {
    /// The launch volume whose content the disk must take.
    pub launch: String,
    /// One pass, then finalize (the source becomes `failed_back`).
    pub once: bool,
    /// Overwrite chunks changed on the disk since cutover instead of stopping.
    pub overwrite_source_changes: bool,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailbackPass {
    /// The launch's root the disk now equals.
    pub target_root: ChunkId,
    /// Chunks written to the disk.
    pub chunks_written: u64,
    /// Bytes of chunk data received.
    pub bytes_received: u64,
    /// Chunks changed on the disk since cutover that were overwritten.
    pub source_changes_overwritten: u64,
    /// Whether this pass finalized the failback.
    pub finalized: bool,
}

/// Merges chunk indices into byte ranges, for the conflict report.
fn ranges(geometry: Geometry, indices: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &index in indices {
        let start = geometry.chunk_offset(index);
        let end = start + u64::from(geometry.chunk_len(index).unwrap_or(0));
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// Fails the disk, or every disk of a machine, back. Returns the passes made.
pub async fn failback(
    config: &AgentConfig,
    options: &FailbackOptions,
    shutdown: watch::Receiver<bool>,
    on_pass: impl FnMut(&FailbackPass),
) -> Result<Vec<FailbackPass>, Error> {
    if !config.volumes.is_empty() {
        return failback_machine(config, options, shutdown, on_pass).await;
    }
    let first = scan_live(config, config.chunk_size_bytes).await?;
    let session = Session::open(config, first.geometry).await?;
    failback_session(config, options, shutdown, on_pass, session, first).await
}

/// [`failback`] of a machine: every volume's disk from the launch's volume
/// of its name, planned together (one conflict report for all of them,
/// before anything is written) and finished together.
async fn failback_machine(
    config: &AgentConfig,
    options: &FailbackOptions,
    shutdown: watch::Receiver<bool>,
    on_pass: impl FnMut(&FailbackPass),
) -> Result<Vec<FailbackPass>, Error> {
    let disks: Vec<Disk> = config
        .volumes
        .iter()
        .enumerate()
        .map(|(index, (name, path))| Disk {
            config: volume_config(config, path),
            // At most VOLUMES_MAX volumes: the index fits.
            volume: Some((index as u16, name.clone())),
            space: IdSpace::PLAIN,
        })
        .collect();
    let mut scans = Vec::with_capacity(disks.len());
    for disk in &disks {
        scans.push(scan_live(&disk.config, config.chunk_size_bytes).await?);
    }
    let names: Vec<VolumeName> = config.volumes.iter().map(|(n, _)| n.clone()).collect();
    let session = MachineSession::open(config, &names, &geometries(&scans)).await?;
    let space = session.space();
    let disks = disks
        .into_iter()
        .map(|disk| Disk { space, ..disk })
        .collect();
    failback_disks(
        options,
        shutdown,
        on_pass,
        session.into_connection(),
        disks,
        scans,
    )
    .await
}

/// [`failback`] on an open session (of any transport), starting from `first`,
/// a scan of the disk taken before the session was opened.
pub(crate) async fn failback_session(
    config: &AgentConfig,
    options: &FailbackOptions,
    shutdown: watch::Receiver<bool>,
    on_pass: impl FnMut(&FailbackPass),
    session: Session<impl Transport>,
    first: Scan,
) -> Result<Vec<FailbackPass>, Error> {
    let disk = Disk {
        config: config.clone(),
        volume: None,
        space: session.space(),
    };
    failback_disks(
        options,
        shutdown,
        on_pass,
        session.into_connection(),
        vec![disk],
        vec![first],
    )
    .await
}

/// A disk failback writes: its configuration (its path) and, in a machine,
/// its volume's index and name.
struct Disk {
    config: AgentConfig,
    volume: Option<(u16, VolumeName)>,
    /// Where the source's chunk ids live (the session's).
    space: IdSpace,
}

/// Failback passes over `disks`, the first from `first` (their scans), until
/// a finishing pass verified every disk.
async fn failback_disks(
    options: &FailbackOptions,
    shutdown: watch::Receiver<bool>,
    mut on_pass: impl FnMut(&FailbackPass),
    mut connection: Connection<impl Transport>,
    disks: Vec<Disk>,
    first: Vec<Scan>,
) -> Result<Vec<FailbackPass>, Error> {
    let mut passes = Vec::new();
    let mut base_override: Vec<Option<Vec<ChunkId>>> = vec![None; disks.len()];
    let mut next_scans = Some(first);
    let mut finalize = options.once;
    let mut mismatches = 0;
    loop {
        let scans = match next_scans.take() {
            Some(scans) => scans,
            None => {
                let mut scans = Vec::with_capacity(disks.len());
                for disk in &disks {
                    scans.push(scan_live(&disk.config, disk.config.chunk_size_bytes).await?);
                }
                scans
            }
        };
        let scans = disks
            .iter()
            .zip(scans)
            .map(|(disk, scan)| scan.into_space(disk.space))
            .collect::<Result<Vec<_>, _>>()?;
        let done = pass(
            options,
            &mut connection,
            &disks,
            scans,
            &base_override,
            finalize,
        )
        .await?;
        if !done.matches {
            mismatches += 1;
            if mismatches >= MISMATCHED_PASSES_MAX {
                return Err(Error::Protocol(
                    "the disk still differs from the launch after failback; is something else writing to it?".into(),
                ));
            }
            warn!("disk differs from the target after the pass; another pass");
            continue;
        }
        on_pass(&done.pass);
        let finalized = done.pass.finalized;
        passes.push(done.pass);
        if finalized {
            connection.close().await;
            return Ok(passes);
        }
        // Later passes judge disk changes against what failback itself wrote.
        base_override = done.target_ids.into_iter().map(Some).collect();
        if done.finalize_requested || *shutdown.borrow() {
            finalize = true;
            continue;
        }
        let mut stop = shutdown.clone();
        let interval = disks[0].config.interval;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => finalize = true,
        }
    }
}

/// What one pass over every disk did.
struct PassDone {
    pass: FailbackPass,
    /// Each disk's target chunk ids.
    target_ids: Vec<Vec<ChunkId>>,
    /// Every disk's rescan matched its target.
    matches: bool,
    /// An operator asked for the final pass.
    finalize_requested: bool,
}

/// One volume's plan: the target, and which chunks differ from it.
struct Plan {
    target: Root,
    target_ids: Vec<ChunkId>,
    needed: Vec<u64>,
    /// Chunks changed on the disk since cutover that differ from the target.
    conflicts: Vec<u64>,
}

/// Tells the server which volume the next messages are about (machines only).
async fn select(connection: &mut Connection<impl Transport>, disk: &Disk) -> Result<(), Error> {
    if let Some((index, _)) = &disk.volume {
        connection
            .send(&Message::SelectVolume { index: *index })
            .await?;
    }
    Ok(())
}

/// One failback pass over every disk: each disk planned, one conflict check
/// over all of them before anything is written, then each disk's transfer,
/// fsync and verification.
async fn pass(
    options: &FailbackOptions,
    connection: &mut Connection<impl Transport>,
    disks: &[Disk],
    scans: Vec<Scan>,
    base_override: &[Option<Vec<ChunkId>>],
    finalize: bool,
) -> Result<PassDone, Error> {
    let mut plans = Vec::with_capacity(disks.len());
    for ((disk, scan), base) in disks.iter().zip(&scans).zip(base_override) {
        select(connection, disk).await?;
        plans.push(plan(&disk.config, options, connection, scan, base.as_deref()).await?);
    }
    let reports: Vec<String> = disks
        .iter()
        .zip(&plans)
        .filter(|(_, plan)| !plan.conflicts.is_empty())
        .map(|(disk, plan)| conflict_report(&disk.config, plan))
        .collect();
    if !reports.is_empty() {
        let report = reports.join("; ");
        if !options.overwrite_source_changes {
            return Err(Error::Conflict(format!(
                "failback stopped before writing anything: {report}; pass --overwrite-source-changes to replace them with the launch's content"
            )));
        }
        warn!(%report, "overwriting changes made to the disk since cutover");
    }
    let mut done = PassDone {
        pass: FailbackPass {
            target_root: ChunkId::ZERO,
            chunks_written: 0,
            bytes_received: 0,
            source_changes_overwritten: 0,
            finalized: false,
        },
        target_ids: Vec::with_capacity(disks.len()),
        matches: true,
        finalize_requested: false,
    };
    let mut roots = Vec::with_capacity(disks.len());
    for ((disk, scan), plan) in disks.iter().zip(scans).zip(plans) {
        select(connection, disk).await?;
        let config = &disk.config;
        let geometry = scan.geometry;
        let (chunks_written, bytes_received) = transfer(
            config,
            connection,
            geometry,
            &plan.target_ids,
            &scan.ids,
            &plan.needed,
            disk.space,
        )
        .await?;
        drop(scan);
        let after = scan_live(config, geometry.chunk_size_bytes())
            .await?
            .into_space(disk.space)?;
        let root = Root::from_chunk_ids(geometry, &after.ids).id();
        connection
            .send(&Message::FailbackDone { root, finalize })
            .await?;
        connection.flush().await?;
        let Message::FailbackAck {
            matches,
            finalize_requested,
        } = connection.recv().await?
        else {
            return Err(Error::Protocol("expected FailbackAck".into()));
        };
        let matches = matches && root == plan.target.id();
        if matches {
            info!(launch = %options.launch, disk = %config.disk.display(), chunks_written, bytes_received, finalized = finalize, "failback pass verified");
        }
        done.pass.chunks_written += chunks_written;
        done.pass.bytes_received += bytes_received;
        done.pass.source_changes_overwritten += plan.conflicts.len() as u64;
        done.matches &= matches;
        done.finalize_requested |= finalize_requested;
        roots.push(plan.target.id());
        done.target_ids.push(plan.target_ids);
    }
    // A machine's target is the machine root of its volumes' targets.
    done.pass.target_root = match disks {
        [Disk { volume: None, .. }] => roots[0],
        _ => {
            let names: Vec<VolumeName> = disks
                .iter()
                .filter_map(|d| d.volume.as_ref().map(|(_, n)| n.clone()))
                .collect();
            machine_root_of(&names, roots.into_iter().map(Some)).unwrap_or(ChunkId::ZERO)
        }
    };
    done.pass.finalized = finalize && done.matches;
    Ok(done)
}

/// Plans one disk's pass: asks for the launch's plan, and finds the chunks
/// that differ from the target and those changed on the disk since cutover.
async fn plan(
    config: &AgentConfig,
    options: &FailbackOptions,
    connection: &mut Connection<impl Transport>,
    disk: &Scan,
    base_override: Option<&[ChunkId]>,
) -> Result<Plan, Error> {
    let geometry = disk.geometry;
    connection
        .send(&Message::FailbackStart {
            launch: options.launch.clone(),
        })
        .await?;
    connection.flush().await?;
    let Message::FailbackPlan {
        target_root,
        base_root,
    } = connection.recv().await?
    else {
        return Err(Error::Protocol("expected FailbackPlan".into()));
    };
    let decode = |bytes: &Bytes| {
        Root::decode(bytes).map_err(|e| Error::Protocol(format!("failback root: {e}")))
    };
    let (target, base) = (decode(&target_root)?, decode(&base_root)?);
    if target.geometry() != geometry {
        return Err(Error::DiskChanged(format!(
            "{} has {} bytes, launch {} has {}",
            config.disk.display(),
            geometry.disk_size_bytes(),
            options.launch,
            target.geometry().disk_size_bytes()
        )));
    }
    // The base judges which chunks changed on the disk since cutover, chunk by
    // chunk: one of another geometry cannot, and only a faulty or malicious
    // server sends it.
    if base.geometry() != geometry {
        return Err(Error::Protocol(format!(
            "the server's failback base root is of {} bytes in {}-byte chunks, the disk and the launch of {} bytes in {}-byte chunks",
            base.geometry().disk_size_bytes(),
            base.geometry().chunk_size_bytes(),
            geometry.disk_size_bytes(),
            geometry.chunk_size_bytes()
        )));
    }
    let own = Root::from_chunk_ids(geometry, &disk.ids);
    let target_ids = fetch_ids(
        connection,
        &target,
        &own,
        &disk.ids,
        PagesOf::FailbackTarget,
    )
    .await?;
    let fetched_base;
    let base_ids = match base_override {
        Some(ids) => ids,
        None => {
            fetched_base =
                fetch_ids(connection, &base, &own, &disk.ids, PagesOf::FailbackBase).await?;
            &fetched_base
        }
    };
    let mut needed = Vec::new();
    let mut conflicts = Vec::new();
    for (index, own_id) in disk.ids.iter().enumerate() {
        if *own_id != target_ids[index] {
            needed.push(index as u64);
            if *own_id != base_ids[index] {
                conflicts.push(index as u64);
            }
        }
    }
    Ok(Plan {
        target,
        target_ids,
        needed,
        conflicts,
    })
}

/// The conflicts of one disk's plan, for the report: how many chunks, where.
fn conflict_report(config: &AgentConfig, plan: &Plan) -> String {
    let spans = ranges(plan.target.geometry(), &plan.conflicts);
    let listed: Vec<String> = spans
        .iter()
        .take(20)
        .map(|(a, b)| format!("{a}..{b}"))
        .collect();
    let more = if spans.len() > 20 {
        format!(" and {} more ranges", spans.len() - 20)
    } else {
        String::new()
    };
    format!(
        "{} chunks of {} changed since cutover (bytes {}{more})",
        plan.conflicts.len(),
        config.disk.display(),
        listed.join(", ")
    )
}

/// The chunk ids of `root`: the disk's own where the page ids agree, the server's
/// pages where they differ.
async fn fetch_ids(
    connection: &mut Connection<impl Transport>,
    root: &Root,
    own: &Root,
    own_ids: &[ChunkId],
    of: PagesOf,
) -> Result<Vec<ChunkId>, Error> {
    let mut ids = own_ids.to_vec();
    let pages = changed_pages(root, own)
        .map_err(|e| Error::Protocol(format!("failback root does not fit the disk: {e}")))?;
    fetch_pages(connection, root, of, &pages, &mut ids).await?;
    Ok(ids)
}

/// Receives the `needed` chunks (whole, or as patches against the disk's
/// chunks `own_ids`), verifies each against the target's id, and writes it in
/// place; fsyncs the disk at the end.
async fn transfer(
    config: &AgentConfig,
    connection: &mut Connection<impl Transport>,
    geometry: Geometry,
    target_ids: &[ChunkId],
    own_ids: &[ChunkId],
    needed: &[u64],
    space: IdSpace,
) -> Result<(u64, u64), Error> {
    let path = config.disk.clone();
    let reader = std::fs::File::open(&path)
        .map_err(|e| Error::DiskChanged(format!("cannot open {}: {e}", path.display())))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Bytes)>(64);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let file = OpenOptions::new().write(true).open(&path)?;
        for (offset, data) in rx {
            file.write_all_at(&data, offset)?;
        }
        file.sync_all()
    });
    let batches: Vec<&[u64]> = needed.chunks(WANT_BATCH).collect();
    let mut bytes_received = 0u64;
    let mut decompressor =
        zstd::bulk::Decompressor::new().map_err(|e| Error::Protocol(format!("zstd: {e}")))?;
    // Keep one request ahead, so the server always has work while we write.
    let patches = config.patches;
    if let Some(first) = batches.first() {
        failback_patch::want(
            connection, &reader, geometry, own_ids, first, patches, space,
        )
        .await?;
    }
    for (position, batch) in batches.iter().enumerate() {
        if let Some(next) = batches.get(position + 1) {
            failback_patch::want(connection, &reader, geometry, own_ids, next, patches, space)
                .await?;
        }
        connection.flush().await?;
        for &expected in *batch {
            let want = target_ids[expected as usize];
            let (index, id, codec, raw_len, data) = match connection.recv().await? {
                Message::Chunk {
                    index,
                    id,
                    codec,
                    raw_len,
                    data,
                } => (index, id, codec, raw_len, data),
                Message::Patch {
                    index,
                    base,
                    id,
                    codec,
                    raw_len,
                    ranges,
                    data,
                } => {
                    let patch = failback_patch::ReceivedPatch {
                        index,
                        base,
                        id,
                        codec,
                        raw_len,
                        ranges,
                        data,
                    };
                    let own = own_ids
                        .get(expected as usize)
                        .copied()
                        .unwrap_or(ChunkId::ZERO);
                    let (raw, received) = failback_patch::apply(
                        &reader,
                        geometry,
                        failback_patch::Expected {
                            index: expected,
                            want,
                            own,
                            space,
                        },
                        patch,
                        &mut decompressor,
                    )?;
                    bytes_received += received;
                    if tx.send((geometry.chunk_offset(expected), raw)).is_err() {
                        break; // the writer failed; its error is reported below
                    }
                    continue;
                }
                _ => return Err(Error::Protocol("expected Chunk".into())),
            };
            if index != expected || id != want || Some(raw_len) != geometry.chunk_len(index) {
                return Err(Error::Protocol(format!(
                    "chunk {index} is not the chunk {expected} asked for"
                )));
            }
            bytes_received += data.len() as u64;
            let raw =
                match codec {
                    Codec::Zero => Bytes::from(vec![0u8; raw_len as usize]),
                    Codec::Raw => data,
                    Codec::Zstd => {
                        Bytes::from(decompressor.decompress(&data, raw_len as usize).map_err(
                            |e| Error::Protocol(format!("chunk {index} does not decompress: {e}")),
                        )?)
                    }
                    Codec::Ref => {
                        return Err(Error::Protocol(format!(
                            "chunk {index} sent as a reference"
                        )));
                    }
                };
            if raw.len() != raw_len as usize || space.hash_chunk(&raw) != id {
                return Err(Error::Protocol(format!(
                    "chunk {index} does not hash to its id"
                )));
            }
            if tx.send((geometry.chunk_offset(index), raw)).is_err() {
                break; // the writer failed; its error is reported below
            }
        }
    }
    drop(tx);
    writer
        .await
        .map_err(|e| Error::Protocol(format!("writer failed: {e}")))?
        .map_err(|e| Error::DiskChanged(format!("cannot write {}: {e}", config.disk.display())))?;
    Ok((needed.len() as u64, bytes_received))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_ranges_merge_adjacent_chunks() {
        let geometry = Geometry::new(10 * 4096 + 10, 4096).unwrap();
        assert_eq!(
            ranges(geometry, &[0, 1, 3, 10]),
            vec![(0, 8192), (12_288, 16_384), (40_960, 40_970)]
        );
    }
}

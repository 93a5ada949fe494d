//! Sub-chunk patches in the failback direction: the server sends a chunk the
//! disk must take as the 4 KiB blocks that differ from what the disk holds.
//!
//! The agent asks with `WantPatched`: each wanted chunk with the id and block
//! values of the disk's current chunk at that index (computed by reading and
//! hashing it once). The server answers each with a `Patch` against that chunk
//! where it is smaller, else with the whole `Chunk`. The agent trusts nothing
//! in a patch: it must be against the very chunk the disk holds, for the
//! target's id and length; it is applied to the disk's chunk read afresh, and
//! the result must hash to the target id before anything is written.

use std::fs::File;
use std::os::unix::fs::FileExt;

use blockrep_core::{ChunkId, Geometry, IdSpace, apply_patch, hash_with_block_values};
use blockrep_proto::{Codec, Message};
use bytes::Bytes;

use crate::Error;
use crate::connection::{Connection, Transport};

/// A `Patch` frame as received.
pub(crate) struct ReceivedPatch {
    pub index: u64,
    pub base: ChunkId,
    pub id: ChunkId,
    pub codec: Codec,
    pub raw_len: u32,
    pub ranges: Vec<(u32, u32)>,
    pub data: Bytes,
}

/// Asks for the target's data of `batch`: with the disk's block values where
/// the disk holds data there (so the server may answer with patches), as a
/// plain `Want` when it holds none (all zero).
pub(crate) async fn want(
    connection: &mut Connection<impl Transport>,
    disk: &File,
    geometry: Geometry,
    own_ids: &[ChunkId],
    batch: &[u64],
    patches: bool,
    space: IdSpace,
) -> Result<(), Error> {
    let has_base = |index: &u64| own_ids.get(*index as usize).is_some_and(|id| !id.is_zero());
    if !patches || !batch.iter().any(has_base) {
        return connection
            .send(&Message::Want {
                indices: batch.to_vec(),
            })
            .await
            .map(drop);
    }
    let mut entries = Vec::with_capacity(batch.len());
    for &index in batch {
        let own = own_ids
            .get(index as usize)
            .copied()
            .unwrap_or(ChunkId::ZERO);
        if own.is_zero() {
            entries.push((index, own, Bytes::new()));
            continue;
        }
        let chunk = read_chunk(disk, geometry, index)?;
        let (id, values) = hash_with_block_values(&chunk);
        let id = space.map(id);
        // The disk changed since the scan: no patch against it (the whole
        // chunk comes, and the pass's verification scan sees the rest).
        if id != own {
            entries.push((index, ChunkId::ZERO, Bytes::new()));
            continue;
        }
        entries.push((index, id, Bytes::from(values.concat())));
    }
    connection
        .send(&Message::WantPatched { entries })
        .await
        .map(drop)
}

/// What a patch must make: chunk `index` with id `want` (in the session's id
/// `space`), from the disk's chunk `own`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected {
    pub index: u64,
    pub want: ChunkId,
    pub own: ChunkId,
    pub space: IdSpace,
}

/// Reads chunk `index` of the disk.
fn read_chunk(disk: &File, geometry: Geometry, index: u64) -> Result<Vec<u8>, Error> {
    let raw_len = geometry
        .chunk_len(index)
        .ok_or_else(|| Error::Protocol(format!("chunk {index} is beyond the end of the disk")))?;
    let mut chunk = vec![0u8; raw_len as usize];
    disk.read_exact_at(&mut chunk, geometry.chunk_offset(index))
        .map_err(|e| Error::DiskChanged(format!("cannot read chunk {index} of the disk: {e}")))?;
    Ok(chunk)
}

/// The target's bytes of chunk `expected` from a server's `patch`, checked
/// against everything the agent knows: the target id `want`, the disk's
/// chunk `own` the patch must be against, the chunk's length, the ranges, and
/// finally the id of the result. Returns the bytes and the patch's data size.
pub(crate) fn apply(
    disk: &File,
    geometry: Geometry,
    expected: Expected,
    patch: ReceivedPatch,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(Bytes, u64), Error> {
    let Expected {
        index: expected,
        want,
        own,
        space,
    } = expected;
    let ReceivedPatch {
        index,
        base,
        id,
        codec,
        raw_len,
        ranges,
        data,
    } = patch;
    if index != expected || id != want || Some(raw_len) != geometry.chunk_len(index) {
        return Err(Error::Protocol(format!(
            "patch for chunk {index} is not the chunk {expected} asked for"
        )));
    }
    if base != own || own.is_zero() {
        return Err(Error::Protocol(format!(
            "patch for chunk {index} is against {base}, but the disk holds {own} there"
        )));
    }
    let changed: u64 = ranges.iter().map(|&(_, len)| u64::from(len)).sum();
    if changed > u64::from(raw_len) {
        return Err(Error::Protocol(format!(
            "patch for chunk {index} carries {changed} bytes of ranges for a {raw_len}-byte chunk"
        )));
    }
    let received = data.len() as u64;
    let payload = match codec {
        Codec::Raw => data,
        Codec::Zstd => Bytes::from(decompressor.decompress(&data, changed as usize).map_err(
            |e| Error::Protocol(format!("patch for chunk {index} does not decompress: {e}")),
        )?),
        other => {
            return Err(Error::Protocol(format!(
                "patch for chunk {index} has codec {other:?}"
            )));
        }
    };
    let base_bytes = read_chunk(disk, geometry, index)?;
    let patched = apply_patch(&base_bytes, raw_len, &ranges, &payload)
        .map_err(|e| Error::Protocol(format!("patch for chunk {index} cannot be applied: {e}")))?;
    let result = space.hash_chunk(&patched);
    if result != want {
        return Err(Error::Protocol(format!(
            "patch for chunk {index} produced {result}, expected {want}; nothing written"
        )));
    }
    Ok((Bytes::from(patched), received))
}

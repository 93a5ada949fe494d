//! Compaction of an overlay's `map`: the map rewritten as its current runs
//! and one marker, when its records have grown to twice that.

use std::os::unix::fs::FileExt;

use super::records::{
    HEADER_LEN, MARKER_LEN, OP_LEN, OPS_PER_RECORD_MAX, Op, OpKind, encode_record,
};
use super::{BlockState, Overlay, create_file, io_error, sync_dir};
use crate::error::Error;

impl Overlay {
    /// The current map as operations: one per run of data or zero blocks.
    pub(super) fn runs(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut block = 0;
        while block < self.blocks {
            let state = self.state(block);
            let start = block;
            while block < self.blocks && self.state(block) == state {
                block += 1;
            }
            let kind = match state {
                BlockState::Base => continue,
                BlockState::Data => OpKind::Data,
                BlockState::Zero => OpKind::Zero,
            };
            ops.push(Op {
                kind,
                first: start,
                count: block - start,
            });
        }
        ops
    }

    pub(super) fn compacted_len(&self) -> u64 {
        let runs = self.runs().len() as u64;
        HEADER_LEN
            + runs * OP_LEN as u64
            + runs.div_ceil(OPS_PER_RECORD_MAX as u64) * 12
            + MARKER_LEN
    }

    /// Rewrites `map` as the current runs and a marker, atomically (called
    /// right after a sync, so the map in memory is the durable one).
    pub(super) fn compact(&mut self) -> Result<(), Error> {
        let tmp = self.dir.join("map.tmp");
        let file = create_file(&tmp)?;
        let mut bytes = self.header();
        for batch in self.runs().chunks(OPS_PER_RECORD_MAX) {
            bytes.extend_from_slice(&encode_record(batch));
        }
        bytes.extend_from_slice(&self.marker());
        file.write_all_at(&bytes, 0)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, self.dir.join("map"))
            .map_err(|e| io_error("cannot publish", &tmp, e))?;
        // The new file is `map` from the rename on, whatever follows.
        self.map = file;
        self.map_len = bytes.len() as u64;
        // Unsynced, a power loss may keep the old map: later markers lie.
        let synced = sync_dir(&self.dir);
        if synced.is_err() {
            self.fail();
        }
        synced
    }
}

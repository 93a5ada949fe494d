//! The memory budget for sessions' chunk ids.
//!
//! A session holds, per chunk of its disk: the 32-byte id (the replica as it
//! knows it), the set of ids the source may reference as its own (the head's,
//! up to 1.25 times the chunk count before it is rebuilt), the ids received in
//! the uncommitted epoch (at most one per chunk), and a bit for "sent in this
//! epoch" ([`IDS_BYTES_PER_CHUNK`] in all, hash-set overhead included). So a
//! `Hello` that claims a large disk commits the server to memory before a
//! single chunk arrives. Every session reserves its share of one server-wide
//! budget (`--session-memory-max`) before it allocates, and no more than
//! `--session-memory-per-source-max` of it, so that one source cannot take the
//! memory every other source needs; a claim that does not fit is refused
//! instead of growing the server until the kernel kills it.
//!
//! The ids of the other sources of a tenant, loaded when a session first needs
//! them for deduplication, take a second reservation ([`IdsBudget::reserve_bytes`]);
//! when that does not fit, the session goes on without cross-source
//! deduplication rather than failing.

use std::sync::{Arc, Mutex};

use blockrep_core::Geometry;
use blockrep_proto::ErrorCode;

use crate::reject::Reject;

/// Bytes a session reserves per chunk of its disk: the replica's id (32), the
/// set of the source's own ids (up to 1.25 ids per chunk) and the ids received
/// in the uncommitted epoch (up to one per chunk), each hashed entry costing
/// about 56 bytes (a 32-byte key, its control byte, and the table's spare
/// room), and one bit for the chunks sent in the epoch.
pub(crate) const IDS_BYTES_PER_CHUNK: u64 = 32 + 128;

/// Bytes a session of a disk of `geometry` reserves: per chunk, plus the page
/// ids, which are 1/1024 of the ids.
pub(crate) fn ids_bytes(geometry: Geometry) -> u64 {
    geometry
        .chunk_count()
        .saturating_mul(IDS_BYTES_PER_CHUNK)
        .saturating_add(geometry.page_count().saturating_mul(32))
}

/// The server-wide budget of memory for chunk ids, and its limits.
#[derive(Debug)]
pub(crate) struct IdsBudget {
    /// `--session-memory-max`: all sessions together.
    max_bytes: u64,
    /// `--session-memory-per-source-max`: one session.
    per_source_max_bytes: u64,
    /// Bytes reserved by sessions in progress; shared with their reservations,
    /// which give their bytes back when dropped.
    reserved_bytes: Arc<Mutex<u64>>,
}

/// A session's share of the budget; returned when dropped.
#[derive(Debug)]
pub(crate) struct IdsReservation {
    reserved_bytes: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for IdsReservation {
    fn drop(&mut self) {
        let mut reserved = self
            .reserved_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

impl IdsBudget {
    /// A budget of `max_bytes`, of which one source may hold
    /// `per_source_max_bytes`.
    pub(crate) fn new(max_bytes: u64, per_source_max_bytes: u64) -> Self {
        Self {
            max_bytes,
            per_source_max_bytes,
            reserved_bytes: Arc::new(Mutex::new(0)),
        }
    }

    /// Most of the budget one source may hold.
    pub(crate) fn per_source_max_bytes(&self) -> u64 {
        self.per_source_max_bytes
    }

    /// Reserves memory for the chunk ids of a disk of `geometry`. A disk that
    /// could never fit, or that needs more than one source may hold, is refused
    /// for good (`GeometryMismatch`, not retried); one that does not fit beside
    /// the sessions in progress is `Busy`.
    pub(crate) fn reserve_ids(&self, geometry: Geometry) -> Result<IdsReservation, Reject> {
        let bytes = ids_bytes(geometry);
        let max = self.max_bytes;
        let per_source_max = self.per_source_max_bytes;
        let mib = |b: u64| b.div_ceil(1 << 20);
        if bytes > max {
            return Err(Reject::new(
                ErrorCode::GeometryMismatch,
                format!(
                    "a disk of {} chunks needs {} MiB of chunk ids, more than the server's \
                     --session-memory-max of {} MiB",
                    geometry.chunk_count(),
                    mib(bytes),
                    mib(max)
                ),
            ));
        }
        if bytes > per_source_max {
            return Err(Reject::new(
                ErrorCode::GeometryMismatch,
                format!(
                    "a disk of {} chunks needs {} MiB of chunk ids, more than one source may \
                     hold (the server's --session-memory-per-source-max of {} MiB); replicate \
                     it in larger chunks or raise that limit",
                    geometry.chunk_count(),
                    mib(bytes),
                    mib(per_source_max)
                ),
            ));
        }
        self.reserve_bytes(bytes).map_err(|free| {
            Reject::new(
                ErrorCode::Busy,
                format!(
                    "a disk of {} chunks needs {} MiB of chunk ids and only {} MiB of the \
                     server's --session-memory-max are free; retry later",
                    geometry.chunk_count(),
                    mib(bytes),
                    mib(free)
                ),
            )
        })
    }

    /// Reserves `bytes` of the budget if they fit beside the reservations in
    /// progress; else returns how many bytes are free.
    pub(crate) fn reserve_bytes(&self, bytes: u64) -> Result<IdsReservation, u64> {
        let max = self.max_bytes;
        let mut reserved = self
            .reserved_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if reserved.saturating_add(bytes) > max {
            return Err(max.saturating_sub(*reserved));
        }
        *reserved += bytes;
        Ok(IdsReservation {
            reserved_bytes: Arc::clone(&self.reserved_bytes),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A geometry of `chunks` chunks of 64 KiB.
    fn disk(chunks: u64) -> Geometry {
        Geometry::new(chunks * 65_536, 65_536).unwrap()
    }

    #[test]
    fn reservations_fit_beside_each_other_and_come_back_when_dropped() {
        let one = ids_bytes(disk(1024));
        let budget = IdsBudget::new(2 * one, 2 * one);
        let first = budget.reserve_ids(disk(1024)).unwrap();
        let second = budget.reserve_ids(disk(1024)).unwrap();
        let full = budget.reserve_ids(disk(1024)).unwrap_err();
        assert_eq!(full.code, ErrorCode::Busy);
        assert_eq!(budget.reserve_bytes(1).unwrap_err(), 0, "nothing is free");
        drop(first);
        let third = budget.reserve_ids(disk(1024)).unwrap();
        drop((second, third));
        assert_eq!(*budget.reserved_bytes.lock().unwrap(), 0);
    }

    #[test]
    fn a_disk_beyond_a_limit_is_refused_for_good() {
        let one = ids_bytes(disk(1024));
        let budget = IdsBudget::new(4 * one, one);
        let refused = budget.reserve_ids(disk(2048)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::GeometryMismatch);
        assert!(refused.message.contains("--session-memory-per-source-max"));
        let small = IdsBudget::new(one, one);
        let refused = small.reserve_ids(disk(4096)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::GeometryMismatch);
        assert!(refused.message.contains("--session-memory-max"));
    }
}

//! The memory budget for sessions' chunk ids.
//!
//! A session holds the 32-byte id of every chunk of its disk (the replica as
//! it knows it), so a `Hello` that claims a large disk commits the server to
//! memory before a single chunk arrives: up to 8 GiB for the largest valid
//! geometry. Every session reserves its share of one server-wide budget
//! (`--session-memory-max`) before it allocates; a claim that does not fit is
//! refused instead of growing the server until the kernel kills it.

use std::sync::{Arc, Mutex};

use blockrep_core::Geometry;
use blockrep_proto::ErrorCode;

use crate::listener::Shared;
use crate::session::Reject;

/// Bytes of chunk ids reserved by sessions in progress.
#[derive(Debug, Default)]
pub(crate) struct IdsBudget {
    reserved_bytes: Mutex<u64>,
}

/// A session's share of the budget; returned when dropped.
#[derive(Debug)]
pub(crate) struct IdsReservation {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Drop for IdsReservation {
    fn drop(&mut self) {
        let mut reserved = self
            .shared
            .ids_budget
            .reserved_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

impl Shared {
    /// Reserves memory for the chunk ids of a disk of `geometry`. A disk that
    /// could never fit is refused for good (`GeometryMismatch`, not retried);
    /// one that does not fit beside the sessions in progress is `Busy`.
    pub(crate) fn reserve_ids(
        self: &Arc<Self>,
        geometry: Geometry,
    ) -> Result<IdsReservation, Reject> {
        // Ids plus the page ids, which are 1/1024 of them.
        let bytes = geometry
            .chunk_count()
            .saturating_add(geometry.page_count())
            .saturating_mul(32);
        let max = self.config.session_memory_max_bytes;
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
        let mut reserved = self
            .ids_budget
            .reserved_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if reserved.saturating_add(bytes) > max {
            return Err(Reject::new(
                ErrorCode::Busy,
                format!(
                    "a disk of {} chunks needs {} MiB of chunk ids and only {} MiB of the \
                     server's --session-memory-max are free; retry later",
                    geometry.chunk_count(),
                    mib(bytes),
                    mib(max - *reserved)
                ),
            ));
        }
        *reserved += bytes;
        Ok(IdsReservation {
            shared: Arc::clone(self),
            bytes,
        })
    }
}

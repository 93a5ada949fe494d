//! Launch volumes' metrics: the decoded chunk cache they share, what their
//! overlays hold that is not folded into the store yet, and their
//! materializations.

use blockrep_store::Store;

use super::exposition::{Exposition, Value};

/// The `blockrep_launch_cache_*`, `blockrep_launch_overlay_bytes` and
/// `blockrep_launch_materialize_*` families; `materialized_bytes`: what
/// the materializations' copiers copied since the server started.
pub(super) fn launches_text(store: &Store, materialized_bytes: u64) -> String {
    let mut x = Exposition::default();
    let cache = store.chunk_cache_stats();
    // A listing that fails shows as nothing in progress; `/health` and the
    // launch listing report the error.
    let materializing: Vec<_> = store
        .launch_materializations()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !m.progress.done)
        .collect();
    let gauges = [
        (
            "blockrep_launch_cache_budget_bytes",
            "Memory budget of the decoded chunk cache shared by launch volumes (--launch-cache).",
            cache.budget_bytes,
        ),
        (
            "blockrep_launch_cache_bytes",
            "Bytes the decoded chunk cache holds now.",
            cache.used_bytes,
        ),
        (
            "blockrep_launch_overlay_bytes",
            "Bytes written to open launch volumes and not folded into the store yet.",
            store.launch_overlay_bytes(),
        ),
        (
            "blockrep_launch_materializations",
            "Launch volumes being materialized (copied to a local target) now.",
            materializing.len() as u64,
        ),
        (
            "blockrep_launch_materialize_remote_bytes",
            "Bytes of volumes being materialized that their targets do not hold yet.",
            materializing.iter().map(|m| m.progress.remote_bytes).sum(),
        ),
    ];
    for (name, help, value) in gauges {
        x.scalar(name, "gauge", help, Value::Int(value));
    }
    let counters = [
        (
            "blockrep_launch_cache_hits_total",
            "Launch reads of unwritten blocks served by a decoded chunk in the cache.",
            cache.hits,
        ),
        (
            "blockrep_launch_cache_misses_total",
            "Launch reads that decoded a chunk from the store.",
            cache.misses,
        ),
        (
            "blockrep_launch_readahead_chunks_total",
            "Chunks decoded ahead of a sequential launch reader.",
            cache.readahead_chunks,
        ),
        (
            "blockrep_launch_materialize_copied_bytes_total",
            "Bytes the background copiers of launch materializations copied.",
            materialized_bytes,
        ),
    ];
    for (name, help, value) in counters {
        x.scalar(name, "counter", help, Value::Int(value));
    }
    x.finish()
}

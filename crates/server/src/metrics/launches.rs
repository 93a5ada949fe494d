//! Launch volumes' metrics: the decoded chunk cache they share, and what
//! their overlays hold that is not folded into the store yet.

use blockrep_store::Store;

use super::exposition::{Exposition, Value};

/// The `blockrep_launch_cache_*` and `blockrep_launch_overlay_bytes`
/// families.
pub(super) fn launches_text(store: &Store) -> String {
    let mut x = Exposition::default();
    let cache = store.chunk_cache_stats();
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
    ];
    for (name, help, value) in counters {
        x.scalar(name, "counter", help, Value::Int(value));
    }
    x.finish()
}

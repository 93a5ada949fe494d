//! `blockrep bench`: replication measured end to end on a synthetic disk.

use anyhow::Result;

use crate::bench::BenchArgs;

/// Runs the bench.
pub(crate) async fn bench(args: BenchArgs) -> Result<()> {
    crate::bench::run(args).await
}

//! `blockrep bench`: the flags become `blockrep_bench::Options`, with this
//! executable as the server under test.

use anyhow::{Context, Result};

use crate::cli::BenchArgs;

/// Runs the bench.
pub(crate) async fn bench(args: BenchArgs) -> Result<()> {
    let server_exe = std::env::current_exe().context("cannot find this executable")?;
    blockrep_bench::run(blockrep_bench::Options {
        server_exe,
        size: args.size,
        disks: usize::from(args.disks),
        disk_kind: args.disk_kind.into(),
        chunk_size: args.chunk_size,
        churn_rate: args.churn_rate,
        duration: args.duration,
        change_percent: args.change_percent,
        seed: args.seed,
        interval: args.interval,
        workdir: args.workdir,
        json: args.json,
        plot: args.plot,
        capture: args.capture,
        capture_sizes: args.capture_sizes,
        capture_duration: args.capture_duration,
        server_args: args.store.server_args(),
        encrypt_at_rest: args.encrypt_at_rest,
        compression: args.compress.into(),
    })
    .await
}

//! `blockrep gc`: offline on a data directory, or through a running server's admin API.

use anyhow::Result;

use super::admin_call;
use crate::cli::GcArgs;
use crate::print::human_bytes;

/// Collects (or reports, with `--dry-run`) offline or through the admin API.
pub(crate) async fn gc(args: GcArgs) -> Result<()> {
    let report = match (&args.data, &args.admin) {
        (Some(data), _) => {
            let options = blockrep_store::GcOptions {
                dry_run: args.dry_run,
                ..Default::default()
            };
            let store = if args.dry_run {
                blockrep_store::Store::open_read_only(data)?
            } else {
                blockrep_store::Store::open_exclusive(data)?
            };
            args.keys.load_into(&store)?;
            blockrep_server::gc_report_json(&store.gc(&options)?)
        }
        (None, admin) => {
            let admin = admin.as_deref().unwrap_or("127.0.0.1:7444");
            let path = if args.dry_run {
                "/v1/gc?dry_run=true"
            } else {
                "/v1/gc"
            };
            serde_json::from_str(&admin_call(admin, "POST", path, None).await?)?
        }
    };
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    let verb = if args.dry_run { "would free" } else { "freed" };
    println!(
        "gc {verb} {} in {} packs ({} live, {} dead before; {} live blobs copied)",
        human_bytes(n("bytes_freed")),
        n("packs_compacted"),
        human_bytes(n("bytes_live")),
        human_bytes(n("bytes_dead")),
        n("blobs_copied")
    );
    if n("packs_kept_damaged") > 0 {
        println!(
            "{} packs kept because of damage: run blockrep verify",
            n("packs_kept_damaged")
        );
    }
    Ok(())
}

//! `blockrep verify`: every referenced blob re-read and checked, damage named with what it affects.

use anyhow::{Result, bail};

use super::source_id;
use crate::cli::VerifyArgs;
use crate::print::human_bytes;

/// Verifies the store (or one source or snapshot); fails when anything is damaged.
pub(crate) fn verify(args: VerifyArgs) -> Result<()> {
    let store = args.store.open(&args.data)?;
    args.keys.load_into(&store)?;
    let source = args.source.as_deref().map(source_id).transpose()?;
    let report = store.verify(source.as_ref(), args.snapshot.as_deref())?;
    println!(
        "checked {} roots, {} pages, {} chunks ({} read)",
        report.roots_checked,
        report.pages_checked,
        report.chunks_checked,
        human_bytes(report.bytes_read)
    );
    for blob in &report.damaged {
        let place = blob
            .place
            .as_ref()
            .map_or_else(|| "missing".to_owned(), ToString::to_string);
        println!(
            "DAMAGED {:?} {} at {place}: {}",
            blob.kind, blob.id, blob.damage
        );
        for affected in &blob.affected {
            let offsets: Vec<String> = affected
                .chunks
                .iter()
                .map(|c| format!("chunk {} (byte {})", c.index, c.offset_bytes))
                .collect();
            let volume = affected
                .volume
                .as_ref()
                .map_or_else(String::new, |v| format!(" volume {v}"));
            println!(
                "  affects {}{volume} (root {}): {}",
                affected.referrer,
                affected.root,
                offsets.join(", ")
            );
        }
    }
    if report.is_clean() {
        println!("no damage found");
        Ok(())
    } else {
        bail!("{} damaged blobs", report.damaged.len())
    }
}

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
    // Heads against their witnesses in the key directory: a head rolled
    // back or replaced reads as sound blobs, so only the witness tells.
    let mut rolled_back = Vec::new();
    let sources = match &source {
        Some(source) => vec![source.clone()],
        None => store.sources()?,
    };
    for source in &sources {
        if let Err(e) = crate::cli::KeyDirArgs::check_head(&store, source) {
            rolled_back.push(format!("{e:#}"));
        }
    }
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
    for error in &rolled_back {
        println!("ROLLED BACK {error}");
    }
    match (report.is_clean(), rolled_back.len()) {
        (true, 0) => {
            println!("no damage found");
            Ok(())
        }
        (true, heads) => bail!("{heads} heads rolled back or replaced"),
        (false, 0) => bail!("{} damaged blobs", report.damaged.len()),
        (false, heads) => bail!(
            "{} damaged blobs, {heads} heads rolled back or replaced",
            report.damaged.len()
        ),
    }
}

//! `blockrep export`: a head, a snapshot or any stored root to a sparse raw image.

use std::path::Path;

use anyhow::{Context, Result};

use super::source_id;
use crate::cli::ExportArgs;

/// Writes the head, the snapshot or the root asked for to `--out`.
pub(crate) fn export(args: ExportArgs) -> Result<()> {
    let store = blockrep_store::Store::open_read_only(&args.data)?;
    if let Some(hex) = &args.root {
        return export_root(&store, hex, &args.out);
    }
    let source = source_id(args.source.as_deref().unwrap_or_default())?;
    if let Some(name) = &args.snapshot {
        let snapshot = store
            .snapshot(&source, name)?
            .with_context(|| format!("source {source} has no snapshot {name:?}"))?;
        let (size, chunks) = store.export_root(&snapshot.root, &args.out)?;
        println!(
            "exported snapshot {name} of {source} (epoch {}, {size} bytes, {chunks} non-zero chunks) to {}",
            snapshot.epoch,
            display(&args.out)
        );
        return Ok(());
    }
    let stats = store.export(&source, &args.out)?;
    println!(
        "exported source {source} epoch {} ({} bytes, {} non-zero chunks) to {}",
        stats.head.epoch,
        stats.disk_size_bytes,
        stats.chunks_written,
        display(&args.out)
    );
    Ok(())
}

/// `export --root`: the disk a root describes, whatever refers to it. Every blob
/// read is checked against its blake3 id, so a successful export is exactly the
/// disk the root names.
fn export_root(store: &blockrep_store::Store, hex: &str, out: &Path) -> Result<()> {
    let root_id =
        blockrep_core::ChunkId::from(blake3::Hash::from_hex(hex).map_err(|e| {
            anyhow::anyhow!("--root {hex:?} is not a root id (64 hex digits): {e}")
        })?);
    // Read before the output is created, so that an unknown root leaves no file.
    let root = store.read_root(&root_id).map_err(|e| match e.kind() {
        blockrep_store::ErrorKind::Missing => anyhow::anyhow!(
            "root {root_id} is not in the store (never committed here, or collected by GC)"
        ),
        _ => anyhow::Error::new(e).context(format!("cannot read root {root_id}")),
    })?;
    match store.export_root(&root_id, out) {
        Ok((size, chunks)) => {
            println!(
                "exported root {root_id} ({size} bytes, {} chunks of {} bytes, {chunks} non-zero) to {}",
                root.geometry().chunk_count(),
                root.geometry().chunk_size_bytes(),
                display(out)
            );
            Ok(())
        }
        // The store removes a partial image itself (and never touches an
        // existing file at `out` unless the export succeeds).
        Err(error) => Err(anyhow::Error::new(error).context(format!(
            "root {root_id} is in the store but cannot be exported whole"
        ))),
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

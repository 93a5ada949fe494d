//! `blockrep export`: a head, a snapshot or any stored root to a sparse raw image
//! (one per volume, for a machine of several disks).

use std::path::Path;

use anyhow::{Context, Result, bail};
use blockrep_core::ChunkId;
use blockrep_store::Store;

use super::source_id;
use crate::cli::ExportArgs;

/// Writes the head, the snapshot or the root asked for to `--out`.
pub(crate) fn export(args: ExportArgs) -> Result<()> {
    let store = args.store.open(&args.data)?;
    args.keys.load_into(&store)?;
    let (what, root_id) = if let Some(hex) = &args.root {
        (format!("root {hex}"), parse_root(&store, hex)?)
    } else {
        let source = source_id(args.source.as_deref().unwrap_or_default())?;
        if let Some(name) = &args.snapshot {
            let snapshot = store
                .snapshot(&source, name)?
                .with_context(|| format!("source {source} has no snapshot {name:?}"))?;
            (
                format!("snapshot {name} of {source} (epoch {})", snapshot.epoch),
                snapshot.root,
            )
        } else {
            crate::cli::KeyDirArgs::check_head(&store, &source)?;
            let head = store
                .head(&source)?
                .with_context(|| format!("source {source} has no committed replica"))?;
            (format!("source {source} epoch {}", head.epoch), head.root)
        }
    };
    let volumes = store
        .volume_roots(&root_id)
        .with_context(|| format!("cannot read {what}"))?;
    if let Some(volume) = &args.volume {
        let root = store
            .volume_root(&root_id, Some(volume))
            .with_context(|| what.clone())?;
        return export_one(&store, &format!("{what} volume {volume}"), &root, &args.out);
    }
    match volumes.as_slice() {
        [(_, root)] => export_one(&store, &what, root, &args.out),
        _ => {
            // A machine: every volume, one image each, in the directory --out.
            if args.out.exists() && !args.out.is_dir() {
                bail!(
                    "{what} has {} volumes: --out {} must be a directory (or name one with --volume)",
                    volumes.len(),
                    args.out.display()
                );
            }
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("cannot create {}", args.out.display()))?;
            for (name, root) in &volumes {
                let out = args.out.join(format!("{name}.raw"));
                export_one(&store, &format!("{what} volume {name}"), root, &out)?;
            }
            Ok(())
        }
    }
}

/// `--root`: any root the store holds, whatever refers to it.
fn parse_root(store: &Store, hex: &str) -> Result<ChunkId> {
    let root_id =
        ChunkId::from(blake3::Hash::from_hex(hex).map_err(|e| {
            anyhow::anyhow!("--root {hex:?} is not a root id (64 hex digits): {e}")
        })?);
    // Read before the output is created, so that an unknown root leaves no file.
    store
        .read_stored_root(&root_id)
        .map_err(|e| match e.kind() {
            blockrep_store::ErrorKind::Missing => anyhow::anyhow!(
                "root {root_id} is not in the store (never committed here, or collected by GC)"
            ),
            _ => anyhow::Error::new(e).context(format!("cannot read root {root_id}")),
        })?;
    Ok(root_id)
}

/// Exports one disk root. Every blob read is checked against its blake3 id,
/// so a successful export is exactly the disk the root names.
fn export_one(store: &Store, what: &str, root_id: &ChunkId, out: &Path) -> Result<()> {
    let root = store.read_root(root_id)?;
    match store.export_root(root_id, out) {
        Ok((size, chunks)) => {
            println!(
                "exported {what} ({size} bytes, {} chunks of {} bytes, {chunks} non-zero) to {}",
                root.geometry().chunk_count(),
                root.geometry().chunk_size_bytes(),
                out.display()
            );
            Ok(())
        }
        // The store removes a partial image itself (and never touches an
        // existing file at `out` unless the export succeeds).
        Err(error) => Err(anyhow::Error::new(error).context(format!(
            "{what} (root {root_id}) is in the store but cannot be exported whole"
        ))),
    }
}

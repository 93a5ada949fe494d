//! `blockrep source delete`: a source deleted from a stopped server's
//! store, and with --shred its data keys destroyed.

use anyhow::{Context, Result, bail};
use blockrep_keys::KeyDir;

use crate::cli::{SourceCommand, SourceDeleteArgs};

pub(crate) fn source(command: SourceCommand) -> Result<()> {
    match command {
        SourceCommand::Delete(args) => delete(&args),
    }
}

fn delete(args: &SourceDeleteArgs) -> Result<()> {
    let source = super::source_id(&args.id)?;
    let keys = match &args.key_dir {
        Some(dir) if dir.is_dir() => Some(KeyDir::open(dir)?),
        Some(dir) => bail!("no key directory at {}", dir.display()),
        None => None,
    };
    let key_count = match &keys {
        Some(keys) => keys.records(&source)?.len(),
        None => 0,
    };
    // Checked before anything is deleted: a shred that cannot happen must
    // not leave the source half gone.
    if args.shred && key_count == 0 {
        bail!(
            "source {source} has no data keys to shred: it is stored in clear, and its blobs \
             stay readable until `blockrep gc` reclaims them (nothing was deleted)"
        );
    }
    let store = blockrep_store::Store::open_exclusive(&args.data).with_context(|| {
        format!(
            "cannot open the store in {} for writing (stop its server first)",
            args.data.display()
        )
    })?;
    let deleted = match store.delete_source(&source) {
        Ok(deleted) => deleted,
        // An earlier run deleted it and stopped before its keys were
        // destroyed: this one finishes the shred.
        Err(e) if e.kind() == blockrep_store::ErrorKind::NotFound && args.shred => {
            println!("source {source} was deleted already; destroying its keys");
            blockrep_store::SourceDeleted::default()
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "deleted source {source}: {} snapshots, {} launches{}",
        deleted.snapshots,
        deleted.launches.len(),
        if deleted.launches.is_empty() {
            String::new()
        } else {
            format!(" ({})", deleted.launches.join(", "))
        }
    );
    match (&keys, args.shred) {
        (Some(keys), true) => {
            let destroyed = keys.shred(&source)?;
            println!(
                "destroyed {destroyed} data keys of {source}: nothing of it can be read again"
            );
        }
        (Some(keys), false) if key_count > 0 => println!(
            "its {key_count} data keys remain in {}; --shred destroys them",
            keys.path().display()
        ),
        _ => {}
    }
    println!("run `blockrep gc` to reclaim its space");
    Ok(())
}

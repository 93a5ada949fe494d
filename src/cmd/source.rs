//! `blockrep source delete`: a source deleted from a stopped server's
//! store, and with --shred its data keys destroyed; `blockrep source
//! encrypt`: a source stored in clear converted to encrypted at rest.

use anyhow::{Context, Result, bail};
use blockrep_keys::KeyDir;

use crate::cli::{SourceCommand, SourceDeleteArgs, SourceEncryptArgs};

pub(crate) fn source(command: SourceCommand) -> Result<()> {
    match command {
        SourceCommand::Delete(args) => delete(&args),
        SourceCommand::Encrypt(args) => encrypt(&args),
        SourceCommand::MarkReady(args) => step("mark-ready", &args),
        SourceCommand::Finalize(args) => step("finalize", &args),
        SourceCommand::Archive(args) => step("archive", &args),
        SourceCommand::History(args) => history(&args),
    }
}

/// A migration step through the admin API.
fn step(action: &str, args: &crate::cli::SourceStepArgs) -> Result<()> {
    let source = super::source_id(args.source_id())?;
    if args.force && action != "mark-ready" {
        bail!("{action} has no gate to force: it is refused only where it cannot be done");
    }
    let path = format!("/v1/sources/{source}/{action}");
    let body = serde_json::json!({ "force": args.force });
    super::runtime_block_on(
        args.admin
            .show("POST", &path, Some(body), |v: serde_json::Value| {
                let state = v["migration_state"].as_str().unwrap_or("?");
                match v.get("launches_released") {
                    Some(launches) => println!(
                        "source {source} finalized: {} snapshots and launches {launches} released; \
                 its agent is told to stop",
                        v["snapshots_released"]
                    ),
                    None if v["event"].is_null() => {
                        println!("source {source} is {state} (unchanged)")
                    }
                    None => println!("source {source} is now {state}"),
                }
            }),
    )
}

/// The migration history through the admin API.
fn history(args: &crate::cli::SourceStepArgs) -> Result<()> {
    let source = super::source_id(args.source_id())?;
    if args.force {
        bail!("history changes nothing: --force does not apply");
    }
    let path = format!("/v1/sources/{source}/history");
    super::runtime_block_on(args.admin.show(
        "GET",
        &path,
        None,
        |events: Vec<blockrep_server::EventView>| crate::print::history(&events),
    ))
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

fn encrypt(args: &SourceEncryptArgs) -> Result<()> {
    let source = super::source_id(&args.id)?;
    let Some(key_dir) = &args.keys.key_dir else {
        bail!("name the key directory the source's data key goes to: --key-dir");
    };
    let kek = args.keys.kek.kek()?;
    let store = blockrep_store::Store::open_exclusive(&args.data).with_context(|| {
        format!(
            "cannot open the store in {} for writing (stop its server first)",
            args.data.display()
        )
    })?;
    if store.head(&source)?.is_none() {
        bail!(
            "no source {source} with a committed head in {}",
            args.data.display()
        );
    }
    let keys = KeyDir::open(key_dir)?;
    let now = blockrep_core::clock::now_unix_ms();
    if keys.records(&source)?.is_empty() {
        let (record, _) = keys
            .create(&source, &kek, now)
            .with_context(|| format!("cannot make a data key for source {source}"))?;
        println!(
            "made data key {} of source {source}, wrapped by KEK {}",
            record.reference,
            kek.id()
        );
    } else {
        println!("source {source} has its data keys already: finishing its conversion");
    }
    store.keyring().extend_from(&keys, &kek)?;
    store.keyring().witness_in(keys);
    let converted = store.encrypt_source(&source, now)?;
    println!(
        "sealed {} chunks; converted {} snapshots, {} launches{}",
        converted.chunks_sealed,
        converted.snapshots,
        converted.launches,
        if converted.head { " and the head" } else { "" }
    );
    if args.keep_clear_copies {
        println!("its clear copies stay until `blockrep gc` reclaims them");
        return Ok(());
    }
    let options = blockrep_store::GcOptions {
        live_share_min: 1.0,
        ..blockrep_store::GcOptions::default()
    };
    let collected = store.gc(&options)?;
    println!(
        "removed the clear copies: {} blobs, {} bytes freed ({} packs compacted)",
        collected.blobs_removed, collected.bytes_freed, collected.packs_compacted
    );
    Ok(())
}

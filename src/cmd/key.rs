//! `blockrep key`: make a KEK, list data keys, re-wrap them under a new KEK,
//! start a source's next data key.

use anyhow::{Context, Result, bail};
use blockrep_keys::KeyDir;

use crate::cli::KeyCommand;

pub(crate) fn key(command: KeyCommand) -> Result<()> {
    match command {
        KeyCommand::Init { out } => {
            let id = blockrep_keys::init_kek_file(&out)?;
            println!("wrote KEK {id} to {}", out.display());
            println!("keep a copy apart from the data: without it nothing it wraps can be read");
        }
        KeyCommand::List { key_dir } => {
            let keys = open_existing(&key_dir)?;
            println!(
                "{:<24} {:>6}  {:<32}  {:<8} {:<24} CREATED",
                "SOURCE", "SERIAL", "KEY", "KEK", "KEK ID"
            );
            for source in keys.sources()? {
                for record in keys.records(&source)? {
                    println!(
                        "{:<24} {:>6}  {}  {:<8} {:<24} {}",
                        source.as_str(),
                        record.serial,
                        record.reference,
                        record.kek_kind.to_string(),
                        record.kek_id,
                        crate::print::unix_ms_text(record.created_unix_ms),
                    );
                }
            }
        }
        KeyCommand::Rotate(args) => {
            let keys = open_existing(&args.key_dir)?;
            let current = args.current.kek()?;
            if args.kek {
                let new = args.new_kek()?;
                if new.id() == current.id() {
                    bail!("the new KEK is the current one ({})", new.id());
                }
                let report = keys.rewrap(&current, &new)?;
                println!(
                    "re-wrapped {} data keys under KEK {} ({} were already)",
                    report.rewrapped,
                    new.id(),
                    report.already
                );
            } else if let Some(source) = &args.source {
                let source = super::source_id(source)?;
                let existing = keys.records(&source)?;
                let Some(last) = existing.last() else {
                    bail!(
                        "source {source} has no data keys in {}: it is not encrypted",
                        args.key_dir.display()
                    );
                };
                // Unwrapping the newest key first proves the KEK is the one in use.
                last.unwrap_with(&current)?;
                let (record, _) =
                    keys.create(&source, &current, blockrep_core::clock::now_unix_ms())?;
                println!(
                    "source {source}: data key {} ({}) seals new data from the server's next start; \
                     the {} older keys still open what they sealed",
                    record.serial,
                    record.reference,
                    existing.len()
                );
            }
        }
    }
    Ok(())
}

/// The key directory at `path`, which must exist (a typo must not make an
/// empty one).
fn open_existing(path: &std::path::Path) -> Result<KeyDir> {
    if !path.is_dir() {
        bail!("no key directory at {}", path.display());
    }
    KeyDir::open(path).with_context(|| format!("key directory {}", path.display()))
}

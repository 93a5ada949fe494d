//! `blockrep source`: sources kept by a store.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub(crate) enum SourceCommand {
    /// Delete a source from the store of a stopped server: its launches,
    /// snapshots and head; its blobs become garbage for the next `gc`. With
    /// --shred, also destroy its data keys (a source encrypted at rest):
    /// nothing of it can be read again, from this store or from any copy of
    /// it, even with the KEK.
    Delete(SourceDeleteArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SourceDeleteArgs {
    /// The source's id.
    pub(crate) id: String,
    /// The store's data directory (the server must be stopped).
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Destroy the source's data keys in --key-dir as well. Refused, with
    /// nothing deleted, for a source that has none (stored in clear).
    #[arg(long, requires = "key_dir")]
    pub(crate) shred: bool,
    /// The key directory of the server's encryption at rest.
    #[arg(long, value_name = "DIR")]
    pub(crate) key_dir: Option<PathBuf>,
}

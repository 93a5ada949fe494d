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
    /// Convert a source stored in clear to encrypted at rest, in the store
    /// of a stopped server: it gets a data key in --key-dir, and every tree
    /// it names (head, snapshots, launches) is written again with its
    /// chunks and pages sealed under keyed ids; its head moves one epoch on.
    /// Then a collection removes the clear copies (compacting every pack
    /// that holds a dead blob), except blobs other clear sources of its
    /// tenant share. Until it finishes the source cannot be read; a run
    /// that stopped half way is finished by running it again.
    Encrypt(SourceEncryptArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SourceEncryptArgs {
    /// The source's id.
    pub(crate) id: String,
    /// The store's data directory (the server must be stopped).
    #[arg(long)]
    pub(crate) data: PathBuf,
    #[command(flatten)]
    pub(crate) keys: super::KeyDirArgs,
    /// Leave the clear copies for the next `blockrep gc` (which compacts
    /// only packs below its --live-share-min, so some may stay a while).
    #[arg(long)]
    pub(crate) keep_clear_copies: bool,
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

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
    /// Confirm a source's test: `testing` -> `ready_for_cutover` (admin
    /// API). Refused from another state, or while a launch's must-succeed
    /// check fails, unless --force (recorded in its history).
    MarkReady(SourceStepArgs),
    /// Finish a cut-over source's migration (admin API): its snapshots and
    /// test launches are released (their NBD clients disconnected), its
    /// agent is told to stop, its cutover launch is kept. Refused before
    /// the cutover.
    Finalize(SourceStepArgs),
    /// Hide a finalized source from default listings (`status --all`
    /// shows it) (admin API).
    Archive(SourceStepArgs),
    /// Every migration step of a source: when, from and to which state,
    /// who asked, forced or not, and why (admin API).
    History(SourceStepArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SourceStepArgs {
    /// The source's id.
    #[arg(value_name = "ID", required_unless_present = "source")]
    pub(crate) id: Option<String>,
    /// The source's id (the same as ID).
    #[arg(long, value_name = "ID", conflicts_with = "id")]
    pub(crate) source: Option<String>,
    /// Pass the gate of this step (mark-ready without a test, or with a
    /// failing must-succeed check); recorded in the history as forced.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) admin: super::AdminArgs,
}

impl SourceStepArgs {
    /// The source named, positionally or with --source.
    pub(crate) fn source_id(&self) -> &str {
        self.id
            .as_deref()
            .or(self.source.as_deref())
            .unwrap_or_default()
    }
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

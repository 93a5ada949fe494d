//! `blockrep key`: the key-encryption key and the data keys of encryption
//! at rest (the hierarchy is described in docs/security.md).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Make a new key-encryption key file: 32 random bytes, mode 0600.
    /// Refuses to replace a file: a lost KEK loses every key it wrapped, so
    /// keep a copy where the data is not.
    Init {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// List the data keys of a key directory: source, serial, reference,
    /// the KEK that wraps each, and when it was made (no KEK needed).
    List {
        /// The key directory.
        #[arg(long, value_name = "DIR")]
        key_dir: PathBuf,
    },
    /// Re-wrap every data key under a new KEK (`--kek`; nothing else is
    /// rewritten, and an interrupted run is finished by running it again),
    /// or start a new data key for one source's new data (`--source ID`;
    /// what its older keys sealed stays readable).
    Rotate(RotateArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RotateArgs {
    /// The key directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) key_dir: PathBuf,
    /// Re-wrap every data key under the KEK given by --new-kek-file or
    /// --new-kek-cmd.
    #[arg(long, conflicts_with = "source", required_unless_present = "source")]
    pub(crate) kek: bool,
    /// Start a new data key for this source, which must have keys already.
    #[arg(long, value_name = "ID")]
    pub(crate) source: Option<String>,
    #[command(flatten)]
    pub(crate) current: KekArgs,
    /// The new KEK file (with --kek).
    #[arg(
        long,
        value_name = "FILE",
        requires = "kek",
        conflicts_with = "new_kek_cmd"
    )]
    pub(crate) new_kek_file: Option<PathBuf>,
    /// The new key service's command (with --kek).
    #[arg(long, value_name = "CMD", requires = "kek")]
    pub(crate) new_kek_cmd: Option<String>,
}

/// Where the key-encryption key is.
#[derive(Debug, Clone, Args)]
pub(crate) struct KekArgs {
    /// The KEK file (`blockrep key init`).
    #[arg(long, value_name = "FILE", conflicts_with = "kek_cmd")]
    pub(crate) kek_file: Option<PathBuf>,
    /// A key service's command, run by /bin/sh with BLOCKREP_KEK_OP set to
    /// id, wrap or unwrap (contract in docs/security.md;
    /// scripts/kek-aws-kms.sh is one for AWS KMS).
    #[arg(long, value_name = "CMD")]
    pub(crate) kek_cmd: Option<String>,
}

impl KekArgs {
    /// The KEK these flags name; an error when they name none.
    pub(crate) fn kek(&self) -> Result<blockrep_keys::Kek> {
        load_kek(
            self.kek_file.as_ref(),
            self.kek_cmd.as_deref(),
            "--kek-file or --kek-cmd",
        )
    }
}

impl RotateArgs {
    /// The new KEK of `rotate --kek`.
    pub(crate) fn new_kek(&self) -> Result<blockrep_keys::Kek> {
        load_kek(
            self.new_kek_file.as_ref(),
            self.new_kek_cmd.as_deref(),
            "--new-kek-file or --new-kek-cmd",
        )
    }
}

fn load_kek(
    file: Option<&PathBuf>,
    command: Option<&str>,
    flags: &str,
) -> Result<blockrep_keys::Kek> {
    match (file, command) {
        (Some(path), None) => blockrep_keys::Kek::from_file(path)
            .with_context(|| format!("KEK file {}", path.display())),
        (None, Some(command)) => blockrep_keys::Kek::from_command(command).context("KEK command"),
        _ => bail!("name the key-encryption key with {flags}"),
    }
}

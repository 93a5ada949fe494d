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

/// Encryption at rest, for the server.
#[derive(Debug, Clone, Args)]
pub(crate) struct EncryptionArgs {
    /// Encrypt every new source at rest: it gets a data key, wrapped by the
    /// KEK in --key-dir, and its chunks, pages and roots are sealed with
    /// AES-256-GCM under keyed ids. Sources already stored in clear stay
    /// clear.
    #[arg(long, requires = "key_dir")]
    pub(crate) encrypt_at_rest: bool,
    #[command(flatten)]
    pub(crate) keys: KeyDirArgs,
}

/// The key directory and its KEK: what opens encrypted sources.
#[derive(Debug, Clone, Args)]
pub(crate) struct KeyDirArgs {
    /// The key directory: every encrypted source's data keys, wrapped by
    /// the KEK. Keep it apart from --data (and back it up apart): a copy of
    /// the data without it is unreadable, and deleting a source's keys
    /// shreds it. Needed to read any encrypted source.
    #[arg(long, value_name = "DIR")]
    pub(crate) key_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) kek: KekArgs,
}

impl KeyDirArgs {
    /// The key directory and KEK named, if any.
    fn named(&self) -> Result<Option<(PathBuf, blockrep_server::KekConfig)>> {
        let Some(key_dir) = &self.key_dir else {
            if self.kek.kek_file.is_some() || self.kek.kek_cmd.is_some() {
                bail!("a KEK without --key-dir: name the key directory it wraps");
            }
            return Ok(None);
        };
        let kek = match (&self.kek.kek_file, &self.kek.kek_cmd) {
            (Some(path), None) => blockrep_server::KekConfig::File(path.clone()),
            (None, Some(command)) => blockrep_server::KekConfig::Command(command.clone()),
            _ => bail!("--key-dir needs its KEK: --kek-file or --kek-cmd"),
        };
        Ok(Some((key_dir.clone(), kek)))
    }

    /// Adds the keys of the key directory to `store`'s keyring, so that its
    /// encrypted sources read (nothing without --key-dir).
    pub(crate) fn load_into(&self, store: &blockrep_store::Store) -> Result<()> {
        let Some((key_dir, _)) = self.named()? else {
            return Ok(());
        };
        if !key_dir.is_dir() {
            bail!("no key directory at {}", key_dir.display());
        }
        let kek = self.kek.kek()?;
        let dir = blockrep_keys::KeyDir::open(&key_dir)?;
        store.keyring().extend_from(&dir, &kek)?;
        store.keyring().witness_in(dir);
        Ok(())
    }

    /// Checks `source`'s head against the witness in the key directory
    /// (nothing to check without one): a head rolled back or replaced is an
    /// error naming both.
    pub(crate) fn check_head(
        store: &blockrep_store::Store,
        source: &blockrep_core::SourceId,
    ) -> Result<()> {
        let head = store.head(source)?;
        store
            .keyring()
            .check_head(source, head.map(|h| (h.epoch, h.root.0)))?;
        Ok(())
    }
}

impl EncryptionArgs {
    /// The configuration these flags ask for: `None` without --key-dir.
    pub(crate) fn config(&self) -> Result<Option<blockrep_server::EncryptionConfig>> {
        Ok(self
            .keys
            .named()?
            .map(|(key_dir, kek)| blockrep_server::EncryptionConfig {
                key_dir,
                kek,
                encrypt_new_sources: self.encrypt_at_rest,
            }))
    }
}

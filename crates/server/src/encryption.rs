//! Encryption at rest on the server: the KEK and key directory it was
//! started with, the keys of every encrypted source unwrapped at start, and
//! a data key made for each new source when `--encrypt-at-rest` asks for it.
//! A source's chunks, pages and roots are then sealed by the store, and its
//! agent is given the source's id space so that both ends name chunks by
//! their stored ids (see `blockrep_core::IdSpace`).

use std::path::PathBuf;
use std::sync::Arc;

use blockrep_core::clock::now_unix_ms;
use blockrep_core::{IdSpace, SourceId};
use blockrep_keys::{Kek, KeyDir, SEALS_PER_KEY_MAX, Sealer};
use blockrep_store::Store;

use crate::Error;

/// Where the key-encryption key is.
#[derive(Debug, Clone)]
pub enum KekConfig {
    /// A KEK file (`blockrep key init`).
    File(PathBuf),
    /// A key service's command (contract in `blockrep_keys::kek_cmd`).
    Command(String),
}

/// Encryption at rest, as configured.
#[derive(Debug, Clone)]
pub struct EncryptionConfig {
    /// The key directory: every source's data keys, wrapped; kept apart
    /// from the data directory.
    pub key_dir: PathBuf,
    /// The KEK that wraps them.
    pub kek: KekConfig,
    /// Give every new source a data key (`--encrypt-at-rest`). Without it
    /// the keys of sources already encrypted are still loaded, so they
    /// stay readable and replicate as before.
    pub encrypt_new_sources: bool,
}

/// The keys a running server holds.
#[derive(Debug)]
pub(crate) struct ServerKeys {
    dir: KeyDir,
    kek: Arc<Kek>,
    encrypt_new_sources: bool,
}

impl ServerKeys {
    /// Reaches the KEK (a key service that fails refuses the start) and
    /// adds every data key of the key directory to the store's keyring.
    pub(crate) fn load(config: &EncryptionConfig, store: &Store) -> Result<Self, Error> {
        let refused = |e: blockrep_keys::Error| Error::Config(format!("encryption at rest: {e}"));
        let kek = match &config.kek {
            KekConfig::File(path) => Kek::from_file(path),
            KekConfig::Command(command) => Kek::from_command(command),
        }
        .map_err(refused)?;
        let kek = Arc::new(kek);
        let dir = KeyDir::open(&config.key_dir).map_err(refused)?;
        store.keyring().extend_from(&dir, &kek).map_err(refused)?;
        // From now on every head of an encrypted source is witnessed there,
        // and keys made there by others (servers sharing the directory,
        // `key rotate --source`) are read when missed.
        store.keyring().witness_in(dir.clone());
        store
            .keyring()
            .load_new_keys_from(dir.clone(), Arc::clone(&kek));
        Ok(Self {
            dir,
            kek,
            encrypt_new_sources: config.encrypt_new_sources,
        })
    }

    /// The KEK's id, for status.
    pub(crate) fn kek_id(&self) -> &str {
        self.kek.id()
    }
}

/// An encrypted source's current data key and id space.
pub(crate) type Sealing = (Arc<Sealer>, IdSpace);

/// The data key sealing `source`'s blobs, with its id space: the one it has, or, for a source
/// with nothing stored yet on a server that encrypts new sources, a new one
/// made durable in the key directory before anything is sealed with it. A
/// source already stored in clear stays clear. Blocking (the key service's
/// command, fsyncs).
pub(crate) fn sealing_for(
    store: &Store,
    keys: Option<&ServerKeys>,
    source: &SourceId,
) -> Result<Option<Sealing>, String> {
    // A key made since the start: by another server sharing the key
    // directory (and the bucket), or a rotation by `key rotate --source`.
    store
        .keyring()
        .refresh_source(source)
        .map_err(|e| format!("cannot read the data keys of source {source}: {e}"))?;
    if let Some(sealer) = store.sealer_of(source) {
        // A head rolled back (or replaced) behind the server's back is not
        // served: it no longer matches the witness in the key directory.
        let head = store.head(source).map_err(|e| e.to_string())?;
        store
            .keyring()
            .check_head(source, head.map(|h| (h.epoch, h.root.0)))
            .map_err(|e| e.to_string())?;
        // A key with a quarter of its seals left is replaced before it
        // runs out (SEALS_PER_KEY_MAX: random nonces).
        if let Some(keys) = keys
            && sealer.seals_left() < SEALS_PER_KEY_MAX / 4
        {
            let sealer = new_key(store, keys, source)?;
            tracing::info!(%source, key = %sealer.reference(), "data key rotated: the previous one had sealed three quarters of what it may");
            return Ok(Some((sealer, store.id_space_of(source))));
        }
        return Ok(Some((sealer, store.id_space_of(source))));
    }
    let Some(keys) = keys.filter(|k| k.encrypt_new_sources) else {
        return Ok(None);
    };
    if store.head(source).map_err(|e| e.to_string())?.is_some() {
        return Ok(None);
    }
    let sealer = new_key(store, keys, source)?;
    tracing::info!(%source, key = %sealer.reference(), kek = keys.kek.id(), "new source encrypted at rest");
    Ok(Some((sealer, store.id_space_of(source))))
}

/// Makes `source`'s next data key (its first, for a new source), durable
/// in the key directory with its seals counted there, and adds it to the
/// keyring; the key that seals the source's new data from now on.
fn new_key(store: &Store, keys: &ServerKeys, source: &SourceId) -> Result<Arc<Sealer>, String> {
    let (record, key) = keys
        .dir
        .create(source, &keys.kek, now_unix_ms())
        .map_err(|e| format!("cannot make a data key for source {source}: {e}"))?;
    let counted = keys.dir.seal_count_path(source, record.serial);
    let sealer = key
        .sealer()
        .and_then(|sealer| sealer.counted_in(counted))
        .map_err(|e| format!("data key of source {source}: {e}"))?;
    store.keyring().add(source, record.serial, Arc::new(sealer));
    if record.serial == 1 {
        return store
            .sealer_of(source)
            .ok_or_else(|| format!("source {source}: its new data key is not held"));
    }
    // Another server may have made the source's first keys between the
    // look at the start of the session and this one: they are read in (the
    // source's id space is that of its first key, whoever made it).
    store
        .keyring()
        .refresh_source(source)
        .map_err(|e| format!("cannot read the data keys of source {source}: {e}"))?;
    store
        .sealer_of(source)
        .ok_or_else(|| format!("source {source}: its new data key is not held"))
}

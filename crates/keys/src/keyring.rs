//! The unwrapped data keys a running store uses: every key of every
//! encrypted source, by reference (to open what they sealed), and each
//! source's newest (to seal new data).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use blockrep_core::SourceId;

use crate::data_key::{KeyRef, Sealer};
use crate::error::{Error, ErrorKind};
use crate::kek::Kek;
use crate::key_dir::KeyDir;

#[derive(Debug, Default)]
struct Inner {
    by_ref: HashMap<KeyRef, Arc<Sealer>>,
    current: HashMap<SourceId, (u32, Arc<Sealer>)>,
}

/// Unwrapped data keys, shared by everything that reads or writes sealed
/// blobs. Keys are only added (a shredded source's keys leave with a
/// restart of the store, which its deletion requires).
#[derive(Debug, Default)]
pub struct Keyring {
    inner: RwLock<Inner>,
}

impl Keyring {
    /// An empty keyring (a store with no encrypted source).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every key of `dir`, unwrapped with `kek`; how many. A key the
    /// KEK cannot unwrap (another KEK's, or a key service that fails) is an
    /// error naming the source, and adds nothing of that source.
    pub fn extend_from(&self, dir: &KeyDir, kek: &Kek) -> Result<usize, Error> {
        let mut added = 0;
        for source in dir.sources()? {
            let mut sealers = Vec::new();
            for record in dir.records(&source)? {
                let key = record.unwrap_with(kek)?;
                sealers.push((record.serial, Arc::new(key.sealer()?)));
            }
            for (serial, sealer) in sealers {
                self.add(&source, serial, sealer);
                added += 1;
            }
        }
        Ok(added)
    }

    /// Adds a key of `source`; the one of the highest serial seals new data.
    pub fn add(&self, source: &SourceId, serial: u32, sealer: Arc<Sealer>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.by_ref.insert(sealer.reference(), Arc::clone(&sealer));
        let newer = inner
            .current
            .get(source)
            .is_none_or(|(known, _)| *known < serial);
        if newer {
            inner.current.insert(source.clone(), (serial, sealer));
        }
    }

    /// The key named `reference`; an error saying it is unknown (never made
    /// here, or shredded) otherwise.
    pub fn sealer(&self, reference: &KeyRef) -> Result<Arc<Sealer>, Error> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.by_ref.get(reference).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "data key {reference} is not in the key directory: it was shredded, \
                     or the store is opened without its keys"
                ),
            )
        })
    }

    /// The key that seals `source`'s new data, if the source is encrypted.
    pub fn current(&self, source: &SourceId) -> Option<Arc<Sealer>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.current.get(source).map(|(_, s)| Arc::clone(s))
    }

    /// Whether `source` has keys here.
    pub fn is_encrypted(&self, source: &SourceId) -> bool {
        self.current(source).is_some()
    }
}

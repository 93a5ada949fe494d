//! The unwrapped data keys a running store uses: every key of every
//! encrypted source, by reference (to open what they sealed), each source's
//! newest (to seal new data), and each source's id space: that of its first
//! key, for its whole life, so that a new data key (`key rotate --source`)
//! changes how new blobs are sealed but never what any chunk is called.
//! Heads, snapshots and launches made before a rotation keep naming the
//! chunks their source still has.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use blockrep_core::{IdSpace, SourceId};

use crate::data_key::{KeyRef, Sealer};
use crate::error::{Error, ErrorKind};
use crate::kek::Kek;
use crate::key_dir::KeyDir;

#[derive(Debug, Default)]
struct Inner {
    /// Every key, with the id space of its source.
    by_ref: HashMap<KeyRef, (Arc<Sealer>, IdSpace)>,
    current: HashMap<SourceId, (u32, Arc<Sealer>)>,
    /// Each source's id space and the serial of the key it comes from.
    spaces: HashMap<SourceId, (u32, IdSpace)>,
}

/// Unwrapped data keys, shared by everything that reads or writes sealed
/// blobs. Keys are only added (a shredded source's keys leave with a
/// restart of the store, which its deletion requires).
#[derive(Debug, Default)]
pub struct Keyring {
    inner: RwLock<Inner>,
    /// Where the heads of encrypted sources are witnessed, if anywhere.
    witnesses: OnceLock<KeyDir>,
    /// Where keys made after the keyring was filled are read from (by
    /// another server sharing the key directory, or `key rotate --source`),
    /// with the KEK that unwraps them.
    loader: OnceLock<(KeyDir, Arc<Kek>)>,
    /// When the whole key directory was last read again.
    refreshed: Mutex<Option<Instant>>,
}

/// The key directory is read again on a missed key at most this often.
const REFRESH_INTERVAL_MIN: Duration = Duration::from_secs(1);

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
                let counted = dir.seal_count_path(&source, record.serial);
                sealers.push((record.serial, Arc::new(key.sealer()?.counted_in(counted)?)));
            }
            for (serial, sealer) in sealers {
                self.add(&source, serial, sealer);
                added += 1;
            }
        }
        Ok(added)
    }

    /// Reads keys made from now on from `dir` when one is missed (see
    /// [`Keyring::refresh`]). Set once.
    pub fn load_new_keys_from(&self, dir: KeyDir, kek: Arc<Kek>) {
        let _ = self.loader.set((dir, kek));
    }

    /// Adds the keys of the key directory that are not here yet: made by
    /// another server sharing it, or by `key rotate --source`. At most once
    /// per [`REFRESH_INTERVAL_MIN`] (a store reads it on every key it
    /// misses); whether a key was added. Nothing to do without a directory
    /// to read from.
    pub fn refresh(&self) -> Result<bool, Error> {
        let Some((dir, _)) = self.loader.get() else {
            return Ok(false);
        };
        {
            let mut refreshed = self.refreshed.lock().unwrap_or_else(|e| e.into_inner());
            if refreshed.is_some_and(|at| at.elapsed() < REFRESH_INTERVAL_MIN) {
                return Ok(false);
            }
            *refreshed = Some(Instant::now());
        }
        let mut added = false;
        for source in dir.sources()? {
            added |= self.refresh_source(&source)?;
        }
        Ok(added)
    }

    /// Adds `source`'s keys of the key directory that are not here yet,
    /// now; whether one was added.
    pub fn refresh_source(&self, source: &SourceId) -> Result<bool, Error> {
        let Some((dir, kek)) = self.loader.get() else {
            return Ok(false);
        };
        let mut added = false;
        for record in dir.records(source)? {
            let known = {
                let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
                inner.by_ref.contains_key(&record.reference)
            };
            if !known {
                let key = record.unwrap_with(kek)?;
                let counted = dir.seal_count_path(source, record.serial);
                let sealer = key.sealer()?.counted_in(counted)?;
                self.add(source, record.serial, Arc::new(sealer));
                added = true;
            }
        }
        Ok(added)
    }

    /// Adds a key of `source`; the one of the highest serial seals new data,
    /// the one of the lowest names the source's chunks. Keys are added in
    /// serial order (`extend_from` does), so the space never changes under
    /// a key already added.
    pub fn add(&self, source: &SourceId, serial: u32, sealer: Arc<Sealer>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let space = match inner.spaces.get(source) {
            Some((first, space)) if *first <= serial => *space,
            previous => {
                // A key older than those held (another server made it while
                // this one made a later one): the source's space is its, and
                // so is that of every key of the source already held.
                let old = previous.map(|(_, space)| *space);
                let space = sealer.id_space();
                inner.spaces.insert(source.clone(), (serial, space));
                if let Some(old) = old {
                    for (_, held) in inner.by_ref.values_mut().filter(|(_, s)| *s == old) {
                        *held = space;
                    }
                }
                space
            }
        };
        inner
            .by_ref
            .insert(sealer.reference(), (Arc::clone(&sealer), space));
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
        self.opener(reference).map(|(sealer, _)| sealer)
    }

    /// The key named `reference` and the id space of its source (what a
    /// chunk it sealed is checked against), as [`Keyring::sealer`].
    pub fn opener(&self, reference: &KeyRef) -> Result<(Arc<Sealer>, IdSpace), Error> {
        let find = || {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            inner.by_ref.get(reference).cloned()
        };
        if let Some(found) = find() {
            return Ok(found);
        }
        // Perhaps made since (by another server sharing the directory).
        let refreshed = self.refresh();
        if let Some(found) = find() {
            return Ok(found);
        }
        let why = match refreshed {
            Err(e) => format!(" (reading the key directory again failed: {e})"),
            Ok(_) => String::new(),
        };
        Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "data key {reference} is not in the key directory: it was shredded, or the \
                 store is opened without its keys{why}"
            ),
        ))
    }

    /// The key that seals `source`'s new data, if the source is encrypted.
    pub fn current(&self, source: &SourceId) -> Option<Arc<Sealer>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.current.get(source).map(|(_, s)| Arc::clone(s))
    }

    /// Whether `source` is encrypted here (its keys are held): its
    /// snapshot and launch records must then be authenticated.
    pub fn is_encrypted(&self, source: &SourceId) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.current.contains_key(source)
    }

    /// The key named `reference`, if it is one of `source`'s (what
    /// authenticates a record of that source); an error saying which
    /// otherwise.
    pub fn source_key(&self, source: &SourceId, reference: &KeyRef) -> Result<Arc<Sealer>, Error> {
        let (sealer, space) = self.opener(reference)?;
        // A source's keys all share its id space (that of its first key),
        // and no two sources share one.
        if self.id_space(source) != Some(space) {
            return Err(Error::new(
                ErrorKind::Auth,
                format!("data key {reference} is not a key of source {source}"),
            ));
        }
        Ok(sealer)
    }

    /// The id space of `source`'s chunks, if it is encrypted: the one its
    /// agent is given and its chunks are checked against.
    pub fn id_space(&self, source: &SourceId) -> Option<IdSpace> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.spaces.get(source).map(|(_, space)| *space)
    }

    /// Witnesses every head of an encrypted source committed from now on in
    /// `dir` (see `witness.rs`). Set once.
    pub fn witness_in(&self, dir: KeyDir) {
        let _ = self.witnesses.set(dir);
    }

    /// Records `source`'s new head as its witness, if the source is
    /// encrypted and heads are witnessed here (else nothing to do).
    pub fn witness_head(
        &self,
        source: &SourceId,
        epoch: u64,
        root: &[u8; 32],
    ) -> Result<(), Error> {
        match (self.witnesses.get(), self.current(source)) {
            (Some(dir), Some(sealer)) => dir.record_head(source, &sealer, epoch, root),
            _ => Ok(()),
        }
    }

    /// Records the head of `source`'s launch `name` as its witness, as
    /// [`Keyring::witness_head`] does.
    pub fn witness_launch(
        &self,
        source: &SourceId,
        name: &str,
        generation: u64,
        root: &[u8; 32],
    ) -> Result<(), Error> {
        match (self.witnesses.get(), self.current(source)) {
            (Some(dir), Some(sealer)) => {
                dir.record_launch_head(source, name, &sealer, generation, root)
            }
            _ => Ok(()),
        }
    }

    /// Checks the head of `source`'s launch `name` against its witness, if
    /// heads are witnessed here.
    pub fn check_launch(
        &self,
        source: &SourceId,
        name: &str,
        head: (u64, [u8; 32]),
    ) -> Result<(), Error> {
        match self.witnesses.get() {
            Some(dir) => dir.check_launch_head(source, name, self, head),
            None => Ok(()),
        }
    }

    /// Whether `source`'s head is witnessed here (it committed, or finished
    /// its conversion, encrypted).
    pub fn has_head_witness(&self, source: &SourceId) -> bool {
        self.witnesses
            .get()
            .is_some_and(|dir| dir.path().join(source.as_str()).join("head").exists())
    }

    /// The source under which launch `name`'s head is witnessed, if any
    /// (a launch's record must name that source).
    pub fn launch_witnessed_by(&self, name: &str) -> Result<Option<SourceId>, Error> {
        match self.witnesses.get() {
            Some(dir) => dir.launch_witnessed_by(name),
            None => Ok(None),
        }
    }

    /// Forgets the witness of `source`'s deleted launch `name`, if heads
    /// are witnessed here.
    pub fn forget_launch(&self, source: &SourceId, name: &str) -> Result<(), Error> {
        match self.witnesses.get() {
            Some(dir) => dir.forget_launch_head(source, name),
            None => Ok(()),
        }
    }

    /// Checks `source`'s head against its witness, if heads are witnessed
    /// here (see [`KeyDir::check_head`]).
    pub fn check_head(
        &self,
        source: &SourceId,
        head: Option<(u64, [u8; 32])>,
    ) -> Result<(), Error> {
        match self.witnesses.get() {
            Some(dir) => dir.check_head(source, self, head),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_key::DataKey;

    /// A source's older key read after a newer one (two servers made them
    /// at once): the source's space, and that of every key of it, is the
    /// older key's.
    #[test]
    fn an_older_key_read_later_gives_every_key_of_the_source_its_space() {
        let ring = Keyring::new();
        let web = SourceId::new("web").unwrap();
        let first = Arc::new(DataKey::generate().unwrap().sealer().unwrap());
        let second = Arc::new(DataKey::generate().unwrap().sealer().unwrap());
        ring.add(&web, 2, Arc::clone(&second));
        assert_eq!(ring.id_space(&web), Some(second.id_space()));
        ring.add(&web, 1, Arc::clone(&first));
        assert_eq!(ring.id_space(&web), Some(first.id_space()));
        for key in [&first, &second] {
            assert_eq!(ring.opener(&key.reference()).unwrap().1, first.id_space());
            ring.source_key(&web, &key.reference()).unwrap();
        }
        assert_eq!(ring.current(&web).unwrap().reference(), second.reference());
    }
}

//! Witnesses: the last head a server committed for an encrypted source, and
//! the last head of each of its launches, kept in the key directory
//! (`KEYS/SOURCE/head`, `KEYS/SOURCE/launch=NAME`), outside the data
//! directory, and authenticated by the source's MAC key. A head rolled back
//! to an older record, or replaced by another source's or launch's, no
//! longer matches its witness, and is refused by the server, `verify` and
//! `export`.
//!
//! Layout (`BRHWIT` version 1, 100 bytes): magic (8) | epoch (a launch's
//! generation) u64 | root id (32) | key reference (16) | MAC (32) of the
//! source id, epoch and root (and, for a launch, `launch/NAME`) under that
//! key | crc32 of everything before.
//!
//! A witness is written after the head it names is durable, so a crash
//! between the two leaves a witness older than the head, which is fine: only
//! a head older than its witness (or of its epoch with another root) is a
//! rollback.

use std::path::PathBuf;

use blockrep_core::SourceId;

use crate::data_key::{KeyRef, Sealer};
use crate::error::{Error, ErrorKind};
use crate::key_dir::{KeyDir, publish, read_bounded};
use crate::keyring::Keyring;

const MAGIC: [u8; 8] = *b"BRHWIT\x00\x01";
const LEN: usize = 100;

/// Which head a witness vouches for.
#[derive(Debug, Clone, Copy)]
enum Witnessed<'a> {
    /// The source's own head.
    Source,
    /// The head of the source's launch of this name.
    Launch(&'a str),
}

impl Witnessed<'_> {
    fn file_name(&self) -> String {
        match self {
            Witnessed::Source => "head".into(),
            // '=' is in no valid name: this never clashes with a key file.
            Witnessed::Launch(name) => format!("launch={name}"),
        }
    }

    fn describe(&self, source: &SourceId) -> String {
        match self {
            Witnessed::Source => format!("the head of source {source}"),
            Witnessed::Launch(name) => format!("the head of launch {name} (source {source})"),
        }
    }

    fn counter(&self) -> &'static str {
        match self {
            Witnessed::Source => "epoch",
            Witnessed::Launch(_) => "generation",
        }
    }

    fn mac_input(&self, source: &SourceId, epoch: u64, root: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + source.as_str().len() + 40 + 72);
        // A valid source id is at most 64 bytes: its length fits a byte.
        out.push(source.as_str().len() as u8);
        out.extend_from_slice(source.as_str().as_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(root);
        // After fields of fixed length: a source's head witness (nothing
        // here) and its launches' cannot stand for each other.
        if let Witnessed::Launch(name) = self {
            out.extend_from_slice(b"launch/");
            out.extend_from_slice(name.as_bytes());
        }
        out
    }
}

impl KeyDir {
    fn witness_path(&self, source: &SourceId, what: Witnessed<'_>) -> PathBuf {
        self.path().join(source.as_str()).join(what.file_name())
    }

    /// Records `source`'s head (`epoch`, `root`) as its witness, durably,
    /// authenticated under `sealer` (one of the source's keys).
    pub fn record_head(
        &self,
        source: &SourceId,
        sealer: &Sealer,
        epoch: u64,
        root: &[u8; 32],
    ) -> Result<(), Error> {
        self.record(source, Witnessed::Source, sealer, epoch, root)
    }

    /// Records the head (`generation`, `root`) of `source`'s launch `name`
    /// as its witness, as [`KeyDir::record_head`] does. A launch made anew
    /// under a name used before replaces the old launch's witness.
    pub fn record_launch_head(
        &self,
        source: &SourceId,
        name: &str,
        sealer: &Sealer,
        generation: u64,
        root: &[u8; 32],
    ) -> Result<(), Error> {
        self.record(source, Witnessed::Launch(name), sealer, generation, root)
    }

    /// The source whose key directory witnesses launch `name`'s head, if
    /// any.
    pub fn launch_witnessed_by(&self, name: &str) -> Result<Option<SourceId>, Error> {
        for source in self.sources()? {
            if self.witness_path(&source, Witnessed::Launch(name)).exists() {
                return Ok(Some(source));
            }
        }
        Ok(None)
    }

    /// Forgets the witness of `source`'s launch `name` (deleted); nothing
    /// to do when there is none.
    pub fn forget_launch_head(&self, source: &SourceId, name: &str) -> Result<(), Error> {
        let path = self.witness_path(source, Witnessed::Launch(name));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot remove {}", path.display()), e)),
        }
    }

    fn record(
        &self,
        source: &SourceId,
        what: Witnessed<'_>,
        sealer: &Sealer,
        epoch: u64,
        root: &[u8; 32],
    ) -> Result<(), Error> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(root);
        out.extend_from_slice(&sealer.reference().0);
        out.extend_from_slice(&sealer.mac(&what.mac_input(source, epoch, root)));
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        let dir = self.path().join(source.as_str());
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("source {source} has no keys in {}", self.path().display()),
            ));
        }
        publish(&self.witness_path(source, what), &out, true)
    }

    /// Checks `source`'s head (`None`: it has none) against its witness:
    /// refused when it is older than the witness, or of its epoch with
    /// another root, or when the witness itself does not authenticate.
    /// Nothing to check (Ok) without a witness.
    pub fn check_head(
        &self,
        source: &SourceId,
        keyring: &Keyring,
        head: Option<(u64, [u8; 32])>,
    ) -> Result<(), Error> {
        self.check(source, Witnessed::Source, keyring, head)
    }

    /// Checks the head (`generation`, `root`) of `source`'s launch `name`
    /// against its witness, as [`KeyDir::check_head`] does.
    pub fn check_launch_head(
        &self,
        source: &SourceId,
        name: &str,
        keyring: &Keyring,
        head: (u64, [u8; 32]),
    ) -> Result<(), Error> {
        self.check(source, Witnessed::Launch(name), keyring, Some(head))
    }

    fn check(
        &self,
        source: &SourceId,
        what: Witnessed<'_>,
        keyring: &Keyring,
        head: Option<(u64, [u8; 32])>,
    ) -> Result<(), Error> {
        let path = self.witness_path(source, what);
        if !path.exists() {
            return Ok(());
        }
        let bytes = read_bounded(&path, LEN)?;
        let subject = what.describe(source);
        let corrupt = |why: &str| {
            Error::new(
                ErrorKind::Corrupt,
                format!("witness of {subject} ({}): {why}", path.display()),
            )
        };
        if bytes.len() != LEN || bytes[..8] != MAGIC {
            return Err(corrupt("wrong length or magic"));
        }
        if crc32fast::hash(&bytes[..LEN - 4]).to_le_bytes() != bytes[LEN - 4..] {
            return Err(corrupt("checksum mismatch"));
        }
        let epoch = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let mut root = [0u8; 32];
        root.copy_from_slice(&bytes[16..48]);
        let mut reference = [0u8; KeyRef::LEN];
        reference.copy_from_slice(&bytes[48..64]);
        let sealer = keyring.sealer(&KeyRef(reference))?;
        if sealer.mac(&what.mac_input(source, epoch, &root))[..] != bytes[64..96] {
            return Err(Error::new(
                ErrorKind::Auth,
                format!("witness of {subject} fails authentication"),
            ));
        }
        let counter = what.counter();
        let rolled_back = |found: String| {
            Error::new(
                ErrorKind::Auth,
                format!(
                    "{subject} was rolled back or replaced: {found}, but the key directory \
                     witnessed {counter} {epoch}; it is not served until the head is restored"
                ),
            )
        };
        match head {
            None => Err(rolled_back("it has no head".into())),
            Some((head_epoch, _)) if head_epoch < epoch => {
                Err(rolled_back(format!("it is at {counter} {head_epoch}")))
            }
            Some((head_epoch, head_root)) if head_epoch == epoch && head_root != root => Err(
                rolled_back(format!("its {counter} {head_epoch} names another root")),
            ),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::{Kek, init_kek_file};

    #[test]
    fn a_head_older_than_its_witness_or_replaced_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_kek_file(&dir.path().join("kek")).unwrap();
        let kek = Kek::from_file(&dir.path().join("kek")).unwrap();
        let keys = KeyDir::open(&dir.path().join("keys")).unwrap();
        let (web, db) = (SourceId::new("web").unwrap(), SourceId::new("db").unwrap());
        let (_, web_key) = keys.create(&web, &kek, 1).unwrap();
        keys.create(&db, &kek, 1).unwrap();
        let ring = Keyring::new();
        ring.extend_from(&keys, &kek).unwrap();
        let sealer = web_key.sealer().unwrap();

        // No witness: nothing to check.
        keys.check_head(&web, &ring, None).unwrap();
        keys.record_head(&web, &sealer, 5, &[5; 32]).unwrap();
        keys.check_head(&web, &ring, Some((5, [5; 32]))).unwrap();
        keys.check_head(&web, &ring, Some((6, [6; 32]))).unwrap();
        for (head, what) in [
            (Some((4, [4; 32])), "at epoch 4"),
            (Some((5, [9; 32])), "another root"),
            (None, "no head"),
        ] {
            let error = keys.check_head(&web, &ring, head).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Auth);
            assert!(error.to_string().contains(what), "{error}");
        }
        // A witness copied to another source does not authenticate there.
        std::fs::copy(
            dir.path().join("keys/web/head"),
            dir.path().join("keys/db/head"),
        )
        .unwrap();
        let error = keys.check_head(&db, &ring, Some((5, [5; 32]))).unwrap_err();
        assert!(
            error.to_string().contains("fails authentication"),
            "{error}"
        );
    }

    /// A launch's witness holds its generation; it cannot stand for the
    /// source's head witness or another launch's, and goes when forgotten.
    #[test]
    fn a_launch_head_older_than_its_witness_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_kek_file(&dir.path().join("kek")).unwrap();
        let kek = Kek::from_file(&dir.path().join("kek")).unwrap();
        let keys = KeyDir::open(&dir.path().join("keys")).unwrap();
        let web = SourceId::new("web").unwrap();
        let (_, key) = keys.create(&web, &kek, 1).unwrap();
        let ring = Keyring::new();
        ring.extend_from(&keys, &kek).unwrap();
        let sealer = key.sealer().unwrap();

        keys.record_launch_head(&web, "drill.1", &sealer, 3, &[3; 32])
            .unwrap();
        keys.check_launch_head(&web, "drill.1", &ring, (3, [3; 32]))
            .unwrap();
        let error = keys
            .check_launch_head(&web, "drill.1", &ring, (2, [2; 32]))
            .unwrap_err();
        assert!(error.to_string().contains("at generation 2"), "{error}");
        // No other launch's, nor the source's head's.
        let launch_file = dir.path().join("keys/web/launch=drill.1");
        std::fs::copy(&launch_file, dir.path().join("keys/web/launch=drill.2")).unwrap();
        let error = keys
            .check_launch_head(&web, "drill.2", &ring, (3, [3; 32]))
            .unwrap_err();
        assert!(
            error.to_string().contains("fails authentication"),
            "{error}"
        );
        std::fs::copy(&launch_file, dir.path().join("keys/web/head")).unwrap();
        let error = keys
            .check_head(&web, &ring, Some((3, [3; 32])))
            .unwrap_err();
        assert!(
            error.to_string().contains("fails authentication"),
            "{error}"
        );
        // A launch witness is no key: the keys still load.
        assert_eq!(keys.records(&web).unwrap().len(), 1);
        keys.forget_launch_head(&web, "drill.1").unwrap();
        keys.forget_launch_head(&web, "drill.1").unwrap();
        keys.check_launch_head(&web, "drill.1", &ring, (0, [0; 32]))
            .unwrap();
    }
}

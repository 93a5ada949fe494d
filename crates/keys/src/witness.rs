//! The head witness: the last head a server committed for an encrypted
//! source, kept in the key directory (`KEYS/SOURCE/head`), outside the data
//! directory, and authenticated by the source's MAC key. A head rolled back
//! to an older record, or replaced by another source's, no longer matches
//! it, and is refused by the server, `verify` and `export`.
//!
//! Layout (`BRHWIT` version 1, 100 bytes): magic (8) | epoch u64 | root id
//! (32) | key reference (16) | MAC (32) of the source id, epoch and root
//! under that key | crc32 of everything before.
//!
//! The witness is written after the head it names is durable, so a crash
//! between the two leaves a witness older than the head, which is fine: only
//! a head older than its witness (or of its epoch with another root) is a
//! rollback.

use blockrep_core::SourceId;

use crate::data_key::{KeyRef, Sealer};
use crate::error::{Error, ErrorKind};
use crate::key_dir::{KeyDir, publish, read_bounded};
use crate::keyring::Keyring;

const MAGIC: [u8; 8] = *b"BRHWIT\x00\x01";
const LEN: usize = 100;

fn mac_input(source: &SourceId, epoch: u64, root: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + source.as_str().len() + 40);
    // A valid source id is at most 64 bytes: its length fits a byte.
    out.push(source.as_str().len() as u8);
    out.extend_from_slice(source.as_str().as_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(root);
    out
}

impl KeyDir {
    /// Records `source`'s head (`epoch`, `root`) as its witness, durably,
    /// authenticated under `sealer` (one of the source's keys).
    pub fn record_head(
        &self,
        source: &SourceId,
        sealer: &Sealer,
        epoch: u64,
        root: &[u8; 32],
    ) -> Result<(), Error> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(root);
        out.extend_from_slice(&sealer.reference().0);
        out.extend_from_slice(&sealer.mac(&mac_input(source, epoch, root)));
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        let dir = self.path().join(source.as_str());
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("source {source} has no keys in {}", self.path().display()),
            ));
        }
        publish(&dir.join("head"), &out, true)
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
        let path = self.path().join(source.as_str()).join("head");
        if !path.exists() {
            return Ok(());
        }
        let bytes = read_bounded(&path, LEN)?;
        let corrupt = |why: &str| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "head witness of source {source} ({}): {why}",
                    path.display()
                ),
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
        if sealer.mac(&mac_input(source, epoch, &root))[..] != bytes[64..96] {
            return Err(Error::new(
                ErrorKind::Auth,
                format!("head witness of source {source} fails authentication"),
            ));
        }
        let rolled_back = |what: String| {
            Error::new(
                ErrorKind::Auth,
                format!(
                    "the head of source {source} was rolled back or replaced: {what}, but the \
                     key directory witnessed epoch {epoch}; it is not served until the head is \
                     restored"
                ),
            )
        };
        match head {
            None => Err(rolled_back("it has no head".into())),
            Some((head_epoch, _)) if head_epoch < epoch => {
                Err(rolled_back(format!("it is at epoch {head_epoch}")))
            }
            Some((head_epoch, head_root)) if head_epoch == epoch && head_root != root => Err(
                rolled_back(format!("its epoch {head_epoch} names another root")),
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
}

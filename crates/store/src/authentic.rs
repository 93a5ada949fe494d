//! Snapshot and launch records of encrypted sources, authenticated.
//!
//! These records stay in clear (they hold names, times and root ids, which
//! are keyed ids for an encrypted source), but whoever can write the data
//! directory must not be able to swap one for another unnoticed: point a
//! snapshot at another root, move a record between sources or launches, or
//! strip the authentication off. So each record of an encrypted source is
//! followed by a trailer: a MAC under one of the source's data keys over
//! what the record is (its kind, source and name, taken from where it is
//! read, not from the record) and its bytes. A record of an encrypted source
//! without one is refused, as is a trailer under a key of another source.
//! A launch head, the only one of these records that changes, is also
//! witnessed in the key directory (`blockrep_keys` `witness.rs`), so an
//! older head put back is refused too, as is a source's head
//! ([`Store::publish_head`]).
//!
//! Trailer (`AUTH_MAGIC` version 1, 56 bytes): magic (8) | key reference (16)
//! | MAC (32) of `blockrep/record/v1`, kind, source and name (each preceded
//! by its length in a byte) and the record's bytes.

use blockrep_core::SourceId;
use blockrep_keys::KeyRef;

use crate::error::{Error, ErrorKind};
use crate::fsutil::publish_atomic;
use crate::head::Head;
use crate::store::Store;

const AUTH_MAGIC: [u8; 8] = *b"BRAUTH\x00\x01";
/// Length of the trailer after an authenticated record.
pub(crate) const AUTH_TRAILER_LEN: usize = 8 + KeyRef::LEN + 32;

/// Which record a MAC vouches for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordPlace<'a> {
    /// `snapshot`, `launch meta` or `launch head`.
    pub(crate) kind: &'static str,
    /// The source the record belongs to.
    pub(crate) source: &'a SourceId,
    /// The snapshot's or launch's name.
    pub(crate) name: &'a str,
}

impl RecordPlace<'_> {
    fn mac_input(&self, record: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + record.len());
        out.extend_from_slice(b"blockrep/record/v1");
        // Kinds, source ids and names are at most 64 bytes: a byte holds
        // each length, which keeps the fields apart.
        for field in [self.kind, self.source.as_str(), self.name] {
            out.push(field.len() as u8);
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(record);
        out
    }
}

impl Store {
    /// Publishes `head` as `source`'s head (its directory exists), then
    /// witnesses it outside the data directory (encrypted sources): a
    /// witness that lags its head is no alarm, so a failure there costs only
    /// the rollback check of this one head.
    pub(crate) fn publish_head(&self, source: &SourceId, head: &Head) -> Result<(), Error> {
        let path = self.source_dir(source).join("head");
        publish_atomic(self.vfs(), &path, &head.encode())?;
        if let Err(e) = self
            .keyring()
            .witness_head(source, head.epoch, &head.root.0)
        {
            eprintln!("blockrep-store: cannot witness the head of {source}: {e}");
        }
        Ok(())
    }

    /// `record` as it is written for `place`: followed by its trailer when
    /// the source is encrypted, unchanged otherwise.
    pub(crate) fn authenticated(&self, place: RecordPlace<'_>, mut record: Vec<u8>) -> Vec<u8> {
        if let Some(sealer) = self.keyring().current(place.source) {
            let mac = sealer.mac(&place.mac_input(&record));
            record.extend_from_slice(&AUTH_MAGIC);
            record.extend_from_slice(&sealer.reference().0);
            record.extend_from_slice(&mac);
        }
        record
    }

    /// The record in `bytes` (as read for `place`, `record_len` bytes
    /// without a trailer), once its trailer vouches for it, or, for a
    /// source that is not encrypted, as it is. Refused: a trailer that does
    /// not authenticate (Corrupt), one under a key this store does not hold
    /// (KeyUnavailable), and a record of an encrypted source without one.
    pub(crate) fn authentic<'b>(
        &self,
        place: RecordPlace<'_>,
        bytes: &'b [u8],
        record_len: usize,
    ) -> Result<&'b [u8], Error> {
        let RecordPlace { kind, source, name } = place;
        let refused = |kind_of: ErrorKind, why: String| {
            Error::new(
                kind_of,
                format!("{kind} record {name} of source {source}: {why}"),
            )
        };
        if bytes.len() == record_len {
            if self.is_encrypted_now(source) {
                return Err(refused(
                    ErrorKind::Corrupt,
                    "not authenticated, but the source is encrypted at rest: it was replaced \
                     or stripped of its MAC"
                        .into(),
                ));
            }
            return Ok(bytes);
        }
        if bytes.len() != record_len + AUTH_TRAILER_LEN {
            return Err(refused(ErrorKind::Corrupt, "wrong length".into()));
        }
        let (record, trailer) = bytes.split_at(record_len);
        if trailer[..8] != AUTH_MAGIC {
            return Err(refused(
                ErrorKind::Corrupt,
                "bad authentication trailer".into(),
            ));
        }
        let mut reference = [0u8; KeyRef::LEN];
        reference.copy_from_slice(&trailer[8..8 + KeyRef::LEN]);
        let reference = KeyRef(reference);
        if !self.is_encrypted_now(source) {
            return Err(refused(
                ErrorKind::KeyUnavailable,
                format!(
                    "authenticated under data key {reference}, which is not held: the source \
                     was shredded, or the store is opened without its key directory"
                ),
            ));
        }
        let sealer = self.keyring().source_key(source, &reference).map_err(|e| {
            let kind_of = if e.kind() == blockrep_keys::ErrorKind::NotFound {
                ErrorKind::KeyUnavailable
            } else {
                ErrorKind::Corrupt
            };
            refused(kind_of, e.to_string())
        })?;
        if sealer.mac(&place.mac_input(record))[..] != trailer[8 + KeyRef::LEN..] {
            return Err(refused(
                ErrorKind::Corrupt,
                "fails authentication: it was altered, or moved from another place".into(),
            ));
        }
        Ok(record)
    }

    /// Whether `source` is encrypted, as far as the key directory says now:
    /// its keys may have been made since the store was opened (by another
    /// server sharing the directory), so a source not known as encrypted is
    /// looked up again (at most once a second, see
    /// [`blockrep_keys::Keyring::refresh`]).
    fn is_encrypted_now(&self, source: &SourceId) -> bool {
        let keyring = self.keyring();
        keyring.is_encrypted(source)
            || (keyring.refresh().unwrap_or(false) && keyring.is_encrypted(source))
    }
}

/// A key directory's error (a witness that does not hold) as the store's:
/// a key not held is [`ErrorKind::KeyUnavailable`], a failed check is
/// corruption.
pub(crate) fn key_error(e: blockrep_keys::Error) -> Error {
    let kind = match e.kind() {
        blockrep_keys::ErrorKind::NotFound => ErrorKind::KeyUnavailable,
        blockrep_keys::ErrorKind::Io => ErrorKind::Io,
        _ => ErrorKind::Corrupt,
    };
    Error::new(kind, e.to_string())
}

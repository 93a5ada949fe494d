//! The key directory (`--key-dir`): every source's data keys, each only
//! wrapped by a KEK, one small record per key.
//!
//! It is kept apart from the data directory on purpose: a copy of the data
//! directory (or of the bucket) without the key directory is nothing but
//! sealed bytes, and destroying a source's records here
//! ([`KeyDir::shred`]) makes what the source stored unreadable even where
//! copies of its packs survive.
//!
//! ```text
//! KEYS/SOURCE/00000001.key   the source's first data key, wrapped
//! KEYS/SOURCE/00000002.key   the key `key rotate --source` started; new data is sealed with the newest
//! ```
//!
//! # Record layout (`BRDKEY` version 1), little-endian
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `BRDKEY` + version `0x00 0x01` |
//! | 8 | 4 | serial (equals the file name) |
//! | 12 | 16 | key reference (derived from the key; see `DataKey::reference`) |
//! | 28 | 8 | creation time, Unix ms |
//! | 36 | 1 | KEK kind: 1 file, 2 command |
//! | 37 | 1 | KEK id length (at most 200) |
//! | 38 | 2 | wrapped key length (at most 8192) |
//! | 40 | .. | KEK id, then the wrapped key |
//! | .. | 4 | crc32 of everything before |
//!
//! Each wrap is bound to the context `blockrep/data-key/v1/source=ID/serial=N`,
//! so a record copied under another source or serial does not unwrap.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use blockrep_core::SourceId;

use crate::data_key::{DataKey, KeyRef};
use crate::error::{Error, ErrorKind};
pub(crate) use crate::fsutil::{publish, read_bounded};
use crate::fsutil::{sync_dir, sync_parent};
use crate::kek::{Kek, KekKind};
use crate::kek_cmd::{KEK_ID_MAX_LEN, WRAPPED_MAX_LEN};

const MAGIC: [u8; 8] = *b"BRDKEY\x00\x01";
const FIXED_LEN: usize = 40;
const RECORD_MAX: usize = FIXED_LEN + KEK_ID_MAX_LEN + WRAPPED_MAX_LEN + 4;

/// One wrapped data key as its record holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The source it belongs to.
    pub source: SourceId,
    /// Its number among the source's keys; the highest seals new data.
    pub serial: u32,
    /// The key's public name.
    pub reference: KeyRef,
    /// When it was made, Unix ms.
    pub created_unix_ms: u64,
    /// How the KEK that wrapped it is held.
    pub kek_kind: KekKind,
    /// The id of the KEK that wrapped it.
    pub kek_id: String,
    wrapped: Vec<u8>,
}

impl KeyRecord {
    fn context(source: &SourceId, serial: u32) -> String {
        format!("blockrep/data-key/v1/source={source}/serial={serial}")
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + self.kek_id.len() + self.wrapped.len() + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.serial.to_le_bytes());
        out.extend_from_slice(&self.reference.0);
        out.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        out.push(self.kek_kind.code());
        // Both lengths were checked against their limits when made.
        out.push(self.kek_id.len() as u8);
        out.extend_from_slice(&(self.wrapped.len() as u16).to_le_bytes());
        out.extend_from_slice(self.kek_id.as_bytes());
        out.extend_from_slice(&self.wrapped);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(source: &SourceId, bytes: &[u8], path: &Path) -> Result<Self, Error> {
        let corrupt = |why: &str| {
            Error::new(
                ErrorKind::Corrupt,
                format!("key record {}: {why}", path.display()),
            )
        };
        if bytes.len() < FIXED_LEN + 4 || bytes[..8] != MAGIC {
            return Err(corrupt("wrong length or magic"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let id_len = body[37] as usize;
        let wrapped_len = u16::from_le_bytes([body[38], body[39]]) as usize;
        if body.len() != FIXED_LEN + id_len + wrapped_len
            || id_len > KEK_ID_MAX_LEN
            || wrapped_len > WRAPPED_MAX_LEN
        {
            return Err(corrupt("lengths disagree"));
        }
        let kek_kind = KekKind::from_code(body[36]).ok_or_else(|| corrupt("unknown KEK kind"))?;
        let kek_id = std::str::from_utf8(&body[FIXED_LEN..FIXED_LEN + id_len])
            .map_err(|_| corrupt("KEK id not UTF-8"))?
            .to_owned();
        let mut reference = [0u8; KeyRef::LEN];
        reference.copy_from_slice(&body[12..28]);
        Ok(Self {
            source: source.clone(),
            serial: u32_at(8),
            reference: KeyRef(reference),
            created_unix_ms: u64::from_le_bytes(body[28..36].try_into().expect("8 bytes")),
            kek_kind,
            kek_id,
            wrapped: body[FIXED_LEN + id_len..].to_vec(),
        })
    }

    /// Unwraps the key with `kek`, which must be the KEK that wrapped it; the
    /// unwrapped key must match the recorded reference.
    pub fn unwrap_with(&self, kek: &Kek) -> Result<DataKey, Error> {
        if kek.id() != self.kek_id {
            return Err(Error::new(
                ErrorKind::WrongKek,
                format!(
                    "data key {} of source {} is wrapped under KEK {}, not {}",
                    self.serial,
                    self.source,
                    self.kek_id,
                    kek.id()
                ),
            ));
        }
        let key = kek.unwrap_key(&self.wrapped, &Self::context(&self.source, self.serial))?;
        if key.reference() != self.reference {
            return Err(Error::new(
                ErrorKind::Auth,
                format!(
                    "data key {} of source {} unwraps to another key than its record names",
                    self.serial, self.source
                ),
            ));
        }
        Ok(key)
    }
}

/// What [`KeyDir::rewrap`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapReport {
    /// Records re-wrapped under the new KEK.
    pub rewrapped: usize,
    /// Records already under the new KEK (an earlier, interrupted run).
    pub already: usize,
}

/// A key directory.
#[derive(Debug, Clone)]
pub struct KeyDir {
    path: PathBuf,
}

impl KeyDir {
    /// Opens the key directory at `path`, making it (mode 0700) if missing.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let created = !path.is_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| {
                Error::io(
                    format!("cannot make the key directory {}", path.display()),
                    e,
                )
            })?;
        if created {
            // Its entry in the parent is durable before any key is written in it.
            sync_parent(path)?;
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the seals of `source`'s key `serial` are counted
    /// ([`crate::Sealer::counted_in`]).
    pub fn seal_count_path(&self, source: &SourceId, serial: u32) -> PathBuf {
        self.source_dir(source).join(format!("{serial:08}.seals"))
    }

    fn source_dir(&self, source: &SourceId) -> PathBuf {
        self.path.join(source.as_str())
    }

    /// The sources that have keys here, sorted.
    pub fn sources(&self) -> Result<Vec<SourceId>, Error> {
        let mut out = Vec::new();
        for entry in read_dir(&self.path)? {
            let is_dir = self.path.join(&entry).is_dir();
            if let Some(source) = entry.to_str().and_then(|name| SourceId::new(name).ok())
                && is_dir
            {
                out.push(source);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The key records of `source`, oldest first (empty when it has none).
    pub fn records(&self, source: &SourceId) -> Result<Vec<KeyRecord>, Error> {
        let dir = self.source_dir(source);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for name in read_dir(&dir)? {
            let Some(serial) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".key"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let path = dir.join(&name);
            let bytes = read_bounded(&path, RECORD_MAX)?;
            let record = KeyRecord::decode(source, &bytes, &path)?;
            if record.serial != serial {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "key record {} names serial {}",
                        path.display(),
                        record.serial
                    ),
                ));
            }
            out.push(record);
        }
        out.sort_by_key(|r| r.serial);
        Ok(out)
    }

    /// Makes a new data key for `source`, wrapped by `kek`, as its next
    /// serial; durable before it returns, so nothing is ever sealed under a
    /// key that a crash could lose.
    pub fn create(
        &self,
        source: &SourceId,
        kek: &Kek,
        now_unix_ms: u64,
    ) -> Result<(KeyRecord, DataKey), Error> {
        let serial = self.records(source)?.last().map_or(Ok(1), |r| {
            r.serial
                .checked_add(1)
                .ok_or_else(|| Error::new(ErrorKind::Invalid, "too many data keys"))
        })?;
        let key = DataKey::generate()?;
        let wrapped = kek.wrap(&key, &KeyRecord::context(source, serial))?;
        let record = KeyRecord {
            source: source.clone(),
            serial,
            reference: key.reference(),
            created_unix_ms: now_unix_ms,
            kek_kind: kek.kind(),
            kek_id: kek.id().to_owned(),
            wrapped,
        };
        check_lengths(&record)?;
        let dir = self.source_dir(source);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Error::io(format!("cannot make {}", dir.display()), e))?;
        sync_dir(&self.path)?;
        publish(
            &dir.join(format!("{serial:08}.key")),
            &record.encode(),
            false,
        )?;
        Ok((record, key))
    }

    /// Re-wraps every data key wrapped under `old` with `new`, one record at
    /// a time, each replaced atomically: an interrupted run leaves every
    /// record under one of the two and is finished by running it again. No
    /// data is rewritten. A record under a third KEK stops it, named.
    pub fn rewrap(&self, old: &Kek, new: &Kek) -> Result<RewrapReport, Error> {
        let mut report = RewrapReport::default();
        for source in self.sources()? {
            for record in self.records(&source)? {
                if record.kek_id == new.id() {
                    report.already += 1;
                    continue;
                }
                let key = record.unwrap_with(old)?;
                let wrapped = new.wrap(&key, &KeyRecord::context(&source, record.serial))?;
                let rewrapped = KeyRecord {
                    kek_kind: new.kind(),
                    kek_id: new.id().to_owned(),
                    wrapped,
                    ..record
                };
                check_lengths(&rewrapped)?;
                let path = self
                    .source_dir(&source)
                    .join(format!("{:08}.key", rewrapped.serial));
                publish(&path, &rewrapped.encode(), true)?;
                report.rewrapped += 1;
            }
        }
        Ok(report)
    }

    /// Destroys every data key of `source` (and its head witness): each
    /// file is overwritten with zeros and fsynced, then removed, and the
    /// removal made durable. How many keys it destroyed (0: the source had
    /// none).
    pub fn shred(&self, source: &SourceId) -> Result<usize, Error> {
        let dir = self.source_dir(source);
        if !dir.exists() {
            return Ok(0);
        }
        let mut destroyed = 0;
        for name in read_dir(&dir)? {
            // Every file goes (the head witness too); the keys are counted.
            let is_key = name.to_str().is_some_and(|n| n.ends_with(".key"));
            let path = dir.join(name);
            let len = std::fs::metadata(&path)
                .map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?
                .len();
            let overwrite = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut file| {
                    file.write_all(&vec![0u8; len as usize])?;
                    file.sync_all()
                });
            overwrite.map_err(|e| Error::io(format!("cannot overwrite {}", path.display()), e))?;
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
            destroyed += usize::from(is_key);
        }
        sync_dir(&dir)?;
        std::fs::remove_dir(&dir)
            .map_err(|e| Error::io(format!("cannot remove {}", dir.display()), e))?;
        sync_dir(&self.path)?;
        Ok(destroyed)
    }
}

fn check_lengths(record: &KeyRecord) -> Result<(), Error> {
    if record.kek_id.len() > KEK_ID_MAX_LEN || record.wrapped.len() > WRAPPED_MAX_LEN {
        return Err(Error::new(
            ErrorKind::Kek,
            format!(
                "the KEK's id or wrapped key is too long (at most {KEK_ID_MAX_LEN} and \
                 {WRAPPED_MAX_LEN} bytes)"
            ),
        ));
    }
    Ok(())
}

fn read_dir(dir: &Path) -> Result<Vec<std::ffi::OsString>, Error> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        names.push(entry.file_name());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::init_kek_file;

    fn kek(dir: &Path, name: &str) -> Kek {
        let path = dir.join(name);
        init_kek_file(&path).unwrap();
        Kek::from_file(&path).unwrap()
    }

    #[test]
    fn keys_are_made_rewrapped_and_shredded() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDir::open(&dir.path().join("keys")).unwrap();
        let (old, new) = (kek(dir.path(), "old"), kek(dir.path(), "new"));
        let web = SourceId::new("web-1").unwrap();
        let db = SourceId::new("db-1").unwrap();
        let (first, web_key) = keys.create(&web, &old, 1).unwrap();
        let (second, _) = keys.create(&web, &old, 2).unwrap();
        keys.create(&db, &old, 3).unwrap();
        assert_eq!((first.serial, second.serial), (1, 2));
        assert_eq!(keys.sources().unwrap(), vec![db.clone(), web.clone()]);
        let records = keys.records(&web).unwrap();
        assert_eq!(records, vec![first.clone(), second]);
        assert_eq!(
            records[0].unwrap_with(&old).unwrap().reference(),
            web_key.reference()
        );
        let error = records[0].unwrap_with(&new).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::WrongKek);
        assert!(error.to_string().contains(old.id()), "{error}");

        // Re-wrap: every record moves to the new KEK, the key stays the same.
        let report = keys.rewrap(&old, &new).unwrap();
        assert_eq!(
            report,
            RewrapReport {
                rewrapped: 3,
                already: 0
            }
        );
        let records = keys.records(&web).unwrap();
        assert_eq!(records[0].kek_id, new.id());
        assert_eq!(
            records[0].unwrap_with(&new).unwrap().reference(),
            web_key.reference()
        );
        assert_eq!(keys.rewrap(&old, &new).unwrap().already, 3);

        // A record moved to another source's place does not unwrap.
        let moved = dir.path().join("keys/db-1/00000002.key");
        std::fs::copy(dir.path().join("keys/web-1/00000002.key"), &moved).unwrap();
        let db_records = keys.records(&db).unwrap();
        let error = db_records[1].unwrap_with(&new).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Auth);
        std::fs::remove_file(moved).unwrap();

        // A flipped byte is caught by the checksum.
        let path = dir.path().join("keys/web-1/00000001.key");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(keys.records(&web).unwrap_err().kind(), ErrorKind::Corrupt);
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();

        // Shredding removes every key of one source and nothing else.
        assert_eq!(keys.shred(&web).unwrap(), 2);
        assert!(keys.records(&web).unwrap().is_empty());
        assert_eq!(keys.sources().unwrap(), vec![db.clone()]);
        assert_eq!(keys.shred(&web).unwrap(), 0);
        assert_eq!(keys.records(&db).unwrap().len(), 1);
    }
}

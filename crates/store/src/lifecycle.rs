//! A source's place in the migration lifecycle after replication: cut over,
//! failing back, failed back. While a record exists the source is *fenced*: the
//! server refuses further replication of it until the operator resets it.
//!
//! File `DATA/sources/ID/lifecycle`, 243 bytes; its layout is in `format.rs`
//! (`LIFECYCLE_MAGIC`).

use blockrep_core::{ChunkId, SourceId};

use crate::error::{Error, ErrorKind};
use crate::fsutil::{create_dir_durable, publish_atomic, read_small_file, remove_file_durable};
use crate::store::Store;

use crate::format::{
    LIFECYCLE_CRC_AT as CRC_AT, LIFECYCLE_LEN as LEN, LIFECYCLE_MAGIC as MAGIC,
    NAME_FIELD_LEN as NAME_MAX,
};

/// Where a source stands after replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleStage {
    /// The final epoch is committed and the cutover launch exists.
    CutOver,
    /// The original disk is being brought back to a launch volume's content.
    FailingBack,
    /// The original disk equals the launch volume; failback is finished.
    FailedBack,
}

/// How long the application was down at cutover, and where the time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Downtime {
    /// The pre-cutover command (before the downtime clock starts).
    pub hook_ms: u64,
    /// The final scan.
    pub scan_ms: u64,
    /// Diff and transfer of the final changes.
    pub transfer_ms: u64,
    /// The final commit, durable on the server.
    pub commit_ms: u64,
    /// Snapshot and launch volume creation.
    pub launch_ms: u64,
    /// From the end of the hook (or the request) to ready.
    pub total_ms: u64,
}

/// A source's lifecycle record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    pub stage: LifecycleStage,
    pub epoch: u64,
    pub root: ChunkId,
    pub snapshot: String,
    pub launch: String,
    pub cutover_unix_ms: u64,
    pub downtime: Downtime,
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    let bytes = name.as_bytes();
    let len = bytes.len().min(NAME_MAX);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
    out.resize(out.len() + NAME_MAX - len, 0);
}

fn get_name(bytes: &[u8]) -> Option<String> {
    let len = bytes[0] as usize;
    if len > NAME_MAX {
        return None;
    }
    String::from_utf8(bytes[1..1 + len].to_vec()).ok()
}

impl Lifecycle {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(&MAGIC);
        out.push(match self.stage {
            LifecycleStage::CutOver => 1,
            LifecycleStage::FailingBack => 2,
            LifecycleStage::FailedBack => 3,
        });
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(self.root.as_bytes());
        put_name(&mut out, &self.snapshot);
        put_name(&mut out, &self.launch);
        out.extend_from_slice(&self.cutover_unix_ms.to_le_bytes());
        let d = self.downtime;
        for value in [
            d.hook_ms,
            d.scan_ms,
            d.transfer_ms,
            d.commit_ms,
            d.launch_ms,
            d.total_ms,
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let corrupt =
            |what: &str| Error::new(ErrorKind::Corrupt, format!("lifecycle record: {what}"));
        if bytes.len() != LEN || bytes[..8] != MAGIC {
            return Err(corrupt("bad length or magic"));
        }
        let crc = u32::from_le_bytes(bytes[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&bytes[..CRC_AT]) {
            return Err(corrupt("checksum mismatch"));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let stage = match bytes[8] {
            1 => LifecycleStage::CutOver,
            2 => LifecycleStage::FailingBack,
            3 => LifecycleStage::FailedBack,
            _ => return Err(corrupt("unknown stage")),
        };
        let mut root = [0u8; 32];
        root.copy_from_slice(&bytes[17..49]);
        Ok(Lifecycle {
            stage,
            epoch: u64_at(9),
            root: ChunkId(root),
            snapshot: get_name(&bytes[49..114]).ok_or_else(|| corrupt("snapshot name"))?,
            launch: get_name(&bytes[114..179]).ok_or_else(|| corrupt("launch name"))?,
            cutover_unix_ms: u64_at(179),
            downtime: Downtime {
                hook_ms: u64_at(187),
                scan_ms: u64_at(195),
                transfer_ms: u64_at(203),
                commit_ms: u64_at(211),
                launch_ms: u64_at(219),
                total_ms: u64_at(227),
            },
        })
    }
}

impl Store {
    /// The source's lifecycle record; `None` while it simply replicates.
    pub fn lifecycle(&self, source: &SourceId) -> Result<Option<Lifecycle>, Error> {
        let path = self.source_dir(source).join("lifecycle");
        match read_small_file(self.vfs(), &path, LEN)? {
            Some(bytes) => Lifecycle::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Durably replaces the source's lifecycle record.
    pub fn set_lifecycle(&self, source: &SourceId, record: &Lifecycle) -> Result<(), Error> {
        self.check_writable()?;
        let dir = self.source_dir(source);
        create_dir_durable(self.vfs(), &dir)?;
        publish_atomic(self.vfs(), &dir.join("lifecycle"), &record.encode())
    }

    /// Removes the record (the operator's reset): replication is allowed again.
    /// Returns only once the removal is durable, also when the record is
    /// already gone: an earlier attempt may have removed it and then failed to
    /// fsync the directory, and the record would come back at a power loss.
    pub fn clear_lifecycle(&self, source: &SourceId) -> Result<(), Error> {
        self.check_writable()?;
        remove_file_durable(self.vfs(), &self.source_dir(source), "lifecycle")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_detects_damage() {
        let record = Lifecycle {
            stage: LifecycleStage::FailingBack,
            epoch: 9,
            root: ChunkId([5; 32]),
            snapshot: "cutover-9-1".into(),
            launch: "web-cutover".into(),
            cutover_unix_ms: 1234,
            downtime: Downtime {
                hook_ms: 1,
                scan_ms: 2,
                transfer_ms: 3,
                commit_ms: 4,
                launch_ms: 5,
                total_ms: 15,
            },
        };
        let bytes = record.encode();
        assert_eq!(bytes.len(), LEN);
        assert_eq!(Lifecycle::decode(&bytes).unwrap(), record);
        for i in 0..235 {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x01;
            assert!(Lifecycle::decode(&damaged).is_err(), "flip at {i}");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let source = SourceId::new("web").unwrap();
        assert_eq!(store.lifecycle(&source).unwrap(), None);
        store.set_lifecycle(&source, &record).unwrap();
        assert_eq!(store.lifecycle(&source).unwrap(), Some(record.clone()));
        store.clear_lifecycle(&source).unwrap();
        assert_eq!(store.lifecycle(&source).unwrap(), None);

        // A read-only store (export, verify beside a running server) must not
        // fence or unfence a source.
        store.set_lifecycle(&source, &record).unwrap();
        let reader = Store::open_read_only(dir.path()).unwrap();
        assert!(reader.clear_lifecycle(&source).is_err());
        assert!(reader.set_lifecycle(&source, &record).is_err());
        assert_eq!(store.lifecycle(&source).unwrap(), Some(record));
    }

    /// A reset whose directory fsync failed, retried: on the same store the
    /// retry is refused (no fsync is trusted after one failed); after a
    /// reopen it finds the record gone, and the removal is durable before it
    /// is acknowledged.
    #[test]
    fn retried_reset_is_durable() {
        use std::sync::Arc;

        use crate::sim::SimFs;

        let sim = SimFs::new();
        let dir = std::path::Path::new("/data");
        let store = Store::open_with_vfs(dir, Arc::new(sim.clone())).unwrap();
        let source = SourceId::new("web").unwrap();
        let record = Lifecycle {
            stage: LifecycleStage::CutOver,
            epoch: 3,
            root: ChunkId([7; 32]),
            snapshot: "cutover-3-1".into(),
            launch: "web-cutover".into(),
            cutover_unix_ms: 1234,
            downtime: Downtime::default(),
        };
        store.set_lifecycle(&source, &record).unwrap();
        // The reset removes the file, then fsyncs the directory: fail that.
        sim.fail_operation(sim.operations() + 2);
        assert!(store.clear_lifecycle(&source).is_err());
        // Retried on the same store: refused, as every fsync is after one failed.
        assert!(store.clear_lifecycle(&source).is_err());
        // Retried after a reopen (a server restart): the record is already
        // gone, and the removal is made durable before it is acknowledged.
        drop(store);
        let store = Store::open_with_vfs(dir, Arc::new(sim.clone())).unwrap();
        store.clear_lifecycle(&source).unwrap();
        for seed in 0..64 {
            let (image, _) = sim.crash_image(seed);
            let store = Store::open_with_vfs(dir, Arc::new(image)).unwrap();
            assert_eq!(store.lifecycle(&source).unwrap(), None, "crash seed {seed}");
        }
        // A source that never had a record resets without error.
        let other = SourceId::new("db").unwrap();
        store.clear_lifecycle(&other).unwrap();
    }
}

//! Which tenant a source belongs to. Sources of one tenant may deduplicate
//! against each other's data. A source whose certificate names no tenant is
//! recorded as its own (an empty name): it is nobody's peer, so a tenant that
//! happens to share its name with a source id never reaches that source's data.
//!
//! The tenant is named by the source's certificate; the server records it at
//! the source's first session so that it knows which sources share a tenant
//! while they are not connected, and so that a later certificate naming
//! another tenant for the same source is noticed (and refused by the server).
//!
//! File `DATA/sources/ID/tenant`, 77 bytes; its layout is in `format.rs`
//! (`TENANT_MAGIC`).

use blockrep_core::SourceId;

use crate::error::{Error, ErrorKind};
use crate::fsutil::{create_dir_durable, publish_atomic, read_small_file};
use crate::store::Store;

use crate::format::{NAME_FIELD_LEN as NAME_MAX, TENANT_LEN as LEN, TENANT_MAGIC as MAGIC};

fn encode(tenant: Option<&SourceId>) -> Vec<u8> {
    let name = tenant.map_or(&[][..], |t| t.as_str().as_bytes());
    let mut out = Vec::with_capacity(LEN);
    out.extend_from_slice(&MAGIC);
    // A valid id is at most 64 bytes, so it always fits.
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.resize(8 + 1 + NAME_MAX, 0);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Result<Option<SourceId>, Error> {
    let corrupt = |why: &str| Error::new(ErrorKind::Corrupt, format!("tenant record: {why}"));
    if bytes.len() != LEN || bytes[..8] != MAGIC {
        return Err(corrupt("wrong length or magic"));
    }
    let crc = u32::from_le_bytes(bytes[LEN - 4..].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&bytes[..LEN - 4]) {
        return Err(corrupt("checksum mismatch"));
    }
    let len = bytes[8] as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > NAME_MAX {
        return Err(corrupt("name too long"));
    }
    let name = std::str::from_utf8(&bytes[9..9 + len]).map_err(|_| corrupt("name not UTF-8"))?;
    SourceId::new(name)
        .map(Some)
        .map_err(|e| corrupt(&e.to_string()))
}

impl Store {
    /// The tenant recorded for `source`: `None` when nothing is recorded yet,
    /// `Some(None)` when the source is its own tenant.
    pub fn source_tenant(&self, source: &SourceId) -> Result<Option<Option<SourceId>>, Error> {
        let path = self.source_dir(source).join("tenant");
        match read_small_file(self.vfs(), &path, LEN)? {
            Some(bytes) => decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Durably records `tenant` as the tenant of `source` (`None`: its own).
    pub fn set_source_tenant(
        &self,
        source: &SourceId,
        tenant: Option<&SourceId>,
    ) -> Result<(), Error> {
        self.check_writable()?;
        let dir = self.source_dir(source);
        create_dir_durable(self.vfs(), &dir)?;
        publish_atomic(self.vfs(), &dir.join("tenant"), &encode(tenant))
    }

    /// The sources other than `source` whose recorded tenant is `tenant`. A
    /// source that is its own tenant, or has no record, is nobody's peer.
    pub fn tenant_peers(
        &self,
        source: &SourceId,
        tenant: &SourceId,
    ) -> Result<Vec<SourceId>, Error> {
        let mut peers = Vec::new();
        for other in self.sources()? {
            if &other == source {
                continue;
            }
            let recorded = self.source_tenant(&other)?;
            if recorded.flatten().as_ref() == Some(tenant) {
                peers.push(other);
            }
        }
        Ok(peers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_records_round_trip_and_name_the_peers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let [a, b, c] = ["a", "b", "c"].map(|s| SourceId::new(s).unwrap());
        let tenant = SourceId::new("acme").unwrap();
        assert_eq!(store.source_tenant(&a).unwrap(), None);
        store.set_source_tenant(&a, Some(&tenant)).unwrap();
        store.set_source_tenant(&b, Some(&tenant)).unwrap();
        assert_eq!(store.source_tenant(&a).unwrap(), Some(Some(tenant.clone())));
        let decoded = decode(&encode(Some(&tenant))).unwrap();
        assert_eq!(decoded, Some(tenant.clone()));
        assert_eq!(decode(&encode(None)).unwrap(), None);
        let mut damaged = encode(Some(&tenant));
        damaged[10] ^= 1;
        assert!(decode(&damaged).is_err());
        // Only sources with a head count as peers.
        assert!(store.tenant_peers(&a, &tenant).unwrap().is_empty());
        let geometry = blockrep_core::Geometry::new(8192, 4096).unwrap();
        let disk = crate::testutil::sample_disk(8192, 1);
        let acme = SourceId::new("acme").unwrap();
        for source in [&a, &b, &c, &acme] {
            crate::testutil::commit_disk(&store, source, &disk, geometry, 1);
        }
        assert_eq!(store.tenant_peers(&a, &tenant).unwrap(), vec![b.clone()]);
        // A source that is its own tenant is nobody's peer, even for a
        // tenant that happens to carry its name.
        store.set_source_tenant(&acme, None).unwrap();
        store.set_source_tenant(&c, Some(&acme)).unwrap();
        assert_eq!(store.source_tenant(&acme).unwrap(), Some(None));
        let mut peers = store.tenant_peers(&c, &acme).unwrap();
        peers.sort_unstable_by(|x, y| x.as_str().cmp(y.as_str()));
        assert_eq!(peers, vec![a.clone(), b.clone()]);
    }
}

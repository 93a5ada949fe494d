//! Launch volumes as NBD exports: the registry the NBD server asks for names.

use std::io;
use std::sync::Arc;

use blockrep_nbd::{Export, Registry};
use blockrep_store::{LaunchKind, LaunchVolume, Store};
use tracing::warn;

/// Every launch in the store, by name.
#[derive(Debug)]
pub(crate) struct LaunchRegistry {
    pub store: Arc<Store>,
}

impl Registry for LaunchRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        match self.store.open_launch(name) {
            Ok(volume) => Some(Arc::new(LaunchExport(volume))),
            Err(e) => {
                warn!(launch = name, error = %e, "NBD export not available");
                None
            }
        }
    }

    fn list(&self) -> Vec<(String, String)> {
        match self.store.list_launches(None) {
            Ok(launches) => launches
                .into_iter()
                .map(|l| {
                    let kind = match l.kind {
                        LaunchKind::Test => "test",
                        LaunchKind::Cutover => "cutover",
                    };
                    let text = format!(
                        "{kind} launch of {} from snapshot {} (epoch {})",
                        l.source, l.snapshot, l.base_epoch
                    );
                    (l.name, text)
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list launches for NBD");
                Vec::new()
            }
        }
    }
}

/// A launch volume behind the NBD `Export` interface.
struct LaunchExport(Arc<LaunchVolume>);

impl Export for LaunchExport {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.trim(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }

    /// One volume object serves every connection to the same launch, behind one
    /// lock, so a flush on any connection covers writes completed on all of them.
    fn multi_conn_safe(&self) -> bool {
        true
    }
}

//! An intermediate commit inside a machine's epoch: it names the machine
//! root, with the volume being sent at the part sent so far and every other
//! volume as the server holds it.

use blockrep_core::{ChunkId, MachineRoot, VolumeName};

use crate::Error;

/// What an intermediate commit in a machine's epoch names: the machine
/// root of every volume's root as the server holds it, the current
/// volume's being the part of its epoch sent so far.
#[derive(Debug, Clone)]
pub(crate) struct MachineStep {
    pub names: Vec<VolumeName>,
    /// Each volume's root (the current one's slot is replaced).
    pub roots: Vec<ChunkId>,
    pub current: usize,
}

impl MachineStep {
    /// The machine root with the current volume at `root`.
    pub(crate) fn root_with(&self, root: ChunkId) -> Result<ChunkId, Error> {
        let mut roots = self.roots.clone();
        let slot = roots
            .get_mut(self.current)
            .ok_or_else(|| Error::Protocol("a machine step past the machine's volumes".into()))?;
        *slot = root;
        let machine = MachineRoot::new(self.names.iter().cloned().zip(roots).collect())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        Ok(machine.id())
    }
}

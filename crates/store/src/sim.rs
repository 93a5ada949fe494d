//! A simulated disk that loses power: an in-memory [`Vfs`] for crash tests.
//!
//! # The model
//!
//! The model is that of a Linux file system such as ext4 in its default
//! `data=ordered` mode. For file data it keeps none of the ordering promises
//! that mode happens to give, only what POSIX and the fsync contract
//! guarantee (the same stance as SQLite's crash tests). For directory entries
//! it does assume one: unsynced metadata operations survive as an in-order
//! prefix, as a journaling file system keeps them. A store bug that needs an
//! earlier unsynced rename in one directory to be lost while a later one in
//! another survives would go unseen here:
//!
//! - **File data.** Every write and truncation is visible at once to reads (the
//!   page cache) and is *pending* until `fsync`/`fdatasync` of that file makes
//!   all of the file's data and its length durable. At a crash each pending
//!   write, independently and in any combination, is applied, dropped,
//!   replaced by garbage (random bytes or zeros) or torn (a prefix applied);
//!   a pending truncation is applied or dropped. A dropped write below a
//!   surviving one leaves zeros.
//! - **Directory entries.** Creating a file or directory, renaming and removing
//!   change the directory at once and are *pending* until `fsync` of that
//!   directory. A file's own fsync does not make its name durable. At a crash
//!   the pending directory operations of the whole file system, kept in the
//!   order they were made, are all dropped, all applied, or applied up to a
//!   point (a prefix: a journal keeps metadata in order). A rename is one
//!   operation: it lands whole or not at all, never as two names or none.
//!   Renames only move an entry within one directory (all the store needs).
//! - **Crash points.** Every mutating call (create, write, truncate, fsync of a
//!   file or directory, rename, remove, create directory) is one numbered
//!   operation. With [`SimFs::power_off_after`] set to `n`, operations after
//!   the `n`th fail with an I/O error and change nothing, reads included: the
//!   machine is off. [`SimFs::crash_image`] then gives the disk as a reboot
//!   finds it, with the pending state resolved by a seeded generator.
//! - **I/O errors.** [`SimFs::fail_operation`] makes one numbered operation
//!   fail with an I/O error and no effect while the machine stays on.
//!
//! Background fsyncs ([`Vfs::start_sync_data`]) run when the store joins them:
//! the latest a real one may finish, and deterministic.
//!
//! Not modelled: bit rot of durable data (the store's checksums and `verify`
//! cover it elsewhere), running out of space, and a failed fsync that silently
//! discards dirty pages (the store treats every fsync failure as sticky
//! anyway).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use blockrep_core::rng::SplitMix64;

use crate::vfs::{OpenMode, PendingSync, Vfs, VfsFile};

type Ino = usize;

const ROOT: Ino = 0;

#[derive(Debug, Clone)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct FileNode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<FileOp>,
}

#[derive(Debug, Clone, Default)]
struct DirNode {
    durable: BTreeMap<String, Ino>,
    current: BTreeMap<String, Ino>,
}

#[derive(Debug, Clone)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

/// One pending change of a directory's entries: names set to an inode or
/// removed, applied together.
#[derive(Debug, Clone)]
struct DirOp {
    dir: Ino,
    changes: Vec<(String, Option<Ino>)>,
}

#[derive(Debug)]
struct State {
    nodes: Vec<Node>,
    /// Pending directory operations of every directory, oldest first.
    dir_log: Vec<DirOp>,
    /// Mutating operations done so far.
    operations: u64,
    power_off_after: Option<u64>,
    fail_operation: Option<u64>,
    /// What the failed operation was, once it failed.
    failed: Option<String>,
}

/// Counts of what a crash did to pending state (for test diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashStats {
    /// Pending writes applied whole.
    pub writes_applied: u64,
    /// Pending writes dropped.
    pub writes_dropped: u64,
    /// Pending writes replaced by garbage.
    pub writes_garbled: u64,
    /// Pending writes of which only a prefix landed.
    pub writes_torn: u64,
    /// Pending directory operations applied.
    pub dir_ops_applied: u64,
    /// Pending directory operations dropped.
    pub dir_ops_dropped: u64,
}

/// The simulated file system. Clones share the same disk.
#[derive(Debug, Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss: the machine is off")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

/// `rng.below(bound)`, or 0 for an empty range.
fn below(rng: &mut SplitMix64, bound: u64) -> u64 {
    if bound == 0 { 0 } else { rng.below(bound) }
}

/// Writes `data` at `offset` of `bytes`, extending it with zeros if needed.
fn write_into(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let offset = offset as usize;
    let end = offset + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset..end].copy_from_slice(data);
}

impl State {
    fn powered_off(&self) -> bool {
        self.power_off_after
            .is_some_and(|after| self.operations >= after)
    }

    /// Numbers a mutating operation; fails it if the power is off or it is
    /// the one chosen to fail.
    fn begin_mutation(&mut self, what: &str) -> io::Result<()> {
        if self.powered_off() {
            return Err(power_lost());
        }
        self.operations += 1;
        if self.fail_operation == Some(self.operations) {
            let message = format!(
                "simulated I/O error at operation {}: {what}",
                self.operations
            );
            self.failed = Some(message.clone());
            return Err(io::Error::other(message));
        }
        Ok(())
    }

    fn check_power(&self) -> io::Result<()> {
        if self.powered_off() {
            Err(power_lost())
        } else {
            Ok(())
        }
    }

    fn dir(&self, ino: Ino) -> Option<&DirNode> {
        match &self.nodes[ino] {
            Node::Dir(dir) => Some(dir),
            Node::File(_) => None,
        }
    }

    fn file_mut(&mut self, ino: Ino) -> io::Result<&mut FileNode> {
        match &mut self.nodes[ino] {
            Node::File(file) => Ok(file),
            Node::Dir(_) => Err(io::Error::other("is a directory")),
        }
    }

    fn file(&self, ino: Ino) -> io::Result<&FileNode> {
        match &self.nodes[ino] {
            Node::File(file) => Ok(file),
            Node::Dir(_) => Err(io::Error::other("is a directory")),
        }
    }

    /// The names of `path` below the root.
    fn components(path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for component in path.components() {
            match component {
                Component::RootDir => {}
                Component::Normal(name) => names.push(
                    name.to_str()
                        .ok_or_else(|| io::Error::other("non-UTF-8 name"))?
                        .to_owned(),
                ),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{}: only absolute, normal paths", path.display()),
                    ));
                }
            }
        }
        Ok(names)
    }

    /// The inode at `path`, which must exist.
    fn existing(&self, path: &Path) -> io::Result<Ino> {
        self.lookup(path)?.ok_or_else(|| not_found(path))
    }

    /// The directory at `path`, which must exist and be a directory.
    fn existing_dir(&mut self, path: &Path) -> io::Result<(Ino, &mut DirNode)> {
        let ino = self.existing(path)?;
        match &mut self.nodes[ino] {
            Node::Dir(dir) => Ok((ino, dir)),
            Node::File(_) => Err(io::Error::other(format!(
                "{} is not a directory",
                path.display()
            ))),
        }
    }

    fn lookup(&self, path: &Path) -> io::Result<Option<Ino>> {
        let mut ino = ROOT;
        for name in Self::components(path)? {
            let Some(dir) = self.dir(ino) else {
                return Ok(None);
            };
            match dir.current.get(&name) {
                Some(&child) => ino = child,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    /// The directory that holds `path` and the last name of `path`.
    fn parent_of(&self, path: &Path) -> io::Result<(Ino, String)> {
        let mut names = Self::components(path)?;
        let name = names
            .pop()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root has no parent"))?;
        let parent: PathBuf = std::iter::once(Component::RootDir.as_os_str())
            .chain(names.iter().map(|n| n.as_ref()))
            .collect();
        match self.lookup(&parent)? {
            Some(ino) if self.dir(ino).is_some() => Ok((ino, name)),
            _ => Err(not_found(&parent)),
        }
    }

    /// Changes directory entries now and logs the change as pending.
    fn change_dir(&mut self, dir: Ino, changes: Vec<(String, Option<Ino>)>) {
        if let Node::Dir(node) = &mut self.nodes[dir] {
            for (name, target) in &changes {
                match target {
                    Some(ino) => node.current.insert(name.clone(), *ino),
                    None => node.current.remove(name),
                };
            }
        }
        self.dir_log.push(DirOp { dir, changes });
    }

    fn add_node(&mut self, node: Node) -> Ino {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn remove_tree(&mut self, dir: Ino) {
        let children: Vec<(String, Ino)> = match self.dir(dir) {
            Some(node) => node.current.iter().map(|(n, i)| (n.clone(), *i)).collect(),
            None => return,
        };
        for (name, child) in children {
            self.remove_tree(child);
            self.change_dir(dir, vec![(name, None)]);
        }
    }
}

impl SimFs {
    /// An empty disk with only the root directory.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                nodes: vec![Node::Dir(DirNode::default())],
                dir_log: Vec::new(),
                operations: 0,
                power_off_after: None,
                fail_operation: None,
                failed: None,
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in a test thread leaves a state that is still a valid disk.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Mutating operations done so far.
    pub fn operations(&self) -> u64 {
        self.state().operations
    }

    /// Cuts the power after operation `operations` (counting from the start of
    /// this disk): every later call fails and changes nothing.
    pub fn power_off_after(&self, operations: u64) {
        self.state().power_off_after = Some(operations);
    }

    /// Whether the power is off.
    pub fn is_powered_off(&self) -> bool {
        self.state().powered_off()
    }

    /// Makes operation number `operation` fail with an I/O error, changing
    /// nothing; the disk keeps working.
    pub fn fail_operation(&self, operation: u64) {
        self.state().fail_operation = Some(operation);
    }

    /// The operation made to fail by [`SimFs::fail_operation`], once it has.
    pub fn injected_failure(&self) -> Option<String> {
        self.state().failed.clone()
    }

    /// The disk as it is found after power is lost now: pending writes and
    /// directory operations resolved as the module docs say, chosen by `seed`.
    /// The image is a fresh disk with everything durable and the power on.
    pub fn crash_image(&self, seed: u64) -> (SimFs, CrashStats) {
        let state = self.state();
        let mut rng = SplitMix64::new(seed ^ 0x5eed_c0de);
        let mut stats = CrashStats::default();
        // Directory entries: what is durable, plus a prefix of the pending log.
        let mut entries: Vec<Option<BTreeMap<String, Ino>>> = state
            .nodes
            .iter()
            .map(|node| match node {
                Node::Dir(dir) => Some(dir.durable.clone()),
                Node::File(_) => None,
            })
            .collect();
        let pending = state.dir_log.len() as u64;
        let applied = match below(&mut rng, 4) {
            0 => 0,
            1 => pending,
            _ => below(&mut rng, pending + 1),
        };
        stats.dir_ops_applied = applied;
        stats.dir_ops_dropped = pending - applied;
        for op in &state.dir_log[..applied as usize] {
            if let Some(Some(dir)) = entries.get_mut(op.dir) {
                for (name, target) in &op.changes {
                    match target {
                        Some(ino) => dir.insert(name.clone(), *ino),
                        None => dir.remove(name),
                    };
                }
            }
        }
        // File contents: durable bytes, plus each pending change as chosen.
        // One mode for the whole crash half of the time, so that "everything
        // landed" and "nothing landed" are explored as often as mixtures.
        let file_mode = match below(&mut rng, 6) {
            0 => Some(0),
            1 => Some(1),
            2 => Some(2),
            _ => None,
        };
        let mut contents: Vec<Option<Vec<u8>>> = Vec::with_capacity(state.nodes.len());
        for node in &state.nodes {
            let Node::File(file) = node else {
                contents.push(None);
                continue;
            };
            let mut bytes = file.durable.clone();
            for op in &file.pending {
                let choice = file_mode.unwrap_or_else(|| below(&mut rng, 5));
                match op {
                    FileOp::SetLen(len) => {
                        if choice != 1 {
                            bytes.resize(*len as usize, 0);
                        }
                    }
                    FileOp::Write { offset, data } => match choice {
                        0 => {
                            write_into(&mut bytes, *offset, data);
                            stats.writes_applied += 1;
                        }
                        1 => stats.writes_dropped += 1,
                        2 => {
                            let zeros = below(&mut rng, 2) == 0;
                            let garbage: Vec<u8> = (0..data.len())
                                .map(|_| if zeros { 0 } else { rng.next_u64() as u8 })
                                .collect();
                            write_into(&mut bytes, *offset, &garbage);
                            stats.writes_garbled += 1;
                        }
                        _ => {
                            let len = below(&mut rng, data.len() as u64) as usize;
                            write_into(&mut bytes, *offset, &data[..len]);
                            stats.writes_torn += 1;
                        }
                    },
                }
            }
            contents.push(Some(bytes));
        }
        // The rebooted disk: what is reachable from the root through durable
        // entries, everything durable.
        let mut image = State {
            nodes: vec![Node::Dir(DirNode::default())],
            dir_log: Vec::new(),
            operations: 0,
            power_off_after: None,
            fail_operation: None,
            failed: None,
        };
        let mut stack = vec![(ROOT, ROOT)];
        while let Some((old, new)) = stack.pop() {
            let Some(Some(children)) = entries.get(old) else {
                continue;
            };
            let mut built = BTreeMap::new();
            for (name, &child) in children {
                let node = match &contents[child] {
                    Some(bytes) => Node::File(FileNode {
                        durable: bytes.clone(),
                        current: bytes.clone(),
                        pending: Vec::new(),
                    }),
                    None => Node::Dir(DirNode::default()),
                };
                let is_dir = matches!(node, Node::Dir(_));
                let ino = image.add_node(node);
                built.insert(name.clone(), ino);
                if is_dir {
                    stack.push((child, ino));
                }
            }
            image.nodes[new] = Node::Dir(DirNode {
                durable: built.clone(),
                current: built,
            });
        }
        (
            SimFs {
                state: Arc::new(Mutex::new(image)),
            },
            stats,
        )
    }

    /// Every file of the disk with its current content, by path (for test
    /// diagnostics).
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let state = self.state();
        let mut out = BTreeMap::new();
        let mut stack = vec![(PathBuf::from("/"), ROOT)];
        while let Some((path, ino)) = stack.pop() {
            match &state.nodes[ino] {
                Node::File(file) => {
                    out.insert(path, file.current.clone());
                }
                Node::Dir(dir) => {
                    for (name, &child) in &dir.current {
                        stack.push((path.join(name), child));
                    }
                }
            }
        }
        out
    }
}

/// An open file of a [`SimFs`]. An unlinked file stays readable through it.
#[derive(Debug)]
struct SimFile {
    fs: SimFs,
    ino: Ino,
    path: PathBuf,
    writable: bool,
}

impl SimFile {
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file not open for writing",
            ))
        }
    }
}

impl VfsFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.fs.state();
        state.check_power()?;
        let file = state.file(self.ino)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        match start.checked_add(buf.len()) {
            Some(end) if end <= file.current.len() => {
                buf.copy_from_slice(&file.current[start..end]);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            )),
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut state = self.fs.state();
        state.begin_mutation(&format!("write {}", self.path.display()))?;
        let file = state.file_mut(self.ino)?;
        write_into(&mut file.current, offset, buf);
        file.pending.push(FileOp::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let state = self.fs.state();
        state.check_power()?;
        Ok(state.file(self.ino)?.current.len() as u64)
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut state = self.fs.state();
        state.begin_mutation(&format!("truncate {}", self.path.display()))?;
        let file = state.file_mut(self.ino)?;
        file.current.resize(len_bytes as usize, 0);
        file.pending.push(FileOp::SetLen(len_bytes));
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        let mut state = self.fs.state();
        state.begin_mutation(&format!("fsync {}", self.path.display()))?;
        let file = state.file_mut(self.ino)?;
        file.durable = file.current.clone();
        file.pending.clear();
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync_all()
    }
}

impl Vfs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VfsFile>> {
        let mut state = self.state();
        let existing = match mode {
            OpenMode::Read | OpenMode::ReadWrite => {
                state.check_power()?;
                state.lookup(path)?
            }
            OpenMode::CreateNew | OpenMode::CreateTruncate => {
                state.begin_mutation(&format!("create {}", path.display()))?;
                state.lookup(path)?
            }
        };
        let ino = match (mode, existing) {
            (OpenMode::Read | OpenMode::ReadWrite, None) => return Err(not_found(path)),
            (OpenMode::CreateNew, Some(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            (OpenMode::CreateTruncate, Some(ino)) => {
                let file = state.file_mut(ino)?;
                file.current.clear();
                file.pending.push(FileOp::SetLen(0));
                ino
            }
            (OpenMode::CreateNew | OpenMode::CreateTruncate, None) => {
                let (parent, name) = state.parent_of(path)?;
                let ino = state.add_node(Node::File(FileNode::default()));
                state.change_dir(parent, vec![(name, Some(ino))]);
                ino
            }
            (OpenMode::Read | OpenMode::ReadWrite, Some(ino)) => {
                state.file(ino)?;
                ino
            }
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
            path: path.to_owned(),
            writable: mode != OpenMode::Read,
        }))
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let state = self.state();
        state.check_power()?;
        let ino = state.existing(path)?;
        Ok(state.file(ino)?.current.len() as u64)
    }

    fn is_dir(&self, path: &Path) -> bool {
        let state = self.state();
        !state.powered_off()
            && state
                .lookup(path)
                .ok()
                .flatten()
                .is_some_and(|ino| state.dir(ino).is_some())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let mut state = self.state();
        state.check_power()?;
        let (_, dir) = state.existing_dir(path)?;
        Ok(dir.current.keys().map(OsString::from).collect())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin_mutation(&format!("mkdir {}", path.display()))?;
        if state.lookup(path)?.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        let (parent, name) = state.parent_of(path)?;
        let ino = state.add_node(Node::Dir(DirNode::default()));
        state.change_dir(parent, vec![(name, Some(ino))]);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin_mutation(&format!("rename {} to {}", from.display(), to.display()))?;
        let ino = state.lookup(from)?.ok_or_else(|| not_found(from))?;
        let (from_parent, from_name) = state.parent_of(from)?;
        let (to_parent, to_name) = state.parent_of(to)?;
        if from_parent != to_parent {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the simulation renames within one directory only",
            ));
        }
        if let Some(target) = state.lookup(to)?
            && state.dir(target).is_some()
        {
            return Err(io::Error::other(format!("{} is a directory", to.display())));
        }
        state.change_dir(from_parent, vec![(from_name, None), (to_name, Some(ino))]);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin_mutation(&format!("remove {}", path.display()))?;
        let ino = state.existing(path)?;
        state.file(ino)?;
        let (parent, name) = state.parent_of(path)?;
        state.change_dir(parent, vec![(name, None)]);
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin_mutation(&format!("remove tree {}", path.display()))?;
        let (ino, _) = state.existing_dir(path)?;
        state.remove_tree(ino);
        let (parent, name) = state.parent_of(path)?;
        state.change_dir(parent, vec![(name, None)]);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.begin_mutation(&format!("fsync directory {}", path.display()))?;
        let (ino, dir) = state.existing_dir(path)?;
        dir.durable = dir.current.clone();
        state.dir_log.retain(|op| op.dir != ino);
        Ok(())
    }

    fn start_sync_data(&self, file: Arc<dyn VfsFile>) -> PendingSync {
        PendingSync::Deferred(Box::new(move || file.sync_data()))
    }
}

#[cfg(test)]
mod tests;

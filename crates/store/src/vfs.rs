//! The narrow file-system interface every file of a data directory is reached
//! through.
//!
//! The store needs few operations: open a file (to read, to append to, to
//! create), read and write at an offset, its length, truncate, fsync a file,
//! fsync a directory, list a directory, create and remove directories, rename
//! and remove. Keeping them behind [`Vfs`] and [`VfsFile`] lets a test put the
//! store on a simulated disk that loses power (`sim.rs`, with the `sim`
//! feature), and leaves room for other backends. [`RealFs`] is the production implementation: a thin
//! wrapper over `std::fs` (plus the modes below). File handles are
//! kept open by the store as before (the active pack, cached readers), so the
//! insert path costs one dynamic call per write, not an open.
//!
//! # Permissions
//!
//! A data directory holds every replicated disk, so [`RealFs`] creates its
//! directories [`DIR_MODE`] (0700) and its files [`FILE_MODE`] (0600), whatever
//! the process umask (a umask only ever removes bits), and a file it truncates
//! to rewrite is set to 0600 too, so a leftover from an older version cannot
//! pass its looser mode on through a rename. [`restrict_data_dir`] tightens the
//! data directory itself when a writable store opens it.
//!
//! Not behind it: the data directory's exclusive lock (`DATA/lock`, an advisory
//! lock of the real file system that no simulation needs) and the image files
//! that `export` writes outside the data directory.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Mode of every file the store creates: the owner only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory the store creates: the owner only.
pub const DIR_MODE: u32 = 0o700;

/// Sets the data directory `dir` to [`DIR_MODE`] if any group or other bit is
/// set, so that a directory made by an older version (or by hand) with the
/// usual 0755 stops exposing the packs of every replicated disk. Files inside
/// keep their modes: once the directory is 0700 no other user can reach them.
pub fn restrict_data_dir(dir: &Path) -> io::Result<()> {
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// How [`Vfs::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// A new file for reading and writing; fails with `AlreadyExists` if the
    /// name is taken.
    CreateNew,
    /// A file for writing, created if missing and truncated otherwise.
    CreateTruncate,
}

/// An open file. Reads and writes are positioned, so one handle serves
/// concurrent readers.
pub trait VfsFile: fmt::Debug + Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `len` bytes at `offset` into a new buffer. This one
    /// zeroes the buffer first; a real file reads into it as allocated,
    /// which saves a pass over every chunk a launch reads.
    fn read_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `head` then `tail` at `offset`, as [`VfsFile::write_all_at`]
    /// of the two joined would. A real file does it in one system call
    /// (`pwritev`) where it can: a pack record is a header and its data.
    fn write_all_at_parts(&self, head: &[u8], tail: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(head, offset)?;
        self.write_all_at(tail, offset + head.len() as u64)
    }
    /// The file's current length.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file to `len_bytes`.
    fn set_len(&self, len_bytes: u64) -> io::Result<()>;
    /// Makes the file's data and metadata durable (`fsync`). Does not make a
    /// new name of the file durable: that takes [`Vfs::sync_dir`].
    fn sync_all(&self) -> io::Result<()>;
    /// Makes the file's data (and its length) durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

/// A durable file system as the store uses it. Paths are absolute paths of the
/// data directory and below.
pub trait Vfs: fmt::Debug + Send + Sync {
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VfsFile>>;
    /// The length of the file at `path`.
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// Whether `path` is a directory (false when it does not exist).
    fn is_dir(&self, path: &Path) -> bool;
    /// The names of the entries of directory `path`, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// Creates directory `path` (its parent must exist); `AlreadyExists` if it does.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to` in the same directory, replacing `to` if it is a file.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes directory `path` and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `path` durable: creates, renames and
    /// removals inside it survive a crash only after this.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Starts `file.sync_data()` without waiting for it; the store joins it
    /// before it reports anything durable. The real file system runs it on a
    /// thread; a simulation may run it later, at the join, to stay
    /// deterministic (the latest a real background fsync may finish).
    fn start_sync_data(&self, file: Arc<dyn VfsFile>) -> PendingSync {
        PendingSync::Thread(std::thread::spawn(move || file.sync_data()))
    }
}

/// An fsync started by [`Vfs::start_sync_data`].
pub enum PendingSync {
    /// Running on its own thread.
    Thread(JoinHandle<io::Result<()>>),
    /// To be run when joined.
    Deferred(Box<dyn FnOnce() -> io::Result<()> + Send>),
}

impl PendingSync {
    /// Waits for the fsync and returns its outcome.
    pub fn wait(self) -> io::Result<()> {
        match self {
            PendingSync::Thread(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("fsync thread panicked"))),
            PendingSync::Deferred(sync) => sync(),
        }
    }
}

impl fmt::Debug for PendingSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PendingSync::Thread(_) => "PendingSync::Thread",
            PendingSync::Deferred(_) => "PendingSync::Deferred",
        })
    }
}

/// The operating system's file system, through `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl VfsFile for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn read_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            // Into the capacity not yet read (which may exceed `len`).
            let at = offset + buf.len() as u64;
            let read = match rustix::io::pread(self, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(read) => read,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if read == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.truncate(len);
        Ok(buf)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn write_all_at_parts(&self, head: &[u8], tail: &[u8], offset: u64) -> io::Result<()> {
        write_parts_through(head, tail, offset, |parts, at| {
            rustix::io::pwritev(self, parts, at).map_err(io::Error::from)
        })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        File::set_len(self, len_bytes)
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

impl Vfs for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn VfsFile>> {
        let mut options = OpenOptions::new();
        match mode {
            OpenMode::Read => options.read(true),
            OpenMode::ReadWrite => options.read(true).write(true),
            OpenMode::CreateNew => options
                .read(true)
                .write(true)
                .create_new(true)
                .mode(FILE_MODE),
            OpenMode::CreateTruncate => options
                .write(true)
                .create(true)
                .truncate(true)
                .mode(FILE_MODE),
        };
        let file = options.open(path)?;
        if mode == OpenMode::CreateTruncate {
            // The mode above applies only when the file is new.
            file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        }
        Ok(Arc::new(file))
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(path)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(DIR_MODE).create(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

/// Writes `head` then `tail` at `offset` through `pwritev` (parts, offset ->
/// bytes written), which writes both at once unless it writes short (a full
/// disk, a signal): then what is left is asked for again, from where it
/// stopped, until all is written or it fails.
fn write_parts_through(
    head: &[u8],
    tail: &[u8],
    offset: u64,
    mut pwritev: impl FnMut(&[io::IoSlice<'_>], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let total = head.len() + tail.len();
    let mut done = 0;
    while done < total {
        let parts = if done < head.len() {
            [io::IoSlice::new(&head[done..]), io::IoSlice::new(tail)]
        } else {
            [
                io::IoSlice::new(&tail[done - head.len()..]),
                io::IoSlice::new(&[]),
            ]
        };
        match pwritev(&parts, offset + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => done += written,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record's header and data written as one call land where two
    /// writes would have put them, past the end and in the middle alike.
    #[test]
    fn parts_written_at_once_land_as_two_writes_would() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.path().join("f"))
            .unwrap();
        let head: Vec<u8> = (0..52u8).collect();
        let tail: Vec<u8> = (0..70_000u32).map(|n| (n % 251) as u8).collect();
        VfsFile::write_all_at_parts(&file, &head, &tail, 10).unwrap();
        VfsFile::write_all_at_parts(&file, &tail[..3], &[], 20).unwrap();
        VfsFile::write_all_at_parts(&file, &[], &head[..5], 70_060).unwrap();
        let mut expected = vec![0u8; 10];
        expected.extend_from_slice(&head);
        expected.extend_from_slice(&tail);
        expected[20..23].copy_from_slice(&tail[..3]);
        expected.resize(70_065, 0);
        expected[70_060..70_065].copy_from_slice(&head[..5]);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), expected);
    }

    /// Short writes and interruptions anywhere (inside the header, at its
    /// end, inside the data) are taken up where they stopped.
    #[test]
    fn short_and_interrupted_writes_are_taken_up_where_they_stopped() {
        let head: Vec<u8> = (0..52u8).collect();
        let tail: Vec<u8> = (0..5000u32).map(|n| (n % 253) as u8).collect();
        let mut expected = vec![0u8; 7];
        expected.extend_from_slice(&head);
        expected.extend_from_slice(&tail);
        for most in [1usize, 7, 51, 52, 53, 1000, 10_000] {
            let mut file = vec![0u8; 7];
            let mut calls = 0;
            write_parts_through(&head, &tail, 7, |parts, at| {
                calls += 1;
                if calls % 3 == 0 {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
                let n = joined.len().min(most);
                let at = at as usize;
                if file.len() < at + n {
                    file.resize(at + n, 0);
                }
                file[at..at + n].copy_from_slice(&joined[..n]);
                Ok(n)
            })
            .unwrap();
            assert_eq!(file, expected, "at most {most} bytes a call");
        }
        let stuck = write_parts_through(&head, &tail, 0, |_, _| Ok(0));
        assert_eq!(stuck.unwrap_err().kind(), io::ErrorKind::WriteZero);
        let failed = write_parts_through(&head, &tail, 0, |_, _| Err(io::Error::other("full")));
        assert_eq!(failed.unwrap_err().to_string(), "full");
    }
}

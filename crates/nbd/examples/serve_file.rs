//! Serves one raw file over NBD on a Unix socket, for measuring the crate's
//! transmission path against `qemu-nbd` (`scripts/nbd_compare.sh`).
//!
//! ```sh
//! cargo run --release -p blockrep-nbd --example serve_file -- IMAGE SOCKET [NAME]
//! qemu-img bench -f raw "nbd+unix:///NAME?socket=SOCKET"
//! ```
//!
//! The export is the plainest one a file allows, and the one `qemu-nbd -f raw
//! --cache=writeback` amounts to: positioned reads and writes through the page
//! cache, `fdatasync` for a flush, zeroes written as zeroes. Anything it costs
//! beyond that file I/O is the server's. The socket is created mode 0600 and
//! removed on SIGINT/SIGTERM; every connection gets the export (the default,
//! empty name too). `INLINE_BYTES=N` in the environment sets
//! [`Limits::inline_request_bytes_max`] (0: every request on a thread), to
//! compare the two ways of running requests. Not part of the shipped binary.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use blockrep_nbd::{Client, Export, Limits, NbdServer, Registry};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

/// Zeroes written per call by `write_zeroes`, so a huge request costs bounded memory.
const ZERO_BUFFER_BYTES: usize = 1 << 20;

/// A raw file as an export.
#[derive(Debug)]
struct FileExport {
    file: File,
    size_bytes: u64,
}

impl Export for FileExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let zeroes = vec![0; ZERO_BUFFER_BYTES.min(usize::try_from(len).unwrap_or(usize::MAX))];
        let mut done = 0;
        while done < len {
            let step = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..step], offset + done)?;
            done += step as u64;
        }
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn multi_conn_safe(&self) -> bool {
        true
    }
}

/// The one export, under `name` and the default (empty) name.
#[derive(Debug)]
struct One {
    name: String,
    export: Arc<FileExport>,
}

impl Registry for One {
    fn lookup(&self, _client: &Client, name: &str) -> Option<Arc<dyn Export>> {
        (name.is_empty() || name == self.name).then(|| Arc::clone(&self.export) as Arc<dyn Export>)
    }
    fn list(&self, _client: &Client) -> Vec<(String, String)> {
        vec![(self.name.clone(), String::new())]
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (image, socket, name) = match args.as_slice() {
        [image, socket] => (image, socket, "disk".to_string()),
        [image, socket, name] => (image, socket, name.clone()),
        _ => {
            eprintln!("usage: serve_file IMAGE SOCKET [NAME]");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("serve_file: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(image.into(), socket.into(), name)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve_file: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(image: PathBuf, socket: PathBuf, name: String) -> std::io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(&image)?;
    let size_bytes = file.metadata()?.len();
    let registry = Arc::new(One {
        name,
        export: Arc::new(FileExport { file, size_bytes }),
    });
    let mut limits = Limits::default();
    if let Ok(bytes) = std::env::var("INLINE_BYTES") {
        limits.inline_request_bytes_max = bytes.parse().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("INLINE_BYTES: {e}"),
            )
        })?;
    }
    let server = Arc::new(NbdServer::new(registry, limits));
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    println!("listening on {}", socket.display());
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        let stream = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("serve_file: accept: {e}");
                    continue;
                }
            },
        };
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            if let Err(e) = server.serve_connection(stream, Client::new(None)).await {
                eprintln!("serve_file: connection ended: {e}");
            }
        });
    }
    std::fs::remove_file(&socket)
}

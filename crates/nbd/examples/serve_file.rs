//! Serves one raw file over NBD on a Unix socket, for measuring the crate's
//! transmission path against `qemu-nbd` (`scripts/nbd_compare.sh`).
//!
//! ```sh
//! cargo run --release -p blockrep-nbd --example serve_file -- IMAGE SOCKET [NAME]
//! qemu-img bench -f raw "nbd+unix:///NAME?socket=SOCKET"
//! ```
//!
//! The export is the crate's [`FileExport`], the plainest one a file allows
//! and the one `qemu-nbd -f raw --cache=writeback` amounts to. Anything it
//! costs beyond that file I/O is the server's. The socket is created mode 0600 and
//! removed on SIGINT/SIGTERM; every connection gets the export (the default,
//! empty name too). `INLINE_BYTES=N` in the environment sets
//! [`Limits::inline_request_bytes_max`] (0: every request on a thread), to
//! compare the two ways of running requests. Not part of the shipped binary.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use blockrep_nbd::{Client, Export, FileExport, Limits, NbdServer, Registry};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

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
    let registry = Arc::new(One {
        name,
        export: Arc::new(FileExport::open(&image, false)?),
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

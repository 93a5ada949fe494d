//! The admin identity of this command line, and requests made with it.
//!
//! With `--admin-tls-dir DIR` (a server run with `--admin-tls`), requests go over
//! mutual TLS with DIR/ca.crt, DIR/admin.crt and DIR/admin.key.
//!
//! Over plain HTTP every request carries the admin token (`Authorization:
//! Bearer`), read from `--admin-token FILE` (or `BLOCKREP_ADMIN_TOKEN_FILE`),
//! else from the first of [`DEFAULT_TOKEN_FILES`] that exists: the layouts
//! the README and the systemd units use, so `blockrep status` works as is.
//! The transport is `blockrep_admin_client`'s.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, bail};
use blockrep_admin_client::{Identity, read_token};
use blockrep_pki::AdminToken;

/// The certificate directory for admin TLS, set once from the command line.
static TLS_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The admin token file named on the command line, set once.
static TOKEN_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Where the admin token is looked for when no file is named: `cert init --dir
/// tls` run here, and the directory of the packaged systemd units.
pub const DEFAULT_TOKEN_FILES: [&str; 2] = ["tls/admin.token", "/etc/blockrep/tls/admin.token"];

/// The admin certificate directory given on the command line, if any.
pub fn tls_dir() -> Option<PathBuf> {
    TLS_DIR.get().cloned().flatten()
}

/// Makes every later request use mutual TLS with the admin certificate in `dir`.
pub fn set_tls_dir(dir: Option<PathBuf>) {
    let _ = TLS_DIR.set(dir);
}

/// Makes every later plain-HTTP request carry the token in `path`.
pub fn set_token_file(path: Option<PathBuf>) {
    let _ = TOKEN_FILE.set(path);
}

/// The token to send: the named file's (which must be readable), else the
/// first default file that exists, else none.
fn configured_token() -> Result<Option<AdminToken>> {
    if let Some(path) = TOKEN_FILE.get().cloned().flatten() {
        return read_token(&path).map(Some);
    }
    for path in DEFAULT_TOKEN_FILES.map(Path::new) {
        if path.exists() {
            return read_token(path).map(Some);
        }
    }
    Ok(None)
}

/// Sends a request with the admin identity configured on the command line
/// (the certificate of `--admin-tls-dir`, else the admin token) and returns
/// the status code and body.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let identity = match TLS_DIR.get().cloned().flatten() {
        Some(dir) => Identity::Certificate { dir },
        None => Identity::Token(configured_token()?),
    };
    let (code, text) = blockrep_admin_client::request(addr, method, path, body, &identity).await?;
    if code == 401 && matches!(identity, Identity::Token(None)) {
        bail!(
            "the admin API at {addr} needs the admin token: pass --admin-token FILE or set \
             BLOCKREP_ADMIN_TOKEN_FILE (the server's TLS_DIR/admin.token; looked for {})",
            DEFAULT_TOKEN_FILES.join(" and ")
        );
    }
    Ok((code, text))
}

//! A minimal HTTP/1.1 client for the server's admin API (JSON over a short-lived
//! connection). The admin API is ours and answers with `Connection: close`, so a
//! full HTTP client library would add nothing but weight.
//!
//! A request goes as an [`Identity`]: over mutual TLS with the admin
//! certificate (a server run with `--admin-tls`; its certificate must name the
//! host of the admin address), or over plain HTTP with the admin token as
//! `Authorization: Bearer`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use blockrep_pki::AdminToken;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Who a request is from, to the admin API.
#[derive(Debug)]
pub enum Identity {
    /// Mutual TLS with `dir`/ca.crt, `dir`/admin.crt and `dir`/admin.key.
    Certificate {
        /// The directory of the admin certificate.
        dir: PathBuf,
    },
    /// Plain HTTP carrying this bearer token, if any (without one, only
    /// /health and /metrics answer).
    Token(Option<AdminToken>),
}

/// Reads an admin token file (0600, as `cert init` and the server write it).
pub fn read_token(path: &Path) -> Result<AdminToken> {
    AdminToken::read(path).context("cannot use the admin token (--admin-token)")
}

/// Most bytes of a response we accept.
const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Sends one request as `identity` and returns the status code and body.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    identity: &Identity,
) -> Result<(u16, String)> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the admin API at {addr} (is the server running with --admin-listen {addr}?)"))?;
    match identity {
        Identity::Certificate { dir } => {
            let config = blockrep_pki::client_config(
                &dir.join("ca.crt"),
                &dir.join("admin.crt"),
                &dir.join("admin.key"),
            )?;
            let name = server_name(addr)?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with the admin API at {addr} failed"))?;
            // Over TLS the certificate is the identity: no token is sent.
            exchange(stream, addr, method, path, body, None).await
        }
        Identity::Token(token) => {
            if token.is_some() {
                refuse_token_off_loopback(&tcp, addr)?;
            }
            exchange(tcp, addr, method, path, body, token.as_ref()).await
        }
    }
}

/// The token travels in clear over plain HTTP, which a server offers only on
/// loopback (it refuses any other address without --admin-tls): an address
/// that leads elsewhere, mistyped or not, must not be handed the token.
fn refuse_token_off_loopback(tcp: &TcpStream, addr: &str) -> Result<()> {
    let peer = tcp
        .peer_addr()
        .with_context(|| format!("cannot read the address of {addr}"))?;
    if peer.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to send the admin token in clear to {addr} ({peer}): a server's plain admin \
         API listens on loopback only. Reach it through a tunnel to a local port, or run the \
         server with --admin-tls and give --admin-tls-dir"
    )
}

/// The host part of `host:port`, as the name the server's certificate must carry.
fn server_name(addr: &str) -> Result<rustls::pki_types::ServerName<'static>> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host:?} is not a valid server name"))
}

/// The operator's name the server records in a source's migration history
/// beside the admin identity: `BLOCKREP_OPERATOR`, else the login name; only
/// names of letters, digits and `._@-` (at most 64) are sent.
fn operator() -> Option<String> {
    ["BLOCKREP_OPERATOR", "USER", "LOGNAME"]
        .iter()
        .filter_map(|var| std::env::var(var).ok())
        .find(|name| !name.is_empty())
        .filter(|name| {
            name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
        })
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&AdminToken>,
) -> Result<(u16, String)> {
    let body = body.unwrap_or("");
    let authorization = token.map_or_else(String::new, |t| {
        format!("Authorization: Bearer {}\r\n", t.as_str())
    });
    let operator = operator().map_or_else(String::new, |name| {
        format!("X-Blockrep-Operator: {name}\r\n")
    });
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\
         {authorization}{operator}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut response = Vec::new();
    (&mut stream)
        .take(RESPONSE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut response)
        .await?;
    if response.len() > RESPONSE_BYTES_MAX {
        bail!("admin API response larger than {RESPONSE_BYTES_MAX} bytes");
    }
    parse_response(&response)
}

fn parse_response(response: &[u8]) -> Result<(u16, String)> {
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("malformed HTTP response from the admin API")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .context("malformed HTTP status line from the admin API")?;
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let raw = &response[split + 4..];
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("malformed chunked body")?;
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("malformed chunk size")?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            bail!("truncated chunked body");
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (status, body) =
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]").unwrap();
        assert_eq!((status, body.as_str()), (200, "[]"));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (status, body) = parse_response(chunked).unwrap();
        assert_eq!((status, body.as_str()), (404, "abcde"));
        assert!(parse_response(b"garbage").is_err());
    }
}

//! Who may use the admin API, checked before any handler runs.
//!
//! A browser on the operator's machine can reach a loopback admin API: a page
//! from anywhere can `POST` to it (CSRF), and a name the attacker controls can
//! be made to resolve to 127.0.0.1 (DNS rebinding). So, in this order:
//!
//! 1. `Host` must name this listener: `localhost`, a loopback address, the
//!    listen address, or a name given with `--admin-host`; else 421.
//! 2. An `Origin` must be the origin of that `Host`, and a browser's
//!    `Sec-Fetch-Site` must say `same-origin` (or `none`: typed by the user); else 403.
//! 3. The admin identity: over `--admin-tls` the admin certificate (checked by
//!    `admin_tls::require_admin`); over plain HTTP `Authorization: Bearer` with
//!    the admin token, compared in constant time; else 401. Only `GET`/`HEAD`
//!    of `/health` and `/metrics` are open without it.
//! 4. Every other method than `GET`/`HEAD` needs `Content-Type:
//!    application/json` (whether or not it has a body); else 415. A page cannot
//!    send that type across origins without a CORS preflight, which this API
//!    never answers.
//!
//! Each refusal is logged and counted in `blockrep_admin_requests_refused_total`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use blockrep_pki::AdminToken;
use tracing::{info, warn};

use crate::ledger::AdminRefusal;
use crate::shared::Shared;
use crate::{Error, ServerConfig};

/// What the admin listener lets in, fixed at start.
#[derive(Debug)]
pub(crate) struct AdminGuard {
    /// The admin token; `None` over `--admin-tls`, where the certificate is the identity.
    token: Option<AdminToken>,
    /// Host names (lowercase) a `Host` header may carry besides addresses.
    names: Vec<String>,
    /// Addresses a `Host` header may carry.
    addresses: Vec<IpAddr>,
}

impl AdminGuard {
    /// The guard of an admin listener bound at `bound`: reads the token file
    /// (writing a new token there when it is missing) unless `--admin-tls`.
    pub(crate) fn new(config: &ServerConfig, bound: SocketAddr) -> Result<Self, Error> {
        let token = if config.admin_tls {
            None
        } else {
            let path = &config.admin_token_path;
            let (token, created) = AdminToken::read_or_create(path)?;
            if created {
                info!(path = %path.display(), "wrote a new admin token");
            }
            Some(token)
        };
        let mut names = vec!["localhost".to_owned()];
        let mut addresses = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        if !bound.ip().is_unspecified() {
            addresses.push(bound.ip());
        }
        for host in &config.admin_hosts {
            let host = host.trim().trim_start_matches('[').trim_end_matches(']');
            match host.parse::<IpAddr>() {
                Ok(ip) => addresses.push(ip),
                Err(_) => names.push(host.to_ascii_lowercase()),
            }
        }
        Ok(Self {
            token,
            names,
            addresses,
        })
    }

    /// Whether the host part of a `Host` header value names this listener.
    fn host_allowed(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        match name.parse::<IpAddr>() {
            Ok(ip) => self.addresses.contains(&ip),
            Err(_) => self.names.iter().any(|n| n.eq_ignore_ascii_case(name)),
        }
    }
}

/// The host of `host[:port]` or `[v6][:port]`; `None` if malformed.
fn host_name(value: &str) -> Option<&str> {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match value.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        }
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (!host.is_empty() && port_ok).then_some(host)
}

/// Whether `origin` (`scheme://host[:port]`) is the origin of `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let origin = origin.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    let (authority, default_port) = if let Some(rest) = origin.strip_prefix("http://") {
        (rest, "80")
    } else if let Some(rest) = origin.strip_prefix("https://") {
        (rest, "443")
    } else {
        return false;
    };
    authority == host
        || format!("{authority}:{default_port}") == host
        || authority == format!("{host}:{default_port}")
}

/// The one value of a header; `Err` when it is repeated or not text.
fn single<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Result<Option<&'a str>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    first.map(|v| v.to_str().map_err(|_| ())).transpose()
}

/// Requests that need no admin identity: reading health and metrics.
fn open_read_only(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD) && (path == "/health" || path == "/metrics")
}

/// The bearer token of an `Authorization` header, if it is one.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether a `Content-Type` value is JSON (parameters such as charset allowed).
fn is_json(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Why a request is refused, or `None` to let it through.
fn check(guard: &AdminGuard, request: &Request) -> Option<(AdminRefusal, StatusCode, String)> {
    let headers = request.headers();
    let refuse = |reason, status, message: String| Some((reason, status, message));
    let host = match single(headers, &header::HOST) {
        Ok(Some(host)) => host,
        Ok(None) => request.uri().authority().map_or("", |a| a.as_str()),
        Err(()) => {
            return refuse(
                AdminRefusal::ForeignHost,
                StatusCode::BAD_REQUEST,
                "exactly one Host header is needed".into(),
            );
        }
    };
    if !guard.host_allowed(host) {
        return refuse(
            AdminRefusal::ForeignHost,
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {host:?} is not this admin API (allowed: localhost, loopback, the listen \
                 address and names given with --admin-host)"
            ),
        );
    }
    match single(headers, &header::ORIGIN) {
        Ok(None) => {}
        Ok(Some(origin)) if same_origin(origin, host) => {}
        Ok(Some(origin)) => {
            return refuse(
                AdminRefusal::ForeignOrigin,
                StatusCode::FORBIDDEN,
                format!("requests from origin {origin:?} are not allowed"),
            );
        }
        Err(()) => {
            return refuse(
                AdminRefusal::ForeignOrigin,
                StatusCode::FORBIDDEN,
                "a repeated or malformed Origin header".into(),
            );
        }
    }
    let fetch_site = headers
        .get("sec-fetch-site")
        .map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = fetch_site
        && site != "same-origin"
        && site != "none"
    {
        return refuse(
            AdminRefusal::ForeignOrigin,
            StatusCode::FORBIDDEN,
            format!("a {site} browser request is not allowed"),
        );
    }
    let method = request.method();
    if let Some(token) = &guard.token
        && !open_read_only(method, request.uri().path())
    {
        let presented = match single(headers, &header::AUTHORIZATION) {
            Ok(value) => value.and_then(bearer),
            Err(()) => None,
        };
        match presented {
            None => {
                return refuse(
                    AdminRefusal::NoToken,
                    StatusCode::UNAUTHORIZED,
                    "the admin API needs the admin token: `Authorization: Bearer` with the \
                     contents of the server's admin token file (TLS_DIR/admin.token); the \
                     blockrep CLI sends it by itself (--admin-token FILE)"
                        .into(),
                );
            }
            Some(presented) if !token.matches(presented) => {
                return refuse(
                    AdminRefusal::WrongToken,
                    StatusCode::UNAUTHORIZED,
                    "wrong admin token".into(),
                );
            }
            Some(_) => {}
        }
    }
    if method != Method::GET && method != Method::HEAD {
        let json = matches!(single(headers, &header::CONTENT_TYPE), Ok(Some(v)) if is_json(v));
        if !json {
            return refuse(
                AdminRefusal::NotJson,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("{method} requests need Content-Type: application/json"),
            );
        }
    }
    None
}

/// The middleware: refuses (logged, counted) or passes the request on.
pub(crate) async fn guard(
    State((shared, guard)): State<(Arc<Shared>, Arc<AdminGuard>)>,
    request: Request,
    next: Next,
) -> Response {
    let Some((refusal, status, message)) = check(&guard, &request) else {
        return next.run(request).await;
    };
    shared.ledger.admin_refused(refusal);
    warn!(method = %request.method(), path = %request.uri().path(),
          reason = refusal.as_str(), message = %message, "admin request refused");
    let mut response = crate::api_error::error(status, message);
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"blockrep admin\""),
        );
    }
    response
}

/// Refuses a plain-HTTP admin listener off loopback: the admin token would
/// cross the network in clear, and with it every admin action. Over
/// `--admin-tls` any address is fine.
pub(crate) fn check_listen(config: &ServerConfig) -> Result<(), Error> {
    match config.admin_listen {
        Some(addr) if !config.admin_tls && !addr.ip().to_canonical().is_loopback() => {
            Err(Error::Config(format!(
                "refusing to serve the admin API on {addr} over plain HTTP: its token (and \
                 every cutover, launch and reset) would cross the network in clear; add \
                 --admin-tls (clients then need the admin certificate), or listen on a \
                 loopback address"
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_origins_are_parsed_strictly() {
        assert_eq!(host_name("127.0.0.1:7444"), Some("127.0.0.1"));
        assert_eq!(host_name("[::1]:7444"), Some("::1"));
        assert_eq!(host_name("localhost"), Some("localhost"));
        assert_eq!(host_name("evil.example:80"), Some("evil.example"));
        assert_eq!(host_name(""), None);
        assert_eq!(host_name("[::1"), None);
        assert_eq!(host_name("a:b"), None);
        assert!(same_origin("http://127.0.0.1:7444", "127.0.0.1:7444"));
        assert!(same_origin("http://localhost", "localhost:80"));
        assert!(same_origin("HTTPS://LocalHost:443", "localhost"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:7444"));
        assert!(!same_origin("null", "127.0.0.1:7444"));
        assert!(!same_origin("http://127.0.0.1:8000", "127.0.0.1:7444"));
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert!(is_json("application/json; charset=utf-8"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json("text/plain"));
    }
}

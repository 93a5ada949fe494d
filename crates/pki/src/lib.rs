//! blockrep's private PKI: making the CA and certificates (rcgen), reading them
//! back, building rustls configurations for mutual TLS, and taking a peer's
//! identity from its certificate.
//!
//! Identities are bound into the certificate's subject alternative names as URIs:
//! `urn:blockrep:source:ID` for a source's agent and `urn:blockrep:admin` for the
//! operator. A source certificate may also carry `urn:blockrep:tenant:T`: the
//! sources of one tenant deduplicate against each other's data (a source without
//! one is its own tenant). The server takes the identity from the verified certificate, never
//! from anything the peer says on the wire.
//!
//! Files of a TLS directory: `ca.crt`/`ca.key` (the CA), `server.crt`/`server.key`,
//! `ID.crt`/`ID.key` per source, `admin.crt`/`admin.key`, `crl.pem`, and
//! `admin.token` (0600), the admin API's bearer token (see [`AdminToken`]).
#![forbid(unsafe_code)]

mod crl;
mod files;
mod identity;
mod issue;
mod revoke;
mod tls;
mod token;

pub use crl::{
    CRL_FILE_MAX_BYTES, CrlFingerprint, ReloadableClientVerifier, RevocationLists, cert_serial,
    read_list_file, server_config_reloadable,
};
pub use files::{read_certs, read_key};
pub use identity::{
    ADMIN_URI, Identity, SOURCE_URI_PREFIX, TENANT_URI_PREFIX, identity_from_cert, tenant_from_cert,
};
pub use issue::{
    init_ca, issue_admin, issue_serve, issue_source, issue_source_in_tenant, serve_cert_paths,
};
pub use revoke::{CRL_FILE_NAME, Revocation, read_crls, revoke_cert};
pub use tls::{client_config, server_config, server_config_with_crls};
pub use token::{ADMIN_TOKEN_FILE_NAME, AdminToken};

/// Errors of this crate: a message naming the file or step that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key is invalid or unusable.
    #[error("{0}")]
    Invalid(String),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

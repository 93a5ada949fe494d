//! rustls configurations: TLS 1.3 only, aws-lc-rs, client certificates required.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateRevocationListDer;

use crate::Error;
use crate::files::{read_certs, read_key};

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub(crate) fn roots(ca: &Path) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert).map_err(|e| {
            Error::Invalid(format!("{}: unusable CA certificate: {e}", ca.display()))
        })?;
    }
    Ok(Arc::new(roots))
}

/// Server configuration: presents `cert`/`key`, requires a client certificate
/// signed by the CA in `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<ServerConfig, Error> {
    server_config_with_crls(ca, cert, key, Vec::new())
}

/// [`server_config`] that also refuses client certificates revoked by `crls`
/// (see [`crate::revoke_cert`]). Only the client's own certificate is checked:
/// the CA is the trust anchor itself. A certificate whose revocation status the
/// lists do not cover is refused, so a list from another CA locks every client
/// out rather than letting every client in.
pub fn server_config_with_crls(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(roots(ca)?, Arc::clone(&provider));
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = builder
        .build()
        .map_err(|e| Error::Invalid(format!("client verifier: {e}")))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert)?, read_key(key)?)?;
    Ok(config)
}

/// Client configuration: trusts only the CA in `ca`, presents `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<ClientConfig, Error> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(read_certs(cert)?, read_key(key)?)?;
    Ok(config)
}

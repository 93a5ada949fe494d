//! rustls configurations: TLS 1.3 only, aws-lc-rs, client certificates required.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateRevocationListDer;

use crate::Error;
use crate::files::{read_certs, read_key};

/// aws-lc-rs, its TLS 1.3 suites in the order that is fastest on this CPU:
/// with AES instructions, AES-128-GCM first (fewer rounds than AES-256-GCM,
/// which rustls puts first); without them, ChaCha20-Poly1305 first. The
/// server follows the client's order, so the agent's CPU decides, and a
/// client without AES instructions is not made to use a slow AES.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let first = if aes_instructions() {
        TLS13_AES_128_GCM_SHA256.suite()
    } else {
        TLS13_CHACHA20_POLY1305_SHA256.suite()
    };
    // A stable sort: the rest keep rustls's order.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != first);
    Arc::new(provider)
}

/// Whether the CPU has AES and carry-less multiply instructions (what makes
/// AES-GCM fast).
pub(crate) fn aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    /// Agent and server settle on the suite that is fastest on this CPU.
    #[test]
    fn the_suite_negotiated_is_the_fastest_here() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        crate::init_ca(path, &["localhost".into()], false).unwrap();
        let source = blockrep_core::SourceId::new("suite").unwrap();
        let (cert, key) = crate::issue_source(path, &source).unwrap();
        let ca = path.join("ca.crt");
        let server =
            server_config(&ca, &path.join("server.crt"), &path.join("server.key")).unwrap();
        let client = client_config(&ca, &cert, &key).unwrap();
        let mut client =
            ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        let expected = if aes_instructions() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        } else {
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        };
        assert_eq!(client.negotiated_cipher_suite().unwrap().suite(), expected);
        assert_eq!(server.negotiated_cipher_suite().unwrap().suite(), expected);
    }
}

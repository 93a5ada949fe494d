//! Revocation lists a running server can replace: the lists as loaded (their
//! DER for rustls and the serials they revoke, for ending open sessions), and a
//! client certificate verifier whose lists are swapped in place.
//!
//! rustls' verifiers are immutable, and a `ServerConfig` holds its verifier for
//! good. [`ReloadableClientVerifier`] is the one verifier a server's
//! configurations hold; it delegates every check to an inner verifier, which
//! [`ReloadableClientVerifier::replace`] rebuilds with the new lists. Every
//! listener built on the configuration (replication, admin over TLS, NBD over
//! TLS) checks each new handshake against the lists in force at that moment.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::Error;
use crate::files::{read_certs, read_key};

/// Largest revocation list file read: a list of a million entries is ~40 MiB;
/// anything larger is not a list `blockrep cert revoke` wrote.
pub const CRL_FILE_MAX_BYTES: u64 = 64 << 20;

/// The revocation lists of one file, checked to be signed by the CA.
#[derive(Debug, Clone, Default)]
pub struct RevocationLists {
    /// The lists, for rustls.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Serials revoked by any list, without leading zero bytes.
    serials: HashSet<Vec<u8>>,
}

impl RevocationLists {
    /// Parses the PEM `bytes` (`what` names them in errors): at least one list,
    /// every one signed by a CA certificate of `ca_path`. A list of another CA
    /// is refused here rather than loaded: rustls would refuse every client
    /// with it, and its serials would end sessions it has no say over.
    pub fn parse(bytes: &[u8], what: &str, ca_path: &Path) -> Result<Self, Error> {
        let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Invalid(format!("{what}: bad PEM: {e}")))?;
        if crls.is_empty() {
            return Err(Error::Invalid(format!(
                "{what}: no certificate revocation list found"
            )));
        }
        let cas = read_certs(ca_path)?;
        let mut serials = HashSet::new();
        for (n, der) in crls.iter().enumerate() {
            let (_, crl) = CertificateRevocationList::from_der(der.as_ref())
                .map_err(|e| Error::Invalid(format!("{what}: list {n}: cannot parse: {e}")))?;
            let signed_by_ca = cas.iter().any(|ca| {
                X509Certificate::from_der(ca.as_ref()).is_ok_and(|(_, ca)| {
                    crl.issuer() == ca.subject() && crl.verify_signature(ca.public_key()).is_ok()
                })
            });
            if !signed_by_ca {
                return Err(Error::Invalid(format!(
                    "{what}: list {n} is not signed by the CA of {}",
                    ca_path.display()
                )));
            }
            for entry in crl.iter_revoked_certificates() {
                serials.insert(normalize_serial(entry.raw_serial()));
            }
        }
        Ok(Self { crls, serials })
    }

    /// Reads and parses the list file at `path` (see [`RevocationLists::parse`]).
    pub fn load(path: &Path, ca_path: &Path) -> Result<Self, Error> {
        let bytes = read_list_file(path)?;
        Self::parse(&bytes, &path.display().to_string(), ca_path)
    }

    /// Whether a certificate with this serial (as [`cert_serial`] gives it) is revoked.
    pub fn revokes(&self, serial: &[u8]) -> bool {
        self.serials.contains(normalize_serial(serial).as_slice())
    }

    /// How many certificates the lists revoke.
    pub fn revoked_count(&self) -> usize {
        self.serials.len()
    }
}

/// Reads a list file, refusing one over [`CRL_FILE_MAX_BYTES`].
pub fn read_list_file(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read as _;
    let io = |source| Error::Io {
        what: format!("cannot read {}", path.display()),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(CRL_FILE_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > CRL_FILE_MAX_BYTES {
        return Err(Error::Invalid(format!(
            "{}: larger than {CRL_FILE_MAX_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The serial number of a certificate (its raw bytes, without leading zeros).
pub fn cert_serial(cert: &CertificateDer<'_>) -> Result<Vec<u8>, Error> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::Invalid(format!("cannot parse client certificate: {e}")))?;
    Ok(normalize_serial(parsed.raw_serial()))
}

/// DER may pad a serial with a zero byte to keep it positive; compare without.
fn normalize_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

/// A client certificate verifier (CA roots, client certificate required)
/// whose revocation lists can be replaced while servers use it.
#[derive(Debug)]
pub struct ReloadableClientVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The CA subjects: they do not change with the lists.
    hints: Vec<DistinguishedName>,
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl ReloadableClientVerifier {
    fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        lists: &RevocationLists,
    ) -> Result<Self, Error> {
        let inner = build_inner(&roots, &provider, lists)?;
        Ok(Self {
            hints: inner.root_hint_subjects().to_vec(),
            roots,
            provider,
            inner: RwLock::new(inner),
        })
    }

    /// Checks every later handshake against `lists`. On error the lists in
    /// force stay in force.
    pub fn replace(&self, lists: &RevocationLists) -> Result<(), Error> {
        let inner = build_inner(&self.roots, &self.provider, lists)?;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = inner;
        Ok(())
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.inner.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// See [`crate::server_config_with_crls`] for the policy: only the client's own
/// certificate is checked, and one the lists do not cover is refused.
fn build_inner(
    roots: &Arc<RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    lists: &RevocationLists,
) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider));
    if !lists.crls.is_empty() {
        builder = builder
            .with_crls(lists.crls.clone())
            .only_check_end_entity_revocation();
    }
    builder
        .build()
        .map_err(|e| Error::Invalid(format!("client verifier: {e}")))
}

impl ClientCertVerifier for ReloadableClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// What a revocation list file looked like when last read; a change of any
/// field is a change of the file (`cert revoke` replaces it by rename: a new
/// inode). Servers poll it to reload the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlFingerprint {
    len: u64,
    modified_ns: i128,
    inode: u64,
}

impl CrlFingerprint {
    /// The file at `path` as it is now; `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            len: meta.len(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
        })
    }
}

/// A server configuration as [`crate::server_config_with_crls`] makes, whose
/// revocation lists can be replaced later through the returned verifier.
pub fn server_config_reloadable(
    ca: &Path,
    cert: &Path,
    key: &Path,
    lists: &RevocationLists,
) -> Result<(rustls::ServerConfig, Arc<ReloadableClientVerifier>), Error> {
    let provider = crate::tls::provider();
    let verifier = Arc::new(ReloadableClientVerifier::new(
        crate::tls::roots(ca)?,
        Arc::clone(&provider),
        lists,
    )?);
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::clone(&verifier) as Arc<dyn ClientCertVerifier>)
        .with_single_cert(read_certs(cert)?, read_key(key)?)?;
    Ok((config, verifier))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{init_ca, issue_source};
    use crate::revoke::{CRL_FILE_NAME, revoke_cert};
    use blockrep_core::SourceId;

    #[test]
    fn a_loaded_list_names_the_revoked_serial_only() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &["localhost".into()], false).unwrap();
        let (a, _) = issue_source(dir.path(), &SourceId::new("a").unwrap()).unwrap();
        let (b, _) = issue_source(dir.path(), &SourceId::new("b").unwrap()).unwrap();
        revoke_cert(dir.path(), &a).unwrap();
        let ca = dir.path().join("ca.crt");
        let lists = RevocationLists::load(&dir.path().join(CRL_FILE_NAME), &ca).unwrap();
        let serial = |path: &Path| cert_serial(&read_certs(path).unwrap()[0]).unwrap();
        assert!(lists.revokes(&serial(a.as_path())));
        assert!(!lists.revokes(&serial(b.as_path())));
        assert_eq!(lists.revoked_count(), 1);
    }

    #[test]
    fn garbage_and_lists_of_another_ca_are_refused() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        init_ca(ours.path(), &["localhost".into()], false).unwrap();
        init_ca(theirs.path(), &["localhost".into()], false).unwrap();
        let (foreign, _) = issue_source(theirs.path(), &SourceId::new("a").unwrap()).unwrap();
        revoke_cert(theirs.path(), &foreign).unwrap();
        let ca = ours.path().join("ca.crt");
        let foreign_list = std::fs::read(theirs.path().join(CRL_FILE_NAME)).unwrap();
        let error = RevocationLists::parse(&foreign_list, "theirs", &ca).unwrap_err();
        assert!(
            error.to_string().contains("not signed by the CA"),
            "{error}"
        );
        for garbage in [
            &b""[..],
            &b"not a list"[..],
            &b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"[..],
        ] {
            assert!(RevocationLists::parse(garbage, "garbage", &ca).is_err());
        }
    }
}

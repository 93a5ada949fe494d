use blockrep_core::SourceId;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::Error;

/// URI prefix of a source identity in a certificate's SAN.
pub const SOURCE_URI_PREFIX: &str = "urn:blockrep:source:";
/// URI of the admin identity in a certificate's SAN.
pub const ADMIN_URI: &str = "urn:blockrep:admin";
/// URI prefix of a source's tenant in a certificate's SAN, beside the source
/// URI. Sources of one tenant may deduplicate against each other's data.
pub const TENANT_URI_PREFIX: &str = "urn:blockrep:tenant:";

/// Who a verified client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The agent of one source.
    Source(SourceId),
    /// The operator.
    Admin,
}

/// The blockrep URIs of a certificate's SAN (whatever their meaning).
fn blockrep_uris(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::Invalid(format!("cannot parse client certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| Error::Invalid(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| Error::Invalid("client certificate has no blockrep identity".into()))?;
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// The DNS names and IP addresses a (server) certificate is valid for, as
/// text (IP addresses in their usual form).
pub(crate) fn host_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::Invalid(format!("cannot parse certificate: {e}")))?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|e| Error::Invalid(format!("bad subject alternative names: {e}")))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// Takes the identity from a certificate that rustls has already verified.
/// Exactly one blockrep identity URI must be present, and a source id must be
/// valid. A tenant URI (see [`tenant_from_cert`]) is not an identity and may
/// stand beside a source's.
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> Result<Identity, Error> {
    let mut found = Vec::new();
    for uri in blockrep_uris(cert)? {
        if uri == ADMIN_URI {
            found.push(Ok(Identity::Admin));
        } else if let Some(id) = uri.strip_prefix(SOURCE_URI_PREFIX) {
            found.push(
                SourceId::new(id)
                    .map(Identity::Source)
                    .map_err(|e| Error::Invalid(format!("certificate identity: {e}"))),
            );
        }
    }
    match found.len() {
        0 => Err(Error::Invalid(
            "client certificate has no blockrep identity".into(),
        )),
        1 => found.pop().expect("one element"),
        _ => Err(Error::Invalid(
            "client certificate names more than one identity".into(),
        )),
    }
}

/// The tenant a verified source certificate names, if any: `None` when the
/// certificate carries no tenant URI (the source is then its own tenant).
/// More than one tenant URI, or a tenant name that is not a valid id, is an
/// error: a certificate must not be read two ways.
pub fn tenant_from_cert(cert: &CertificateDer<'_>) -> Result<Option<SourceId>, Error> {
    let mut found = None;
    for uri in blockrep_uris(cert)? {
        let Some(name) = uri.strip_prefix(TENANT_URI_PREFIX) else {
            continue;
        };
        let tenant =
            SourceId::new(name).map_err(|e| Error::Invalid(format!("certificate tenant: {e}")))?;
        if found.replace(tenant).is_some() {
            return Err(Error::Invalid(
                "client certificate names more than one tenant".into(),
            ));
        }
    }
    Ok(found)
}

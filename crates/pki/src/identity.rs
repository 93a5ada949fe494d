use blockrep_core::SourceId;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::Error;

/// URI prefix of a source identity in a certificate's SAN.
pub const SOURCE_URI_PREFIX: &str = "urn:blockrep:source:";
/// URI of the admin identity in a certificate's SAN.
pub const ADMIN_URI: &str = "urn:blockrep:admin";

/// Who a verified client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The agent of one source.
    Source(SourceId),
    /// The operator.
    Admin,
}

/// Takes the identity from a certificate that rustls has already verified.
/// Exactly one blockrep identity URI must be present, and a source id must be valid.
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> Result<Identity, Error> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| Error::Invalid(format!("cannot parse client certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| Error::Invalid(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| Error::Invalid("client certificate has no blockrep identity".into()))?;
    let mut found = Vec::new();
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if *uri == ADMIN_URI {
                found.push(Ok(Identity::Admin));
            } else if let Some(id) = uri.strip_prefix(SOURCE_URI_PREFIX) {
                found.push(
                    SourceId::new(id)
                        .map(Identity::Source)
                        .map_err(|e| Error::Invalid(format!("certificate identity: {e}"))),
                );
            }
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

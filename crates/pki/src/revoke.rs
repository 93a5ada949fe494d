//! Revoking certificates: a certificate revocation list (`crl.pem`) signed by
//! the CA, which the server loads with `--crl`.
//!
//! Each revocation rewrites the whole list: the entries of the existing list
//! are kept, the new serial is added once, and the CRL number grows by one, so
//! a newer list always supersedes an older one. The file is replaced
//! atomically (temp file, fsync, rename), because a server may be reading it.

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::Error;
use crate::files::{read_certs, write_file};
use crate::issue::load_issuer;

/// File name of the revocation list in a certificate directory.
pub const CRL_FILE_NAME: &str = "crl.pem";
/// How long a list is declared valid (`nextUpdate`); the server does not
/// enforce it, so it is informational for other verifiers.
const CRL_VALIDITY_DAYS: i64 = 825;

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The list written.
    pub crl_path: PathBuf,
    /// Serial number of the revoked certificate, in hex.
    pub serial_hex: String,
    /// Certificates the list now revokes.
    pub revoked_count: usize,
    /// Whether the certificate was already on the list (nothing changed but
    /// the list's number and dates).
    pub already_revoked: bool,
}

/// Revokes the certificate at `cert` (issued by the CA in `dir`) by adding its
/// serial to `dir/crl.pem`, creating the list if needed.
pub fn revoke_cert(dir: &Path, cert: &Path) -> Result<Revocation, Error> {
    let issuer = load_issuer(dir)?;
    let ca_der = read_certs(&dir.join("ca.crt"))?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Invalid("ca.crt holds no certificate".into()))?;
    let der = read_certs(cert)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Invalid(format!("{}: no certificate", cert.display())))?;
    let serial = serial_issued_by(&der, &ca_der, cert)?;
    let crl_path = dir.join(CRL_FILE_NAME);
    let (mut revoked, previous_number) = read_existing(&crl_path)?;
    let already_revoked = revoked.iter().any(|r| r.serial_number.as_ref() == serial);
    let now = time::OffsetDateTime::now_utc();
    if !already_revoked {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now,
            reason_code: Some(RevocationReason::Unspecified),
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(CRL_VALIDITY_DAYS),
        crl_number: SerialNumber::from(previous_number + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let revoked_count = params.revoked_certs.len();
    let crl = params.signed_by(&issuer)?;
    let pem = crl.pem()?;
    let temp = dir.join(format!(".{CRL_FILE_NAME}.tmp"));
    write_file(&temp, &pem, 0o644)?;
    std::fs::rename(&temp, &crl_path).map_err(|source| Error::Io {
        what: format!("cannot replace {}", crl_path.display()),
        source,
    })?;
    // Only a durable rename revokes: a power loss must not bring back the
    // list that let the certificate in.
    crate::files::sync_parent(&crl_path)?;
    Ok(Revocation {
        crl_path,
        serial_hex: hex(&serial),
        revoked_count,
        already_revoked,
    })
}

/// The serial of `der`, after checking that the CA `ca_der` issued it (by name
/// and signature): revoking a serial of another CA would protect nothing.
fn serial_issued_by(
    der: &CertificateDer<'_>,
    ca_der: &CertificateDer<'_>,
    path: &Path,
) -> Result<Vec<u8>, Error> {
    let cert = parse_cert(der, &path.display().to_string())?;
    let ca = parse_cert(ca_der, "ca.crt")?;
    if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(Error::Invalid(format!(
            "{} was not issued by this CA; nothing revoked",
            path.display()
        )));
    }
    Ok(cert.raw_serial().to_vec())
}

fn parse_cert<'a>(der: &'a CertificateDer<'_>, what: &str) -> Result<X509Certificate<'a>, Error> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| Error::Invalid(format!("cannot parse {what}: {e}")))
}

/// Entries and number of the list at `path`, or none and 0 when there is no list.
fn read_existing(path: &Path) -> Result<(Vec<RevokedCertParams>, u64), Error> {
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(source) => {
            return Err(Error::Io {
                what: format!("cannot read {}", path.display()),
                source,
            });
        }
    };
    let der = CertificateRevocationListDer::from_pem_slice(&pem)
        .map_err(|e| Error::Invalid(format!("{}: bad PEM: {e}", path.display())))?;
    let (_, crl) = CertificateRevocationList::from_der(der.as_ref())
        .map_err(|e| Error::Invalid(format!("{}: cannot parse: {e}", path.display())))?;
    let number = crl
        .crl_number()
        .and_then(|n| {
            let bytes = n.to_bytes_be();
            (bytes.len() <= 8).then(|| bytes.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
        })
        .unwrap_or(0);
    let mut revoked = Vec::new();
    for entry in crl.iter_revoked_certificates() {
        let revocation_time =
            time::OffsetDateTime::from_unix_timestamp(entry.revocation_date.timestamp())
                .map_err(|e| Error::Invalid(format!("{}: bad date: {e}", path.display())))?;
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(entry.raw_serial()),
            revocation_time,
            reason_code: Some(RevocationReason::Unspecified),
            invalidity_date: None,
        });
    }
    Ok((revoked, number))
}

/// Reads every CRL of a PEM file; at least one is required.
pub fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Io {
        what: format!("cannot read {}", path.display()),
        source,
    })?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("{}: bad PEM: {e}", path.display())))?;
    if crls.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no certificate revocation list found",
            path.display()
        )));
    }
    Ok(crls)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{init_ca, issue_source};
    use blockrep_core::SourceId;

    #[test]
    fn revocations_accumulate_in_one_list() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &["localhost".into()], false).unwrap();
        let (a, _) = issue_source(dir.path(), &SourceId::new("a").unwrap()).unwrap();
        let (b, _) = issue_source(dir.path(), &SourceId::new("b").unwrap()).unwrap();
        let first = revoke_cert(dir.path(), &a).unwrap();
        assert_eq!((first.revoked_count, first.already_revoked), (1, false));
        let second = revoke_cert(dir.path(), &b).unwrap();
        assert_eq!(second.revoked_count, 2);
        let again = revoke_cert(dir.path(), &a).unwrap();
        assert_eq!((again.revoked_count, again.already_revoked), (2, true));
        let (entries, number) = read_existing(&dir.path().join(CRL_FILE_NAME)).unwrap();
        assert_eq!((entries.len(), number), (2, 3));
        assert_eq!(read_crls(&dir.path().join(CRL_FILE_NAME)).unwrap().len(), 1);
    }

    #[test]
    fn a_certificate_of_another_ca_is_not_revoked() {
        let ours = tempfile::tempdir().unwrap();
        let theirs = tempfile::tempdir().unwrap();
        init_ca(ours.path(), &["localhost".into()], false).unwrap();
        init_ca(theirs.path(), &["localhost".into()], false).unwrap();
        let (foreign, _) = issue_source(theirs.path(), &SourceId::new("a").unwrap()).unwrap();
        let error = revoke_cert(ours.path(), &foreign).unwrap_err();
        assert!(
            error.to_string().contains("not issued by this CA"),
            "{error}"
        );
        assert!(!ours.path().join(CRL_FILE_NAME).exists());
    }
}

//! Making the CA and certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use blockrep_core::SourceId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::Error;
use crate::files::write_file;
use crate::identity::{ADMIN_URI, SOURCE_URI_PREFIX, TENANT_URI_PREFIX};

const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;
/// Certificates are valid this long; rotate by issuing again.
const VALIDITY_DAYS: i64 = 825;

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that disagree a little.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
}

fn ensure_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: format!("cannot create {}", dir.display()),
        source,
    })
}

/// Creates a private CA (`ca.crt`, `ca.key`), a server certificate
/// (`server.crt`, `server.key`) valid for `server_names` (DNS names or IP
/// addresses) and the admin token (`admin.token`, 0600) in `dir`. Refuses to
/// replace an existing CA unless `force` (which also replaces the token).
pub fn init_ca(dir: &Path, server_names: &[String], force: bool) -> Result<(), Error> {
    ensure_dir(dir)?;
    if dir.join("ca.key").exists() && !force {
        return Err(Error::Invalid(format!(
            "{} already holds a CA; certificates issued by it would stop working \
             (pass --force to replace it)",
            dir.display()
        )));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "blockrep private CA");
    ca_params.distinguished_name = name;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    write_file(&dir.join("ca.crt"), &ca_cert.pem(), CERT_MODE)?;
    write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), KEY_MODE)?;

    let issuer = Issuer::new(ca_params, ca_key);
    issue_server(
        &issuer,
        cert_and_key(dir, "server"),
        "blockrep server",
        server_names,
    )?;
    // The admin API's bearer token goes with the CA: a new CA gets a new token.
    let token_path = dir.join(crate::ADMIN_TOKEN_FILE_NAME);
    if force {
        crate::AdminToken::replace(&token_path)?;
    } else {
        crate::AdminToken::read_or_create(&token_path)?;
    }
    Ok(())
}

/// The certificate and key files of `stem` in `dir`: `STEM.crt`, `STEM.key`.
fn cert_and_key(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

/// Writes a signed certificate and its key to `paths` (the key owner-only).
fn write_signed(
    paths: (PathBuf, PathBuf),
    cert: &rcgen::Certificate,
    key: &KeyPair,
) -> Result<(PathBuf, PathBuf), Error> {
    write_file(&paths.0, &cert.pem(), CERT_MODE)?;
    write_file(&paths.1, &key.serialize_pem(), KEY_MODE)?;
    Ok(paths)
}

/// A server certificate at `paths` valid for `names` (DNS names or IP
/// addresses): server authentication only, so no peer takes it for a
/// client's identity.
fn issue_server(
    issuer: &Issuer<'_, KeyPair>,
    paths: (PathBuf, PathBuf),
    common_name: &str,
    names: &[String],
) -> Result<(PathBuf, PathBuf), Error> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    for server_name in names {
        let san = match server_name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(server_name.as_str().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_signed(paths, &cert, &key)
}

/// The certificate and key the agent of `source` serves its disk with over
/// TLS, in the TLS directory `dir`: `serve/ID.crt`, `serve/ID.key` (a
/// directory of their own, which no source id can name apart from the
/// client certificates beside it).
pub fn serve_cert_paths(dir: &Path, source: &SourceId) -> (PathBuf, PathBuf) {
    cert_and_key(&dir.join("serve"), source.as_str())
}

/// Issues `serve/ID.crt`/`serve/ID.key` in `dir`, signed by the CA there: the
/// certificate the agent of `source` presents when it serves its disk over
/// TLS (`agent --serve-tls`), valid for `names`, the DNS names or IP
/// addresses its clients reach it by. It carries no identity: the replication
/// server does not take it from a client.
pub fn issue_serve(
    dir: &Path,
    source: &SourceId,
    names: &[String],
) -> Result<(PathBuf, PathBuf), Error> {
    if names.is_empty() {
        return Err(Error::Invalid(
            "a serving certificate needs the names its clients reach the agent by".into(),
        ));
    }
    // The CA's server certificates all verify the same way: a serving
    // certificate for one of the replication server's names would let the
    // agent's host pose as the replication server to every agent.
    let server_crt = dir.join("server.crt");
    if server_crt.exists() {
        let server_names = crate::files::read_certs(&server_crt)?
            .first()
            .map(crate::identity::host_names)
            .transpose()?
            .unwrap_or_default();
        let canonical = |name: &str| match name.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => name.to_ascii_lowercase(),
        };
        if let Some(taken) = names
            .iter()
            .find(|name| server_names.contains(&canonical(name)))
        {
            return Err(Error::Invalid(format!(
                "{taken} is a name of the replication server ({}): a serving certificate \
                 for it would let this agent's host pose as the server; use the names \
                 the agent's clients reach its host by",
                server_crt.display()
            )));
        }
    }
    let issuer = load_issuer(dir)?;
    let paths = serve_cert_paths(dir, source);
    if let Some(serve_dir) = paths.0.parent() {
        ensure_dir(serve_dir)?;
    }
    issue_server(
        &issuer,
        paths,
        &format!("blockrep agent of {source}"),
        names,
    )
}

pub(crate) fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, Error> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| Error::Io {
            what: format!(
                "cannot read {} (run `blockrep cert init` first)",
                path.display()
            ),
            source,
        })
    };
    let key = KeyPair::from_pem(&read("ca.key")?)?;
    Ok(Issuer::from_ca_cert_pem(&read("ca.crt")?, key)?)
}

fn issue_client(
    dir: &Path,
    file_stem: &str,
    common_name: &str,
    uris: &[String],
) -> Result<(PathBuf, PathBuf), Error> {
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.subject_alt_names = uris
        .iter()
        .map(|uri| Ok(SanType::URI(uri.as_str().try_into()?)))
        .collect::<Result<_, Error>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    // keyEncipherment means nothing to an ECDSA key, but qemu (the NBD client
    // of a launched VM) refuses a client certificate whose critical key usage
    // lacks it; rustls ignores it.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_signed(cert_and_key(dir, file_stem), &cert, &key)
}

/// Issues `ID.crt`/`ID.key` in `dir` for source `source`, signed by the CA there.
pub fn issue_source(dir: &Path, source: &SourceId) -> Result<(PathBuf, PathBuf), Error> {
    issue_source_in_tenant(dir, source, None)
}

/// [`issue_source`] with the source's tenant bound into the certificate as a
/// second SAN URI (`urn:blockrep:tenant:T`). Sources of one tenant share
/// deduplicated data; without a tenant a source is its own.
pub fn issue_source_in_tenant(
    dir: &Path,
    source: &SourceId,
    tenant: Option<&SourceId>,
) -> Result<(PathBuf, PathBuf), Error> {
    let mut uris = vec![format!("{SOURCE_URI_PREFIX}{source}")];
    if let Some(tenant) = tenant {
        uris.push(format!("{TENANT_URI_PREFIX}{tenant}"));
    }
    if source.as_str() == "ca" || source.as_str() == "server" || source.as_str() == "admin" {
        return Err(Error::Invalid(format!(
            "source id {source:?} would overwrite the {source} certificate; choose another id"
        )));
    }
    issue_client(dir, source.as_str(), source.as_str(), &uris)
}

/// Issues `admin.crt`/`admin.key` in `dir`, signed by the CA there.
pub fn issue_admin(dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
    issue_client(dir, "admin", "blockrep admin", &[ADMIN_URI.to_owned()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::read_certs;
    use crate::identity::{Identity, identity_from_cert};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_tenant_stands_beside_the_source_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &["localhost".into()], false).unwrap();
        let source = SourceId::new("db-1").unwrap();
        let tenant = SourceId::new("acme").unwrap();
        let (cert, _) = issue_source_in_tenant(dir.path(), &source, Some(&tenant)).unwrap();
        let der = &read_certs(&cert).unwrap()[0];
        assert_eq!(
            identity_from_cert(der).unwrap(),
            Identity::Source(source.clone())
        );
        assert_eq!(crate::tenant_from_cert(der).unwrap(), Some(tenant));
    }

    #[test]
    fn issued_certificates_carry_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &["localhost".into(), "127.0.0.1".into()], false).unwrap();
        let source = SourceId::new("web-1").unwrap();
        let (cert, key) = issue_source(dir.path(), &source).unwrap();
        let der = &read_certs(&cert).unwrap()[0];
        assert_eq!(
            identity_from_cert(der).unwrap(),
            Identity::Source(source.clone())
        );
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (admin, _) = issue_admin(dir.path()).unwrap();
        assert_eq!(
            identity_from_cert(&read_certs(&admin).unwrap()[0]).unwrap(),
            Identity::Admin
        );
        let server = &read_certs(&dir.path().join("server.crt")).unwrap()[0];
        assert!(identity_from_cert(server).is_err());
        // An agent's serving certificate names no identity either, and goes
        // where no source id can collide with it.
        let (serve, _) = issue_serve(dir.path(), &source, &["10.0.0.5".into()]).unwrap();
        assert_eq!(serve, dir.path().join("serve").join("web-1.crt"));
        assert!(identity_from_cert(&read_certs(&serve).unwrap()[0]).is_err());
        assert!(issue_serve(dir.path(), &source, &[]).is_err());
        // Never one of the replication server's names.
        for taken in ["127.0.0.1", "LOCALHOST"] {
            let refused = issue_serve(dir.path(), &source, &[taken.into()]).unwrap_err();
            assert!(
                refused.to_string().contains("pose as the server"),
                "{refused}"
            );
        }
        assert_eq!(crate::tenant_from_cert(der).unwrap(), None);
        assert!(
            init_ca(dir.path(), &[], false).is_err(),
            "refuses to replace a CA"
        );
    }
}

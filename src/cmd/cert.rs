//! `blockrep cert`: the private CA, certificates and their revocation.

use anyhow::Result;

use super::source_id;
use crate::cli::CertCommand;

/// Makes the CA, issues a certificate, or revokes one.
pub(crate) fn cert(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Init {
            dir,
            server_names,
            force,
        } => {
            blockrep_pki::init_ca(&dir, &server_names, force)?;
            println!(
                "wrote {0}/ca.crt, {0}/ca.key, {0}/server.crt, {0}/server.key (server names: {1})",
                dir.display(),
                server_names.join(", ")
            );
        }
        CertCommand::Issue {
            dir,
            source,
            admin,
            tenant,
            serve_names,
        } => {
            let (cert, key) = if admin {
                blockrep_pki::issue_admin(&dir)?
            } else if !serve_names.is_empty() {
                let source = source_id(source.as_deref().unwrap_or_default())?;
                blockrep_pki::issue_serve(&dir, &source, &serve_names)?
            } else {
                let source = source_id(source.as_deref().unwrap_or_default())?;
                let tenant = tenant.as_deref().map(source_id).transpose()?;
                blockrep_pki::issue_source_in_tenant(&dir, &source, tenant.as_ref())?
            };
            println!("wrote {} and {}", cert.display(), key.display());
        }
        CertCommand::Revoke {
            dir,
            source,
            admin,
            cert,
        } => {
            let cert = match (cert, admin, source) {
                (Some(path), ..) => path,
                (None, true, _) => dir.join("admin.crt"),
                (None, false, source) => {
                    let source = source_id(source.as_deref().unwrap_or_default())?;
                    dir.join(format!("{source}.crt"))
                }
            };
            let revocation = blockrep_pki::revoke_cert(&dir, &cert)?;
            println!(
                "{} {} (serial {}); {} lists {} revoked certificate(s)",
                if revocation.already_revoked {
                    "already revoked"
                } else {
                    "revoked"
                },
                cert.display(),
                revocation.serial_hex,
                revocation.crl_path.display(),
                revocation.revoked_count
            );
        }
    }
    Ok(())
}

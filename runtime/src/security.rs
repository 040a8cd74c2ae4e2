//! Who may talk to the cluster, and as whom: a cluster CA, certificates that
//! carry one identity each, and the rustls configurations for mutual TLS on
//! the control port.
//!
//! Rules:
//! 1. An identity comes from the peer's certificate, never from what the
//!    peer says: a URI SAN `lazarus://<role>/<name>`, with role
//!    `supervisor`, `agent`, `operator` or `viewer`.
//! 2. Both sides present a certificate signed by the cluster CA; a peer
//!    without one, with one from another CA, or with an expired one fails
//!    the handshake.
//! 3. Supervisors also carry the DNS name [`SUPERVISOR_NAME`], which clients
//!    and agents verify whatever address they dialled.
//! 4. The CA key signs certificates and nothing else; it never needs to be
//!    on a host that runs Lazarus.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The DNS name every supervisor certificate carries and clients verify.
pub const SUPERVISOR_NAME: &str = "supervisor.lazarus";

/// What a certificate allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Runs jobs and grants leases.
    Supervisor,
    /// Runs workers and holds VIPs on one host, under its own name only.
    Agent,
    /// Submits and stops jobs, reads status.
    Operator,
    /// Reads status.
    Viewer,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Supervisor => "supervisor",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = SecurityError;
    fn from_str(s: &str) -> Result<Role, SecurityError> {
        match s {
            "supervisor" => Ok(Role::Supervisor),
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            "viewer" => Ok(Role::Viewer),
            other => Err(SecurityError::Invalid(format!(
                "unknown role {other:?}; expected supervisor, agent, operator or viewer"
            ))),
        }
    }
}

/// A peer as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What it may do.
    pub role: Role,
    /// Its name (an agent's host name; a person or tool otherwise).
    pub name: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.name)
    }
}

impl Identity {
    fn uri(&self) -> String {
        format!("lazarus://{}/{}", self.role.as_str(), self.name)
    }

    fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("lazarus://")?;
        let (role, name) = rest.split_once('/')?;
        Some(Identity {
            role: role.parse().ok()?,
            name: name.to_string(),
        })
    }
}

/// Why a security operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why (in the message, printed once).
        error: std::io::Error,
    },
    /// A certificate or key is malformed, or an argument is wrong.
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecurityError + '_ {
    move |error| SecurityError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn invalid(what: &str) -> impl FnOnce(rcgen::Error) -> SecurityError + '_ {
    move |e| SecurityError::Invalid(format!("{what}: {e}"))
}

/// A name usable in an identity: 1 to 64 of `[A-Za-z0-9._-]`.
fn check_name(name: &str) -> Result<(), SecurityError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SecurityError::Invalid(format!(
            "invalid name {name:?}: 1 to 64 letters, digits, '.', '_' or '-'"
        )))
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), SecurityError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for hosts whose clocks lag.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// `lazarus ca init DIR`: a new cluster CA in `dir` (`ca.pem`, and
/// `ca.key` readable by its owner only). Refuses to overwrite one.
pub fn ca_init(dir: &Path, days: u32) -> Result<PathBuf, SecurityError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate().map_err(invalid("generating the CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(invalid("CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(DnType::CommonName, "Lazarus cluster CA");
    validity(&mut params, days);
    let cert = params
        .self_signed(&key)
        .map_err(invalid("signing the CA"))?;
    let key_path = dir.join("ca.key");
    write_private(&key_path, &key.serialize_pem())?;
    let cert_path = dir.join("ca.pem");
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(cert_path)
}

/// `lazarus cert issue`: a key and a certificate for `identity`, signed by
/// the CA in `ca_dir`, written to `out` as `cert.pem`, `key.pem` (owner
/// only) and a copy of `ca.pem` (what a peer needs, in one directory).
pub fn issue(
    ca_dir: &Path,
    identity: &Identity,
    out: &Path,
    days: u32,
) -> Result<(), SecurityError> {
    check_name(&identity.name)?;
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_pem_path).map_err(io(&ca_pem_path))?;
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key).map_err(invalid("the CA key"))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(invalid("the CA certificate"))?;
    let dns: Vec<String> = match identity.role {
        Role::Supervisor => vec![SUPERVISOR_NAME.to_string()],
        _ => Vec::new(),
    };
    let mut params = CertificateParams::new(dns).map_err(invalid("certificate"))?;
    let uri = Ia5String::try_from(identity.uri()).map_err(invalid("identity"))?;
    params.subject_alt_names.push(SanType::URI(uri));
    params
        .distinguished_name
        .push(DnType::CommonName, identity.to_string());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(invalid("generating the key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(invalid("signing the certificate"))?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    write_private(&out.join("key.pem"), &key.serialize_pem())?;
    let cert_path = out.join("cert.pem");
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    let ca_copy = out.join("ca.pem");
    std::fs::write(&ca_copy, ca_pem).map_err(io(&ca_copy))?;
    Ok(())
}

/// The identity a certificate carries (rule 1), or why it carries none.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, SecurityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| SecurityError::Invalid(format!("unreadable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| SecurityError::Invalid(format!("certificate alternative names: {e}")))?;
    let found = san
        .into_iter()
        .flat_map(|s| s.value.general_names.iter())
        .find_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
            _ => None,
        });
    found.ok_or_else(|| {
        SecurityError::Invalid(
            "the certificate names no Lazarus identity (lazarus://role/name)".into(),
        )
    })
}

/// When `cert` expires, in seconds since the Unix epoch.
pub fn not_after_unix(cert: &CertificateDer<'_>) -> Result<i64, SecurityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| SecurityError::Invalid(format!("unreadable certificate: {e}")))?;
    Ok(parsed.validity().not_after.timestamp())
}

/// Days from now until `not_after` (a Unix time); negative once past.
pub fn days_left(not_after: i64) -> i64 {
    (not_after - time::OffsetDateTime::now_utc().unix_timestamp()).div_euclid(86400)
}

/// How long until `cert` expires (zero if it has).
pub fn expires_in(cert: &CertificateDer<'_>) -> Result<Duration, SecurityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| SecurityError::Invalid(format!("unreadable certificate: {e}")))?;
    let until = parsed.validity().not_after.timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(Duration::from_secs(until.saturating_sub(now).max(0) as u64))
}

/// One side's TLS material: its certificate chain and key, and the CA it
/// trusts. Loaded from a directory written by [`issue`].
#[derive(Debug)]
pub struct TlsMaterial {
    /// The directory it came from.
    pub dir: PathBuf,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// This side's own identity.
    pub identity: Identity,
}

impl TlsMaterial {
    /// Loads `dir/{ca,cert,key}.pem`; errors name the file.
    pub fn load(dir: &Path) -> Result<TlsMaterial, SecurityError> {
        let certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, SecurityError> {
            let path = dir.join(name);
            let list: Vec<_> = CertificateDer::pem_file_iter(&path)
                .map_err(|e| SecurityError::Invalid(format!("{}: {e}", path.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| SecurityError::Invalid(format!("{}: {e}", path.display())))?;
            if list.is_empty() {
                return Err(SecurityError::Invalid(format!(
                    "{}: no certificate in it",
                    path.display()
                )));
            }
            Ok(list)
        };
        let ca = certs("ca.pem")?;
        let chain = certs("cert.pem")?;
        let key_path = dir.join("key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| SecurityError::Invalid(format!("{}: {e}", key_path.display())))?;
        let identity = identity_of(&chain[0])?;
        Ok(TlsMaterial {
            dir: dir.to_path_buf(),
            ca,
            chain,
            key,
            identity,
        })
    }

    /// How long until this side's own certificate expires.
    pub fn expires_in(&self) -> Result<Duration, SecurityError> {
        expires_in(&self.chain[0])
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, SecurityError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| {
                SecurityError::Invalid(format!("{}/ca.pem: {e}", self.dir.display()))
            })?;
        }
        Ok(Arc::new(roots))
    }

    /// The server side of the control port: a client certificate from the
    /// cluster CA is required (rule 2).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, SecurityError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = |e: rustls::Error| SecurityError::Invalid(format!("TLS configuration: {e}"));
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| SecurityError::Invalid(format!("client verifier: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        Ok(Arc::new(config))
    }

    /// The server side of a job's control port: workers check this
    /// certificate against the cluster CA and prove themselves inside the
    /// channel with their one-time credential (they hold no certificate).
    pub fn worker_server_config(&self) -> Result<Arc<rustls::ServerConfig>, SecurityError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = |e: rustls::Error| SecurityError::Invalid(format!("TLS configuration: {e}"));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        Ok(Arc::new(config))
    }

    /// The client side: trusts the cluster CA only and presents this
    /// side's certificate.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, SecurityError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = |e: rustls::Error| SecurityError::Invalid(format!("TLS configuration: {e}"));
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        Ok(Arc::new(config))
    }
}

/// A fresh credential: 128 random bits from the TLS provider's secure
/// random source, as hex.
pub fn random_token() -> Result<String, SecurityError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| SecurityError::Invalid("no secure random source".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares a presented credential with the expected one in time that does
/// not depend on where they differ.
pub fn tokens_match(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The name clients verify on the supervisor's certificate (rule 3).
pub fn supervisor_server_name() -> ServerName<'static> {
    ServerName::try_from(SUPERVISOR_NAME).expect("a valid DNS name")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role, name: &str) -> Identity {
        Identity {
            role,
            name: name.into(),
        }
    }

    #[test]
    fn test_issued_certificates_carry_their_identity() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = dir.path().join("ca");
        ca_init(&ca, 365).expect("ca");
        assert!(
            ca_init(&ca, 365).is_err(),
            "an existing CA is never overwritten"
        );
        for (role, name) in [
            (Role::Agent, "h1"),
            (Role::Operator, "alice"),
            (Role::Supervisor, "s1"),
        ] {
            let out = dir.path().join(name);
            issue(&ca, &id(role, name), &out, 30).expect("issue");
            let m = TlsMaterial::load(&out).expect("load");
            assert_eq!(m.identity, id(role, name));
            let left = m.expires_in().expect("expiry");
            assert!(
                left > Duration::from_secs(29 * 86400) && left <= Duration::from_secs(30 * 86400)
            );
            m.server_config().expect("server config");
            m.client_config().expect("client config");
        }
        let mode = std::fs::metadata(dir.path().join("h1/key.pem"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .expect("key");
        assert_eq!(mode & 0o077, 0, "keys are readable by their owner only");
    }

    #[test]
    fn test_bad_names_and_roles_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        ca_init(dir.path(), 1).expect("ca");
        let e = issue(
            dir.path(),
            &id(Role::Agent, "a/b"),
            &dir.path().join("x"),
            1,
        )
        .expect_err("a slash");
        assert!(e.to_string().contains("invalid name \"a/b\""), "{e}");
        let e = "admin".parse::<Role>().expect_err("no such role");
        assert!(e.to_string().contains("unknown role \"admin\""), "{e}");
        let e = TlsMaterial::load(&dir.path().join("nowhere")).expect_err("no files");
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }
}

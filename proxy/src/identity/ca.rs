//! The built-in certificate authority, for a self-contained mesh.
//!
//! `outrigger ca init` writes a root CA (`ca.crt`, `ca.key`) to a
//! directory; `outrigger run --ca-dir` mints short-lived leaf certificates
//! for the identities of its node's pods from it.
//!
//! What this mode trusts: every node's proxy holds the CA key, so any node
//! can mint any identity of the trust domain — a compromised node can
//! impersonate every workload. Use it for a self-contained or development
//! mesh; in production, issue certificates per node with node attestation
//! (SPIRE, cert-manager csi-driver-spiffe) and use `--cert-dir`.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::Identity;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the system's random number generator failed: cannot make a certificate serial")]
    Random,
    #[error("{0} already holds a CA; remove it first (every node trusts it) or pick another directory")]
    Exists(PathBuf),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path} is not a usable CA {what}: {reason} (was it written by `outrigger ca init`?)")]
    Invalid { path: PathBuf, what: &'static str, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_path_buf(), source }
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// Writes a new root CA for `trust_domain` into `dir`.
pub fn init(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<PathBuf, CaError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if cert_path.exists() || key_path.exists() {
        return Err(CaError::Exists(dir.to_path_buf()));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Outrigger");
    dn.push(DnType::CommonName, format!("Outrigger mesh CA for {trust_domain}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    let now = SystemTime::now();
    params.not_before = offset(now - Duration::from_secs(3600));
    params.not_after = offset(now + lifetime);
    let cert = params.self_signed(&key)?;
    fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok(cert_path)
}

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, pem: &str) -> Result<(), CaError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f =
        fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path).map_err(io(path))?;
    f.write_all(pem.as_bytes()).map_err(io(path))
}

/// A loaded CA that can sign workload certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    dir: PathBuf,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// A freshly issued workload certificate, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.clone(),
            what: "key",
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Invalid {
            path: cert_path,
            what: "certificate",
            reason: e.to_string(),
        })?;
        Ok(Self { issuer, cert_pem, dir: dir.to_path_buf() })
    }

    /// The trust bundle: the CA certificate.
    pub fn bundle_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `id` valid from `now - backdate` for
    /// `lifetime` (a backdate beyond the lifetime gives an expired one, for
    /// tests of refusal).
    pub fn issue(&self, id: &Identity, lifetime: Duration, backdate: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial: [u8; 16] = rand_bytes()?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // A minute of slack for clocks that disagree a little.
        let start = SystemTime::now() - backdate - Duration::from_secs(60);
        params.not_before = offset(start);
        params.not_after = offset(start + lifetime + Duration::from_secs(60));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { chain_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Serial numbers must be unpredictable (CA/B Forum: at least 64 bits
/// from a CSPRNG): the system's cryptographic RNG, through ring.
fn rand_bytes() -> Result<[u8; 16], CaError> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut out).map_err(|_| CaError::Random)?;
    // A positive serial: the top bit clear.
    out[0] &= 0x7f;
    out[0] |= 0x01;
    Ok(out)
}

//! Loading and checking certificates: a workload's chain and key must
//! match, name the workload's SPIFFE ID, be valid now, and chain to the
//! trust bundle. Whatever fails is refused with the reason.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{crypto::ring::sign::any_supported_type, sign::CertifiedKey, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate in the PEM data")]
    NoCertificate,
    #[error("unreadable PEM: {0}")]
    Pem(String),
    #[error("no usable private key: {0}")]
    Key(String),
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
    #[error("the certificate names {found:?}, not {expected}")]
    WrongIdentity { expected: String, found: Vec<String> },
    #[error("the certificate expired at {0} (unix time)")]
    Expired(u64),
    #[error("the certificate is not valid before {0} (unix time): is the node's clock right?")]
    NotYetValid(u64),
    #[error("the certificate does not chain to the trust bundle: {0}")]
    Untrusted(String),
    #[error("the trust bundle holds no usable CA certificate")]
    EmptyBundle,
}

/// The trust bundle: CA certificates peers' certificates must chain to.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    pub store: Arc<RootCertStore>,
    pub certs: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn from_pem(pem: &[u8]) -> Result<Self, CertError> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| CertError::Pem(e.to_string()))?;
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(certs.iter().cloned());
        if added == 0 {
            return Err(CertError::EmptyBundle);
        }
        Ok(Self { store: Arc::new(store), certs })
    }

    fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.store.roots
    }
}

/// A workload certificate ready for TLS.
#[derive(Debug, Clone)]
pub struct WorkloadCert {
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub not_before: SystemTime,
    /// Hex serial number, for logs.
    pub serial: String,
}

impl WorkloadCert {
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The moment half of its lifetime has passed (when to renew).
    pub fn half_life(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Parses a PEM chain (leaf first) and key, and checks everything a peer
/// would check, so that a bad certificate is refused here rather than
/// failing handshakes later.
pub fn load_workload_cert(
    chain_pem: &[u8],
    key_pem: &[u8],
    expected: &Identity,
    bundle: &TrustBundle,
    now: SystemTime,
) -> Result<WorkloadCert, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    let leaf = chain.first().ok_or(CertError::NoCertificate)?.clone();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Key(e.to_string()))?;
    let signer = any_supported_type(&key).map_err(|e| CertError::Key(e.to_string()))?;
    let certified = CertifiedKey::new(chain.clone(), signer);
    certified.keys_match().map_err(|_| CertError::KeyMismatch)?;

    let info = describe(&leaf)?;
    let expected_id = expected.to_string();
    if !info.uris.iter().any(|u| u == &expected_id) {
        return Err(CertError::WrongIdentity { expected: expected_id, found: info.uris });
    }
    if now >= info.not_after {
        return Err(CertError::Expired(unix(info.not_after)));
    }
    if now < info.not_before {
        return Err(CertError::NotYetValid(unix(info.not_before)));
    }
    // A workload certificate serves both ends of a tunnel.
    verify_chain(&leaf, &chain[1..], bundle, now, Usage::Client)?;
    verify_chain(&leaf, &chain[1..], bundle, now, Usage::Server)?;
    Ok(WorkloadCert {
        key: Arc::new(certified),
        not_after: info.not_after,
        not_before: info.not_before,
        serial: info.serial,
    })
}

/// What we read out of a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub uris: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

pub fn describe(der: &CertificateDer<'_>) -> Result<CertInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| CertError::Parse(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push(uri.to_string());
            }
        }
    }
    let to_system = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok(CertInfo {
        uris,
        not_before: to_system(cert.validity().not_before.timestamp()),
        not_after: to_system(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string().replace(':', ""),
    })
}

/// Which end of a TLS connection a certificate is checked for (its
/// extended key usage must allow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

/// Chain validation against the bundle, for the given usage.
pub fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    usage: Usage,
) -> Result<(), CertError> {
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::Parse(e.to_string()))?;
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    let key_usage = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    end_entity
        .verify_for_usage(algs, bundle.anchors(), intermediates, time, key_usage, None, None)
        .map_err(|e| CertError::Untrusted(format!("{e} (as a TLS {usage:?} certificate)").to_lowercase()))?;
    Ok(())
}

//! Certificate verifiers that check SPIFFE identities rather than DNS names.

use std::{sync::Arc, time::UNIX_EPOCH};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls13_signature, CryptoProvider},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{cert, Identity, TrustBundle};

fn identity_error(message: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(std::io::Error::other(message)))))
}

/// The SPIFFE ID a certificate names, if it names exactly one.
pub fn peer_identity(der: &CertificateDer<'_>) -> Option<Identity> {
    let info = cert::describe(der).ok()?;
    let mut ids = info.uris.iter().filter_map(|u| u.parse::<Identity>().ok());
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// Server side: the client must present a certificate chaining to the
/// bundle (checked by webpki) that names a SPIFFE ID of our trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, trust_domain: &str) -> Self {
        Self { inner, trust_domain: trust_domain.to_string() }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match peer_identity(end_entity) {
            Some(id) if *id.trust_domain == *self.trust_domain => Ok(ClientCertVerified::assertion()),
            Some(id) => Err(identity_error(format!("client {id} is not in trust domain {}", self.trust_domain))),
            None => Err(identity_error("client certificate names no single SPIFFE ID".into())),
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server must chain to the bundle and present exactly
/// the destination pod's SPIFFE ID; the server name (an IP) is not used.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: TrustBundle, expected: Identity, provider: Arc<CryptoProvider>) -> Self {
        Self { bundle, expected, provider }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let now = UNIX_EPOCH + std::time::Duration::from_secs(now.as_secs());
        cert::verify_chain(end_entity, intermediates, &self.bundle, now, cert::Usage::Server)
            .map_err(|e| identity_error(format!("server certificate: {e}")))?;
        match peer_identity(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(identity_error(format!("server presented {id}, expected {}", self.expected))),
            None => Err(identity_error("server certificate names no single SPIFFE ID".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Tunnels are TLS 1.3 only; the config never offers 1.2.
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

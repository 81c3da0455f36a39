//! Mutual TLS 1.3 between proxies, with SPIFFE identities.
//!
//! - Accepting (inbound, as a pod): present the pod's certificate; require
//!   a client certificate that chains to the bundle and names a SPIFFE ID
//!   of our trust domain.
//! - Originating (outbound, as a pod): present the source pod's
//!   certificate; require the server to present exactly the destination
//!   pod's SPIFFE ID (the address is not what is verified: the identity is).
//!
//! TLS 1.3 only, ALPN `h2` (the HBONE convention), ring as the provider.
//! Configs are cached per identity (pair) and bundle generation; the
//! certificate itself is looked up on every handshake, so a rotated one is
//! used by the next handshake without rebuilding anything.
#![forbid(unsafe_code)]

mod verify;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    ClientConfig, ServerConfig, SignatureScheme,
};

use crate::identity::{Identities, Identity, IdentityError};

pub use verify::peer_identity;

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Presents the current certificate of one identity.
#[derive(Debug)]
struct CurrentCertOf {
    identities: Arc<Identities>,
    id: Identity,
}

impl CurrentCertOf {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        match self.identities.current(&self.id) {
            Ok(c) => Some(c.cert.key.clone()),
            Err(e) => {
                crate::warn_throttled!(identity = %self.id, error = %e, "no certificate to present");
                None
            }
        }
    }
}

impl ResolvesServerCert for CurrentCertOf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for CurrentCertOf {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

type ServerKey = (Identity, u64);
type ClientKey = (Identity, Identity, u64);

/// Builds and caches TLS configurations for the node's identities.
#[derive(Debug)]
pub struct TlsConfigs {
    identities: Arc<Identities>,
    servers: Mutex<HashMap<ServerKey, Arc<ServerConfig>>>,
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl TlsConfigs {
    pub fn new(identities: Arc<Identities>) -> Self {
        Self { identities, servers: Mutex::default(), clients: Mutex::default() }
    }

    pub fn identities(&self) -> &Arc<Identities> {
        &self.identities
    }

    /// The configuration for accepting tunnels as `id`.
    pub fn server(&self, id: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
        let bundle = self.identities.bundle()?;
        let key = (id.clone(), bundle.1);
        let mut cache = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let inner = WebPkiClientVerifier::builder_with_provider(bundle.0.store.clone(), provider()).build()?;
        let verifier = Arc::new(verify::SpiffeClientVerifier::new(inner, &self.identities.trust_domain));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCertOf { identities: self.identities.clone(), id: id.clone() }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let config = Arc::new(config);
        // Configs of older bundles are useless once a new one is in.
        cache.retain(|(_, generation), _| *generation == bundle.1);
        cache.insert(key, config.clone());
        Ok(config)
    }

    /// The configuration for opening a tunnel as `source` to `destination`.
    pub fn client(&self, source: &Identity, destination: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
        let bundle = self.identities.bundle()?;
        let key = (source.clone(), destination.clone(), bundle.1);
        let mut cache = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let verifier = Arc::new(verify::SpiffeServerVerifier::new(bundle.0.clone(), destination.clone(), provider()));
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(CurrentCertOf {
                identities: self.identities.clone(),
                id: source.clone(),
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Resumption would skip the identity check on later handshakes of
        // a pooled peer; full handshakes are rare thanks to pooling.
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        cache.retain(|(_, _, generation), _| *generation == bundle.1);
        cache.insert(key, config.clone());
        Ok(config)
    }
}

//! The client side of a proxy's tunnel port, as test clients play it:
//! mutual TLS 1.3 with ALPN h2 under whatever certificate the test gives
//! (or none), without verifying the server — a client that may be anyone.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{Context, Result};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    DigitallySignedStruct, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3, ALPN h2 client configuration presenting `cert_dir`'s
/// `tls.crt`/`tls.key` (none: no client certificate).
pub fn client_config(cert_dir: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match cert_dir {
        Some(dir) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(dir.join("tls.crt"))?.collect::<Result<_, _>>()?;
            let key = PrivateKeyDer::from_pem_file(dir.join("tls.key"))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS handshake over a connected socket to a tunnel port.
pub async fn tls_handshake(tcp: TcpStream, config: Arc<rustls::ClientConfig>) -> Result<TlsStream<TcpStream>> {
    let peer = tcp.peer_addr().context("getpeername")?;
    let connector = tokio_rustls::TlsConnector::from(config);
    connector.connect(ServerName::IpAddress(peer.ip().into()), tcp).await.context("TLS handshake")
}

/// TCP, then the TLS handshake, to a tunnel port.
pub async fn tls_connect(target: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<TlsStream<TcpStream>> {
    tls_handshake(TcpStream::connect(target).await.context("TCP connect")?, config).await
}

//! `hbone`: a test client for a proxy's tunnel port. It does what a peer
//! proxy does — mutual TLS 1.3 with ALPN h2, then `CONNECT authority` — with
//! whatever certificate the test gives it (or none), and reports each step.
//! It does not verify the server: it plays a client that may be anyone.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use bytes::Bytes;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    DigitallySignedStruct, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use tokio::net::TcpStream;

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

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub tcp_connected: bool,
    pub tls_ok: bool,
    pub status: Option<u16>,
    pub echoed: bool,
    pub error: Option<String>,
}

pub struct Options {
    pub target: SocketAddr,
    pub authority: String,
    pub cert_dir: Option<String>,
    pub payload: Vec<u8>,
}

pub fn run(opts: Options) -> Result<Report> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut report = Report::default();
    let result = runtime.block_on(attempt(&opts, &mut report));
    if let Err(e) = result {
        report.error = Some(format!("{e:#}"));
    }
    Ok(report)
}

async fn attempt(opts: &Options, report: &mut Report) -> Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match &opts.cert_dir {
        Some(dir) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(format!("{dir}/tls.crt"))?.collect::<Result<_, _>>()?;
            let key = PrivateKeyDer::from_pem_file(format!("{dir}/tls.key"))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(opts.target).await.context("TCP connect")?;
    report.tcp_connected = true;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = connector.connect(ServerName::IpAddress(opts.target.ip().into()), tcp).await.context("TLS handshake")?;
    // With TLS 1.3 the server checks the client certificate after the
    // client considers the handshake done: the h2 handshake tells.
    let (sender, connection) = h2::client::handshake(tls).await.context("HTTP/2 handshake (after TLS)")?;
    tokio::spawn(connection);
    let mut sender = sender.ready().await.context("HTTP/2 not ready (TLS refused?)")?;
    report.tls_ok = true;
    let request = http::Request::builder().method(http::Method::CONNECT).uri(opts.authority.as_str()).body(())?;
    let (response, mut send) = sender.send_request(request, false)?;
    let response = response.await.context("CONNECT response")?;
    report.status = Some(response.status().as_u16());
    if response.status() != http::StatusCode::OK {
        return Ok(());
    }
    send.send_data(Bytes::from(opts.payload.clone()), true)?;
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    report.echoed = got == opts.payload;
    Ok(())
}

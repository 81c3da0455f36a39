//! `hbone`: a test client for a proxy's tunnel port. It does what a peer
//! proxy does — mutual TLS 1.3 with ALPN h2, then `CONNECT authority` — with
//! whatever certificate the test gives it (or none), and reports each step.
//! It does not verify the server: it plays a client that may be anyone.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;

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
    let config = outrigger_e2e::hbone::client_config(opts.cert_dir.as_deref().map(std::path::Path::new))?;
    let tcp = tokio::net::TcpStream::connect(opts.target).await.context("TCP connect")?;
    report.tcp_connected = true;
    let tls = outrigger_e2e::hbone::tls_handshake(tcp, config).await?;
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

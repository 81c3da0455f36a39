//! Bulk transfers at a set rate whose end is reported exactly: a clean end
//! of stream (`eof`), a `reset`, or another error. A proxy that dies or
//! cuts a connection must never make a short transfer look complete.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{end_of, report, Opts};

const CHUNK: usize = 64 * 1024;

/// Writes `bytes` at `rate` bytes per second (0: as fast as possible);
/// returns what was written and how it ended.
fn send_paced(stream: &mut TcpStream, bytes: u64, rate: u64) -> (u64, String) {
    let chunk = vec![0x5au8; CHUNK];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        if let Err(e) = stream.write_all(&chunk[..n]) {
            return (sent, end_of(&e));
        }
        sent += n as u64;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    match stream.shutdown(Shutdown::Write) {
        Ok(()) => (sent, "ok".into()),
        Err(e) => (sent, end_of(&e)),
    }
}

/// Reads to the end; returns what was read and how it ended.
fn receive(stream: &mut TcpStream) -> (u64, String) {
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (received, "eof".into()),
            Ok(n) => received += n as u64,
            Err(e) => return (received, end_of(&e)),
        }
    }
}

fn rate(opts: &Opts) -> Result<u64> {
    Ok(opts.or::<u64>("rate-mbps", 0)? * 1024 * 1024)
}

/// Serves every connection to `--listen ADDR` with `serve`, a thread each,
/// once `{"event":"listening"}` is printed.
fn serve_each(opts: &Opts, serve: fn(TcpStream, u64, u64)) -> Result<()> {
    let addr: SocketAddr = opts.get("listen")?;
    let (bytes, rate) = (opts.or("bytes", 0u64)?, rate(opts)?);
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    report(serde_json::json!({"event": "listening", "addr": addr.to_string()}));
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || serve(stream, bytes, rate));
    }
    Ok(())
}

/// `source --listen ADDR --bytes N [--rate-mbps R]`: sends N bytes to every
/// client, then closes; one `{"event":"sent",..}` line per connection.
pub fn source(opts: &Opts) -> Result<()> {
    serve_each(opts, |mut stream, bytes, rate| {
        let (sent, end) = send_paced(&mut stream, bytes, rate);
        report(serde_json::json!({"event": "sent", "sent": sent, "end": end}));
    })
}

/// `sink --listen ADDR`: reads every client to its end; one
/// `{"event":"received",..}` line per connection, saying how it ended.
pub fn sink(opts: &Opts) -> Result<()> {
    serve_each(opts, |mut stream, _, _| {
        let (received, end) = receive(&mut stream);
        report(serde_json::json!({"event": "received", "received": received, "end": end}));
    })
}

/// `download --connect ADDR`: reads to the end and reports it.
pub fn download(opts: &Opts) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&opts.target()?, Duration::from_secs(5)).context("connect")?;
    report(serde_json::json!({"event": "connected"}));
    let (received, end) = receive(&mut stream);
    report(serde_json::json!({"event": "received", "received": received, "end": end}));
    Ok(())
}

/// `upload --connect ADDR --bytes N [--rate-mbps R]`: sends N bytes, then
/// waits for the server's end, and reports both.
pub fn upload(opts: &Opts) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&opts.target()?, Duration::from_secs(5)).context("connect")?;
    report(serde_json::json!({"event": "connected"}));
    let (sent, end) = send_paced(&mut stream, opts.get("bytes")?, rate(opts)?);
    let (_, server_end) = receive(&mut stream);
    report(serde_json::json!({"event": "sent", "sent": sent, "end": end, "server_end": server_end}));
    Ok(())
}

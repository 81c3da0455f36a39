//! `outrigger-podtool`: the application that runs inside test pods.
//!
//! It joins a cgroup and a network namespace first (so the kernel programs
//! see it as a pod process), then serves or dials TCP and reports what it
//! saw as JSON on stdout:
//!
//! - `serve --listen ADDR...`: an echo server. Each connection gets an
//!   optional greeting line, then every byte is echoed; EOF from the client
//!   is answered with a write shutdown (half-close). One JSON line per
//!   accepted connection: `{"event":"accepted","peer":..,"local":..}`.
//! - `client --connect ADDR`: opens `--conns` connections (`--parallel` at
//!   once), sends `--bytes` seeded pseudo-random bytes on each, half-closes,
//!   reads the echo to EOF and checks it byte for byte. Prints a summary.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

fn main() {
    if let Err(e) = run() {
        eprintln!("outrigger-podtool: {e:#}");
        std::process::exit(2);
    }
}

struct Args {
    rest: Vec<String>,
}

impl Args {
    fn take_all(&mut self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(i) = self.rest.iter().position(|a| a == name) {
            if i + 1 >= self.rest.len() {
                break;
            }
            out.push(self.rest.remove(i + 1));
            self.rest.remove(i);
        }
        out
    }
    fn take(&mut self, name: &str) -> Option<String> {
        self.take_all(name).pop()
    }
    fn flag(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(i) => {
                self.rest.remove(i);
                true
            }
            None => false,
        }
    }
    fn num<T: std::str::FromStr>(&mut self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.take(name) {
            Some(v) => v.parse().map_err(|e| anyhow::anyhow!("{name} {v}: {e}")),
            None => Ok(default),
        }
    }
}

fn run() -> Result<()> {
    let mut args = Args { rest: std::env::args().skip(1).collect() };
    if let Some(cgroup) = args.take("--cgroup") {
        std::fs::write(format!("{cgroup}/cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {cgroup}"))?;
    }
    if let Some(netns) = args.take("--netns") {
        let file = std::fs::File::open(&netns).with_context(|| format!("opening {netns}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {netns}"))?;
    }
    let command = if args.rest.is_empty() { String::new() } else { args.rest.remove(0) };
    match command.as_str() {
        "serve" => serve(args),
        "client" => client(args),
        "hbone" => hbone_client(args),
        "idle" => idle::run(args),
        _ => bail!("usage: outrigger-podtool [--cgroup DIR] [--netns FILE] serve|client|hbone ..."),
    }
}

mod hbone;
mod idle;

fn hbone_client(mut args: Args) -> Result<()> {
    let target: SocketAddr = args.take("--connect").context("hbone needs --connect ADDR")?.parse()?;
    let authority = args.take("--authority").context("hbone needs --authority IP:PORT")?;
    let opts = hbone::Options {
        target,
        authority,
        cert_dir: args.take("--cert-dir"),
        payload: args.take("--payload").unwrap_or_else(|| "hello".into()).into_bytes(),
    };
    println!("{}", serde_json::to_string(&hbone::run(opts)?)?);
    Ok(())
}

// ---------------------------------------------------------------- server

fn serve(mut args: Args) -> Result<()> {
    let listens = args.take_all("--listen");
    let greeting = args.take("--greet");
    let accept_delay = Duration::from_millis(args.num("--delay-accept-ms", 0)?);
    let first_byte_delay = Duration::from_millis(args.num("--delay-first-byte-ms", 0)?);
    if listens.is_empty() {
        bail!("serve needs --listen ADDR");
    }
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let mut handles = Vec::new();
    for addr in listens {
        let addr: SocketAddr = addr.parse().with_context(|| format!("--listen {addr}"))?;
        let listener = bind(addr)?;
        {
            let mut out = stdout.lock().unwrap_or_else(|e| e.into_inner());
            writeln!(out, "{}", serde_json::json!({"event": "listening", "addr": addr.to_string()}))?;
            out.flush()?;
        }
        let stdout = stdout.clone();
        let greeting = greeting.clone();
        handles.push(thread::spawn(move || loop {
            if !accept_delay.is_zero() {
                thread::sleep(accept_delay);
            }
            let (stream, peer) = match listener.accept() {
                Ok(a) => a,
                Err(_) => continue,
            };
            let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
            {
                let mut out = stdout.lock().unwrap_or_else(|e| e.into_inner());
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({"event": "accepted", "peer": peer.to_string(), "local": local})
                );
                let _ = out.flush();
            }
            let greeting = greeting.clone();
            thread::spawn(move || echo(stream, greeting.as_deref(), first_byte_delay));
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> Result<TcpListener> {
    // Retry briefly: a v6 address may still be settling right after set-up.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listen(addr) {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
}

/// A listener with a deep backlog: the tests open hundreds of connections at once.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn echo(mut stream: TcpStream, greeting: Option<&str>, first_byte_delay: Duration) {
    let _ = stream.set_nodelay(true);
    if !first_byte_delay.is_zero() {
        thread::sleep(first_byte_delay);
    }
    if let Some(g) = greeting {
        if stream.write_all(format!("{g}\n").as_bytes()).is_err() {
            return;
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------- client

#[derive(Serialize, Default)]
struct Summary {
    ok: usize,
    failed: usize,
    /// How often each peer address (getpeername) was seen.
    peers: BTreeMap<String, usize>,
    /// How often each server greeting was seen.
    greetings: BTreeMap<String, usize>,
    /// Local addresses of the client sockets.
    locals: Vec<String>,
    errors: Vec<String>,
    /// Connect times in microseconds, sorted.
    connect_us: Vec<u64>,
    /// Time until each failed connection gave up, microseconds.
    failed_after_us: Vec<u64>,
    /// Wall time of the whole run, milliseconds.
    elapsed_ms: f64,
    /// Echoed bytes received over all connections.
    bytes_received: u64,
}

struct ClientOpts {
    target: SocketAddr,
    /// Keep opening connections until then (instead of a fixed count).
    deadline: Option<Instant>,
    /// Send a constant buffer and only count the echo (for throughput runs,
    /// where generating and checking random bytes would be the bottleneck).
    no_verify: bool,
    /// Send this text, repeated, instead of random bytes (and check the echo).
    marker: Option<Vec<u8>>,
    bytes: usize,
    bind_port: Option<u16>,
    hold: Duration,
    greeting: bool,
    seed: u64,
    timeout: Duration,
}

fn client(mut args: Args) -> Result<()> {
    let target: SocketAddr =
        args.take("--connect").context("client needs --connect ADDR")?.parse().context("--connect")?;
    let conns: usize = args.num("--conns", 1)?;
    let parallel: usize = args.num("--parallel", 1)?;
    let bind_port: u16 = args.num("--bind-port", 0)?;
    let duration_ms: u64 = args.num("--duration-ms", 0)?;
    let conns = if duration_ms > 0 { usize::MAX } else { conns };
    let opts = Arc::new(ClientOpts {
        target,
        deadline: (duration_ms > 0).then(|| Instant::now() + Duration::from_millis(duration_ms)),
        no_verify: args.flag("--no-verify"),
        marker: args.take("--marker").map(String::into_bytes),
        bytes: args.num("--bytes", 1024)?,
        bind_port: (bind_port != 0).then_some(bind_port),
        hold: Duration::from_millis(args.num("--hold-ms", 0)?),
        greeting: args.flag("--greeting"),
        seed: args.num("--seed", 1)?,
        timeout: Duration::from_millis(args.num("--timeout-ms", 30_000)?),
    });
    let next = Arc::new(AtomicUsize::new(0));
    let summary = Arc::new(Mutex::new(Summary::default()));
    let run_started = Instant::now();
    let workers: Vec<_> = (0..parallel.max(1).min(conns.max(1)))
        .map(|_| {
            let (opts, next, summary) = (opts.clone(), next.clone(), summary.clone());
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= conns || opts.deadline.map(|d| Instant::now() >= d).unwrap_or(false) {
                        return;
                    }
                    let started = Instant::now();
                    let result = one_connection(&opts, i as u64);
                    let mut s = summary.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(r) => {
                            s.ok += 1;
                            s.bytes_received += r.received as u64;
                            *s.peers.entry(r.peer).or_default() += 1;
                            if let Some(g) = r.greeting {
                                *s.greetings.entry(g).or_default() += 1;
                            }
                            s.locals.push(r.local);
                            s.connect_us.push(r.connect_us);
                        }
                        Err(e) => {
                            s.failed += 1;
                            s.failed_after_us.push(started.elapsed().as_micros() as u64);
                            if s.errors.len() < 20 {
                                s.errors.push(format!("{e:#}"));
                            }
                        }
                    }
                })
                .expect("spawn client thread")
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let mut s = summary.lock().unwrap_or_else(|e| e.into_inner());
    s.elapsed_ms = run_started.elapsed().as_secs_f64() * 1e3;
    s.connect_us.sort_unstable();
    if s.locals.len() > 1000 {
        // Long runs: keep the output small.
        s.locals.truncate(1000);
        s.connect_us = vec![];
    }
    println!("{}", serde_json::to_string(&*s)?);
    Ok(())
}

struct ConnResult {
    received: usize,
    peer: String,
    local: String,
    greeting: Option<String>,
    connect_us: u64,
}

fn connect(opts: &ClientOpts) -> Result<TcpStream> {
    let Some(port) = opts.bind_port else {
        return TcpStream::connect_timeout(&opts.target, opts.timeout).context("connect");
    };
    let domain = if opts.target.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    let local: SocketAddr = if opts.target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    };
    socket.bind(&local.into()).with_context(|| format!("binding source port {port}"))?;
    socket.connect_timeout(&opts.target.into(), opts.timeout).context("connect")?;
    Ok(socket.into())
}

fn one_connection(opts: &ClientOpts, index: u64) -> Result<ConnResult> {
    let start = Instant::now();
    let stream = connect(opts)?;
    let connect_us = start.elapsed().as_micros() as u64;
    stream.set_read_timeout(Some(opts.timeout))?;
    stream.set_write_timeout(Some(opts.timeout))?;
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().context("getpeername")?.to_string();
    let local = stream.local_addr().context("getsockname")?.to_string();
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let greeting = if opts.greeting {
        let mut line = String::new();
        reader.read_line(&mut line).context("reading the server's greeting")?;
        Some(line.trim_end().to_string())
    } else {
        None
    };
    if !opts.hold.is_zero() {
        thread::sleep(opts.hold);
    }
    let seed = opts.seed.wrapping_mul(1_000_003).wrapping_add(index);
    let bytes = opts.bytes;
    let mut writer = stream;
    let no_verify = opts.no_verify;
    let marker = opts.marker.clone();
    let sender = thread::Builder::new().stack_size(256 * 1024).spawn(move || -> std::io::Result<()> {
        let mut rng = Rng::new(seed, marker.clone());
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            if !no_verify {
                rng.fill(&mut buf[..n]);
            }
            writer.write_all(&buf[..n])?;
            left -= n;
        }
        writer.shutdown(Shutdown::Write)
    })?;
    let mut rng = Rng::new(seed, opts.marker.clone());
    let mut expected = vec![0u8; 64 * 1024];
    let mut got = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    loop {
        let n = reader.read(&mut got).context("reading the echo")?;
        if n == 0 {
            break;
        }
        if received + n > bytes {
            bail!("received more than sent ({} > {bytes})", received + n);
        }
        if opts.no_verify {
            received += n;
            continue;
        }
        rng.fill(&mut expected[..n]);
        if got[..n] != expected[..n] {
            bail!("echoed bytes differ from sent bytes at offset {received}");
        }
        received += n;
    }
    let sent = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
    if received != bytes {
        // A reset is reported to whichever thread asks first; show both.
        bail!("echo ended after {received} of {bytes} bytes (sender: {sent:?})");
    }
    sent.context("sending")?;
    Ok(ConnResult { received, peer, local, greeting, connect_us })
}

/// xorshift64* as a byte stream: the same bytes however the stream is
/// chunked, so sender and checker agree.
struct Rng {
    state: u64,
    word: [u8; 8],
    used: usize,
    /// When set, the stream is this text repeated instead.
    pattern: Option<(Vec<u8>, usize)>,
}

impl Rng {
    fn new(seed: u64, pattern: Option<Vec<u8>>) -> Self {
        Self { state: seed | 1, word: [0; 8], used: 8, pattern: pattern.filter(|p| !p.is_empty()).map(|p| (p, 0)) }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        if let Some((pattern, pos)) = &mut self.pattern {
            for b in buf {
                *b = pattern[*pos];
                *pos = (*pos + 1) % pattern.len();
            }
            return;
        }
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

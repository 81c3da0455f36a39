//! `outrigger-hostile`: the misbehaving clients (and two plain servers) of
//! the hardening tests. Like the podtool, it first joins a cgroup and a
//! network namespace (`--cgroup DIR --netns FILE`) so the kernel programs
//! see it as a pod process, then runs one mode and reports JSON on stdout:
//!
//! - floods (`flood.rs`): `dial-ports` (one connect per port of a range),
//!   `plain-flood` (thousands of idle plain TCP connections, held),
//!   `silent-tls` (TLS done with a valid certificate, then nothing or only
//!   the HTTP/2 preface);
//! - tunnel streams (`streams.rs`): `connect-ports` (a CONNECT per port of a
//!   range over one tunnel), `rapid-reset` (CONNECTs reset milliseconds
//!   after they are opened);
//! - bulk transfers whose end is reported as a clean EOF or a reset
//!   (`bulk.rs`): servers `source` and `sink`, clients `download` and
//!   `upload`;
//! - `marked`: an echo exchange on a socket carrying a chosen `SO_MARK`.
#![forbid(unsafe_code)]

mod bulk;
mod flood;
mod streams;

use std::{collections::BTreeMap, io, net::SocketAddr, str::FromStr};

use anyhow::{bail, Context, Result};

fn main() {
    if let Err(e) = run() {
        eprintln!("outrigger-hostile: {e:#}");
        std::process::exit(2);
    }
}

/// `MODE --key value ... --flag`: a mode and its options.
pub struct Opts {
    mode: String,
    values: BTreeMap<String, String>,
}

impl Opts {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let mut args = args.peekable();
        let (mut mode, mut values) = (String::new(), BTreeMap::new());
        while let Some(arg) = args.next() {
            match arg.strip_prefix("--") {
                Some(key) => {
                    let value = args.next_if(|v| !v.starts_with("--")).unwrap_or_else(|| "true".into());
                    values.insert(key.to_string(), value);
                }
                None if mode.is_empty() => mode = arg,
                None => bail!("unexpected argument {arg:?}"),
            }
        }
        Ok(Self { mode, values })
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn flag(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// A required option, parsed.
    pub fn get<T: FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.str(key).with_context(|| format!("{} needs --{key}", self.mode))?;
        v.parse().map_err(|e| anyhow::anyhow!("--{key} {v}: {e}"))
    }

    /// An option with a default.
    pub fn or<T: FromStr>(&self, key: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        if self.str(key).is_none() {
            return Ok(default);
        }
        self.get(key)
    }

    /// `--ports FROM-TO`, inclusive.
    pub fn ports(&self) -> Result<std::ops::RangeInclusive<u16>> {
        let spec: String = self.get("ports")?;
        let (from, to) = spec.split_once('-').context("--ports FROM-TO")?;
        Ok(from.parse()?..=to.parse()?)
    }

    pub fn target(&self) -> Result<SocketAddr> {
        self.get("connect")
    }
}

fn run() -> Result<()> {
    let opts = Opts::parse(std::env::args().skip(1))?;
    outrigger_e2e::enter_pod(opts.str("cgroup"), opts.str("netns"))?;
    match opts.mode.as_str() {
        "dial-ports" => flood::dial_ports(&opts),
        "plain-flood" => flood::plain_flood(&opts),
        "silent-tls" => flood::silent_tls(&opts),
        "connect-ports" => streams::connect_ports(&opts),
        "rapid-reset" => streams::rapid_reset(&opts),
        "source" => bulk::source(&opts),
        "sink" => bulk::sink(&opts),
        "download" => bulk::download(&opts),
        "upload" => bulk::upload(&opts),
        "marked" => marked(&opts),
        other => bail!(
            "unknown mode {other:?}: dial-ports, plain-flood, silent-tls, connect-ports, rapid-reset, \
             source, sink, download, upload, marked"
        ),
    }
}

/// How a connection ended, as the tests tell them apart: a reset is never
/// to be confused with a clean end of stream.
pub fn end_of(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "reset".into(),
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timeout".into(),
        _ => format!("error: {e}"),
    }
}

/// Prints one JSON line and flushes it (tests read reports as they come).
pub fn report(value: serde_json::Value) {
    use std::io::Write;
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Raises the open-file limit towards `needed`, as far as the hard limit
/// allows (a socket the server resets is closed at once, so a flood holds
/// far fewer than it opens).
pub fn raise_fd_limit(needed: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < needed.min(hard) {
        setrlimit(Resource::RLIMIT_NOFILE, needed.min(hard), hard).context("raising RLIMIT_NOFILE")?;
    }
    Ok(())
}

/// `marked --connect ADDR --mark M [--bytes N]`: a pod process that puts
/// the proxy's own mark on its socket (it has CAP_NET_ADMIN) and echoes
/// `--bytes` through the connection.
fn marked(opts: &Opts) -> Result<()> {
    use std::io::{Read, Write};
    let target = opts.target()?;
    let mark = outrigger::config::parse_mark(&opts.get::<String>("mark")?).map_err(anyhow::Error::msg)?;
    let bytes: usize = opts.or("bytes", 1000)?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)?;
    socket.set_mark(mark).context("SO_MARK (needs CAP_NET_ADMIN)")?;
    socket.connect_timeout(&target.into(), std::time::Duration::from_secs(5)).context("connect")?;
    let mut stream: std::net::TcpStream = socket.into();
    // What the application is told it reached (getpeername).
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let payload = vec![b'm'; bytes];
    stream.write_all(&payload)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut echoed = Vec::new();
    let end = match stream.read_to_end(&mut echoed) {
        Ok(_) => "eof".to_string(),
        Err(e) => end_of(&e),
    };
    report(serde_json::json!({"mark": mark, "echoed": echoed == payload, "end": end, "peer": peer}));
    Ok(())
}

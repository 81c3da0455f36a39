//! The proxy's memory per idle connection, held to issue #8's goal of at
//! most 8 KiB per connection per proxy, at 1 000 and 10 000 connections.
//!
//! The meshed client pod opens N connections (`podtool idle open`), echoes
//! a few bytes on each — so every relay has moved data both ways and any
//! buffer it keeps has been allocated — and holds them. Same node: to
//! `server` through node 0's proxy. Tunnelled: to `remote` on node 1, over
//! HBONE (mTLS) between the two proxies. Each figure is a proxy's resident
//! set growth (VmRSS) from before opening to after ~2 s of idleness,
//! divided by N.
//!
//! The proxies involved are restarted first and warmed up with a few
//! connections, so that one-time costs (the first tunnel connection, the
//! first certificates, runtime threads' stacks and arenas) are not charged
//! to the connections, and memory freed by an earlier measurement is not
//! reused by this one to make it look cheaper.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde_json::{json, Value};

use super::{
    topology::{Topology, IDLE_PORT},
    Table,
};

/// Connections of the warm-up: enough to open the pooled tunnel
/// connections a first stream opens, few enough that the memory they free
/// does not make a difference.
const WARM_UP: usize = 20;
/// The proxies' per-pod connection cap defaults to an eighth of the
/// open-file limit (2 500 under a 20 000 limit): lifted, since one pod
/// holding all N connections is the point here.
const PROXY_FLAGS: [&str; 2] = ["--max-connections-per-pod", "1000000"];
/// How long the connections stay idle before the proxies are measured.
const IDLE: Duration = Duration::from_secs(2);
/// Longest wait for N connections to be established.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
const CASES: [(&str, bool, usize); 4] = [
    ("same node, 1k", false, 1_000),
    ("same node, 10k", false, 10_000),
    ("tunnel (mTLS), 1k", true, 1_000),
    ("tunnel (mTLS), 10k", true, 10_000),
];

pub fn table() -> Table {
    let paths: Vec<&str> = CASES.iter().map(|c| c.0).collect();
    Table::with_paths(
        "idle_memory",
        "Proxy memory per idle connection, KiB (ΔVmRSS / conns after 2 s idle; src: the client's node's proxy, \
         dst: the server's node's proxy; base: its RSS before, MB)",
        &paths,
        &[
            ("conns", true),
            ("src_kib_per_conn", false),
            ("dst_kib_per_conn", false),
            ("sum_kib_per_conn", false),
            ("src_base_mb", false),
            ("dst_base_mb", false),
        ],
        vec![],
    )
    .goal("src_kib_per_conn", 8.0)
    .goal("dst_kib_per_conn", 8.0)
}

/// A proxy holding 10 000 relayed connections on one node needs over
/// 20 000 file descriptors; it raises its soft limit to the hard one, so
/// the hard one must allow that. Raised here, before the sandbox starts
/// anything, as a node's service manager would configure it — if this
/// process may (CAP_SYS_RESOURCE); if not, [`measure`] opens fewer.
pub fn raise_fd_limit() {
    let raise = || -> Result<()> {
        let max: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")?.trim().parse()?;
        Ok(setrlimit(Resource::RLIMIT_NOFILE, max, max)?)
    };
    if let Err(e) = raise() {
        let hard = getrlimit(Resource::RLIMIT_NOFILE).map(|(_, hard)| hard).unwrap_or(0);
        eprintln!("bench: could not raise the open-file limit ({e:#}); it stays at {hard}");
    }
}

/// How many more connections of `fds_per_conn` descriptors a process has
/// room for under its open-file limit, keeping a margin for its own use.
fn fd_room(pid: u32, fds_per_conn: usize) -> Result<usize> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .context("no open-file limit in /proc/PID/limits")?;
    let Ok(soft) = soft.parse::<usize>() else { return Ok(usize::MAX) }; // "unlimited"
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(soft.saturating_sub(open + 128) / fds_per_conn)
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

pub fn measure(topo: &mut Topology, table: &mut Table, round: usize) -> Result<()> {
    for (p, (name, tunnel, n)) in CASES.into_iter().enumerate() {
        eprintln!("bench: round {round}: {:<28} {name}", "idle connections");
        let (nodes, target) =
            if tunnel { (vec![0, 1], topo.remote_addr(IDLE_PORT)) } else { (vec![0], topo.server_addr(IDLE_PORT)) };
        for &node in &nodes {
            topo.restart_proxy(node, &PROXY_FLAGS)?;
        }
        Held::open(topo, target, WARM_UP)?.close();
        std::thread::sleep(Duration::from_secs(1));
        // Same node, the source proxy holds both sockets of a connection;
        // tunnelled, one socket each (streams share pooled TLS connections).
        let room = fd_room(topo.proxy(0).pid(), if tunnel { 1 } else { 2 })?;
        if room < n {
            eprintln!(
                "bench: the proxy's open-file limit leaves room for {room} connections: measuring {room}, not {n}"
            );
        }
        let n = n.min(room);
        let rss =
            |topo: &Topology| -> Result<Vec<f64>> { nodes.iter().map(|&k| rss_kib(topo.proxy(k).pid())).collect() };
        let before = rss(topo)?;
        let held = Held::open(topo, target, n)?;
        std::thread::sleep(IDLE);
        let after = rss(topo);
        held.close();
        let after = after?;
        let per_conn: Vec<f64> = before.iter().zip(&after).map(|(b, a)| (a - b) / n as f64).collect();
        for (k, (b, a)) in before.iter().zip(&after).enumerate() {
            eprintln!("bench: proxy n{k}: VmRSS {:.1} -> {:.1} MB with {n} idle connections", b / 1024.0, a / 1024.0);
        }
        let at = |v: &[f64], k: usize| v.get(k).copied().unwrap_or(f64::NAN);
        table.record(
            p,
            &json!({
                "src_kib_per_conn": at(&per_conn, 0),
                "dst_kib_per_conn": at(&per_conn, 1),
                "sum_kib_per_conn": per_conn.iter().sum::<f64>(),
                "src_base_mb": at(&before, 0) / 1024.0,
                "dst_base_mb": at(&before, 1) / 1024.0,
                "conns": n,
            }),
        );
    }
    // The other tables run their proxies with the usual flags.
    for node in [0, 1] {
        topo.restart_proxy(node, &[])?;
    }
    Ok(())
}

/// Connections held open by `podtool idle open` in the meshed pod, until
/// [`Held::close`] (or the sandbox's end) ends them.
struct Held(Child);

impl Held {
    fn open(topo: &Topology, target: SocketAddr, n: usize) -> Result<Self> {
        let mut cmd = topo.sb.podtool(&topo.meshed);
        cmd.args(["idle", "open", "--connect", &target.to_string(), "--conns", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Held(cmd.spawn().context("starting podtool idle open")?);
        let stdout = child.0.stdout.take().context("podtool's stdout")?;
        // Read on a thread so that a stuck client cannot stall the bench.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let line = match rx.recv_timeout(OPEN_TIMEOUT) {
            Ok(Ok(line)) if !line.is_empty() => line,
            _ => bail!("{n} connections to {target} were not established: {}", child.stderr()),
        };
        let v: Value = serde_json::from_str(&line).with_context(|| format!("podtool printed {line}"))?;
        if v["ok"].as_u64() != Some(n as u64) {
            bail!("{} of {n} connections to {target} failed: {}", v["failed"], v["errors"]);
        }
        Ok(child)
    }

    /// Closing its stdin tells the client to reset its connections and exit.
    fn close(mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }

    /// What the client said on stderr (it has ended, or is killed first).
    fn stderr(&mut self) -> String {
        let _ = self.0.kill();
        let mut text = String::new();
        if let Some(mut err) = self.0.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

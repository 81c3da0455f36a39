//! The mesh table: what an operator compares a mesh's data path on, each
//! path against nginx (`return 200`) through one proxy hop or one proxy
//! pair. Paths: direct (same node); HAProxy in TCP mode in the client pod
//! (the one extra hop a sidecar adds); Outrigger's plain hop (a captured
//! client to a pod on its node, on a port declared opaque: the L4 relay);
//! direct across nodes; the HAProxy pair doing mutual TLS 1.3 between the
//! nodes; the Outrigger pair (HBONE, mutual TLS 1.3 under both pods'
//! identities).
//!
//! Columns: wrk with 16 connections (requests/s, p50, p99), wrk with one
//! connection (p50, p99) with idle CPUs and again while a spinner at the
//! lowest priority keeps every CPU busy (so every path pays the same wake-up
//! latency: on an idle VM one connection's latency is mostly the time an
//! idle CPU takes to wake), new connections per second (wrk, `Connection:
//! close`, 16 connections), iperf3 with 1 and 8 streams, the proxies' CPU
//! time per 16-connection request and per new connection (utime + stime
//! from /proc, both sides of a pair) and their resident memory after that run. Figures are min–max
//! over rounds; the "times better" rows compare medians.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use outrigger_e2e::{Pod, Sandbox};

use super::{
    http::{cpu_seconds, start_nginx, wrk},
    measure,
    topology::{
        loopback, Topology, HAPROXY_IPERF, HAPROXY_NGINX, IPERF_PORT, NGINX_PORT, TLS_CLIENT_IPERF, TLS_CLIENT_NGINX,
    },
    Table,
};

pub const GROUP: &str = "mesh";

const PATHS: [&str; 6] =
    ["direct", "haproxy plain", "outrigger plain", "direct cross-node", "haproxy mtls pair", "outrigger mtls pair"];

const METRICS: [(&str, bool); 13] = [
    ("c16_req_per_s", true),
    ("c16_p50_us", false),
    ("c16_p99_us", false),
    ("c1_p50_us", false),
    ("c1_p99_us", false),
    ("c1_spin_p50_us", false),
    ("c1_spin_p99_us", false),
    ("new_conns_per_s", true),
    ("gbps_1_stream", true),
    ("gbps_8_streams", true),
    ("cpu_us_per_req", false),
    ("cpu_us_per_conn", false),
    ("rss_mb", false),
];

/// The columns each comparison is held to (the performance issue's goals):
/// the plain hop at least HAProxy's, the mTLS pair 1.2× HAProxy's pair.
const PLAIN_GOALS: [&str; 5] = ["c16_req_per_s", "c16_p99_us", "new_conns_per_s", "gbps_1_stream", "gbps_8_streams"];
const MTLS_GOALS: [&str; 7] = [
    "c16_req_per_s",
    "c16_p50_us",
    "c16_p99_us",
    "new_conns_per_s",
    "gbps_1_stream",
    "gbps_8_streams",
    "cpu_us_per_req",
];

pub fn table() -> Table {
    Table::with_paths(
        GROUP,
        "Mesh data path against nginx: one plain hop and one mutual-TLS pair (min–max over rounds)",
        &PATHS,
        &METRICS,
        vec![(2, 1, "outrigger plain / haproxy plain"), (5, 4, "outrigger mtls / haproxy mtls")],
    )
    .advantage(2, 1, "outrigger plain vs haproxy plain", 1.0, &PLAIN_GOALS)
    .advantage(5, 4, "outrigger mtls pair vs haproxy mtls pair", 1.2, &MTLS_GOALS)
    .ranges()
}

/// The origins: nginx in the server pod and in the remote pod.
pub struct Origins {
    _spawned: Vec<outrigger_e2e::sandbox::Spawned>,
}

impl Origins {
    pub fn start(topo: &Topology) -> Result<Self> {
        let mut spawned = Vec::new();
        for pod in [&topo.server, &topo.remote] {
            let body = format!("server {{ listen {}:{NGINX_PORT}; location / {{ return 200 'ok'; }} }}", pod.ip4);
            spawned.push(start_nginx(&topo.sb, pod, &format!("nginx-mesh-{}", pod.name), &body)?);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        for s in &spawned {
            if s.stderr().contains("emerg") {
                anyhow::bail!("nginx failed: {}", s.stderr());
            }
        }
        Ok(Self { _spawned: spawned })
    }
}

/// Where a path's client runs, what it connects to for nginx and for
/// iperf3, and which processes are its proxies.
struct Route<'a> {
    from: &'a Pod,
    nginx: SocketAddr,
    iperf: SocketAddr,
    proxies: Vec<u32>,
}

impl Route<'_> {
    /// CPU seconds the path's proxies have used (`None` without proxies).
    fn cpu(&self) -> Option<f64> {
        if self.proxies.is_empty() {
            return None;
        }
        self.proxies.iter().map(|p| cpu_seconds(*p)).sum()
    }

    /// Proxy CPU µs per unit of work since `before`.
    fn cpu_per(&self, before: Option<f64>, units: f64) -> f64 {
        match (self.cpu(), before) {
            (Some(after), Some(before)) => (after - before) * 1e6 / units,
            _ => f64::NAN,
        }
    }
}

fn route<'a>(topo: &'a Topology, path: &str) -> Route<'a> {
    let (server, remote) = (topo.server.ip4, topo.remote.ip4);
    let both = vec![topo.proxy(0).pid(), topo.proxy(1).pid()];
    match path {
        "direct" => Route {
            from: &topo.plain,
            nginx: SocketAddr::from((server, NGINX_PORT)),
            iperf: SocketAddr::from((server, IPERF_PORT)),
            proxies: vec![],
        },
        "haproxy plain" => Route {
            from: &topo.plain,
            nginx: loopback(HAPROXY_NGINX),
            iperf: loopback(HAPROXY_IPERF),
            proxies: vec![topo.haproxy_pid],
        },
        "outrigger plain" => Route {
            from: &topo.meshed,
            nginx: SocketAddr::from((server, NGINX_PORT)),
            iperf: SocketAddr::from((server, IPERF_PORT)),
            proxies: vec![topo.proxy(0).pid()],
        },
        "direct cross-node" => Route {
            from: &topo.plain,
            nginx: SocketAddr::from((remote, NGINX_PORT)),
            iperf: SocketAddr::from((remote, IPERF_PORT)),
            proxies: vec![],
        },
        "haproxy mtls pair" => Route {
            from: &topo.plain,
            nginx: loopback(TLS_CLIENT_NGINX),
            iperf: loopback(TLS_CLIENT_IPERF),
            proxies: topo.haproxy_tls_pids.clone(),
        },
        _ => Route {
            from: &topo.meshed,
            nginx: SocketAddr::from((remote, NGINX_PORT)),
            iperf: SocketAddr::from((remote, IPERF_PORT)),
            proxies: both,
        },
    }
}

/// Resident memory of `pid` in MB, from /proc.
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// One busy loop per CPU at the lowest priority while it lives: the CPUs
/// never go idle, so a wake-up costs the same on every path. `SCHED_BATCH`
/// at nice 19 rather than `SCHED_IDLE`: with `SCHED_IDLE` spinners, wrk
/// against nginx on loopback (no proxy) measured a p99 of 2.2–3.7 ms
/// against 0.27 ms on idle CPUs (we did not pin down why), while
/// `SCHED_BATCH` nice 19 spinners gave 80–660 µs and halved the p50, as
/// busy CPUs should.
pub struct Spinners<'a> {
    sb: &'a Sandbox,
    pids: Vec<u32>,
}

impl<'a> Spinners<'a> {
    pub fn start(sb: &'a Sandbox) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let mut pids = Vec::new();
        for _ in 0..cpus {
            let mut cmd = std::process::Command::new("chrt");
            cmd.args(["--batch", "0", "nice", "-n", "19", "sh", "-c", "while :; do :; done"]);
            pids.push(sb.spawn("spinner", cmd).context("starting a spinner (chrt)")?.pid);
        }
        Ok(Self { sb, pids })
    }
}

impl Drop for Spinners<'_> {
    fn drop(&mut self) {
        for pid in &self.pids {
            self.sb.kill(*pid);
        }
    }
}

/// One measurement of one path: (metric, value) pairs.
type Measure<'a> = dyn Fn(&Route) -> Result<Vec<(&'static str, f64)>> + 'a;

/// One round, paths interleaved within each measurement.
pub fn measure(topo: &Topology, table: &mut Table, secs: u64, round: usize) -> Result<()> {
    let sb = &topo.sb;
    // `f` gives (metric, value) pairs for one path.
    let each = |table: &mut Table, what: &str, f: &Measure| -> Result<()> {
        for (p, path) in PATHS.iter().enumerate() {
            eprintln!("bench: round {round}: {what:<28} {path}");
            for (name, v) in f(&route(topo, path))? {
                let m = METRICS.iter().position(|(n, _)| *n == name).context("a mesh metric")?;
                table.samples[p][m].push(v);
            }
        }
        Ok(())
    };
    each(table, "mesh wrk c16", &|r| {
        let before = r.cpu();
        let (rps, p50, p99) = wrk(sb, r.from, r.nginx, 16, secs, false)?;
        let per_req = r.cpu_per(before, rps * secs as f64);
        let rss = if r.proxies.is_empty() { None } else { r.proxies.iter().map(|p| rss_mb(*p)).sum() };
        Ok(vec![
            ("c16_req_per_s", rps),
            ("c16_p50_us", p50),
            ("c16_p99_us", p99),
            ("cpu_us_per_req", per_req),
            ("rss_mb", rss.unwrap_or(f64::NAN)),
        ])
    })?;
    each(table, "mesh wrk c1", &|r| {
        let (_, p50, p99) = wrk(sb, r.from, r.nginx, 1, secs, false)?;
        Ok(vec![("c1_p50_us", p50), ("c1_p99_us", p99)])
    })?;
    {
        let _spin = Spinners::start(sb)?;
        each(table, "mesh wrk c1 + spinner", &|r| {
            let (_, p50, p99) = wrk(sb, r.from, r.nginx, 1, secs, false)?;
            Ok(vec![("c1_spin_p50_us", p50), ("c1_spin_p99_us", p99)])
        })?;
    }
    each(table, "mesh new connections", &|r| {
        let before = r.cpu();
        let rate = wrk(sb, r.from, r.nginx, 16, secs, true)?.0;
        Ok(vec![("new_conns_per_s", rate), ("cpu_us_per_conn", r.cpu_per(before, rate * secs as f64))])
    })?;
    for (name, streams) in [("gbps_1_stream", 1), ("gbps_8_streams", 8)] {
        each(table, &format!("mesh iperf3 x{streams}"), &|r| {
            Ok(vec![(name, measure::iperf(sb, r.from, r.iperf, streams, secs)?)])
        })?;
    }
    Ok(())
}

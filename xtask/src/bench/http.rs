//! The HTTP table: wrk (HTTP/1.1) and h2load (h2) against nginx in the
//! server pod, through each path: direct; Outrigger's HTTP layer; Outrigger
//! on a port declared opaque (the L4 relay); HAProxy in `mode http`; nginx
//! as a reverse proxy (upstream keep-alive); and Outrigger through a
//! service VIP, without and with a resilience policy on its route
//! (timeouts, retries under a budget; the circuit breaker is always on),
//! which measures what the policy costs. 1 and 16 connections, each one
//! request at a time. Requests/s, latency p50/p99 and the proxy's CPU time
//! per 1 000 requests (utime + stime from /proc).

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context, Result};
use outrigger_e2e::{sandbox::Spawned, Pod, Sandbox};

use super::{topology::Topology, Table};
use crate::util::output;

pub const GROUP: &str = "http";

const PATHS: [&str; 7] = [
    "direct",
    "outrigger http",
    "outrigger opaque",
    "haproxy http",
    "nginx proxy",
    "outrigger service",
    "outrigger service+policy",
];
/// The origin behind a service VIP, plain and under a policy.
const WEB_VIP: [u8; 4] = [10, 96, 0, 110];
const WEB_POLICY_VIP: [u8; 4] = [10, 96, 0, 111];

/// The mesh file's part for the HTTP table: the origin's two services and
/// the policy route (appended to the topology's `services:`).
pub fn mesh_yaml() -> String {
    let service = |name: &str, vip: [u8; 4]| {
        format!(
            "  - name: {name}\n    vips: [{}]\n    ports: [{{name: h1, port: {H1}, protocol: http}}, {{name: h2, port: {H2}, protocol: http}}]\n    endpoints: [{{pod: server}}]\n",
            std::net::Ipv4Addr::from(vip)
        )
    };
    format!(
        "{}{}routes:\n  - name: policy\n    parentRefs: [{{name: web-policy}}]\n    rules:\n      - timeouts: {{request: 15s, backendRequest: 5s}}\n        retry: {{codes: [502, 503, 504], attempts: 2}}\n",
        service("web", WEB_VIP),
        service("web-policy", WEB_POLICY_VIP)
    )
}
/// nginx in the server pod: HTTP/1.1 and h2c, and the same again on ports
/// the proxy is told are opaque.
const H1: u16 = 8081;
const H2: u16 = 8083;
const H1_OPAQUE: u16 = 8091;
const H2_OPAQUE: u16 = 8093;
/// The plain pod's proxies, on its loopback.
const HAPROXY_H1: u16 = 28081;
const HAPROXY_H2: u16 = 28083;
const NGINX_H1: u16 = 18081;
const NGINX_H2: u16 = 18083;

pub fn tables() -> Vec<Table> {
    let metrics = [("req_per_s", true), ("p50_us", false), ("p99_us", false), ("cpu_ms_per_1k", false)];
    let ratios = vec![
        (1, 3, "outrigger http / haproxy http"),
        (1, 4, "outrigger http / nginx proxy"),
        (1, 0, "outrigger http / direct"),
        (2, 0, "outrigger opaque / direct"),
        (6, 5, "service+policy / service"),
    ];
    [
        ("h1_c1", "HTTP/1.1, 1 connection (wrk)"),
        ("h1_c16", "HTTP/1.1, 16 connections (wrk)"),
        ("h2_c1", "h2, 1 connection (h2load)"),
        ("h2_c16", "h2, 16 connections (h2load)"),
    ]
    .into_iter()
    .map(|(key, title)| Table::with_paths(key, title, &PATHS, &metrics, ratios.clone()).in_group(GROUP))
    .collect()
}

/// The HTTP peers: the origin, HAProxy and the nginx reverse proxy.
pub struct Peers {
    _spawned: Vec<Spawned>,
    haproxy_pid: u32,
    nginx_pid: u32,
}

fn nginx_conf(dir: &std::path::Path, body: &str) -> String {
    format!(
        "daemon off; master_process off; worker_rlimit_nofile 65536; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;\n\
           client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
           {body} }}\n",
        d = dir.display()
    )
}

pub(super) fn start_nginx(sb: &Sandbox, pod: &Pod, name: &str, body: &str) -> Result<Spawned> {
    let dir = sb.dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir, body))?;
    let mut cmd = sb.in_pod(pod, "nginx");
    cmd.arg("-c").arg(&conf);
    sb.spawn(name, cmd)
}

impl Peers {
    pub fn start(topo: &Topology) -> Result<Self> {
        let (sb, ip) = (&topo.sb, topo.server.ip4);
        let mut spawned = Vec::new();
        let origin = format!(
            "server {{ listen {ip}:{H1}; listen {ip}:{H1_OPAQUE}; listen {ip}:{H2} http2; listen {ip}:{H2_OPAQUE} http2; location / {{ return 200 'ok'; }} }}"
        );
        spawned.push(start_nginx(sb, &topo.server, "nginx-origin", &origin)?);
        let proxy = format!(
            "upstream origin {{ server {ip}:{H1}; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:{NGINX_H1}; listen 127.0.0.1:{NGINX_H2} http2;\n\
               location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        );
        let nginx = start_nginx(sb, &topo.plain, "nginx-proxy", &proxy)?;
        let nginx_pid = nginx.pid;
        spawned.push(nginx);
        let cfg = sb.dir.join("haproxy-http.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\n\
                 frontend h1\n  bind 127.0.0.1:{HAPROXY_H1}\n  default_backend origin_h1\n\
                 frontend h2\n  bind 127.0.0.1:{HAPROXY_H2} proto h2\n  default_backend origin_h2\n\
                 backend origin_h1\n  server s {ip}:{H1}\n\
                 backend origin_h2\n  server s {ip}:{H2} proto h2\n"
            ),
        )?;
        let mut haproxy = sb.in_pod(&topo.plain, "haproxy");
        haproxy.arg("-db").arg("-f").arg(&cfg);
        let haproxy = sb.spawn("haproxy-http", haproxy)?;
        let haproxy_pid = haproxy.pid;
        spawned.push(haproxy);
        std::thread::sleep(Duration::from_millis(500));
        for s in &spawned {
            if s.stderr().contains("ALERT") || s.stderr().contains("emerg") {
                bail!("an HTTP peer failed: {}", s.stderr());
            }
        }
        Ok(Self { _spawned: spawned, haproxy_pid, nginx_pid })
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// (requests/s, p50 µs, p99 µs)
pub(super) fn wrk(
    sb: &Sandbox,
    from: &Pod,
    target: SocketAddr,
    conns: usize,
    secs: u64,
    close: bool,
) -> Result<(f64, f64, f64)> {
    let mut cmd = sb.in_pod(from, "wrk");
    cmd.args(["-t", "1", "-c", &conns.to_string(), "-d", &format!("{secs}s"), "--latency"]);
    if close {
        // A new connection per request: the connection rate.
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{target}/"));
    let text = output(&mut cmd).with_context(|| format!("wrk to {target}"))?;
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk to {target} saw errors:\n{text}");
    }
    let pct = |p: &str| -> Result<f64> {
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .map(str::trim)
            .with_context(|| format!("no {p} in wrk output:\n{text}"))?;
        duration_us(v).with_context(|| format!("wrk latency {v:?}"))
    };
    Ok((rps, pct("50%")?, pct("99%")?))
}

/// wrk's "123.45us", "1.20ms", "2.00s" in µs.
fn duration_us(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    Some(num.parse::<f64>().ok()? * mult)
}

/// h2load for `secs` with `conns` connections, one stream each at a time;
/// percentiles from its per-request log.
fn h2load(sb: &Sandbox, from: &Pod, target: SocketAddr, conns: usize, secs: u64) -> Result<(f64, f64, f64)> {
    let log = sb.dir.join(format!("h2load-{}-{conns}.log", target.port()));
    let _ = std::fs::remove_file(&log);
    let mut cmd = sb.in_pod(from, "h2load");
    cmd.args(["-c", &conns.to_string(), "-m", "1", "-t", "1", "-D", &secs.to_string(), "--log-file"])
        .arg(&log)
        .arg(format!("http://{target}/"));
    let text = output(&mut cmd).with_context(|| format!("h2load to {target}"))?;
    let line = text.lines().find(|l| l.starts_with("requests:")).context("no requests line")?;
    if !line.contains(" 0 failed, 0 errored") {
        bail!("h2load to {target} saw failures:\n{text}");
    }
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().strip_suffix(" req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no req/s in h2load output:\n{text}"))?;
    // Log lines: start time (µs since epoch), status, duration (µs).
    let mut times: Vec<f64> =
        std::fs::read_to_string(&log)?.lines().filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok()).collect();
    if times.is_empty() {
        bail!("h2load wrote no request log");
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    Ok((rps, pct(0.5), pct(0.99)))
}

/// `--opaque-ports` of the bench's proxies: the default list and the
/// origin's opaque-path ports.
pub fn opaque_ports() -> String {
    format!("21,25,587,3306,4444,5432,6379,9300,11211,{H1_OPAQUE},{H2_OPAQUE},{}", super::topology::NGINX_PORT)
}

/// One round of the HTTP tables, paths interleaved within each table.
pub fn measure(topo: &Topology, peers: &Peers, tables: &mut [Table], secs: u64, round: usize) -> Result<()> {
    for (t, (h2, conns)) in [(false, 1), (false, 16), (true, 1), (true, 16)].into_iter().enumerate() {
        for (p, path) in PATHS.iter().enumerate() {
            eprintln!("bench: round {round}: {:<28} {path}", tables[t].title);
            let server = topo.server.ip4;
            let (from, target, pid) = match (*path, h2) {
                ("direct", false) => (&topo.plain, SocketAddr::from((server, H1)), None),
                ("direct", true) => (&topo.plain, SocketAddr::from((server, H2)), None),
                ("outrigger http", false) => (&topo.meshed, SocketAddr::from((server, H1)), Some(topo.proxy(0).pid())),
                ("outrigger http", true) => (&topo.meshed, SocketAddr::from((server, H2)), Some(topo.proxy(0).pid())),
                ("outrigger opaque", false) => {
                    (&topo.meshed, SocketAddr::from((server, H1_OPAQUE)), Some(topo.proxy(0).pid()))
                }
                ("outrigger opaque", true) => {
                    (&topo.meshed, SocketAddr::from((server, H2_OPAQUE)), Some(topo.proxy(0).pid()))
                }
                ("outrigger service", h2) => {
                    (&topo.meshed, SocketAddr::from((WEB_VIP, if h2 { H2 } else { H1 })), Some(topo.proxy(0).pid()))
                }
                ("outrigger service+policy", h2) => (
                    &topo.meshed,
                    SocketAddr::from((WEB_POLICY_VIP, if h2 { H2 } else { H1 })),
                    Some(topo.proxy(0).pid()),
                ),
                ("haproxy http", h2) => (
                    &topo.plain,
                    super::topology::loopback(if h2 { HAPROXY_H2 } else { HAPROXY_H1 }),
                    Some(peers.haproxy_pid),
                ),
                (_, h2) => (
                    &topo.plain,
                    super::topology::loopback(if h2 { NGINX_H2 } else { NGINX_H1 }),
                    Some(peers.nginx_pid),
                ),
            };
            let cpu_before = pid.and_then(cpu_seconds);
            let (rps, p50, p99) = if h2 {
                h2load(&topo.sb, from, target, conns, secs)?
            } else {
                wrk(&topo.sb, from, target, conns, secs, false)?
            };
            let cpu = match (pid.and_then(cpu_seconds), cpu_before) {
                (Some(after), Some(before)) => (after - before) * 1e3 / (rps * secs as f64 / 1e3),
                _ => f64::NAN,
            };
            let table = &mut tables[t];
            for (i, v) in [rps, p50, p99, cpu].into_iter().enumerate() {
                table.samples[p][i].push(v);
            }
        }
    }
    Ok(())
}

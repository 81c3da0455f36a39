//! `cargo xtask bench`: one topology, one run, three paths side by side.
//!
//! Pods on one simulated node: `server` runs sockperf and iperf3 servers;
//! `meshed` is captured by Outrigger; `plain` is not meshed and reaches the
//! server directly, or through HAProxy (TCP mode) running in its own netns
//! on loopback — the same one extra hop a sidecar adds. Paths are measured
//! interleaved so drift on a noisy machine hits all of them alike; results
//! are printed as a table with ratios and written to target/bench/.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use outrigger_e2e::{proxy::pods_yaml, Pod, ProxyProcess, Sandbox};
use serde::Serialize;
use serde_json::Value;

use crate::util::{output, workspace_root};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rounds over all paths (results are the median over rounds).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Extra flags for `outrigger run` (for experiments), e.g. --proxy-arg=--worker-threads=1.
    #[arg(long = "proxy-arg")]
    pub proxy_args: Vec<String>,
}

const SOCKPERF_PORT: u16 = 11111;
const IPERF_PORT: u16 = 5201;
const HAPROXY_SOCKPERF_PORT: u16 = 21111;
const HAPROXY_IPERF_PORT: u16 = 25201;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Path {
    Direct,
    Outrigger,
    Haproxy,
}

impl Path {
    const ALL: [Path; 3] = [Path::Direct, Path::Outrigger, Path::Haproxy];
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Outrigger => "outrigger",
            Path::Haproxy => "haproxy",
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
struct PathResult {
    /// Round-trip latency of 1 KiB TCP messages, microseconds.
    p50_us: f64,
    p99_us: f64,
    /// Bulk throughput, Gbit/s.
    gbps_1: f64,
    gbps_8: f64,
}

struct Topology {
    sb: Sandbox,
    server: Pod,
    meshed: Pod,
    plain: Pod,
    _proxy: ProxyProcess,
}

impl Topology {
    fn client_pod(&self, path: Path) -> &Pod {
        match path {
            Path::Outrigger => &self.meshed,
            _ => &self.plain,
        }
    }

    /// Where a client on `path` connects to reach the server's `port`.
    fn target(&self, path: Path, port: u16) -> SocketAddr {
        match path {
            Path::Haproxy => {
                let front = if port == SOCKPERF_PORT { HAPROXY_SOCKPERF_PORT } else { HAPROXY_IPERF_PORT };
                SocketAddr::from(([127, 0, 0, 1], front))
            }
            _ => SocketAddr::new(self.server.ip4.into(), port),
        }
    }
}

fn setup(args: &BenchArgs) -> Result<Topology> {
    let mut sb = Sandbox::new()?;
    let server = sb.add_pod(0, "server")?;
    let meshed = sb.add_pod(0, "meshed")?;
    let plain = sb.add_pod(0, "plain")?;
    let pods_file = sb.dir.join("pods.yaml");
    std::fs::write(&pods_file, pods_yaml(&[&meshed, &server]))?;

    let mut sockperf = sb.in_pod(&server, "sockperf");
    sockperf.args(["server", "--tcp", "-i", &server.ip4.to_string(), "-p", &SOCKPERF_PORT.to_string()]);
    sb.spawn("sockperf-server", sockperf)?;
    let mut iperf = sb.in_pod(&server, "iperf3");
    iperf.args(["-s", "-B", &server.ip4.to_string(), "-p", &IPERF_PORT.to_string()]);
    sb.spawn("iperf3-server", iperf)?;

    let cfg = sb.dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
             listen sockperf\n  bind 127.0.0.1:{HAPROXY_SOCKPERF_PORT}\n  server s {}:{SOCKPERF_PORT}\n\n\
             listen iperf\n  bind 127.0.0.1:{HAPROXY_IPERF_PORT}\n  server s {}:{IPERF_PORT}\n",
            server.ip4, server.ip4
        ),
    )?;
    let mut haproxy = sb.in_pod(&plain, "haproxy");
    haproxy.arg("-db").arg("-f").arg(&cfg);
    let haproxy = sb.spawn("haproxy", haproxy)?;

    let mut proxy_args = vec!["--log-level", "warn"];
    proxy_args.extend(args.proxy_args.iter().map(String::as_str));
    let proxy = ProxyProcess::start(&sb, 0, pods_file, &proxy_args)?;
    // Let the servers settle before the first measurement.
    std::thread::sleep(Duration::from_millis(500));
    if !haproxy.stderr().is_empty() && haproxy.stderr().contains("ALERT") {
        bail!("haproxy failed: {}", haproxy.stderr());
    }
    Ok(Topology { sb, server, meshed, plain, _proxy: proxy })
}

/// sockperf ping-pong with 1 KiB messages: full round-trip percentiles (µs).
fn latency(topo: &Topology, path: Path, seconds: u64) -> Result<(f64, f64)> {
    let target = topo.target(path, SOCKPERF_PORT);
    let mut cmd = topo.sb.in_pod(topo.client_pod(path), "sockperf");
    cmd.args(["ping-pong", "--tcp", "-i", &target.ip().to_string(), "-p", &target.port().to_string()]).args([
        "-m",
        "1024",
        "-t",
        &seconds.to_string(),
        "--full-rtt",
    ]);
    let text = output(&mut cmd).with_context(|| format!("sockperf over {}", path.name()))?;
    let pct = |p: &str| -> Result<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {p} percentile in sockperf output:\n{text}"))
    };
    Ok((pct("50.000")?, pct("99.000")?))
}

/// iperf3 bulk throughput in Gbit/s (receiver side).
fn throughput(topo: &Topology, path: Path, streams: usize, seconds: u64) -> Result<f64> {
    let target = topo.target(path, IPERF_PORT);
    let mut cmd = topo.sb.in_pod(topo.client_pod(path), "iperf3");
    cmd.args(["-c", &target.ip().to_string(), "-p", &target.port().to_string()]).args([
        "-t",
        &seconds.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]);
    let text = output(&mut cmd).with_context(|| format!("iperf3 over {}", path.name()))?;
    let v: Value = serde_json::from_str(&text)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in iperf3 output: {}", v["error"]))?;
    Ok(bps / 1e9)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = output(Command::new("uname").arg("-r")).unwrap_or_default().trim().to_string();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    serde_json::json!({ "cpu": cpu, "cpus": cpus, "kernel": kernel })
}

pub fn run(args: &BenchArgs) -> Result<()> {
    crate::build::all()?;
    crate::build::export_binaries();
    let topo = setup(args)?;
    let secs = args.duration;
    let mut samples: Vec<(Path, Vec<PathResult>)> = Path::ALL.iter().map(|p| (*p, Vec::new())).collect();
    for round in 0..args.rounds.max(1) {
        let mut results: Vec<PathResult> = vec![PathResult::default(); 3];
        for (i, path) in Path::ALL.iter().enumerate() {
            eprintln!("bench: round {} {:>9}: latency", round + 1, path.name());
            let (p50, p99) = latency(&topo, *path, secs)?;
            results[i].p50_us = p50;
            results[i].p99_us = p99;
        }
        for streams in [1, 8] {
            for (i, path) in Path::ALL.iter().enumerate() {
                eprintln!("bench: round {} {:>9}: throughput, {streams} stream(s)", round + 1, path.name());
                let g = throughput(&topo, *path, streams, secs)?;
                if streams == 1 {
                    results[i].gbps_1 = g;
                } else {
                    results[i].gbps_8 = g;
                }
            }
        }
        for (i, r) in results.into_iter().enumerate() {
            samples[i].1.push(r);
        }
    }
    let summary: Vec<(Path, PathResult)> = samples
        .into_iter()
        .map(|(p, rs)| {
            let m = |f: fn(&PathResult) -> f64| median(rs.iter().map(f).collect());
            (
                p,
                PathResult {
                    p50_us: m(|r| r.p50_us),
                    p99_us: m(|r| r.p99_us),
                    gbps_1: m(|r| r.gbps_1),
                    gbps_8: m(|r| r.gbps_8),
                },
            )
        })
        .collect();
    report(&summary, args)
}

fn report(summary: &[(Path, PathResult)], args: &BenchArgs) -> Result<()> {
    let get = |p: Path| summary.iter().find(|(q, _)| *q == p).map(|(_, r)| r.clone()).unwrap_or_default();
    let (direct, ours, haproxy) = (get(Path::Direct), get(Path::Outrigger), get(Path::Haproxy));
    println!(
        "\nTCP, 1 KiB ping-pong round trips and iperf3 bulk; {} s per measurement, median of {} round(s)\n",
        args.duration, args.rounds
    );
    println!("{:<10} {:>9} {:>9} {:>13} {:>13}", "path", "p50 µs", "p99 µs", "1 conn Gb/s", "8 conns Gb/s");
    for (p, r) in summary {
        println!("{:<10} {:>9.1} {:>9.1} {:>13.2} {:>13.2}", p.name(), r.p50_us, r.p99_us, r.gbps_1, r.gbps_8);
    }
    let ratio = |a: f64, b: f64| a / b;
    println!("\n{:<22} {:>9} {:>9} {:>13} {:>13}", "ratio", "p50", "p99", "1 conn", "8 conns");
    for (name, base) in [("outrigger / direct", &direct), ("outrigger / haproxy", &haproxy)] {
        println!(
            "{:<22} {:>9.2} {:>9.2} {:>13.2} {:>13.2}",
            name,
            ratio(ours.p50_us, base.p50_us),
            ratio(ours.p99_us, base.p99_us),
            ratio(ours.gbps_1, base.gbps_1),
            ratio(ours.gbps_8, base.gbps_8)
        );
    }
    let added_ours = ours.p50_us - direct.p50_us;
    let added_haproxy = haproxy.p50_us - direct.p50_us;
    println!("\nadded p50 latency: outrigger {added_ours:.1} µs, haproxy {added_haproxy:.1} µs");

    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let json = serde_json::json!({
        "unix_time": stamp,
        "machine": machine(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "paths": summary.iter().map(|(p, r)| (p.name().to_string(), serde_json::to_value(r).unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
        "ratios": {
            "outrigger_over_direct": { "p50": ours.p50_us / direct.p50_us, "p99": ours.p99_us / direct.p99_us, "gbps_1": ours.gbps_1 / direct.gbps_1, "gbps_8": ours.gbps_8 / direct.gbps_8 },
            "outrigger_over_haproxy": { "p50": ours.p50_us / haproxy.p50_us, "p99": ours.p99_us / haproxy.p99_us, "gbps_1": ours.gbps_1 / haproxy.gbps_1, "gbps_8": ours.gbps_8 / haproxy.gbps_8 },
        },
        "added_p50_us": { "outrigger": added_ours, "haproxy": added_haproxy },
    });
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(&json)?;
    std::fs::write(dir.join(format!("bench-{stamp}.json")), &text)?;
    std::fs::write(dir.join("latest.json"), &text)?;
    println!("written to {}", dir.join("latest.json").display());
    Ok(())
}

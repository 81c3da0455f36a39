//! `cargo xtask bench`: one topology, one run, paths side by side.
//!
//! Two tables. *Single hop*: a client pod to a server pod directly, through
//! Outrigger, and through HAProxy (TCP mode). *Service VIP*: a client to a
//! service with three endpoint pods — directly to one endpoint, through
//! Outrigger's VIP balancing, and through HAProxy `balance leastconn`.
//! Paths are measured interleaved, so drift on a noisy machine hits all of
//! them alike; the tables and the Outrigger/direct and Outrigger/HAProxy
//! ratios are printed and written to target/bench/.

mod measure;
mod topology;

use std::{
    net::SocketAddr,
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use serde_json::{json, Map, Value};
use topology::{
    loopback, vip, Topology, ECHO_PORT, HAPROXY_IPERF, HAPROXY_SOCKPERF, HAPROXY_VIP_ECHO, HAPROXY_VIP_SOCKPERF,
    IPERF_PORT, SOCKPERF_PORT, TLS_CLIENT_ECHO, TLS_CLIENT_IPERF, TLS_CLIENT_SOCKPERF,
};

use crate::util::{output, workspace_root};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Rounds over all paths (each figure is the median over rounds).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Extra flags for `outrigger run` (for experiments), e.g. --proxy-arg=--worker-threads=1.
    #[arg(long = "proxy-arg")]
    pub proxy_args: Vec<String>,
    /// Only these tables (single_hop, service_vip, cross_node_mtls, metrics_cost); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

impl BenchArgs {
    fn wants(&self, table: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|t| t == table)
    }
}

const PATHS: [&str; 3] = ["direct", "outrigger", "haproxy"];

/// A metric of a table: name, and whether larger is better.
struct Metric {
    name: &'static str,
    higher_is_better: bool,
}

struct Table {
    key: &'static str,
    title: &'static str,
    paths: Vec<&'static str>,
    metrics: Vec<Metric>,
    /// (numerator path, denominator path, label) ratios to report.
    ratios: Vec<(usize, usize, &'static str)>,
    /// samples[path][metric] over rounds.
    samples: Vec<Vec<Vec<f64>>>,
}

impl Table {
    /// A table of the three paths (direct, Outrigger, HAProxy).
    fn new(key: &'static str, title: &'static str, metrics: &[(&'static str, bool)]) -> Self {
        Self::with_paths(key, title, &PATHS, metrics, vec![(1, 0, "outrigger / direct"), (1, 2, "outrigger / haproxy")])
    }

    fn with_paths(
        key: &'static str,
        title: &'static str,
        paths: &[&'static str],
        metrics: &[(&'static str, bool)],
        ratios: Vec<(usize, usize, &'static str)>,
    ) -> Self {
        Self {
            key,
            title,
            paths: paths.to_vec(),
            metrics: metrics
                .iter()
                .map(|(name, higher_is_better)| Metric { name, higher_is_better: *higher_is_better })
                .collect(),
            ratios,
            samples: vec![vec![Vec::new(); metrics.len()]; paths.len()],
        }
    }

    fn median(&self, path: usize, metric: usize) -> f64 {
        let mut v = self.samples[path][metric].clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(f64::NAN)
    }
}

fn single_hop_target(topo: &Topology, path: usize, port: u16, haproxy_port: u16) -> (&outrigger_e2e::Pod, SocketAddr) {
    match PATHS[path] {
        "outrigger" => (&topo.meshed, topo.server_addr(port)),
        "haproxy" => (&topo.plain, loopback(haproxy_port)),
        _ => (&topo.plain, topo.server_addr(port)),
    }
}

/// Cross-node: direct plaintext, the Outrigger pair (mTLS tunnel), or the
/// HAProxy pair (TLS between them).
fn cross_target(topo: &Topology, path: usize, port: u16, haproxy_port: u16) -> (&outrigger_e2e::Pod, SocketAddr) {
    match PATHS[path] {
        "outrigger" => (&topo.meshed, topo.remote_addr(port)),
        "haproxy" => (&topo.plain, loopback(haproxy_port)),
        _ => (&topo.plain, topo.remote_addr(port)),
    }
}

fn vip_target(topo: &Topology, path: usize, port: u16, haproxy_port: u16) -> (&outrigger_e2e::Pod, SocketAddr) {
    match PATHS[path] {
        "outrigger" => (&topo.meshed, vip(port)),
        "haproxy" => (&topo.plain, loopback(haproxy_port)),
        _ => (&topo.plain, topo.endpoint_addr(port)),
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    crate::build::all()?;
    crate::build::export_binaries();
    let mut topo = Topology::new(&args.proxy_args)?;
    let secs = args.duration;
    let mut hop = Table::new(
        "single_hop",
        "Single hop: client pod -> server pod",
        &[("p50_us", false), ("p99_us", false), ("gbps_1_conn", true), ("gbps_8_conns", true)],
    );
    let mut svc = Table::new(
        "service_vip",
        "Service VIP with 3 endpoints (direct = straight to one endpoint; HAProxy = balance leastconn)",
        &[("p50_us", false), ("p99_us", false), ("conns_per_s", true), ("echo_gbps_8_conns", true)],
    );
    let mut cross = Table::new(
        "cross_node_mtls",
        "Cross-node with mutual TLS: Outrigger pair (HBONE) vs HAProxy pair (TLS 1.3 both ends); direct is plaintext",
        &[("p50_us", false), ("p99_us", false), ("gbps_1_conn", true), ("gbps_8_conns", true), ("conns_per_s", true)],
    );
    let mut cost = Table::with_paths(
        "metrics_cost",
        "Cost of metrics: Outrigger single hop with per-connection metrics on, off, and on while /metrics is scraped every 100 ms",
        &["metrics on", "metrics off", "on + scrape 100ms"],
        &[("p50_us", false), ("p99_us", false), ("gbps_1_conn", true), ("conns_per_s", true)],
        vec![(1, 0, "off / on"), (2, 0, "scraped / on")],
    );
    for round in 1..=args.rounds.max(1) {
        if args.wants("metrics_cost") {
            measure_metrics_cost(&mut topo, &mut cost, secs, round)?;
        }
        let (sb, t) = (&topo.sb, &topo);
        if args.wants("single_hop") {
            each_path(round, &mut hop, "single hop latency", 0, |p| {
                let (from, to) = single_hop_target(t, p, SOCKPERF_PORT, HAPROXY_SOCKPERF);
                let (p50, p99) = measure::latency(sb, from, to, secs)?;
                Ok(vec![p50, p99])
            })?;
            for (m, streams) in [(2, 1), (3, 8)] {
                each_path(round, &mut hop, &format!("single hop iperf3 x{streams}"), m, |p| {
                    let (from, to) = single_hop_target(t, p, IPERF_PORT, HAPROXY_IPERF);
                    Ok(vec![measure::iperf(sb, from, to, streams, secs)?])
                })?;
            }
        }
        if args.wants("service_vip") {
            each_path(round, &mut svc, "service latency", 0, |p| {
                let (from, to) = vip_target(t, p, SOCKPERF_PORT, HAPROXY_VIP_SOCKPERF);
                let (p50, p99) = measure::latency(sb, from, to, secs)?;
                Ok(vec![p50, p99])
            })?;
            each_path(round, &mut svc, "service connection rate", 2, |p| {
                let (from, to) = vip_target(t, p, ECHO_PORT, HAPROXY_VIP_ECHO);
                Ok(vec![measure::connection_rate(sb, from, to, secs)?])
            })?;
            each_path(round, &mut svc, "service echo throughput", 3, |p| {
                let (from, to) = vip_target(t, p, ECHO_PORT, HAPROXY_VIP_ECHO);
                Ok(vec![measure::echo_throughput(sb, from, to, secs)?])
            })?;
        }
        if args.wants("cross_node_mtls") {
            each_path(round, &mut cross, "cross-node latency", 0, |p| {
                let (from, to) = cross_target(t, p, SOCKPERF_PORT, TLS_CLIENT_SOCKPERF);
                let (p50, p99) = measure::latency(sb, from, to, secs)?;
                Ok(vec![p50, p99])
            })?;
            for (m, streams) in [(2, 1), (3, 8)] {
                each_path(round, &mut cross, &format!("cross-node iperf3 x{streams}"), m, |p| {
                    let (from, to) = cross_target(t, p, IPERF_PORT, TLS_CLIENT_IPERF);
                    Ok(vec![measure::iperf(sb, from, to, streams, secs)?])
                })?;
            }
            each_path(round, &mut cross, "cross-node connection rate", 4, |p| {
                let (from, to) = cross_target(t, p, ECHO_PORT, TLS_CLIENT_ECHO);
                Ok(vec![measure::connection_rate(sb, from, to, secs)?])
            })?;
        }
    }
    let tables: Vec<Table> = [hop, svc, cross, cost].into_iter().filter(|t| args.wants(t.key)).collect();
    report(&tables, args)
}

/// Measures `what` on every path of `table` in turn (interleaved, so drift
/// hits all paths alike); `measure` returns the values of consecutive
/// metrics starting at `first`.
fn each_path(
    round: usize,
    table: &mut Table,
    what: &str,
    first: usize,
    mut measure: impl FnMut(usize) -> Result<Vec<f64>>,
) -> Result<()> {
    for p in 0..table.paths.len() {
        eprintln!("bench: round {round}: {what:<28} {}", table.paths[p]);
        for (i, value) in measure(p)?.into_iter().enumerate() {
            table.samples[p][first + i].push(value);
        }
    }
    Ok(())
}

/// One round of the metrics-cost table: the single-hop Outrigger path with
/// metrics on, off (proxy restarted with --connection-metrics false), and on
/// while a scraper fetches /metrics every 100 ms.
fn measure_metrics_cost(topo: &mut Topology, cost: &mut Table, secs: u64, round: usize) -> Result<()> {
    let measure = |topo: &Topology, cost: &mut Table, p: usize| -> Result<()> {
        eprintln!("bench: round {round}: {:<28} {}", "metrics cost", cost.paths[p]);
        let (p50, p99) = measure::latency(&topo.sb, &topo.meshed, topo.server_addr(SOCKPERF_PORT), secs)?;
        cost.samples[p][0].push(p50);
        cost.samples[p][1].push(p99);
        cost.samples[p][2].push(measure::iperf(&topo.sb, &topo.meshed, topo.server_addr(IPERF_PORT), 1, secs)?);
        // Short connections are where per-connection metrics could show.
        let echo = topo.endpoint_addr(ECHO_PORT);
        cost.samples[p][3].push(measure::connection_rate(&topo.sb, &topo.meshed, echo, secs)?);
        Ok(())
    };
    measure(topo, cost, 0)?;
    topo.restart_local_proxy(&["--connection-metrics", "false"])?;
    measure(topo, cost, 1)?;
    topo.restart_local_proxy(&[])?;
    let admin = topo.local_proxy().admin;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut scrapes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if outrigger_e2e::http::get(admin, "/metrics").is_ok() {
                    scrapes += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            scrapes
        })
    };
    let result = measure(topo, cost, 2);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.join().unwrap_or(0);
    eprintln!("bench: round {round}: {scrapes} scrapes of /metrics during the scraped measurement");
    result
}

fn report(tables: &[Table], args: &BenchArgs) -> Result<()> {
    println!(
        "\nlatency: sockperf ping-pong, 1 KiB messages, full round trip; bulk: iperf3 (single hop) or 8 echo \
         connections (service); {} s per measurement, median of {} round(s)",
        args.duration, args.rounds
    );
    let mut out = Map::new();
    for t in tables {
        println!("\n{}\n", t.title);
        print!("{:<22}", "path");
        for m in &t.metrics {
            print!(" {:>18}", m.name);
        }
        println!();
        let mut paths = Map::new();
        for (p, name) in t.paths.iter().enumerate() {
            print!("{name:<22}");
            let mut row = Map::new();
            for (i, m) in t.metrics.iter().enumerate() {
                let v = t.median(p, i);
                print!(" {v:>18.2}");
                row.insert(m.name.to_string(), json!(v));
            }
            println!();
            paths.insert(name.to_string(), Value::Object(row));
        }
        let mut ratios = Map::new();
        for &(num, base, label) in &t.ratios {
            print!("{label:<22}");
            let mut row = Map::new();
            for (i, m) in t.metrics.iter().enumerate() {
                let r = t.median(num, i) / t.median(base, i);
                print!(" {r:>18.2}");
                row.insert(m.name.to_string(), json!(r));
            }
            println!();
            ratios.insert(label.replace(" / ", "_over_"), Value::Object(row));
        }
        if t.paths[0] == "direct" && t.metrics[0].name == "p50_us" && !t.metrics[0].higher_is_better {
            let added = |p: usize| t.median(p, 0) - t.median(0, 0);
            println!("added p50 latency over direct: outrigger {:.1} µs, haproxy {:.1} µs", added(1), added(2));
        }
        out.insert(t.key.to_string(), json!({ "title": t.title, "paths": paths, "ratios": ratios }));
    }
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let json = json!({
        "unix_time": stamp,
        "machine": machine(),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "proxy_args": args.proxy_args,
        "tables": out,
    });
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(&json)?;
    std::fs::write(dir.join(format!("bench-{stamp}.json")), &text)?;
    std::fs::write(dir.join("latest.json"), &text)?;
    println!("\nwritten to {}", dir.join("latest.json").display());
    Ok(())
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
    json!({ "cpu": cpu, "cpus": cpus, "kernel": kernel })
}

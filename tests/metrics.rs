//! Metrics as a node's Prometheus stack reads them: a real Prometheus
//! scraping the proxy, a real prometheus-node-exporter publishing its
//! textfile, and the registry staying bounded under pod churn.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpListener},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use outrigger_e2e::{
    http,
    prometheus::{dashboard_queries, Prometheus},
    proxy::{mesh_yaml, ServiceDef},
    wait_for, Pod, ProxyProcess, Sandbox,
};
use serde_json::Value;

const APP: u16 = 8080;

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn service<'a>(name: &'a str, vip: [u8; 4], endpoint: &'a str) -> ServiceDef<'a> {
    ServiceDef { name, vips: vec![IpAddr::from(vip)], port: 80, target_port: APP, endpoints: vec![(endpoint, 1)] }
}

/// Two client pods and three services: s1 and s2 answer, s3's endpoint
/// refuses (nothing listens there).
struct Traffic {
    sb: Sandbox,
    clients: [Pod; 2],
    file: std::path::PathBuf,
}

const S1: [u8; 4] = [10, 96, 1, 1];
const S2: [u8; 4] = [10, 96, 1, 2];
const S3: [u8; 4] = [10, 96, 1, 3];

impl Traffic {
    fn new() -> Result<Self> {
        let mut sb = Sandbox::new()?;
        let c1 = sb.add_pod(0, "c1")?;
        let c2 = sb.add_pod(0, "c2")?;
        let s1 = sb.add_pod(0, "s1a")?;
        let s2 = sb.add_pod(0, "s2a")?;
        let s3 = sb.add_pod(0, "s3a")?;
        sb.echo_server(&s1, &[APP], &[])?;
        sb.echo_server(&s2, &[APP], &[])?;
        let file = sb.dir.join("mesh.yaml");
        let services = [service("s1", S1, "s1a"), service("s2", S2, "s2a"), service("s3", S3, "s3a")];
        std::fs::write(&file, mesh_yaml(&[&c1, &c2, &s1, &s2, &s3], &services))?;
        Ok(Self { sb, clients: [c1, c2], file })
    }

    /// Drives `conns` connections of `bytes` each from client `c` to `vip`.
    fn drive(&self, c: usize, vip: [u8; 4], conns: usize, bytes: usize) -> Result<Value> {
        let target = SocketAddr::from((vip, 80));
        self.sb.client(
            &self.clients[c],
            target,
            &["--conns", &conns.to_string(), "--parallel", "4", "--bytes", &bytes.to_string()],
        )
    }
}

#[test]
fn prometheus_sees_the_traffic_that_was_driven_and_the_dashboard_has_data() -> Result<()> {
    let t = Traffic::new()?;
    let proxy = ProxyProcess::start(&t.sb, 0, t.file.clone(), &["--log-format", "json"])?;
    let prom = Prometheus::start(&t.sb, proxy.admin)?;

    let plan = [(0, S1, 30), (0, S2, 20), (1, S1, 10), (1, S2, 40)];
    for (c, vip, n) in plan {
        ensure!(t.drive(c, vip, n, 1000)?["ok"] == n, "traffic c{} -> {vip:?} failed", c + 1);
    }
    // One refused connection: s3's endpoint has no server.
    ensure!(t.drive(0, S3, 1, 10)?["failed"] == 1, "s3 did not refuse");

    let mut expected = BTreeMap::new();
    for (c, vip, n) in plan {
        let svc = if vip == S1 { "s1.default" } else { "s2.default" };
        expected.insert((format!("c{}", c + 1), svc.to_string()), n as f64);
    }
    let opened = "sum by (source_pod, destination_service) (outrigger_connections_opened_total{reporter=\"outbound\"})";
    // (A failed connection's series exist with zero opened connections.)
    let nonzero =
        |m: BTreeMap<(String, String), f64>| m.into_iter().filter(|(_, v)| *v > 0.0).collect::<BTreeMap<_, _>>();
    let seen = wait_for(Duration::from_secs(30), || {
        let got = nonzero(prom.by_two(opened, "source_pod", "destination_service").ok()?);
        (got == expected).then_some(got)
    });
    ensure!(
        seen.is_some(),
        "Prometheus has {:?}, expected {expected:?}",
        prom.by_two(opened, "source_pod", "destination_service")?
    );
    let sent = prom.by_two(
        "sum by (source_pod, destination_service) (outrigger_sent_bytes_total{reporter=\"outbound\"})",
        "source_pod",
        "destination_service",
    )?;
    let received = prom.by_two(
        "sum by (source_pod, destination_service) (outrigger_received_bytes_total{reporter=\"outbound\"})",
        "source_pod",
        "destination_service",
    )?;
    for (key, n) in &expected {
        ensure!(sent.get(key) == Some(&(n * 1000.0)), "sent bytes for {key:?}: {:?}", sent.get(key));
        ensure!(received.get(key) == Some(&(n * 1000.0)), "received bytes for {key:?}: {:?}", received.get(key));
    }
    let count = |q: &str| -> Result<f64> {
        Ok(prom.query(q)?.first().and_then(|r| r["value"][1].as_str()?.parse().ok()).unwrap_or(f64::NAN))
    };
    let ok_services = "destination_service=~\"s1.default|s2.default\"";
    ensure!(count(&format!("sum(outrigger_connect_duration_seconds_count{{{ok_services}}})"))? == 100.0);
    ensure!(count(&format!("sum(outrigger_connection_duration_seconds_count{{{ok_services}}})"))? == 100.0);
    ensure!(count(&format!("sum(outrigger_tcp_rtt_seconds_count{{{ok_services}}})"))? == 100.0);
    let failed = prom.by_two(
        "sum by (destination_service, reason) (outrigger_connections_failed_total)",
        "destination_service",
        "reason",
    )?;
    ensure!(
        failed.get(&("s3.default".to_string(), "connect_refused".to_string())) == Some(&1.0),
        "the refused connection was not counted with its reason: {failed:?}"
    );
    ensure!(
        proxy
            .log_text()
            .lines()
            .any(|l| l.contains("connection failed") && l.contains("connect_refused") && l.contains("s3")),
        "the refused connection was not logged"
    );

    // One structured access-log line per connection.
    let access: Vec<Value> = proxy
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "outrigger::access")
        .collect();
    ensure!(access.len() == 101, "{} access-log lines for 101 connections", access.len());
    let line = access.iter().find(|v| v["service"] == "default/s1").context("no access line for s1")?;
    for field in [
        "timestamp",
        "pod",
        "identity",
        "dst",
        "service",
        "upstream",
        "sent_bytes",
        "received_bytes",
        "duration_ms",
        "result",
        "flags",
    ] {
        ensure!(!line[field].is_null(), "access log lacks {field}: {line}");
    }
    ensure!(line["sent_bytes"] == 1000 && line["identity"] == "spiffe://cluster.local/ns/default/sa/c1", "{line}");

    // `outrigger stats` reads the same numbers from the admin server.
    let stats = Command::new(outrigger_e2e::outrigger_bin())
        .args(["stats", "--admin-addr", &proxy.admin.to_string()])
        .output()?;
    let table = String::from_utf8_lossy(&stats.stdout);
    eprintln!("{table}");
    let row = |svc: &str| {
        table.lines().find(|l| l.starts_with(svc)).map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
    };
    let s2 = row("s2.default").context("no s2 row in outrigger stats")?;
    ensure!(s2[1] == "60" && s2[3] == "0", "s2 row: {s2:?}");
    let s3 = row("s3.default").context("no s3 row")?;
    ensure!(s3[3] == "1", "s3 failures: {s3:?}");
    ensure!(table.lines().next().is_some_and(|h| h.starts_with("SERVICE")), "{table}");

    for expr in dashboard_queries("outrigger-services.json")? {
        let started = std::time::Instant::now();
        let has_data = wait_for(Duration::from_secs(30), || (!prom.query(&expr).ok()?.is_empty()).then_some(()));
        eprintln!("dashboard query has data after {:?}: {expr}", started.elapsed());
        ensure!(has_data.is_some(), "dashboard query returns no data: {expr}");
    }
    Ok(())
}

#[test]
fn node_exporter_publishes_the_per_pod_series_from_whole_files() -> Result<()> {
    let t = Traffic::new()?;
    let dir = t.sb.dir.join("textfile");
    std::fs::create_dir_all(&dir)?;
    let dir_arg = dir.display().to_string();
    let _proxy =
        ProxyProcess::start(&t.sb, 0, t.file.clone(), &["--textfile-dir", &dir_arg, "--textfile-interval", "50ms"])?;
    let exporter: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut cmd = Command::new("prometheus-node-exporter");
    cmd.args(["--collector.disable-defaults", "--collector.textfile"])
        .arg(format!("--collector.textfile.directory={dir_arg}"))
        .arg(format!("--web.listen-address={exporter}"));
    t.sb.spawn("node-exporter", cmd)?;

    // Read the file as fast as possible while the proxy keeps rewriting it:
    // every read must be a whole file.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, torn) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = {
        let (stop, reads, torn, file) = (stop.clone(), reads.clone(), torn.clone(), dir.join("outrigger.prom"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(text) = std::fs::read_to_string(&file) {
                    reads.fetch_add(1, Ordering::Relaxed);
                    if !text.ends_with("# outrigger textfile end\n") {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    for _ in 0..7 {
        ensure!(t.drive(0, S1, 1, 1234)?["ok"] == 1);
    }
    let found = wait_for(Duration::from_secs(15), || {
        let (_, body) = http::get(exporter, "/metrics").ok()?;
        let m = outrigger_e2e::MetricsText::parse(&body);
        let labels = [("source_pod", "c1"), ("destination_service", "s1.default")];
        (m.sum("outrigger_connections_opened_total", &labels) == 7.0
            && m.sum("outrigger_sent_bytes_total", &labels) == 7.0 * 1234.0
            && m.sum("outrigger_received_bytes_total", &labels) == 7.0 * 1234.0
            && m.sum("outrigger_connect_duration_seconds_count", &labels) == 7.0)
            .then_some(m)
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let m = match found {
        Some(m) => m,
        None => bail!("node exporter never published the per-pod series:\n{}", http::get(exporter, "/metrics")?.1),
    };
    ensure!(m.sum("node_textfile_scrape_error", &[]) == 0.0, "node exporter could not parse the textfile");
    let (reads, torn) = (reads.load(Ordering::Relaxed), torn.load(Ordering::Relaxed));
    eprintln!("{reads} reads of the textfile while it was rewritten every 50 ms, {torn} incomplete");
    ensure!(reads > 100, "too few reads ({reads}) to say anything");
    ensure!(torn == 0, "{torn} of {reads} reads saw a half-written file");
    let listing: Vec<String> =
        std::fs::read_dir(&dir)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    ensure!(listing.iter().filter(|n| n.ends_with(".prom")).count() == 1, "stray .prom files: {listing:?}");
    Ok(())
}

/// Lines of per-connection series in an exposition.
fn connection_series(proxy: &ProxyProcess) -> Result<usize> {
    let (_, body) = http::get(proxy.admin, "/metrics")?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| outrigger::metrics::POD_FAMILIES.iter().any(|f| l.starts_with(f)))
        .count())
}

#[test]
fn series_of_departed_pods_are_dropped_after_the_idle_period() -> Result<()> {
    let mut sb = Sandbox::new()?;
    let server = sb.add_pod(0, "server")?;
    let steady = sb.add_pod(0, "steady")?;
    sb.echo_server(&server, &[APP], &[])?;
    let target = SocketAddr::new(server.ip4.into(), APP);
    let file = sb.dir.join("mesh.yaml");
    std::fs::write(&file, mesh_yaml(&[&server, &steady], &[]))?;
    let proxy = ProxyProcess::start(&sb, 0, file.clone(), &["--metrics-idle-timeout", "1s"])?;
    ensure!(sb.client(&steady, target, &[])?["ok"] == 1);
    let baseline = connection_series(&proxy)?;
    ensure!(baseline > 0, "the steady pod's series are the baseline");

    let names: Vec<String> = (0..200).map(|i| format!("churn{i}")).collect();
    let mut churn = Vec::new();
    for name in &names {
        churn.push(sb.add_pod(0, name)?);
    }
    let mut all: Vec<&Pod> = vec![&server, &steady];
    all.extend(churn.iter());
    ProxyProcess::write_pods_file(&file, &mesh_yaml(&all, &[]))?;
    // Meshed means listeners bound, not just listed: a pod listed while its
    // listeners are still being bound would have its connect refused.
    wait_for(Duration::from_secs(60), || {
        let dump = proxy.config_dump().ok()?;
        let pods = dump["node"]["pods"].as_array()?;
        let meshed = pods
            .iter()
            .filter(|p| p["error"].is_null() && p["listeners"].as_array().is_some_and(|l| !l.is_empty()))
            .count();
        (meshed == 202).then_some(())
    })
    .context("the 200 pods were never meshed")?;
    for pod in &churn {
        // One retry: with 200 fresh pods on one bridge, the sandbox's network
        // now and then leaves one pod's first ARP request unanswered, and the
        // proxy's upstream connect fails with EHOSTUNREACH after 3 s (logged
        // as `no_route`, the client reset: correct, and not this test's
        // subject). Its series are counted either way.
        let mut summary = sb.client(pod, target, &["--bytes", "100"])?;
        if summary["ok"] != 1 {
            eprintln!("{} failed once, retrying: {summary}", pod.name);
            summary = sb.client(pod, target, &["--bytes", "100"])?;
        }
        if summary["ok"] != 1 {
            let log: Vec<String> =
                proxy.log_text().lines().filter(|l| l.contains(pod.name.as_str())).map(str::to_string).collect();
            anyhow::bail!("{} could not connect: {summary}\n{}", pod.name, log.join("\n"));
        }
    }
    let peak = connection_series(&proxy)?;
    eprintln!("series: baseline {baseline}, with 200 more pods {peak}");
    ensure!(peak > baseline * 100, "the churned pods did not add series ({peak})");

    ProxyProcess::write_pods_file(&file, &mesh_yaml(&[&server, &steady], &[]))?;
    let back = wait_for(Duration::from_secs(30), || (connection_series(&proxy).ok()? == baseline).then_some(()));
    ensure!(back.is_some(), "series did not return to baseline {baseline}: {}", connection_series(&proxy)?);
    // The pod that stayed keeps its counters.
    let m = proxy.metrics()?;
    ensure!(m.sum("outrigger_connections_opened_total", &[("source_pod", "steady")]) == 1.0);
    Ok(())
}

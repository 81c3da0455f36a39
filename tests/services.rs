//! Services against the real kernel: a meshed pod dials a virtual IP and the
//! proxy picks an endpoint, balancing, retrying and ejecting as it goes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::Stdio,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use outrigger_e2e::{
    proxy::{mesh_yaml, ServiceDef},
    wait_for, Pod, ProxyProcess, Sandbox,
};
use serde_json::Value;

const VIP4: [u8; 4] = [10, 96, 0, 10];
const VIP6: &str = "fd96::10";
const PORT: u16 = 80;
const TARGET: u16 = 8080;

struct Mesh {
    sb: Sandbox,
    client: Pod,
    endpoints: Vec<Pod>,
    servers: Vec<Option<outrigger_e2e::sandbox::Spawned>>,
    file: std::path::PathBuf,
}

impl Mesh {
    /// A meshed client pod and three endpoint pods e1..e3, each running an
    /// echo server on 8080 that greets with its own name.
    fn new(delays_ms: [u64; 3]) -> Result<Self> {
        let mut sb = Sandbox::new()?;
        let client = sb.add_pod(0, "client")?;
        let mut endpoints = Vec::new();
        let mut servers = Vec::new();
        for (i, delay) in delays_ms.iter().enumerate() {
            let pod = sb.add_pod(0, &format!("e{}", i + 1))?;
            servers.push(Some(start_server(&sb, &pod, *delay)?));
            endpoints.push(pod);
        }
        let file = sb.dir.join("mesh.yaml");
        Ok(Self { sb, client, endpoints, servers, file })
    }

    fn write(&self, services: &[ServiceDef<'_>]) -> Result<()> {
        let mut pods = vec![&self.client];
        pods.extend(self.endpoints.iter());
        ProxyProcess::write_pods_file(&self.file, &mesh_yaml(&pods, services))
    }

    fn start_proxy(&self, extra: &[&str]) -> Result<ProxyProcess> {
        ProxyProcess::start(&self.sb, 0, self.file.clone(), extra)
    }

    fn to_vip(&self, vip: IpAddr, args: &[&str]) -> Result<Value> {
        self.sb.client(&self.client, SocketAddr::new(vip, PORT), args)
    }
}

fn start_server(sb: &Sandbox, pod: &Pod, delay_ms: u64) -> Result<outrigger_e2e::sandbox::Spawned> {
    sb.echo_server(pod, &[TARGET], &["--greet", &pod.name, "--delay-first-byte-ms", &delay_ms.to_string()])
}

fn web<'a>(weights: [u32; 3]) -> ServiceDef<'a> {
    ServiceDef {
        name: "web",
        vips: vec![IpAddr::from(VIP4), VIP6.parse().expect("v6 vip")],
        port: PORT,
        target_port: TARGET,
        endpoints: vec![("e1", weights[0]), ("e2", weights[1]), ("e3", weights[2])],
    }
}

fn vip4() -> IpAddr {
    IpAddr::from(VIP4)
}

/// Connections per endpoint, from the servers' greetings.
fn shares(summary: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for name in ["e1", "e2", "e3"] {
        out.insert(name.to_string(), summary["greetings"][name].as_u64().unwrap_or(0));
    }
    out
}

fn endpoint_status(proxy: &ProxyProcess, vip: &str, endpoint_ip: &str) -> Value {
    let dump = proxy.config_dump().unwrap_or_default();
    dump["services"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["vip"].as_str() == Some(vip)))
        .and_then(|r| r["endpoints"].as_array())
        .and_then(|eps| eps.iter().find(|e| e["address"].as_str().map(|a| a.starts_with(endpoint_ip)).unwrap_or(false)))
        .cloned()
        .unwrap_or_default()
}

/// How the tests of P2C's spread run: equal servers that answer after
/// 20 ms, and a peak-EWMA decay of 200 ms instead of 10 s.
/// P2C over peak-EWMA is load-aware on purpose, and a peak sticks for about
/// one decay. With instant servers, the few milliseconds that a busy CI
/// machine takes to schedule one server's thread is a peak many times their
/// latency, and for the default 10 s it keeps that endpoint out of most picks
/// (one CI run sent 55 % to one of three; another undid weight 2). Here a
/// stall moves an estimate by a fraction and is forgotten within the run, so
/// the spread measures the balancer, not the machine. The default decay's
/// effect is what `a_slow_endpoint_gets_a_smaller_share_under_p2c_ewma` shows.
const EQUAL_DELAYS_MS: [u64; 3] = [20, 20, 20];
const SHORT_DECAY: [&str; 2] = ["--lb-ewma-decay", "200ms"];

#[test]
fn vip_connections_spread_over_endpoints_and_follow_weights() -> Result<()> {
    let mesh = Mesh::new(EQUAL_DELAYS_MS)?;
    mesh.write(&[web([1, 1, 1])])?;
    let proxy = mesh.start_proxy(&SHORT_DECAY)?;
    let args = ["--conns", "3000", "--parallel", "30", "--bytes", "64", "--greeting"];
    let even = mesh.to_vip(vip4(), &args)?;
    ensure!(even["ok"] == 3000, "connections failed: {}", even["errors"]);
    ensure!(even["peers"][format!("{}:{PORT}", vip4())] == 3000, "getpeername is not the VIP: {}", even["peers"]);
    let s = shares(&even);
    eprintln!("weights 1:1:1 -> {s:?}");
    for (name, n) in &s {
        ensure!((750..=1260).contains(n), "{name} got {n} of 3000 (want 25%–42%): {s:?}");
    }

    mesh.write(&[web([1, 1, 2])])?;
    wait_for(Duration::from_secs(10), || {
        (endpoint_status(&proxy, &format!("{}:{PORT}", vip4()), "10.77.0.4")["weight"] == 2).then_some(())
    })
    .context("weights never applied")?;
    let weighted = mesh.to_vip(vip4(), &args)?;
    ensure!(weighted["ok"] == 3000, "{}", weighted["errors"]);
    let w = shares(&weighted);
    eprintln!("weights 1:1:2 -> {w:?}");
    let (e1, e2, e3) = (w["e1"], w["e2"], w["e3"]);
    // With exact, equal latencies P2C at 30 in flight gives weight 2 about
    // 49 % (a simulation of this test's closed loop); measured, it is 41–47 %,
    // since a peak-EWMA estimate is its endpoint's largest recent sample and
    // the busier endpoint has more samples to take a peak from.
    ensure!(e3 as f64 > 1.25 * e1.max(e2) as f64, "weight 2 did not shift the share: {w:?}");
    ensure!((1200..=1900).contains(&e3), "e3 should carry about half: {w:?}");
    Ok(())
}

#[test]
fn ipv6_vips_work_the_same() -> Result<()> {
    let mesh = Mesh::new(EQUAL_DELAYS_MS)?;
    mesh.write(&[web([1, 1, 1])])?;
    let _proxy = mesh.start_proxy(&SHORT_DECAY)?;
    let vip: IpAddr = VIP6.parse()?;
    let summary = mesh.to_vip(vip, &["--conns", "600", "--parallel", "20", "--bytes", "64", "--greeting"])?;
    ensure!(summary["ok"] == 600, "{}", summary["errors"]);
    ensure!(summary["peers"][format!("[{vip}]:{PORT}")] == 600, "getpeername: {}", summary["peers"]);
    let s = shares(&summary);
    ensure!(s.values().all(|n| (120..=260).contains(n)), "uneven over IPv6: {s:?}");
    Ok(())
}

#[test]
fn a_stopped_endpoint_is_ejected_without_failing_clients_and_returns_later() -> Result<()> {
    let mut mesh = Mesh::new([0, 0, 0])?;
    mesh.write(&[web([1, 1, 1])])?;
    let proxy = mesh.start_proxy(&[
        "--ejection-consecutive-failures",
        "3",
        "--ejection-base-time",
        "2s",
        "--lb-algorithm",
        "round-robin",
    ])?;
    let args = ["--conns", "300", "--parallel", "1", "--bytes", "64", "--greeting"];
    ensure!(mesh.to_vip(vip4(), &args)?["ok"] == 300);

    let e3 = mesh.servers[2].take().context("e3 server")?;
    mesh.sb.kill(e3.pid);
    let during = mesh.to_vip(vip4(), &args)?;
    ensure!(during["ok"] == 300, "clients failed while two endpoints lived: {}", during["errors"]);
    ensure!(during["greetings"]["e3"].is_null(), "a stopped server answered: {during}");
    let status = endpoint_status(&proxy, &format!("{}:{PORT}", vip4()), "10.77.0.4");
    ensure!(status["ejected"] == true, "e3 not ejected: {status}");
    ensure!(status["connect_failures"] == 3, "ejected after {} failures, configured 3", status["connect_failures"]);
    let m = proxy.metrics()?;
    ensure!(m.sum("outrigger_endpoint_ejections_total", &[("destination_service", "web.default")]) == 1.0);

    mesh.servers[2] = Some(start_server(&mesh.sb, &mesh.endpoints[2], 0)?);
    wait_for(Duration::from_secs(10), || {
        (endpoint_status(&proxy, &format!("{}:{PORT}", vip4()), "10.77.0.4")["ejected"] == false).then_some(())
    })
    .context("e3 never un-ejected")?;
    let after = mesh.to_vip(vip4(), &args)?;
    ensure!(after["ok"] == 300, "{}", after["errors"]);
    let back = after["greetings"]["e3"].as_u64().unwrap_or(0);
    eprintln!("after the ejection: {:?}", shares(&after));
    ensure!(back >= 30, "e3 not used again after its ejection: {after}");
    Ok(())
}

#[test]
fn a_slow_endpoint_gets_a_smaller_share_under_p2c_ewma() -> Result<()> {
    let mesh = Mesh::new([0, 0, 50])?;
    mesh.write(&[web([1, 1, 1])])?;
    let _proxy = mesh.start_proxy(&[])?;
    let summary = mesh.to_vip(vip4(), &["--conns", "600", "--parallel", "6", "--bytes", "64", "--greeting"])?;
    ensure!(summary["ok"] == 600, "{}", summary["errors"]);
    let s = shares(&summary);
    eprintln!("e3 delays its first byte by 50 ms -> {s:?}");
    ensure!(s["e3"] * 3 < s["e1"].min(s["e2"]), "the slow endpoint was not avoided: {s:?}");
    Ok(())
}

#[test]
fn a_vip_without_endpoints_is_refused_at_connect_and_counted() -> Result<()> {
    let mesh = Mesh::new([0, 0, 0])?;
    let empty = ServiceDef {
        name: "empty",
        vips: vec![IpAddr::from([10, 96, 0, 20]), "fd96::20".parse()?],
        port: PORT,
        target_port: TARGET,
        endpoints: vec![],
    };
    mesh.write(&[web([1, 1, 1]), empty])?;
    let proxy = mesh.start_proxy(&[])?;
    for vip in [IpAddr::from([10, 96, 0, 20]), "fd96::20".parse()?] {
        let summary = mesh.to_vip(vip, &["--timeout-ms", "5000"])?;
        ensure!(summary["failed"] == 1, "connect to an empty service succeeded: {summary}");
        let error = summary["errors"][0].as_str().unwrap_or("");
        ensure!(error.contains("refused"), "not refused: {error}");
        let after_us = summary["failed_after_us"][0].as_u64().unwrap_or(u64::MAX);
        ensure!(after_us < 100_000, "refusal took {after_us} µs");
    }
    let m = proxy.metrics()?;
    ensure!(m.sum("outrigger_service_refused_connections_total", &[("destination_service", "empty.default")]) == 2.0);
    ensure!(m.sum("outrigger_ebpf_events_total", &[("event", "refused_no_endpoints")]) == 2.0);
    Ok(())
}

#[test]
fn service_edits_apply_to_new_connections_and_leave_open_ones_alone() -> Result<()> {
    let mesh = Mesh::new([0, 0, 0])?;
    mesh.write(&[web([1, 0, 0]).only(&["e1"])])?;
    let proxy = mesh.start_proxy(&[])?;
    let one = ["--bytes", "64", "--greeting"];
    ensure!(mesh.to_vip(vip4(), &one)?["greetings"]["e1"] == 1);

    // A connection that stays open across the edits.
    let mut long = mesh.sb.podtool(&mesh.client);
    long.args(["client", "--connect", &SocketAddr::new(vip4(), PORT).to_string()])
        .args(["--greeting", "--hold-ms", "2500", "--bytes", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let long = long.spawn()?;
    std::thread::sleep(Duration::from_millis(300));

    mesh.write(&[web([0, 1, 0]).only(&["e2"])])?;
    let moved =
        wait_for(Duration::from_secs(10), || (mesh.to_vip(vip4(), &one).ok()?["greetings"]["e2"] == 1).then_some(()));
    ensure!(moved.is_some(), "new connections did not follow the edit to e2");

    mesh.write(&[])?;
    wait_for(Duration::from_secs(10), || proxy.config_dump().ok()?["services"].as_array()?.is_empty().then_some(()))
        .context("service never removed")?;
    // No longer a service: the VIP is just an address nobody has.
    ensure!(mesh.to_vip(vip4(), &one)?["failed"] == 1, "a removed service still answered");

    let out = long.wait_with_output()?;
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(summary["ok"] == 1 && summary["greetings"]["e1"] == 1, "the open connection was disturbed: {summary}");
    Ok(())
}

trait Only {
    fn only(self, names: &[&str]) -> Self;
}

impl Only for ServiceDef<'_> {
    /// Keeps only the named endpoints.
    fn only(mut self, names: &[&str]) -> Self {
        self.endpoints.retain(|(n, _)| names.contains(n));
        for e in &mut self.endpoints {
            e.1 = 1;
        }
        self
    }
}

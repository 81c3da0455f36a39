//! `outrigger-kubebench`: the Kubernetes source at cluster scale, for
//! `cargo xtask bench --only kubernetes` (issue #11).
//!
//! A cluster of 5 000 pods (250 on this node), 2 000 services and 20 000
//! endpoints is fed to the real proxy (`outrigger run --kubernetes`)
//! through the test double of the API server, and this prints one JSON
//! object with:
//!
//! - `watch_apply_s`: the whole cluster created while the proxy watches
//!   (every object arrives as a watch event), from the first object to the
//!   proxy's store holding all of it with the 250 local pods meshed;
//! - `cold_start_s`: a new proxy against that cluster, from start to
//!   `/ready` (initial LIST of every kind, apply, netns scan, 250 pods
//!   meshed with their listeners and certificates);
//! - `change_p50_ms`/`p99`/`max`: one EndpointSlice change (an endpoint's
//!   ready flip) from the API write to the proxy's store publishing it
//!   (`GET /store` version), over `CHANGES` changes on random services;
//! - `rss_mb`: the proxy's resident set with that state, and
//!   `state_rss_mb`: the growth over the same proxy with an empty cluster.
//!
//! Local pods are network namespaces holding their address on loopback,
//! each with a sandbox process in a kubelet-shaped cgroup; remote pods are
//! API objects only. Needs root (the proxy attaches its programs to the
//! sandbox's cgroup).
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use outrigger_e2e::{
    http,
    kubeapi::{self, EndpointDef, KubeApi, ServicePortDef},
    kubelet::{self, BareNetns, Driver},
    proxy::ca_init,
    wait_for, ProxyProcess, Sandbox,
};
use serde_json::{json, Value};

const NAMESPACES: usize = 50;
const PODS: usize = 5_000;
const LOCAL_PODS: usize = 250;
const REMOTE_NODES: usize = 19;
const SERVICES: usize = 2_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const CHANGES: usize = 300;

fn namespace(i: usize) -> String {
    format!("ns-{:02}", i % NAMESPACES)
}

/// Pod `p`: namespace `p % 50`, on this node for the first 250.
fn pod_ip(p: usize) -> IpAddr {
    let base = if p < LOCAL_PODS { 201 } else { 200 };
    IpAddr::V4(Ipv4Addr::new(10, base, (p / 250) as u8, (p % 250 + 1) as u8))
}

fn pod_node(p: usize) -> String {
    if p < LOCAL_PODS {
        "n0".into()
    } else {
        format!("n{}", 1 + p % REMOTE_NODES)
    }
}

fn pod_object(p: usize, uid: Option<&str>) -> k8s_openapi::api::core::v1::Pod {
    let ip = pod_ip(p).to_string();
    let name = format!("pod-{p}");
    let app = format!("app-{}", p % 40);
    kubeapi::pod(&namespace(p), &name, &pod_node(p), &[ip.as_str()], &[("app", app.as_str())], "default", uid)
}

fn uid(p: usize) -> String {
    format!("00000000-0000-4000-8000-{p:012}")
}

/// Service `s` in namespace `s % 50`: its endpoints are 10 pods of the
/// same namespace (namespace n holds pods n, n+50, ...: 100 of them).
fn endpoint_pods(s: usize) -> impl Iterator<Item = usize> {
    let ns = s % NAMESPACES;
    let k = s / NAMESPACES;
    (0..ENDPOINTS_PER_SERVICE).map(move |j| ns + NAMESPACES * ((k * ENDPOINTS_PER_SERVICE + j) % (PODS / NAMESPACES)))
}

fn slice(s: usize, not_ready: Option<usize>) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let endpoints: Vec<EndpointDef> = endpoint_pods(s)
        .enumerate()
        .map(|(j, p)| {
            let e = EndpointDef::ready(&pod_ip(p).to_string(), Some(&format!("pod-{p}")), Some(&pod_node(p)));
            if not_ready == Some(j) {
                e.not_ready()
            } else {
                e
            }
        })
        .collect();
    kubeapi::endpoint_slice(
        &namespace(s),
        &format!("svc-{s}-abcde"),
        &format!("svc-{s}"),
        "IPv4",
        &endpoints,
        &[("http", 8080)],
    )
}

fn service(s: usize) -> k8s_openapi::api::core::v1::Service {
    let vip = Ipv4Addr::new(10, 96, (s / 250) as u8, (s % 250 + 1) as u8).to_string();
    kubeapi::service(&namespace(s), &format!("svc-{s}"), &[vip.as_str()], &[ServicePortDef::new("http", 80, 8080)])
}

fn store(proxy: &ProxyProcess) -> Result<Value> {
    let (status, body) = http::get(proxy.admin, "/store")?;
    if status != 200 {
        bail!("/store: {status} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

fn full(v: &Value) -> bool {
    v["workloads"].as_u64() == Some(PODS as u64)
        && v["services"].as_u64() == Some(SERVICES as u64)
        && v["endpoint_slices"].as_u64() == Some(SERVICES as u64)
}

fn meshed(proxy: &ProxyProcess) -> usize {
    let m = proxy.metrics().map(|m| m.sum("outrigger_pods_meshed", &[])).unwrap_or(0.0);
    m as usize
}

/// Polls until the proxy holds the whole cluster with every local pod meshed.
fn wait_full(proxy: &ProxyProcess, timeout: Duration) -> Result<()> {
    let ok = wait_for(timeout, || (store(proxy).is_ok_and(|v| full(&v)) && meshed(proxy) == LOCAL_PODS).then_some(()));
    if ok.is_none() {
        bail!(
            "the proxy did not reach the full state: {:?}, {} meshed; log tail:\n{}",
            store(proxy).ok(),
            meshed(proxy),
            proxy.log_text().lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    if let Err(e) = run() {
        eprintln!("outrigger-kubebench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let sb = Sandbox::new()?;
    let api = KubeApi::start()?;
    let kubeconfig = sb.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let ca = sb.dir.join("ca");
    ca_init(&ca)?;
    let ca_arg = ca.display().to_string();
    let start_proxy = |kubeconfig: &Path| {
        ProxyProcess::spawn_kubernetes(&sb, 0, kubeconfig, &["--ca-dir", &ca_arg, "--reload-interval", "1s"])
    };
    for n in 0..NAMESPACES {
        api.apply(&kubeapi::namespace(&namespace(n), &[("outrigger.dev/mesh", "enabled")]))?;
    }

    // The local pods' namespaces and sandbox processes, before any object.
    let mut netns = BareNetns::new();
    for p in 0..LOCAL_PODS {
        let ns = netns.add(&sb, &format!("k{p}"), pod_ip(p))?;
        kubelet::pod_sandbox(&sb, 0, &uid(p), &ns, if p % 2 == 0 { Driver::Cgroupfs } else { Driver::Systemd })?;
    }
    eprintln!("kubebench: {LOCAL_PODS} local pod namespaces ready");

    // An empty cluster: the baseline.
    let proxy = start_proxy(&kubeconfig)?;
    proxy.wait_ready(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    let empty_rss = proxy.rss_kib();

    // The whole cluster, as watch events.
    let started = Instant::now();
    for p in 0..PODS {
        let u = uid(p);
        api.apply(&pod_object(p, Some(&u)))?;
    }
    for s in 0..SERVICES {
        api.apply(&service(s))?;
        api.apply(&slice(s, None))?;
    }
    let api_apply = started.elapsed();
    wait_full(&proxy, Duration::from_secs(300))?;
    let watch_apply = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let watched_rss = proxy.rss_kib();
    eprintln!("kubebench: cluster applied through watches in {:.2} s", watch_apply.as_secs_f64());

    // One change at a time: API write → published.
    let mut rng = fastrand::Rng::with_seed(11);
    let mut latencies = Vec::with_capacity(CHANGES);
    // Per service, which endpoint is not ready now: each change flips one,
    // so no write is a no-op.
    let mut not_ready: Vec<Option<usize>> = vec![None; SERVICES];
    for i in 0..CHANGES {
        let s = rng.usize(..SERVICES);
        not_ready[s] = match not_ready[s] {
            None => Some(rng.usize(..ENDPOINTS_PER_SERVICE)),
            Some(_) => None,
        };
        let before = store(&proxy)?["version"].as_u64().context("version")?;
        let t = Instant::now();
        api.apply(&slice(s, not_ready[s]))?;
        // Polled tightly (not with wait_for's 25 ms step): the figure is
        // sub-millisecond.
        let mut seen = None;
        while t.elapsed() < Duration::from_secs(10) {
            if store(&proxy)?["version"].as_u64().is_some_and(|v| v > before) {
                seen = Some(t.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let Some(elapsed) = seen else {
            bail!(
                "change {i} (service {s}) was never published: store {:?}, open watches {}, slice watches {}; log tail:\n{}",
                store(&proxy).ok(),
                api.open_watches(),
                api.watches(outrigger_e2e::kubeapi::Kind::EndpointSlice),
                proxy.log_text().lines().rev().take(10).collect::<Vec<_>>().join("\n")
            );
        };
        latencies.push(elapsed.as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    drop(proxy);

    // A new proxy against the full cluster: LIST, apply, mesh.
    let started = Instant::now();
    let proxy = start_proxy(&kubeconfig)?;
    proxy.wait_ready(Duration::from_secs(300))?;
    let cold_ready = started.elapsed();
    wait_full(&proxy, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    let cold_rss = proxy.rss_kib();

    let out = json!({
        "pods": PODS, "local_pods": LOCAL_PODS, "services": SERVICES, "endpoints": SERVICES * ENDPOINTS_PER_SERVICE,
        "api_apply_s": api_apply.as_secs_f64(),
        "watch_apply_s": watch_apply.as_secs_f64(),
        "cold_start_s": cold_ready.as_secs_f64(),
        "change_p50_ms": percentile(&latencies, 0.5),
        "change_p99_ms": percentile(&latencies, 0.99),
        "change_max_ms": latencies.last().copied().unwrap_or(f64::NAN),
        "empty_rss_mb": mb(empty_rss),
        "rss_mb": mb(cold_rss),
        "watched_rss_mb": mb(watched_rss),
        "state_rss_mb": mb(cold_rss.saturating_sub(empty_rss)),
        "lists": api.lists(outrigger_e2e::kubeapi::Kind::Pod),
    });
    println!("{out}");
    drop(proxy);
    drop(netns);
    Ok(())
}

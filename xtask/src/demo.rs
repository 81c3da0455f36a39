//! `cargo xtask demo`: a small simulated node in network namespaces — two
//! meshed pods and one that is not — with the real proxy capturing the
//! meshed pods' connections. Prints what happened, then tears it all down.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use outrigger_e2e::{proxy::pods_yaml, wait_for, Pod, ProxyProcess, Sandbox};
use serde_json::Value;

pub fn run() -> Result<()> {
    crate::build::all()?;
    crate::build::export_binaries();
    let mut sb = Sandbox::new()?;
    let a = sb.add_pod(0, "frontend")?;
    let b = sb.add_pod(0, "backend")?;
    let c = sb.add_pod(0, "legacy")?;
    println!("\n== simulated node {}:", sb.node_netns(0));
    for (pod, meshed) in [(&a, true), (&b, true), (&c, false)] {
        println!(
            "   pod {:<9} {:<11} {:<16} {}",
            pod.name,
            if meshed { "meshed" } else { "not meshed" },
            pod.ip4,
            pod.ip6
        );
    }
    let pods_file = sb.dir.join("pods.yaml");
    std::fs::write(&pods_file, pods_yaml(&[&a, &b]))?;
    sb.echo_server(&b, &[8080], &[])?;
    let proxy = ProxyProcess::start(&sb, 0, pods_file, &["--log-format", "json"])?;
    println!("== outrigger running (admin {}), programs attached to {}\n", proxy.admin, sb.node_cgroup(0).display());

    let target4 = SocketAddr::new(b.ip4.into(), 8080);
    let target6 = SocketAddr::new(b.ip6.into(), 8080);
    drive(&sb, &a, target4, "1048576", "frontend -> backend over IPv4, 1 MiB echoed")?;
    drive(&sb, &a, target6, "1048576", "frontend -> backend over IPv6, 1 MiB echoed")?;
    drive(&sb, &c, target4, "65536", "legacy (not meshed) -> backend, 64 KiB echoed")?;

    wait_for(Duration::from_secs(5), || {
        let m = proxy.metrics().ok()?;
        (m.sum("outrigger_connections_closed_total", &[]) >= 2.0).then_some(())
    })
    .context("the proxy did not report its connections")?;

    println!("\n== captured connections (the proxy's access log):");
    for line in proxy.log_text().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        if v["target"] == "outrigger::access" {
            println!(
                "   pod {:<18} original destination {:<22} sent {:>8} B  received {:>8} B  {:.2} ms  {}",
                v["pod"].as_str().unwrap_or("?"),
                v["dst"].as_str().unwrap_or("?"),
                v["sent_bytes"],
                v["received_bytes"],
                v["duration_ms"].as_f64().unwrap_or(0.0),
                v["result"].as_str().unwrap_or("?"),
            );
        }
    }
    let m = proxy.metrics()?;
    println!("\n== kernel counters:");
    for event in ["captured", "bypass_unmeshed", "bypass_proxy", "rekeyed", "peername_rewritten", "closed"] {
        println!("   {event:<20} {}", m.sum("outrigger_ebpf_events_total", &[("event", event)]));
    }
    let maps = proxy.config_dump()?["maps"].clone();
    println!("   original-destination entries left: {} (by cookie: {})", maps["orig_dst"], maps["orig_dst_by_cookie"]);
    ensure!(m.sum("outrigger_connections_opened_total", &[("source_pod", "frontend")]) == 2.0);
    ensure!(m.sum("outrigger_connections_opened_total", &[("source_pod", "legacy")]) == 0.0);
    println!("\n== tearing down (namespaces, cgroup, proxy)");
    drop(proxy);
    drop(sb);
    println!("== done");
    Ok(())
}

fn drive(sb: &Sandbox, from: &Pod, target: SocketAddr, bytes: &str, what: &str) -> Result<()> {
    let mut cmd = sb.podtool(from);
    cmd.args(["client", "--connect", &target.to_string(), "--bytes", bytes]);
    let out = sb.run(cmd)?;
    let summary: Value = serde_json::from_slice(&out.stdout).context("client output")?;
    ensure!(summary["ok"] == 1, "{what}: {summary}");
    let peer = summary["peers"].as_object().and_then(|p| p.keys().next().cloned()).unwrap_or_default();
    println!("   {what}: ok; the client's getpeername says {peer}");
    Ok(())
}

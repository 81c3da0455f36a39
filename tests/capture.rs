//! The data path against the real kernel: a meshed pod's ordinary connect()
//! lands in the node proxy, which forwards it to where the pod meant to go.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use outrigger_e2e::{proxy::pods_yaml, wait_for, Pod, ProxyProcess, Sandbox};
use serde_json::Value;

const MIB: usize = 1024 * 1024;

fn ok_count(summary: &Value) -> u64 {
    summary["ok"].as_u64().unwrap_or(0)
}

fn opened(proxy: &ProxyProcess, pod: &str) -> f64 {
    proxy.metrics().map(|m| m.sum("outrigger_connections_opened_total", &[("source_pod", pod)])).unwrap_or(f64::NAN)
}

fn setup(pods: &[&str], meshed: &[&str]) -> Result<(Sandbox, Vec<Pod>, std::path::PathBuf)> {
    let mut sb = Sandbox::new()?;
    let mut all = Vec::new();
    for name in pods {
        all.push(sb.add_pod(0, name)?);
    }
    let meshed: Vec<&Pod> = all.iter().filter(|p| meshed.contains(&p.name.as_str())).collect();
    let pods_file = sb.dir.join("pods.yaml");
    std::fs::write(&pods_file, pods_yaml(&meshed))?;
    Ok((sb, all, pods_file))
}

fn pod_to_pod(v6: bool) -> Result<()> {
    let (sb, pods, pods_file) = setup(&["a", "b"], &["a", "b"])?;
    let (a, b) = (&pods[0], &pods[1]);
    let server = sb.echo_server(b, &[8080], &[])?;
    let proxy = ProxyProcess::start(&sb, 0, pods_file, &[])?;
    let target = SocketAddr::new(b.ip(v6), 8080);

    let summary = sb.client(a, target, &["--bytes", &(16 * MIB).to_string()])?;
    ensure!(ok_count(&summary) == 1, "16 MiB echo through the proxy failed: {summary}");
    // getpeername in the client answers with what it dialled, not 127.0.0.1:15001.
    ensure!(summary["peers"][target.to_string()] == 1, "client's getpeername: {}", summary["peers"]);

    // The server saw the pod's own address: the upstream socket was made in A's netns.
    let accepted = server.stdout();
    let expected_peer = if v6 { format!("\"peer\":\"[{}]:", a.ip6) } else { format!("\"peer\":\"{}:", a.ip4) };
    ensure!(accepted.contains(&expected_peer), "server did not see pod a's address {expected_peer}: {accepted}");

    // The proxy and the kernel agree that it went through the proxy, once.
    let m = wait_for(Duration::from_secs(5), || {
        let m = proxy.metrics().ok()?;
        (m.sum("outrigger_connections_closed_total", &[("source_pod", "a")]) == 1.0).then_some(m)
    })
    .context("the proxy never reported the connection closed")?;
    ensure!(m.sum("outrigger_connections_opened_total", &[("source_pod", "a")]) == 1.0);
    ensure!(m.sum("outrigger_sent_bytes_total", &[("source_pod", "a")]) == (16 * MIB) as f64, "sent bytes");
    ensure!(m.sum("outrigger_received_bytes_total", &[("source_pod", "a")]) == (16 * MIB) as f64, "received bytes");
    let event = |e: &str| m.sum("outrigger_ebpf_events_total", &[("event", e)]);
    ensure!(event("captured") == 1.0, "kernel captured {} connects, expected 1", event("captured"));
    ensure!(event("rekeyed") == 1.0, "kernel re-keyed {}", event("rekeyed"));
    // The proxy's own upstream connect met the programs and was left alone.
    ensure!(event("bypass_proxy") == 1.0, "loop guard saw {} proxy connects", event("bypass_proxy"));
    ensure!(event("peername_rewritten") >= 1.0);
    Ok(())
}

#[test]
fn pod_to_pod_ipv4_goes_through_the_proxy_intact_with_half_close() -> Result<()> {
    pod_to_pod(false)
}

#[test]
fn pod_to_pod_ipv6_goes_through_the_proxy_intact_with_half_close() -> Result<()> {
    pod_to_pod(true)
}

#[test]
fn unmeshed_pod_is_not_captured() -> Result<()> {
    let (sb, pods, pods_file) = setup(&["a", "b", "c"], &["a", "b"])?;
    let (b, c) = (&pods[1], &pods[2]);
    let server = sb.echo_server(b, &[8080], &[])?;
    let proxy = ProxyProcess::start(&sb, 0, pods_file, &[])?;
    let before = proxy.kernel_events("bypass_unmeshed");
    let summary = sb.client(c, SocketAddr::new(b.ip4.into(), 8080), &["--bytes", "100000"])?;
    ensure!(ok_count(&summary) == 1, "{summary}");
    ensure!(proxy.kernel_events("captured") == 0.0, "an unmeshed pod's connect was captured");
    ensure!(proxy.kernel_events("bypass_unmeshed") > before);
    ensure!(opened(&proxy, "c") == 0.0);
    ensure!(server.stdout().contains(&c.ip4.to_string()), "server did not see c directly");
    Ok(())
}

#[test]
fn two_pods_using_the_same_client_port_at_once_are_told_apart() -> Result<()> {
    let (sb, pods, pods_file) = setup(&["a", "b", "c"], &["a", "b", "c"])?;
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    sb.echo_server(b, &[8080], &["--greet", "port-8080"])?;
    sb.echo_server(b, &[8081], &["--greet", "port-8081"])?;
    let proxy = ProxyProcess::start(&sb, 0, pods_file, &[])?;
    // Same source port, same loopback listener: the 4-tuples inside the two
    // pods are identical; only the netns tells them apart. Different
    // destinations make a mix-up visible in the greetings.
    let spawn = |pod: &Pod, port: u16| {
        let mut cmd = sb.podtool(pod);
        cmd.args(["client", "--connect", &SocketAddr::new(b.ip4.into(), port).to_string()])
            .args(["--bind-port", "40000", "--hold-ms", "1000", "--greeting", "--bytes", "1048576"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn()
    };
    let from_a = spawn(a, 8080)?;
    let from_c = spawn(c, 8081)?;
    let (out_a, out_c) = (from_a.wait_with_output()?, from_c.wait_with_output()?);
    let (sum_a, sum_c): (Value, Value) =
        (serde_json::from_slice(&out_a.stdout)?, serde_json::from_slice(&out_c.stdout)?);
    ensure!(ok_count(&sum_a) == 1 && ok_count(&sum_c) == 1, "a: {sum_a} c: {sum_c}");
    ensure!(sum_a["locals"][0].as_str().unwrap_or("").ends_with(":40000"), "a did not use port 40000: {sum_a}");
    ensure!(sum_c["locals"][0].as_str().unwrap_or("").ends_with(":40000"), "c did not use port 40000: {sum_c}");
    ensure!(sum_a["greetings"]["port-8080"] == 1, "a reached the wrong destination: {sum_a}");
    ensure!(sum_c["greetings"]["port-8081"] == 1, "c reached the wrong destination: {sum_c}");
    ensure!(opened(&proxy, "a") == 1.0 && opened(&proxy, "c") == 1.0);
    Ok(())
}

#[test]
fn five_hundred_concurrent_connections_complete_and_the_maps_drain() -> Result<()> {
    let (sb, pods, pods_file) = setup(&["a", "b"], &["a", "b"])?;
    let (a, b) = (&pods[0], &pods[1]);
    sb.echo_server(b, &[8080], &[])?;
    let proxy = ProxyProcess::start(&sb, 0, pods_file, &[])?;
    let summary = sb.client(
        a,
        SocketAddr::new(b.ip4.into(), 8080),
        &["--conns", "500", "--parallel", "500", "--hold-ms", "500", "--bytes", "65536"],
    )?;
    if ok_count(&summary) != 500 {
        let m = proxy.metrics()?;
        let log = proxy.log_text();
        let problems: Vec<&str> =
            log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("failed")).collect();
        anyhow::bail!(
            "not all 500 connections completed: {}; lookup misses {}, failures {}; proxy log:\n{}",
            summary["errors"],
            m.sum("outrigger_orig_dst_lookup_misses_total", &[]),
            m.sum("outrigger_connections_failed_total", &[]),
            problems.join("\n")
        );
    }
    ensure!(opened(&proxy, "a") == 500.0);
    let drained = wait_for(Duration::from_secs(10), || {
        let maps = proxy.config_dump().ok()?["maps"].clone();
        (maps["orig_dst"] == 0 && maps["orig_dst_by_cookie"] == 0).then_some(())
    });
    ensure!(drained.is_some(), "original-destination maps not empty: {}", proxy.config_dump()?["maps"]);
    ensure!(proxy.kernel_events("closed") == 500.0, "closed events: {}", proxy.kernel_events("closed"));
    Ok(())
}

fn meshed_pods(proxy: &ProxyProcess) -> Vec<String> {
    proxy
        .config_dump()
        .ok()
        .and_then(|d| {
            d["node"]["pods"].as_array().map(|pods| {
                pods.iter()
                    .filter(|p| p["error"].is_null())
                    .filter_map(|p| p["key"]["name"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[test]
fn pods_file_changes_apply_at_run_time_and_bad_files_change_nothing() -> Result<()> {
    let (sb, pods, pods_file) = setup(&["a", "b", "c"], &["a", "b"])?;
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    sb.echo_server(b, &[8080], &[])?;
    let proxy = ProxyProcess::start(&sb, 0, pods_file.clone(), &[])?;
    let target = SocketAddr::new(b.ip4.into(), 8080);
    let one = ["--bytes", "10000"];

    ensure!(ok_count(&sb.client(c, target, &one)?) == 1);
    ensure!(opened(&proxy, "c") == 0.0, "c captured before it was added");

    // Add c: capture starts.
    ProxyProcess::write_pods_file(&pods_file, &pods_yaml(&[a, b, c]))?;
    wait_for(Duration::from_secs(10), || meshed_pods(&proxy).contains(&"c".to_string()).then_some(()))
        .context("c never became meshed")?;
    ensure!(ok_count(&sb.client(c, target, &one)?) == 1);
    ensure!(opened(&proxy, "c") == 1.0, "c not captured after it was added");

    // Remove c: capture stops.
    ProxyProcess::write_pods_file(&pods_file, &pods_yaml(&[a, b]))?;
    wait_for(Duration::from_secs(10), || (!meshed_pods(&proxy).contains(&"c".to_string())).then_some(()))
        .context("c never left")?;
    ensure!(ok_count(&sb.client(c, target, &one)?) == 1);
    ensure!(opened(&proxy, "c") == 1.0, "c still captured after it was removed");

    // Malformed YAML and a semantically bad file: reported, nothing changes.
    for (bad, expect) in [
        ("pods:\n  - name: a\n    netns: [unclosed\n", "not valid mesh YAML"),
        (
            &*format!("{}  - name: dup\n    netns: /var/run/netns/x\n    ips: [\"{}\"]\n", pods_yaml(&[a, b]), a.ip4),
            "both claim",
        ),
    ] {
        ProxyProcess::write_pods_file(&pods_file, bad)?;
        let reported = wait_for(Duration::from_secs(10), || {
            let err = proxy.config_dump().ok()?["node"]["last_reload_error"].as_str()?.to_string();
            err.contains(expect).then_some(err)
        })
        .with_context(|| format!("bad file never reported (expected {expect:?})"))?;
        ensure!(reported.contains(&pods_file.display().to_string()), "error does not name the file: {reported}");
        ensure!(proxy.log_text().contains(expect), "bad file not logged");
        let mut names = meshed_pods(&proxy);
        names.sort();
        ensure!(names == ["a", "b"], "meshed pods changed after a bad file: {names:?}");
        let before = opened(&proxy, "a");
        ensure!(ok_count(&sb.client(a, target, &one)?) == 1);
        ensure!(opened(&proxy, "a") == before + 1.0, "a no longer captured after a bad file");
    }
    let m = proxy.metrics()?;
    ensure!(m.sum("outrigger_config_reloads_total", &[("result", "rejected")]) >= 2.0);
    Ok(())
}

#[test]
fn sigkill_fails_open_and_a_restarted_proxy_captures_again() -> Result<()> {
    let (sb, pods, pods_file) = setup(&["a", "b"], &["a", "b"])?;
    let (a, b) = (&pods[0], &pods[1]);
    let server = sb.echo_server(b, &[8080], &[])?;
    let target = SocketAddr::new(b.ip4.into(), 8080);
    let mut proxy = ProxyProcess::start(&sb, 0, pods_file.clone(), &[])?;
    ensure!(
        sb.attached_programs(0)? == 7,
        "expected 7 programs attached (connect, getpeername and getsockname, v4 and v6, and sockops)"
    );
    ensure!(ok_count(&sb.client(a, target, &["--bytes", "1000"])?) == 1);
    ensure!(opened(&proxy, "a") == 1.0);

    proxy.signal(Signal::SIGKILL)?;
    proxy.wait_exit(Duration::from_secs(5)).context("proxy survived SIGKILL")?;
    let detached = wait_for(Duration::from_secs(5), || (sb.attached_programs(0).ok()? == 0).then_some(()));
    ensure!(detached.is_some(), "programs still attached after the proxy died");
    // Fail open: the pod's connection now goes direct and works.
    let peers_before = server.stdout().matches(&a.ip4.to_string()).count();
    ensure!(ok_count(&sb.client(a, target, &["--bytes", "1000"])?) == 1, "direct connection failed after SIGKILL");
    ensure!(server.stdout().matches(&a.ip4.to_string()).count() == peers_before + 1);

    let restarted = ProxyProcess::start(&sb, 0, pods_file, &[])?;
    ensure!(ok_count(&sb.client(a, target, &["--bytes", "1000"])?) == 1);
    ensure!(opened(&restarted, "a") == 1.0, "restarted proxy did not capture");
    Ok(())
}

#[test]
fn sigterm_drains_open_connections_and_exits_cleanly() -> Result<()> {
    let (sb, pods, pods_file) = setup(&["a", "b"], &["a", "b"])?;
    let (a, b) = (&pods[0], &pods[1]);
    sb.echo_server(b, &[8080], &[])?;
    let target = SocketAddr::new(b.ip4.into(), 8080);
    let mut proxy = ProxyProcess::start(&sb, 0, pods_file, &[])?;
    let mut long = sb.podtool(a);
    long.args(["client", "--connect", &target.to_string(), "--hold-ms", "1500", "--bytes", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let long = long.spawn()?;
    wait_for(Duration::from_secs(5), || {
        let m = proxy.metrics().ok()?;
        (m.sum("outrigger_connections_open", &[("source_pod", "a")]) == 1.0).then_some(())
    })
    .context("long connection never opened")?;
    proxy.signal(Signal::SIGTERM)?;
    // While draining, new connects go direct and still work.
    std::thread::sleep(Duration::from_millis(300));
    ensure!(ok_count(&sb.client(a, target, &["--bytes", "1000"])?) == 1, "connect during drain failed");
    let out = long.wait_with_output()?;
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(ok_count(&summary) == 1, "open connection broken by shutdown: {summary}");
    let status = proxy.wait_exit(Duration::from_secs(10)).context("proxy did not exit after draining")?;
    ensure!(status.success(), "proxy exited with {status}; log:\n{}", proxy.log_text());
    ensure!(sb.attached_programs(0)? == 0);
    ensure!(proxy.log_text().contains("all connections finished"));
    Ok(())
}

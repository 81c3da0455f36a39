//! Faults against the real kernel (issue 9): a stalled or dead peer, a
//! proxy that is stopped or killed mid-transfer, a pod netns recreated
//! under the proxy, and a mesh file rewritten hundreds of times a second.
//! A failure must be bounded in time and must never look like success.
//! Figures are printed (`--nocapture`); deadlines are asserted with
//! generous slack. Hostile input is in `hardening.rs`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use outrigger_e2e::{
    http,
    mesh::Mesh,
    proxy::{node_pods_yaml, spiffe_id},
    sandbox::Spawned,
    wait_for, Pod, ProxyProcess,
};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;

fn app(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip4.into(), port)
}

/// A proxy stopped with SIGSTOP until this is dropped (then SIGCONT), so a
/// failing test never leaves it stopped.
struct Stopped<'a>(&'a ProxyProcess);

impl<'a> Stopped<'a> {
    fn new(proxy: &'a ProxyProcess) -> Result<Self> {
        proxy.signal(Signal::SIGSTOP)?;
        let stopped = Self(proxy);
        // The signal is delivered asynchronously: wait until every thread
        // is stopped (state T), or a connection made at once still gets in.
        let all_stopped = || {
            let tasks = std::fs::read_dir(format!("/proc/{}/task", proxy.pid())).ok()?;
            let states: Vec<String> =
                tasks.flatten().filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok()).collect();
            // The state follows the command name in parentheses.
            let stopped = |stat: &String| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'));
            (!states.is_empty() && states.iter().all(stopped)).then_some(())
        };
        wait_for(Duration::from_secs(5), all_stopped).context("the proxy did not stop")?;
        Ok(stopped)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let _ = self.0.signal(Signal::SIGCONT);
    }
}

fn pool(proxy: &ProxyProcess) -> Result<Value> {
    Ok(proxy.config_dump()?["mtls"]["pool"].clone())
}

/// Pod a on node 0, pod b on node 1 with an echo server on port 8080.
fn a_and_b() -> Result<Mesh> {
    let mesh = Mesh::new(&[&["a"], &["b"]], &[])?;
    mesh.sb.echo_server(mesh.pod("b"), &[8080], &[])?;
    Ok(mesh)
}

/// The longest a failed podtool connection took to fail.
fn slowest_failure(summary: &Value) -> Duration {
    let max = summary["failed_after_us"].as_array().into_iter().flatten().filter_map(Value::as_u64).max();
    Duration::from_micros(max.unwrap_or(u64::MAX))
}

// ------------------------------------------------------------ item 7

#[test]
fn a_stalled_peer_fails_new_streams_within_the_connect_deadline_and_its_tunnel_is_closed() -> Result<()> {
    let mesh = a_and_b()?;
    let (a, b) = (mesh.pod("a"), mesh.pod("b"));
    let deadline = Duration::from_secs(2);
    // One connection thread: tunnel pools are per thread, and the second
    // connection must find the first one's pooled tunnel.
    let n0 =
        mesh.start(0, &["--connect-timeout", "2s", "--tunnel-keepalive-interval", "3s", "--connection-threads", "1"])?;
    let n1 = mesh.start(1, &[])?;
    ensure!(mesh.sb.client(a, app(b, 8080), &[])?["ok"] == 1, "a -> b failed before the fault");
    let before = pool(&n0)?;
    ensure!(before["connections"] == 1, "no pooled tunnel: {before}");

    let stopped = Stopped::new(&n1)?;
    let since_stop = Instant::now();
    let mark = n0.log_mark();
    let over_pooled = mesh.sb.client(a, app(b, 8080), &["--timeout-ms", "30000"])?;
    let failed_after = slowest_failure(&over_pooled);
    let after = pool(&n0)?;
    eprintln!(
        "[7] peer proxy stopped; a new connection over the pooled tunnel failed after {failed_after:?}: {}",
        over_pooled["errors"]
    );
    eprintln!("[7] pool before {before}, after {after}");
    ensure!(over_pooled["failed"] == 1, "{over_pooled}");
    ensure!(failed_after < 3 * deadline, "failed after {failed_after:?} (deadline {deadline:?})");
    ensure!(after["dialled_total"] == before["dialled_total"], "the stream did not use the pooled tunnel");
    let logged = n0.log_since(mark);
    ensure!(logged.contains("flags=\"UT\""), "not logged as a connect timeout:\n{logged}");

    // HTTP/2 PINGs find the silent peer and close the pooled connection.
    let closed = wait_for(Duration::from_secs(20), || n0.log_text().contains("tunnel peer unresponsive").then_some(()));
    let closed_after = since_stop.elapsed();
    eprintln!(
        "[7] --tunnel-keepalive-interval 3s: the pooled connection was closed {closed_after:?} after the peer stopped"
    );
    ensure!(closed.is_some(), "the pooled connection to a stopped peer was never closed");
    drop(stopped);
    let again =
        wait_for(Duration::from_secs(10), || (mesh.sb.client(a, app(b, 8080), &[]).ok()?["ok"] == 1).then_some(()));
    ensure!(again.is_some(), "a -> b did not recover after SIGCONT");
    Ok(())
}

// ------------------------------------------------------------ item 8

#[test]
fn twenty_connections_to_a_dead_peer_fail_after_one_connect_timeout_and_one_dial() -> Result<()> {
    let mesh = a_and_b()?;
    let (a, b) = (mesh.pod("a"), mesh.pod("b"));
    let deadline = Duration::from_secs(2);
    // One connection thread: pools are per thread, and this is about one
    // pool's single flight.
    let n0 = mesh.start(0, &["--connect-timeout", "2s", "--connection-threads", "1"])?;
    let n1 = mesh.start(1, &[])?;
    // The peer's kernel still completes TCP handshakes for its stopped
    // proxy: only the TLS handshake hangs.
    let _stopped = Stopped::new(&n1)?;
    let args = ["--conns", "20", "--parallel", "20", "--timeout-ms", "60000"];
    let summary = mesh.sb.client(a, app(b, 8080), &args)?;
    let slowest = slowest_failure(&summary);
    let dialled = pool(&n0)?["dialled_total"].clone();
    let queued = std::process::Command::new("ip")
        .args(["netns", "exec", &b.netns, "ss", "-Htn", "state", "all", "( sport = :15008 )"])
        .output()?;
    let tcp = String::from_utf8_lossy(&queued.stdout).lines().filter(|l| l.contains(&a.ip4.to_string())).count();
    eprintln!(
        "[8] 20 concurrent connections to a stopped peer: {} failed, the slowest after {slowest:?}; dials {dialled}, TCP connections at the peer {tcp}",
        summary["failed"]
    );
    ensure!(summary["failed"] == 20, "{summary}");
    ensure!(slowest < 3 * deadline, "the slowest waited {slowest:?}: dials ran one after another");
    ensure!(dialled == 1, "the pool dialled {dialled} times for one peer");
    Ok(())
}

// ------------------------------------------------------------ items 9, 10

/// `outrigger-hostile source` in `pod` on `port`: sends `bytes` to each
/// client at 20 MiB/s.
fn source(mesh: &Mesh, pod: &Pod, port: u16, bytes: u64) -> Result<Spawned> {
    let mut cmd = mesh.sb.hostile(pod);
    cmd.args(["source", "--listen", &app(pod, port).to_string(), "--bytes", &bytes.to_string(), "--rate-mbps", "20"]);
    let server = mesh.sb.spawn("source", cmd)?;
    server.event("listening", Duration::from_secs(10))?;
    Ok(server)
}

fn hostile_running(mesh: &Mesh, pod: &Pod, name: &str, args: &[&str]) -> Result<Spawned> {
    let mut cmd = mesh.sb.hostile(pod);
    cmd.args(args);
    let spawned = mesh.sb.spawn(name, cmd)?;
    spawned.event("connected", Duration::from_secs(10))?;
    Ok(spawned)
}

#[test]
fn connections_cut_at_the_drain_deadline_see_a_reset_and_are_logged() -> Result<()> {
    let mesh = Mesh::new(&[&["a", "b"]], &[])?;
    let (a, b) = (mesh.pod("a"), mesh.pod("b"));
    source(&mesh, b, 9000, 100 * MIB)?;
    let mut proxy = mesh.start(0, &["--drain-timeout", "2s"])?;
    let target = app(b, 9000).to_string();
    let downloads = [
        hostile_running(&mesh, a, "download", &["download", "--connect", &target])?,
        hostile_running(&mesh, a, "download", &["download", "--connect", &target])?,
    ];
    let open = wait_for(Duration::from_secs(5), || {
        let m = proxy.metrics().ok()?;
        (m.sum("outrigger_connections_open", &[("source_pod", "a")]) == 2.0).then_some(())
    });
    ensure!(open.is_some(), "the two downloads were not proxied");
    let signalled = Instant::now();
    proxy.signal(Signal::SIGTERM)?;
    for download in &downloads {
        let end = download.event("received", Duration::from_secs(30))?;
        eprintln!(
            "[9] SIGTERM, --drain-timeout 2s, 100 MiB download: {:.1} MiB received, end: {} ({:?} after SIGTERM)",
            end["received"].as_f64().unwrap_or(0.0) / MIB as f64,
            end["end"],
            signalled.elapsed()
        );
        ensure!(end["end"] == "reset", "a cut download ended with {end}, not a reset");
        ensure!(end["received"].as_u64().unwrap_or(0) < 100 * MIB, "the download was not cut: {end}");
    }
    let status = proxy.wait_exit(Duration::from_secs(20)).context("the proxy did not exit")?;
    eprintln!("[9] the proxy exited {status} {:?} after SIGTERM", signalled.elapsed());
    ensure!(status.success(), "{status}");
    let cut: Vec<String> = proxy.log_text().lines().filter(|l| l.contains("flags=\"DC\"")).map(String::from).collect();
    eprintln!("[9] access log:\n{}", cut.join("\n"));
    ensure!(cut.len() == 2 && cut.iter().all(|l| l.contains("result=\"drain_cut\"")), "{} DC lines", cut.len());
    Ok(())
}

#[test]
fn a_proxy_killed_mid_transfer_leaves_resets_never_a_clean_short_end() -> Result<()> {
    let mesh = Mesh::new(&[&["a", "c"], &["b"]], &[])?;
    let (a, b, c) = (mesh.pod("a"), mesh.pod("b"), mesh.pod("c"));
    let n0 = mesh.start(0, &[])?;
    let n1 = mesh.start(1, &[])?;

    // Tunnelled: a uploads to b's application; b's node proxy dies.
    let mut sink = mesh.sb.hostile(b);
    sink.args(["sink", "--listen", &app(b, 9001).to_string()]);
    let sink = mesh.sb.spawn("sink", sink)?;
    sink.event("listening", Duration::from_secs(10))?;
    let upload =
        ["upload", "--connect", &app(b, 9001).to_string(), "--bytes", &(100 * MIB).to_string(), "--rate-mbps", "20"];
    let upload = hostile_running(&mesh, a, "upload", &upload)?;
    std::thread::sleep(Duration::from_secs(1));
    n1.signal(Signal::SIGKILL)?;
    let received = sink.event("received", Duration::from_secs(30))?;
    let sent = upload.event("sent", Duration::from_secs(30))?;
    eprintln!("[10] tunnelled upload, destination proxy SIGKILLed: the app saw {received}; the client saw {sent}");
    ensure!(received["end"] == "reset", "the application saw {received}, not a reset");
    ensure!(sent["end"] == "reset" || sent["server_end"] == "reset", "the client saw {sent}, not a reset");

    // Same node: a downloads from c; the node's proxy dies.
    source(&mesh, c, 9000, 100 * MIB)?;
    let download = hostile_running(&mesh, a, "download", &["download", "--connect", &app(c, 9000).to_string()])?;
    std::thread::sleep(Duration::from_secs(1));
    n0.signal(Signal::SIGKILL)?;
    let end = download.event("received", Duration::from_secs(30))?;
    eprintln!("[10] same-node download, proxy SIGKILLed: the client saw {end}");
    ensure!(end["end"] == "reset", "the client saw {end}, not a reset");
    ensure!(end["received"].as_u64().unwrap_or(0) < 100 * MIB, "{end}");
    Ok(())
}

// ------------------------------------------------------------ item 11

fn pod_status(proxy: &ProxyProcess, name: &str) -> Option<Value> {
    let dump = proxy.config_dump().ok()?;
    dump["node"]["pods"].as_array()?.iter().find(|p| p["key"]["name"] == name).cloned()
}

#[test]
fn a_recreated_pod_netns_is_re_meshed_and_its_traffic_is_tunnelled_again() -> Result<()> {
    let mesh = a_and_b()?;
    let (a, b) = (mesh.pod("a"), mesh.pod("b"));
    let n0 = mesh.start(0, &[])?;
    let n1 = mesh.start(1, &[])?;
    ensure!(mesh.sb.client(a, app(b, 8080), &[])?["ok"] == 1);
    let cookie = pod_status(&n0, "a").context("pod a missing")?["netns_cookie"].clone();

    let old_netns = format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&a.netns_path)?));
    // Whether the proxy holds the pod's first netns: a thread in it or a
    // descriptor of it.
    let holds_old = || {
        let links = |dir: String| -> Vec<String> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.display().to_string())
                .collect()
        };
        let pid = n0.pid();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
        let mut all: Vec<String> = tasks.flat_map(|t| links(format!("{}/ns", t.path().display()))).collect();
        all.extend(links(format!("/proc/{pid}/fd")));
        all.contains(&old_netns)
    };
    ensure!(holds_old(), "the proxy does not hold the pod's netns {old_netns}: the check below means nothing");

    // The pod sandbox goes away: /ready says which pod and why.
    let removed = Instant::now();
    mesh.sb.remove_pod_netns(a)?;
    let why = wait_for(Duration::from_secs(10), || match http::get(n0.admin, "/ready") {
        Ok((503, body)) if body.contains("default/a") => Some(body),
        _ => None,
    })
    .context("/ready stayed 200 with pod a's netns gone")?;
    eprintln!("[11] netns deleted: /ready 503 after {:?}: {}", removed.elapsed(), why.trim());

    // Recreated at the same path with the same address: re-meshed.
    mesh.sb.recreate_pod_netns(a)?;
    let recreated = Instant::now();
    let remeshed = wait_for(Duration::from_secs(10), || {
        let status = pod_status(&n0, "a")?;
        (status["error"].is_null() && !status["netns_cookie"].is_null() && status["netns_cookie"] != cookie)
            .then_some(status["netns_cookie"].clone())
    })
    .context("the recreated netns was never meshed")?;
    eprintln!(
        "[11] recreated: re-meshed {:?} later (reload interval 100ms), netns cookie {cookie} -> {remeshed}",
        recreated.elapsed()
    );
    n0.wait_ready(Duration::from_secs(10))?;
    // ... and lets it go once the pod is re-meshed.
    let released = wait_for(Duration::from_secs(10), || (!holds_old()).then_some(()));
    eprintln!("[11] the old netns ({old_netns}) released by the proxy: {}", released.is_some());
    ensure!(released.is_some(), "the proxy still holds the deleted netns {old_netns}");

    let captured = n0.kernel_events("captured");
    let mark = n1.log_mark();
    ensure!(mesh.sb.client(a, app(b, 8080), &[])?["ok"] == 1, "the recreated pod cannot reach b");
    ensure!(n0.kernel_events("captured") == captured + 1.0, "the recreated pod's connect was not captured");
    let tunnelled = wait_for(Duration::from_secs(5), || {
        n1.log_since(mark)
            .lines()
            .find(|l| l.contains("tunnel stream closed") && l.contains(&format!("peer_identity={}", spiffe_id("a"))))
            .map(String::from)
    });
    eprintln!("[11] b's proxy: {}", tunnelled.as_deref().unwrap_or("no tunnel stream from a"));
    ensure!(tunnelled.is_some(), "the recreated pod's connection did not arrive over mutual TLS");
    Ok(())
}

// ------------------------------------------------------------ item 12

/// Rewrites `file` with each of `versions` in turn, as fast as it can,
/// until `stop`; returns how many writes it made.
fn flap(file: std::path::PathBuf, versions: Vec<String>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut writes = 0;
        while !stop.load(Ordering::Relaxed) {
            let _ = ProxyProcess::write_pods_file(&file, &versions[writes % versions.len()]);
            writes += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        writes
    })
}

/// While the mesh file flaps between `versions`, pod a runs short
/// connections to b: none may fail. Returns (writes, client summary).
fn connections_while_flapping(mesh: &Mesh, versions: Vec<String>) -> Result<(usize, Value)> {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = flap(mesh.files[0].clone(), versions, stop.clone());
    let args = ["--duration-ms", "3000", "--parallel", "4", "--bytes", "200"];
    let summary = mesh.sb.client(mesh.pod("a"), app(mesh.pod("b"), 8080), &args);
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))?;
    Ok((writes, summary?))
}

#[test]
fn a_mesh_file_flapping_hundreds_of_times_a_second_never_breaks_connections() -> Result<()> {
    let mesh = Mesh::new(&[&["a", "b", "u"]], &[])?;
    let (a, b, u) = (mesh.pod("a"), mesh.pod("b"), mesh.pod("u"));
    mesh.sb.echo_server(b, &[8080], &[])?;
    mesh.sb.tune_for_load(a)?;
    let proxy = mesh.start(0, &["--reload-interval", "10ms"])?;
    let base = node_pods_yaml(0, &[a, b, u]);
    let with = |a_label: &str, u_label: &str, remote: &str| {
        let labelled = |yaml: String, pod: &str, label: &str| {
            yaml.replace(&format!("  - name: {pod}\n"), &format!("  - name: {pod}\n    labels: {{v: \"{label}\"}}\n"))
        };
        format!("{}{remote}", labelled(labelled(base.clone(), "a", a_label), "u", u_label))
    };
    let remote = |node: &str, label: &str| {
        format!("  - {{name: r, node: {node}, labels: {{v: \"{label}\"}}, ips: [\"10.99.0.1\"]}}\n")
    };
    ProxyProcess::write_pods_file(&mesh.files[0], &with("1", "1", &remote("n1", "1")))?;
    wait_for(Duration::from_secs(10), || pod_status(&proxy, "a").filter(|p| p["error"].is_null()))
        .context("pod a not meshed")?;
    std::thread::sleep(Duration::from_millis(300));
    let a_before = pod_status(&proxy, "a").context("pod a")?;

    // A remote pod's label and node, and an unrelated local pod's label,
    // flapping: pod a is left alone.
    let mark = proxy.log_mark();
    let versions = vec![with("1", "1", &remote("n1", "1")), with("1", "2", &remote("n2", "2"))];
    let (writes, summary) = connections_while_flapping(&mesh, versions)?;
    let log = proxy.log_since(mark);
    let a_after = pod_status(&proxy, "a").context("pod a")?;
    let a_lines = log.lines().filter(|l| l.contains("pod=default/a") && !l.contains("outrigger::access")).count();
    let u_restarts = log.lines().filter(|l| l.contains("pod meshed") && l.contains("pod=default/u")).count();
    eprintln!(
        "[12] {writes} rewrites in 3 s (remote pod r, unrelated pod u): pod a's client {} ok / {} failed; pod u restarted {u_restarts} times; {a_lines} lines about pod a",
        summary["ok"], summary["failed"]
    );
    ensure!(summary["failed"] == 0 && summary["ok"].as_u64().unwrap_or(0) > 0, "{summary}");
    ensure!(a_before["netns_cookie"] == a_after["netns_cookie"] && a_before["listeners"] == a_after["listeners"]);
    ensure!(a_lines == 0, "pod a was restarted by changes to other pods:\n{log}");
    ensure!(!log.contains("un-meshed") && !log.contains("in use"), "{log}");

    // Pod a's own label flapping: a real change, so a is restarted each
    // time — without a capture gap and without a port conflict.
    let mark = proxy.log_mark();
    let versions = vec![with("1", "1", &remote("n1", "1")), with("2", "1", &remote("n1", "1"))];
    let (writes, summary) = connections_while_flapping(&mesh, versions)?;
    let log = proxy.log_since(mark);
    let restarts = log.lines().filter(|l| l.contains("pod meshed") && l.contains("pod=default/a")).count();
    let problems: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    eprintln!(
        "[12] {writes} rewrites of pod a's own label: {restarts} restarts, client {} ok / {} failed, {} warnings",
        summary["ok"],
        summary["failed"],
        problems.len()
    );
    ensure!(restarts > 10, "pod a was restarted only {restarts} times");
    ensure!(summary["failed"] == 0, "connections failed while pod a was restarted: {}", summary["errors"]);
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ensure!(!log.contains("un-meshed"), "pod a was un-meshed on a change");
    Ok(())
}

// ------------------------------------------------------------ item 20

#[test]
fn a_missing_local_certificate_does_not_eject_a_healthy_endpoint() -> Result<()> {
    let mesh = a_and_b()?;
    let (a, b) = (mesh.pod("a"), mesh.pod("b"));
    let service = "services:\n  - {name: web, vips: [\"10.96.0.1\"], ports: [{port: 80, targetPort: 8080}], endpoints: [{pod: b}]}\n";
    mesh.write_files(&[a, b], service)?;
    // Node 0 reads certificates from a directory that lacks pod a's.
    let certs = mesh.sb.dir.join("certs-n0");
    std::fs::create_dir_all(&certs)?;
    std::fs::copy(mesh.ca.join("ca.crt"), certs.join("ca.crt"))?;
    let certs_arg = certs.display().to_string();
    let eject =
        ["--ejection-consecutive-failures", "2", "--ejection-max-percent", "100", "--ejection-base-time", "60s"];
    let n0 =
        ProxyProcess::start(&mesh.sb, 0, mesh.files[0].clone(), &[&["--cert-dir", &certs_arg][..], &eject].concat())?;
    let _n1 = mesh.start(1, &[])?;
    let vip = SocketAddr::from(([10, 96, 0, 1], 80));
    let without = mesh.sb.client(a, vip, &["--conns", "5", "--timeout-ms", "10000"])?;
    let health = |n0: &ProxyProcess| -> Result<Value> { Ok(n0.config_dump()?["services"][0]["endpoints"][0].clone()) };
    eprintln!(
        "[20] without a local certificate: {} of 5 failed ({}); endpoint b: {}",
        without["failed"],
        without["errors"][0],
        health(&n0)?
    );
    ensure!(without["failed"] == 5, "{without}");
    ensure!(health(&n0)?["ejected"] == false, "a local error ejected the endpoint: {}", health(&n0)?);

    let issued = mesh.sb.dir.join("issued-a");
    outrigger_e2e::proxy::ca_issue(&mesh.ca, "a", &issued, &[])?;
    let target = certs.join("default").join("a");
    std::fs::create_dir_all(&target)?;
    std::fs::rename(issued.join("tls.key"), target.join("tls.key"))?;
    std::fs::rename(issued.join("tls.crt"), target.join("tls.crt"))?;
    let with = wait_for(Duration::from_secs(10), || {
        let s = mesh.sb.client(a, vip, &["--timeout-ms", "10000"]).ok()?;
        (s["ok"] == 1).then_some(s)
    });
    eprintln!(
        "[20] certificate installed: a -> web {}; endpoint b: {}",
        if with.is_some() { "ok" } else { "still failing" },
        health(&n0)?
    );
    ensure!(with.is_some(), "the service stayed unreachable: its endpoint was ejected for this node's own error");
    Ok(())
}

//! Pod-to-pod mutual TLS between two nodes (two proxies), against the real
//! kernel: HBONE tunnels under each pod's own identity.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use outrigger_e2e::{
    proxy::{ca_init, ca_issue, node_pods_yaml, spiffe_id},
    wait_for, Pod, ProxyProcess, Sandbox,
};
use serde_json::Value;

const MARKER: &str = "OUTRIGGER-PLAINTEXT-MARKER-7f3a";
const APP: u16 = 8080;

/// Two nodes; `per_node[k]` names the meshed pods of node k. `extra` pods
/// are created but not meshed.
struct TwoNodes {
    sb: Sandbox,
    pods: Vec<Pod>,
    files: [PathBuf; 2],
    ca: PathBuf,
}

impl TwoNodes {
    fn new(node0: &[&str], node1: &[&str], unmeshed: &[(usize, &str)]) -> Result<Self> {
        let mut sb = Sandbox::new()?;
        sb.add_node()?;
        let mut pods = Vec::new();
        for name in node0 {
            pods.push(sb.add_pod(0, name)?);
        }
        for name in node1 {
            pods.push(sb.add_pod(1, name)?);
        }
        let meshed = pods.len();
        for (node, name) in unmeshed {
            pods.push(sb.add_pod(*node, name)?);
        }
        let ca = sb.dir.join("ca");
        ca_init(&ca)?;
        let files = [sb.dir.join("mesh-n0.yaml"), sb.dir.join("mesh-n1.yaml")];
        let this = Self { sb, pods, files, ca };
        this.write_mesh(&this.pods[..meshed].iter().collect::<Vec<_>>(), ["", ""])?;
        Ok(this)
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod exists")
    }

    /// Writes both nodes' mesh files; `extra[k]` is appended to node k's.
    fn write_mesh(&self, meshed: &[&Pod], extra: [&str; 2]) -> Result<()> {
        for (node, (file, extra)) in self.files.iter().zip(extra).enumerate() {
            ProxyProcess::write_pods_file(file, &format!("{}{extra}", node_pods_yaml(node, meshed)))?;
        }
        Ok(())
    }

    /// Starts node `node`'s proxy with the built-in CA.
    fn start(&self, node: usize, extra: &[&str]) -> Result<ProxyProcess> {
        let ca = self.ca.display().to_string();
        let mut args = vec!["--ca-dir", ca.as_str()];
        args.extend_from_slice(extra);
        ProxyProcess::start(&self.sb, node, self.files[node].clone(), &args)
    }

    /// Starts node `node`'s proxy with `args` only (e.g. --cert-dir).
    fn start_with(&self, node: usize, args: &[&str]) -> Result<ProxyProcess> {
        ProxyProcess::start(&self.sb, node, self.files[node].clone(), args)
    }

    /// `outrigger-podtool hbone` from `pod` against `target` (a tunnel port).
    fn hbone(&self, from: &Pod, target: SocketAddr, authority: SocketAddr, cert_dir: Option<&Path>) -> Result<Value> {
        let mut cmd = self.sb.podtool(from);
        cmd.args(["hbone", "--connect", &target.to_string(), "--authority", &authority.to_string()]);
        if let Some(dir) = cert_dir {
            cmd.arg("--cert-dir").arg(dir);
        }
        let out = self.sb.run(cmd)?;
        ensure!(out.status.success(), "hbone client: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

fn app_addr(pod: &Pod) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod.ip4), APP)
}

fn accepted(server: &outrigger_e2e::sandbox::Spawned) -> usize {
    server.stdout().matches("\"accepted\"").count()
}

/// tcpdump on the link between the nodes, until dropped.
struct Capture {
    child: std::process::Child,
    file: PathBuf,
}

impl Capture {
    fn start(sb: &Sandbox, name: &str) -> Result<Self> {
        let file = sb.dir.join(format!("{name}.pcap"));
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                sb.node_netns(1),
                "tcpdump",
                "--immediate-mode",
                "-i",
                "wire1",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        // tcpdump says "listening on" once the capture is live; a busy
        // machine can take a while to get there.
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(15)).context("tcpdump never started listening")?;
        Ok(Self { child, file })
    }

    fn stop(mut self) -> Result<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        Ok(std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `proxy` logs (within 5 s) a finished tunnel stream whose line
/// contains `needle`.
fn tunnel_logged(proxy: &ProxyProcess, needle: &str) -> bool {
    wait_for(Duration::from_secs(5), || {
        proxy.log_text().lines().any(|l| l.contains("tunnel stream closed") && l.contains(needle)).then_some(())
    })
    .is_some()
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

/// TLS versions chosen by servers in a capture, per tshark.
fn negotiated_tls_versions(pcap: &Path) -> Result<String> {
    let out = Command::new("tshark")
        .args(["-r"])
        .arg(pcap)
        .args(["-d", "tcp.port==15008,tls", "-Y", "tls.handshake.type == 2", "-T", "fields"])
        .args(["-e", "tls.handshake.extensions.supported_version"])
        .output()
        .context("running tshark")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn pod_to_pod_across_nodes_never_crosses_the_wire_in_plaintext() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b"], &[(0, "plain")])?;
    let (a, b, plain) = (nodes.pod("a"), nodes.pod("b"), nodes.pod("plain"));
    let server = nodes.sb.echo_server(b, &[APP], &[])?;
    let _n0 = nodes.start(0, &[])?;
    let n1 = nodes.start(1, &[])?;

    let capture = Capture::start(&nodes.sb, "mtls")?;
    let summary = nodes.sb.client(a, app_addr(b), &["--marker", MARKER, "--bytes", "100000"])?;
    ensure!(summary["ok"] == 1, "a -> b across nodes failed: {summary}");
    ensure!(summary["peers"][app_addr(b).to_string()] == 1, "getpeername: {}", summary["peers"]);
    let pcap = capture.stop()?;
    ensure!(pcap.len() > 1000, "nothing captured on the wire ({} bytes)", pcap.len());
    ensure!(count(&pcap, MARKER.as_bytes()) == 0, "the marker crossed the wire in plaintext");
    let versions = negotiated_tls_versions(&nodes.sb.dir.join("mtls.pcap"))?;
    ensure!(versions.contains("0x0304"), "no TLS 1.3 handshake in the capture: {versions:?}");

    // B's proxy saw A's identity, and delivered over loopback in B's pod.
    let peer_logged = tunnel_logged(&n1, &format!("peer_identity={}", spiffe_id("a")));
    ensure!(peer_logged, "B's proxy did not log A's identity:\n{}", n1.log_text());
    // Delivered with its original source: the app sees A's address as the
    // peer, as it would without the mesh.
    ensure!(
        server.stdout().contains(&format!("\"peer\":\"{}:", a.ip4)),
        "B's app did not see A as the client: {}",
        server.stdout()
    );

    // The same capture sees plaintext when it is plaintext: an unmeshed pod.
    let capture = Capture::start(&nodes.sb, "plain")?;
    let summary = nodes.sb.client(plain, app_addr(b), &["--marker", MARKER, "--bytes", "100000"])?;
    ensure!(summary["ok"] == 1, "plain -> b failed: {summary}");
    ensure!(
        count(&capture.stop()?, MARKER.as_bytes()) > 0,
        "the capture cannot see plaintext: the check above proves nothing"
    );
    Ok(())
}

#[test]
fn requests_are_counted_by_the_proxy_that_serves_them() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b"], &[(0, "outside")])?;
    let (a, b, outside) = (nodes.pod("a"), nodes.pod("b"), nodes.pod("outside"));
    let _log = outrigger_e2e::servers::origin(&nodes.sb, b, APP, "b", 0)?;
    let n0 = nodes.start(0, &[])?;
    let n1 = nodes.start(1, &[])?;
    let target = b.ip4.to_string();
    let args = [target.as_str(), "8080", "/counted", "20"];
    let out = nodes.sb.run(outrigger_e2e::servers::python(&nodes.sb, a, "client.py", &args))?;
    let summary: Value = serde_json::from_slice(&out.stdout).context("client.py output")?;
    ensure!(summary["statuses"]["200"] == 20, "a -> b over the tunnel: {summary}");
    // The application closing its connection after each answer: the
    // client's requests still all succeed (the tunnel side winds down and
    // the caller's proxy opens a new one).
    let args = [target.as_str(), "8080", "/close", "10"];
    let out = nodes.sb.run(outrigger_e2e::servers::python(&nodes.sb, a, "client.py", &args))?;
    let closing: Value = serde_json::from_slice(&out.stdout).context("client.py output")?;
    ensure!(closing["statuses"]["200"] == 10, "a -> b, the application closing each connection: {closing}");
    // Request bodies: 5 POSTs of 1 000 bytes.
    let args = [target.as_str(), "8080", "/posted", "5", "method:POST", "body:1000"];
    let out = nodes.sb.run(outrigger_e2e::servers::python(&nodes.sb, a, "client.py", &args))?;
    let posted: Value = serde_json::from_slice(&out.stdout).context("client.py output")?;
    ensure!(posted["statuses"]["200"] == 5, "a -> b, POST with a body: {posted}");
    // A client outside the mesh (plaintext arriving at b): 5 requests.
    let out = nodes.sb.run(outrigger_e2e::servers::python(&nodes.sb, outside, "client.py", &args[..4]))?;
    let plain: Value = serde_json::from_slice(&out.stdout).context("client.py output")?;
    ensure!(plain["statuses"]["200"] == 5, "outside -> b in plaintext: {plain}");
    // Both ends count the 35 requests from a: the caller's proxy as
    // outbound, the server's as inbound (the server pod's view); the
    // server's proxy alone counts the plaintext ones.
    let inbound = [("reporter", "inbound"), ("source_pod", "a"), ("destination_pod", "b"), ("response_code", "200")];
    let outbound = [("reporter", "outbound"), ("source_pod", "a"), ("destination_pod", "b"), ("response_code", "200")];
    let plaintext = [("reporter", "inbound"), ("source_pod", ""), ("destination_pod", "b"), ("response_code", "200")];
    let counts = || -> Option<(f64, f64, f64)> {
        let (m0, m1) = (n0.metrics().ok()?, n1.metrics().ok()?);
        let requests =
            |m: &outrigger_e2e::MetricsText, labels: &[(&str, &str)]| m.sum("outrigger_requests_total", labels);
        Some((requests(&m0, &outbound), requests(&m1, &inbound), requests(&m1, &plaintext)))
    };
    let settled = wait_for(Duration::from_secs(5), || counts().filter(|c| *c == (35.0, 35.0, 5.0)));
    ensure!(
        settled.is_some(),
        "requests counted (outbound on node 0, inbound and plaintext on node 1): {:?}",
        counts()
    );
    let m1 = n1.metrics()?;
    let posted_bytes = m1.sum("outrigger_request_bytes_total", &[("reporter", "inbound"), ("source_pod", "a")]);
    ensure!(posted_bytes == 5000.0, "inbound request body bytes: {posted_bytes} (want 5 000)");
    // Each tunnel stream and plaintext arrival was detected as HTTP/1.1 by
    // the server's proxy: at least one per client run.
    let inbound_http1 = m1.sum("outrigger_protocol_detections_total", &[("direction", "inbound"), ("result", "http1")]);
    ensure!(inbound_http1 >= 4.0, "inbound http1 detections: {inbound_http1}");
    Ok(())
}

#[test]
fn an_inbound_rate_limit_protects_a_pod_from_every_caller() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b"], &[(0, "outside")])?;
    let (a, b, outside) = (nodes.pod("a"), nodes.pod("b"), nodes.pod("outside"));
    let _log = outrigger_e2e::servers::origin(&nodes.sb, b, APP, "b", 0)?;
    // b's service: 5 requests, then one an hour, kept by b's own node for
    // every caller (through the tunnel or in plaintext).
    let service = format!(
        "services:\n  - name: guarded\n    vips: [\"10.96.5.1\"]\n    ports: [{{port: 80, targetPort: {APP}, protocol: http}}]\n    endpoints: [{{pod: b}}]\n    inboundRateLimit: {{maxTokens: 5, tokensPerFill: 1, fillInterval: 1h}}\n"
    );
    nodes.write_mesh(&[a, b], [service.as_str(), service.as_str()])?;
    let _n0 = nodes.start(0, &[])?;
    let n1 = nodes.start(1, &[])?;
    let target = b.ip4.to_string();
    let run = |from: &Pod| -> Result<Value> {
        let args = [target.as_str(), "8080", "/limited", "10"];
        let out = nodes.sb.run(outrigger_e2e::servers::python(&nodes.sb, from, "client.py", &args))?;
        serde_json::from_slice(&out.stdout).context("client.py output")
    };
    let meshed = run(a)?;
    let plain = run(outside)?;
    eprintln!(
        "FIGURE inbound limit of 5 on b: from a (tunnel) {}, from outside (plaintext) {}",
        meshed["statuses"], plain["statuses"]
    );
    ensure!(meshed["statuses"]["200"] == 5 && meshed["statuses"]["429"] == 5, "a: {meshed}");
    ensure!(plain["statuses"]["429"] == 10, "the bucket is b's, for every caller: {plain}");
    let h = &plain["refused_headers"];
    ensure!(h["x-ratelimit-limit"] == "5" && h["retry-after"].is_string(), "429 headers: {h}");
    let limited = |source: &str| {
        n1.metrics().map(|m| m.sum("outrigger_rate_limited_total", &[("source_pod", source)])).unwrap_or(f64::NAN)
    };
    ensure!(
        limited("a") == 5.0 && limited("") == 10.0,
        "429s counted by source: a {} outside {}",
        limited("a"),
        limited("")
    );
    Ok(())
}

#[test]
fn the_tunnel_port_refuses_untrusted_clients_and_foreign_addresses() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b"], &[(0, "tester")])?;
    let (a, b, tester) = (nodes.pod("a"), nodes.pod("b"), nodes.pod("tester"));
    let server = nodes.sb.echo_server(b, &[APP], &[])?;
    let n1 = nodes.start(1, &[])?;
    let tunnel_port = SocketAddr::new(IpAddr::V4(b.ip4), 15008);
    let dir = |name: &str| nodes.sb.dir.join(name);

    let other_ca = dir("other-ca");
    ca_init(&other_ca)?;
    ca_issue(&other_ca, "a", &dir("foreign"), &[])?;
    ca_issue(&nodes.ca, "a", &dir("expired"), &["--lifetime", "1h", "--backdate", "2h"])?;
    ca_issue(&nodes.ca, "a", &dir("valid"), &[])?;

    for (what, cert) in
        [("no certificate", None), ("another CA", Some(dir("foreign"))), ("expired", Some(dir("expired")))]
    {
        let report = nodes.hbone(tester, tunnel_port, app_addr(b), cert.as_deref())?;
        ensure!(
            report["status"].is_null() && report["error"].is_string(),
            "{what}: the tunnel port accepted: {report}"
        );
    }
    // Plaintext to the tunnel port goes nowhere.
    let plain = nodes.sb.client(tester, tunnel_port, &["--bytes", "1000", "--timeout-ms", "5000"])?;
    ensure!(plain["ok"] == 0, "plaintext to :15008 was echoed: {plain}");
    ensure!(accepted(&server) == 0, "the application saw a refused client");

    // A trusted client may only reach the pod itself, never relay elsewhere.
    let foreign = nodes.hbone(tester, tunnel_port, app_addr(a), Some(&dir("valid")))?;
    ensure!(foreign["status"] == 403, "CONNECT to another address was not refused: {foreign}");
    ensure!(accepted(&server) == 0);
    let valid = nodes.hbone(tester, tunnel_port, app_addr(b), Some(&dir("valid")))?;
    ensure!(valid["status"] == 200 && valid["echoed"] == true, "a valid client failed: {valid}");
    ensure!(accepted(&server) == 1);

    let m = n1.metrics()?;
    let inbound =
        |result| m.sum("outrigger_inbound_tunnel_streams_total", &[("destination_pod", "b"), ("result", result)]);
    ensure!(inbound("tls_failure") >= 4.0, "refused handshakes counted: {}", inbound("tls_failure"));
    ensure!(inbound("not_pod_address") == 1.0);
    ensure!(inbound("ok") == 1.0);
    Ok(())
}

#[test]
fn an_authorization_rule_refuses_and_its_removal_applies_without_restart() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b"], &[])?;
    let (a, b) = (nodes.pod("a"), nodes.pod("b"));
    nodes.sb.echo_server(b, &[APP], &[])?;
    let n0 = nodes.start(0, &[])?;
    let n1 = nodes.start(1, &[])?;
    let meshed = [a, b];
    ensure!(nodes.sb.client(a, app_addr(b), &[])?["ok"] == 1, "allowed by default");

    let deny = format!(
        "authorization:\n  - name: no-a\n    selector: {{pods: [b]}}\n    action: deny\n    rules: [{{principals: [\"{}\"]}}]\n",
        spiffe_id("a")
    );
    nodes.write_mesh(&meshed, ["", &deny])?;
    let denied =
        wait_for(Duration::from_secs(10), || (nodes.sb.client(a, app_addr(b), &[]).ok()?["ok"] == 0).then_some(()));
    ensure!(denied.is_some(), "the deny rule never applied");
    let m1 = n1.metrics()?;
    ensure!(m1.sum("outrigger_inbound_tunnel_streams_total", &[("result", "denied")]) >= 1.0);
    let m0 = n0.metrics()?;
    ensure!(m0.sum("outrigger_connections_failed_total", &[("source_pod", "a"), ("reason", "denied")]) >= 1.0);

    nodes.write_mesh(&meshed, ["", ""])?;
    let allowed =
        wait_for(Duration::from_secs(10), || (nodes.sb.client(a, app_addr(b), &[]).ok()?["ok"] == 1).then_some(()));
    ensure!(allowed.is_some(), "removing the rule did not apply");
    Ok(())
}

fn serial_of(proxy: &ProxyProcess, name: &str) -> Option<String> {
    let dump = proxy.config_dump().ok()?;
    let certs = dump["mtls"]["identities"]["certificates"].as_array()?.clone();
    certs.iter().find(|c| c["identity"] == spiffe_id(name))?["serial"].as_str().map(String::from)
}

/// Puts a certificate for `name` where --cert-dir expects it, atomically
/// per file (key first, so the pair is whole once the chain arrives).
fn install_cert(ca: &Path, name: &str, as_identity: &str, cert_dir: &Path) -> Result<()> {
    let staging = cert_dir.join(format!(".staging-{name}"));
    ca_issue(ca, as_identity, &staging, &[])?;
    let target = cert_dir.join("default").join(name);
    std::fs::create_dir_all(&target)?;
    std::fs::rename(staging.join("tls.key"), target.join("tls.key"))?;
    std::fs::rename(staging.join("tls.crt"), target.join("tls.crt"))?;
    Ok(())
}

#[test]
fn rotated_certificates_are_used_by_new_connections_without_breaking_open_ones() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b"], &[])?;
    let (a, b) = (nodes.pod("a"), nodes.pod("b"));
    nodes.sb.echo_server(b, &[APP], &[])?;
    let dirs = [nodes.sb.dir.join("certs-n0"), nodes.sb.dir.join("certs-n1")];
    for (dir, name) in dirs.iter().zip(["a", "b"]) {
        std::fs::create_dir_all(dir)?;
        std::fs::copy(nodes.ca.join("ca.crt"), dir.join("ca.crt"))?;
        install_cert(&nodes.ca, name, name, dir)?;
    }
    let d0 = dirs[0].display().to_string();
    let d1 = dirs[1].display().to_string();
    let n0 = nodes.start_with(0, &["--cert-dir", &d0])?;
    let n1 = nodes.start_with(1, &["--cert-dir", &d1])?;
    let first = serial_of(&n0, "a").context("no certificate loaded for a")?;

    let mut long = nodes.sb.podtool(a);
    long.args(["client", "--connect", &app_addr(b).to_string(), "--hold-ms", "3000", "--bytes", "200000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let long = long.spawn()?;
    std::thread::sleep(Duration::from_millis(500));

    install_cert(&nodes.ca, "a", "a", &dirs[0])?;
    let second = wait_for(Duration::from_secs(10), || serial_of(&n0, "a").filter(|s| *s != first))
        .context("the rotated certificate was never loaded")?;
    ensure!(nodes.sb.client(a, app_addr(b), &[])?["ok"] == 1, "a new connection failed after rotation");
    let presented = |serial: &str| tunnel_logged(&n1, &format!("peer_serial={serial}"));
    ensure!(presented(&second), "B never saw the new certificate {second}:\n{}", n1.log_text());

    // A certificate for the wrong identity is refused; the current one stays.
    install_cert(&nodes.ca, "a", "z", &dirs[0])?;
    let refused = wait_for(Duration::from_secs(10), || {
        n0.log_text().lines().any(|l| l.contains("refused") && l.contains("sa/z")).then_some(())
    });
    ensure!(refused.is_some(), "a mismatched certificate was not refused:\n{}", n0.log_text());
    ensure!(serial_of(&n0, "a").as_deref() == Some(second.as_str()), "the previous certificate was dropped");
    ensure!(nodes.sb.client(a, app_addr(b), &[])?["ok"] == 1, "connections broke after a bad certificate");

    let out = long.wait_with_output()?;
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(summary["ok"] == 1, "the open connection broke during rotation: {summary}");
    ensure!(presented(&first), "the long connection did not use the first certificate");
    Ok(())
}

#[test]
fn a_thousand_connections_from_ten_pods_share_few_tls_connections() -> Result<()> {
    let names: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let sources: Vec<&str> = names.iter().map(String::as_str).collect();
    let nodes = TwoNodes::new(&sources, &["b"], &[])?;
    let b = nodes.pod("b");
    nodes.sb.echo_server(b, &[APP], &[])?;
    // Streams of one source pod spread over at most 2 connections: one
    // per connection thread (pools are per thread), 2 threads.
    let n0 = nodes.start(0, &["--tunnel-connections-per-peer", "1", "--connection-threads", "2"])?;
    let n1 = nodes.start(1, &[])?;
    let clients: Vec<_> = sources
        .iter()
        .map(|name| {
            let mut cmd = nodes.sb.podtool(nodes.pod(name));
            cmd.args(["client", "--connect", &app_addr(b).to_string(), "--conns", "100", "--parallel", "10"])
                .args(["--bytes", "20000"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut ok = 0;
    for client in clients {
        let out = client.wait_with_output()?;
        let summary: Value = serde_json::from_slice(&out.stdout).context("client output")?;
        ensure!(summary["failed"] == 0, "connections failed: {}", summary["errors"]);
        ok += summary["ok"].as_u64().unwrap_or(0);
    }
    ensure!(ok == 1000, "{ok} of 1000 connections completed");
    let dialled = n0.config_dump()?["mtls"]["pool"]["dialled_total"].as_u64().unwrap_or(u64::MAX);
    eprintln!("1000 tunnelled connections from 10 pods used {dialled} TLS connections");
    ensure!(dialled <= 20, "{dialled} TLS connections for 10 source identities at 1 per peer and thread, 2 threads");
    let m1 = n1.metrics()?;
    ensure!(m1.sum("outrigger_inbound_tunnel_streams_total", &[("result", "ok")]) == 1000.0);
    Ok(())
}

#[test]
fn strict_mode_takes_only_tunnels_even_between_pods_of_one_node() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b", "c"], &[(1, "plain")])?;
    let (a, b, c, plain) = (nodes.pod("a"), nodes.pod("b"), nodes.pod("c"), nodes.pod("plain"));
    let server = nodes.sb.echo_server(b, &[APP], &[])?;
    let _n0 = nodes.start(0, &["--mtls", "strict"])?;
    let n1 = nodes.start(1, &["--mtls", "strict"])?;

    let from_plain = nodes.sb.client(plain, app_addr(b), &["--timeout-ms", "1500"])?;
    ensure!(from_plain["ok"] == 0, "a pod outside the mesh reached a strict pod in plaintext: {from_plain}");
    eprintln!("plaintext to a strict pod: {}", from_plain["errors"]);
    ensure!(accepted(&server) == 0, "the strict pod's application saw plaintext from outside the mesh");
    ensure!(n1.kernel_events("strict_dropped") >= 1.0);

    ensure!(nodes.sb.client(a, app_addr(b), &[])?["ok"] == 1, "a -> b (other node) failed in strict mode");
    ensure!(nodes.sb.client(c, app_addr(b), &[])?["ok"] == 1, "c -> b (same node) failed in strict mode");
    let tunnelled = tunnel_logged(&n1, &format!("peer_identity={}", spiffe_id("c")));
    ensure!(tunnelled, "same-node traffic was not tunnelled in strict mode");
    ensure!(accepted(&server) == 2);
    Ok(())
}

#[test]
fn the_admin_server_reports_state_without_secrets() -> Result<()> {
    let nodes = TwoNodes::new(&["a"], &["b"], &[])?;
    let n0 = nodes.start(0, &[])?;
    let get = |path: &str| outrigger_e2e::http::get(n0.admin, path);
    ensure!(get("/live")?.0 == 200);
    ensure!(get("/ready")?.0 == 200);
    let (status, body) = get("/config_dump")?;
    ensure!(status == 200);
    ensure!(!body.contains("PRIVATE KEY") && !body.contains("tls.key"), "config_dump leaks key material");
    let dump: Value = serde_json::from_str(&body)?;
    ensure!(dump["node"]["pods"][0]["key"]["name"] == "a", "pods: {}", dump["node"]["pods"]);
    ensure!(
        // Outbound v4/v6, tunnel v4/v6, captured plaintext v4/v6.
        dump["node"]["pods"][0]["listeners"].as_array().map(Vec::len) == Some(6),
        "listeners: {}",
        dump["node"]["pods"]
    );
    ensure!(dump["programs"].as_array().map(Vec::len) == Some(7), "programs: {}", dump["programs"]);
    ensure!(dump["mtls"]["identities"]["certificates"][0]["identity"] == spiffe_id("a"));
    ensure!(dump["mtls"]["identities"]["certificates"][0]["serial"].is_string());

    ensure!(get("/logging")?.1.trim() == "info");
    let (status, _) = outrigger_e2e::http::post(n0.admin, "/logging?level=outrigger=debug")?;
    ensure!(status == 200);
    ensure!(get("/logging")?.1.trim() == "outrigger=debug", "the log level did not change");
    let (status, body) = outrigger_e2e::http::post(n0.admin, "/logging?level=not[a]filter")?;
    ensure!(status == 400, "a bad filter was accepted: {body}");
    ensure!(get("/nope")?.0 == 404);
    Ok(())
}

//! The benchmark's simulated node.
//!
//! Pods: `server` (sockperf + iperf3) for the single-hop paths; `e1..e3`
//! (sockperf + echo) behind the service VIP; `meshed`, a client captured by
//! Outrigger; `plain`, a client that is not, which reaches servers directly
//! or through HAProxy running in its own netns on loopback — the same one
//! extra hop a sidecar adds. `server` and `remote` also run an echo server
//! built for tens of thousands of idle connections (the idle-memory table).

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context, Result};
use outrigger_e2e::{
    proxy::{ca_init, ca_issue, node_pods_yaml},
    sandbox::Spawned,
    wait_for, Pod, ProxyProcess, Sandbox,
};

pub const SOCKPERF_PORT: u16 = 11111;
pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 8080;
/// `podtool idle serve`, in `server` and `remote`.
pub const IDLE_PORT: u16 = 9090;
/// HAProxy frontends on the plain pod's loopback.
pub const HAPROXY_SOCKPERF: u16 = 21111;
pub const HAPROXY_IPERF: u16 = 25201;
pub const HAPROXY_VIP_SOCKPERF: u16 = 31111;
pub const HAPROXY_VIP_ECHO: u16 = 38080;
pub const VIP: [u8; 4] = [10, 96, 0, 100];
/// HAProxy TLS pair: client-side frontends (plain pod's loopback) and the
/// server side's TLS listeners (on the remote pod's address).
pub const TLS_CLIENT_SOCKPERF: u16 = 41111;
pub const TLS_CLIENT_IPERF: u16 = 45201;
pub const TLS_CLIENT_ECHO: u16 = 48080;
const TLS_SERVER_SOCKPERF: u16 = 41112;
const TLS_SERVER_IPERF: u16 = 45202;
const TLS_SERVER_ECHO: u16 = 48081;
/// nginx in `server` and `remote` for the mesh table (a port the proxies
/// treat as opaque: the L4 paths), HAProxy's plain frontend for it and its
/// TLS pair's ports.
pub const NGINX_PORT: u16 = 8095;
pub const HAPROXY_NGINX: u16 = 28095;
pub const TLS_CLIENT_NGINX: u16 = 48095;
const TLS_SERVER_NGINX: u16 = 48096;

pub struct Topology {
    pub sb: Sandbox,
    pub server: Pod,
    pub endpoints: Vec<Pod>,
    pub meshed: Pod,
    pub plain: Pod,
    /// On node 1: the far end of the cross-node paths.
    pub remote: Pod,
    /// Node k's proxy is `proxies[k]`.
    proxies: Vec<ProxyProcess>,
    /// How the proxies were started, to restart them with other flags.
    base_args: Vec<String>,
    pods_files: Vec<std::path::PathBuf>,
    /// HAProxy in TCP mode (plain pod), and its TLS pair (client side,
    /// server side): for CPU and memory figures.
    pub haproxy_pid: u32,
    pub haproxy_tls_pids: Vec<u32>,
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn vip(port: u16) -> SocketAddr {
    SocketAddr::from((VIP, port))
}

impl Topology {
    pub fn new(proxy_args: &[String]) -> Result<Self> {
        let mut sb = Sandbox::new()?;
        let server = sb.add_pod(0, "server")?;
        let meshed = sb.add_pod(0, "meshed")?;
        let plain = sb.add_pod(0, "plain")?;
        let endpoints = vec![sb.add_pod(0, "e1")?, sb.add_pod(0, "e2")?, sb.add_pod(0, "e3")?];
        // Client pods (and the proxy's upstream sockets, which live in the
        // meshed pod) open tens of thousands of connections per run.
        sb.tune_for_load(&meshed)?;
        sb.tune_for_load(&plain)?;

        for pod in std::iter::once(&server).chain(&endpoints) {
            let mut sockperf = sb.in_pod(pod, "sockperf");
            sockperf.args(["server", "--tcp", "-i", &pod.ip4.to_string(), "-p", &SOCKPERF_PORT.to_string()]);
            sb.spawn("sockperf-server", sockperf)?;
        }
        let mut iperf = sb.in_pod(&server, "iperf3");
        iperf.args(["-s", "-B", &server.ip4.to_string(), "-p", &IPERF_PORT.to_string()]);
        sb.spawn("iperf3-server", iperf)?;
        // The server's for the inbound-plaintext connection rate.
        for pod in std::iter::once(&server).chain(&endpoints) {
            sb.echo_server(pod, &[ECHO_PORT], &[])?;
        }
        sb.add_node()?;
        let remote = sb.add_pod(1, "remote")?;
        let mut sockperf = sb.in_pod(&remote, "sockperf");
        sockperf.args(["server", "--tcp", "-i", &remote.ip4.to_string(), "-p", &SOCKPERF_PORT.to_string()]);
        sb.spawn("sockperf-remote", sockperf)?;
        let mut iperf = sb.in_pod(&remote, "iperf3");
        iperf.args(["-s", "-B", &remote.ip4.to_string(), "-p", &IPERF_PORT.to_string()]);
        sb.spawn("iperf3-remote", iperf)?;
        sb.echo_server(&remote, &[ECHO_PORT], &[])?;
        for pod in [&server, &remote] {
            idle_server(&sb, pod)?;
        }

        let mut pods: Vec<&Pod> = vec![&meshed, &server];
        pods.extend(endpoints.iter());
        pods.push(&remote);
        let mut mesh = node_pods_yaml(0, &pods);
        mesh.push_str(&format!(
            "services:\n  - name: bench\n    vips: [{}]\n    ports: [{{name: sockperf, port: {SOCKPERF_PORT}}}, {{name: echo, port: {ECHO_PORT}}}]\n    endpoints: [{{pod: e1}}, {{pod: e2}}, {{pod: e3}}]\n",
            std::net::Ipv4Addr::from(VIP)
        ));
        mesh.push_str(&super::http::mesh_yaml());
        let pods_file = sb.dir.join("mesh.yaml");
        std::fs::write(&pods_file, mesh)?;
        let remote_file = sb.dir.join("mesh-n1.yaml");
        std::fs::write(&remote_file, node_pods_yaml(1, &[&meshed, &remote]))?;
        let ca = sb.dir.join("ca");
        ca_init(&ca)?;
        let haproxy_tls = haproxy_tls_pair(&sb, &plain, &remote, &ca)?;

        let backends = |port: u16| -> String {
            endpoints.iter().map(|e| format!("  server {} {}:{port}\n", e.name, e.ip4)).collect()
        };
        let cfg = sb.dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
                 listen sockperf\n  bind 127.0.0.1:{HAPROXY_SOCKPERF}\n  server s {ip}:{SOCKPERF_PORT}\n\n\
                 listen iperf\n  bind 127.0.0.1:{HAPROXY_IPERF}\n  server s {ip}:{IPERF_PORT}\n\n\
                 listen nginx\n  bind 127.0.0.1:{HAPROXY_NGINX}\n  server s {ip}:{NGINX_PORT}\n\n\
                 listen vip_sockperf\n  bind 127.0.0.1:{HAPROXY_VIP_SOCKPERF}\n  balance leastconn\n{}\n\
                 listen vip_echo\n  bind 127.0.0.1:{HAPROXY_VIP_ECHO}\n  balance leastconn\n{}",
                backends(SOCKPERF_PORT),
                backends(ECHO_PORT),
                ip = server.ip4,
            ),
        )?;
        let mut haproxy = sb.in_pod(&plain, "haproxy");
        haproxy.arg("-db").arg("-f").arg(&cfg);
        let haproxy = sb.spawn("haproxy", haproxy)?;

        let ca_arg = ca.display().to_string();
        // Inbound capture off: the direct and HAProxy paths reach meshed
        // servers in plaintext and must stay one hop, as they were measured
        // before it existed. The inbound_plaintext table measures it alone.
        let opaque = super::http::opaque_ports();
        let mut args = vec![
            "--log-level",
            "warn,outrigger::cli=info",
            "--ca-dir",
            ca_arg.as_str(),
            "--inbound-capture",
            "false",
            "--opaque-ports",
            opaque.as_str(),
        ];
        args.extend(proxy_args.iter().map(String::as_str));
        let proxy = ProxyProcess::start(&sb, 0, pods_file.clone(), &args)?;
        let remote_proxy = ProxyProcess::start(&sb, 1, remote_file.clone(), &args)?;
        // Let the servers settle before the first measurement.
        std::thread::sleep(Duration::from_millis(500));
        for h in std::iter::once(&haproxy).chain(&haproxy_tls) {
            if h.stderr().contains("ALERT") {
                bail!("haproxy failed: {}", h.stderr());
            }
        }
        let base_args = args.iter().map(|a| a.to_string()).collect();
        let (haproxy_pid, haproxy_tls_pids) = (haproxy.pid, haproxy_tls.iter().map(|h| h.pid).collect());
        Ok(Self {
            sb,
            server,
            endpoints,
            meshed,
            plain,
            remote,
            proxies: vec![proxy, remote_proxy],
            base_args,
            pods_files: vec![pods_file, remote_file],
            haproxy_pid,
            haproxy_tls_pids,
        })
    }

    /// Node `node`'s proxy (0: the clients' node, 1: `remote`'s).
    pub fn proxy(&self, node: usize) -> &ProxyProcess {
        &self.proxies[node]
    }

    /// Restarts node `node`'s proxy with `extra` flags added to its usual
    /// ones (a flag in `extra` replaces the usual one of that name).
    pub fn restart_proxy(&mut self, node: usize, extra: &[&str]) -> Result<()> {
        let mut args: Vec<&str> = Vec::new();
        let mut base = self.base_args.iter().map(String::as_str).peekable();
        while let Some(arg) = base.next() {
            let has_value = base.peek().is_some_and(|next| !next.starts_with("--"));
            if arg.starts_with("--") && extra.contains(&arg) {
                if has_value {
                    base.next();
                }
                continue;
            }
            args.push(arg);
        }
        args.extend_from_slice(extra);
        // The old one must be gone first: both would attach to the same cgroup.
        drop(self.proxies.remove(node));
        let replacement = ProxyProcess::start(&self.sb, node, self.pods_files[node].clone(), &args)?;
        self.proxies.insert(node, replacement);
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ip4.into(), port)
    }

    pub fn remote_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.remote.ip4.into(), port)
    }

    pub fn endpoint_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.endpoints[0].ip4.into(), port)
    }
}

/// `podtool idle serve` on `pod`'s IPv4 address, once it listens.
fn idle_server(sb: &Sandbox, pod: &Pod) -> Result<Spawned> {
    let mut cmd = sb.podtool(pod);
    cmd.args(["idle", "serve", "--listen", &SocketAddr::new(pod.ip4.into(), IDLE_PORT).to_string()]);
    let spawned = sb.spawn(&format!("idle-server-{}", pod.name), cmd)?;
    wait_for(Duration::from_secs(10), || spawned.stdout().contains("\"listening\"").then_some(()))
        .with_context(|| format!("idle server in {} did not start: {}", pod.name, spawned.stderr()))?;
    Ok(spawned)
}

/// HAProxy doing TLS on both ends of the cross-node hop: one in the client
/// pod (TCP in, mutual TLS 1.3 out), one in the remote pod (mutual TLS 1.3
/// in, TCP to the application), with certificates from the mesh's CA.
fn haproxy_tls_pair(sb: &Sandbox, client: &Pod, remote: &Pod, ca: &std::path::Path) -> Result<Vec<Spawned>> {
    let pem = |name: &str| -> Result<std::path::PathBuf> {
        let dir = sb.dir.join(name);
        ca_issue(ca, name, &dir, &[])?;
        let combined = dir.join("combined.pem");
        let mut text = std::fs::read_to_string(dir.join("tls.crt"))?;
        text.push_str(&std::fs::read_to_string(dir.join("tls.key"))?);
        std::fs::write(&combined, text)?;
        Ok(combined)
    };
    let (client_pem, server_pem) = (pem("haproxy-client")?, pem("haproxy-server")?);
    let ca_crt = ca.join("ca.crt");
    let defaults = "global\n  maxconn 4096\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n\n\
                    defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n";
    let mut client_cfg = String::from(defaults);
    let mut server_cfg = String::from(defaults);
    for (name, front, tls, app) in [
        ("sockperf", TLS_CLIENT_SOCKPERF, TLS_SERVER_SOCKPERF, SOCKPERF_PORT),
        ("iperf", TLS_CLIENT_IPERF, TLS_SERVER_IPERF, IPERF_PORT),
        ("echo", TLS_CLIENT_ECHO, TLS_SERVER_ECHO, ECHO_PORT),
        ("nginx", TLS_CLIENT_NGINX, TLS_SERVER_NGINX, NGINX_PORT),
    ] {
        client_cfg.push_str(&format!(
            "listen {name}\n  bind 127.0.0.1:{front}\n  server s {ip}:{tls} ssl crt {} ca-file {} verify required\n\n",
            client_pem.display(),
            ca_crt.display(),
            ip = remote.ip4
        ));
        server_cfg.push_str(&format!(
            "listen {name}\n  bind {ip}:{tls} ssl crt {} ca-file {} verify required\n  server s {ip}:{app}\n\n",
            server_pem.display(),
            ca_crt.display(),
            ip = remote.ip4
        ));
    }
    let mut spawned = Vec::new();
    for (pod, cfg, name) in [(client, client_cfg, "haproxy-tls-client"), (remote, server_cfg, "haproxy-tls-server")] {
        let path = sb.dir.join(format!("{name}.cfg"));
        std::fs::write(&path, cfg)?;
        let mut cmd = sb.in_pod(pod, "haproxy");
        cmd.arg("-db").arg("-f").arg(&path);
        spawned.push(sb.spawn(name, cmd)?);
    }
    Ok(spawned)
}

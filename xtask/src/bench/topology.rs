//! The benchmark's simulated node.
//!
//! Pods: `server` (sockperf + iperf3) for the single-hop paths; `e1..e3`
//! (sockperf + echo) behind the service VIP; `meshed`, a client captured by
//! Outrigger; `plain`, a client that is not, which reaches servers directly
//! or through HAProxy running in its own netns on loopback — the same one
//! extra hop a sidecar adds.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Result};
use outrigger_e2e::{proxy::pods_yaml, Pod, ProxyProcess, Sandbox};

pub const SOCKPERF_PORT: u16 = 11111;
pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 8080;
/// HAProxy frontends on the plain pod's loopback.
pub const HAPROXY_SOCKPERF: u16 = 21111;
pub const HAPROXY_IPERF: u16 = 25201;
pub const HAPROXY_VIP_SOCKPERF: u16 = 31111;
pub const HAPROXY_VIP_ECHO: u16 = 38080;
pub const VIP: [u8; 4] = [10, 96, 0, 100];

pub struct Topology {
    pub sb: Sandbox,
    pub server: Pod,
    pub endpoints: Vec<Pod>,
    pub meshed: Pod,
    pub plain: Pod,
    _proxy: ProxyProcess,
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

        for pod in std::iter::once(&server).chain(&endpoints) {
            let mut sockperf = sb.in_pod(pod, "sockperf");
            sockperf.args(["server", "--tcp", "-i", &pod.ip4.to_string(), "-p", &SOCKPERF_PORT.to_string()]);
            sb.spawn("sockperf-server", sockperf)?;
        }
        let mut iperf = sb.in_pod(&server, "iperf3");
        iperf.args(["-s", "-B", &server.ip4.to_string(), "-p", &IPERF_PORT.to_string()]);
        sb.spawn("iperf3-server", iperf)?;
        for pod in &endpoints {
            sb.echo_server(pod, &[ECHO_PORT], &[])?;
        }

        let mut pods: Vec<&Pod> = vec![&meshed, &server];
        pods.extend(endpoints.iter());
        let mut mesh = pods_yaml(&pods);
        mesh.push_str(&format!(
            "services:\n  - name: bench\n    vips: [{}]\n    ports: [{{port: {SOCKPERF_PORT}}}, {{port: {ECHO_PORT}}}]\n    endpoints: [{{pod: e1}}, {{pod: e2}}, {{pod: e3}}]\n",
            std::net::Ipv4Addr::from(VIP)
        ));
        let pods_file = sb.dir.join("mesh.yaml");
        std::fs::write(&pods_file, mesh)?;

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

        let mut args = vec!["--log-level", "warn"];
        args.extend(proxy_args.iter().map(String::as_str));
        let proxy = ProxyProcess::start(&sb, 0, pods_file, &args)?;
        // Let the servers settle before the first measurement.
        std::thread::sleep(Duration::from_millis(500));
        if haproxy.stderr().contains("ALERT") {
            bail!("haproxy failed: {}", haproxy.stderr());
        }
        Ok(Self { sb, server, endpoints, meshed, plain, _proxy: proxy })
    }

    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ip4.into(), port)
    }

    pub fn endpoint_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.endpoints[0].ip4.into(), port)
    }
}

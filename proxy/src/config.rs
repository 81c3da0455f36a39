//! Command-line configuration: one typed struct per command, filled by clap.
//! Every flag has an environment fallback and a documented default, so
//! `outrigger run --help` is the reference.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::balance::{Algorithm, BalanceSettings};

#[derive(Debug, Parser)]
#[command(
    name = "outrigger",
    version,
    about = "Per-node service-mesh proxy: eBPF capture of meshed pods, forwarding, metrics",
    long_about = "Outrigger runs once per node (a DaemonSet). eBPF programs steer the TCP \
                  connects of meshed pods into it; it forwards each connection to where the \
                  pod meant to go, from inside the pod's own network namespace."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node proxy (needs root: it loads eBPF programs and enters pods' network namespaces).
    Run(Box<RunArgs>),
    /// The built-in certificate authority for a self-contained mesh.
    #[command(subcommand)]
    Ca(CaCommand),
    /// A running proxy's traffic per destination service: connections, bytes, failures,
    /// connect latency p50/p99 (read from its admin server).
    Stats(StatsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// The proxy's admin server.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Which side: outbound (pods of this node as clients) or inbound (as servers).
    #[arg(long, default_value = "outbound", value_parser = ["outbound", "inbound"])]
    pub reporter: String,
    /// Refresh until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// --watch: time between refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a new root CA (ca.crt, ca.key) for `outrigger run --ca-dir`. Every node's proxy needs
    /// a copy of the directory; anyone holding ca.key can mint any identity of the trust domain.
    Init {
        /// Directory to write ca.crt and ca.key (0600) into. Refuses to overwrite an existing CA.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain the CA serves.
        #[arg(long, env = "OUTRIGGER_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime of the CA certificate.
        #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
    /// Issue one workload certificate (tls.crt, tls.key) from a CA directory: for tools, tests and
    /// peers that are not Outrigger (the layout matches --cert-dir's per-identity directories).
    Issue {
        /// The CA directory written by `outrigger ca init`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The SPIFFE ID to certify, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
        #[arg(long)]
        id: String,
        /// Directory to write tls.crt and tls.key into.
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// Start validity this long ago (a backdate beyond the lifetime makes an expired certificate).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        backdate: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MtlsMode {
    /// Meshed pods also take plaintext from pods outside the mesh; pods of one node talk directly.
    Permissive,
    /// Meshed pods take only mutual-TLS tunnels (plaintext from elsewhere is dropped), and even
    /// pods of one node talk through a tunnel.
    Strict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Mesh state file (YAML) listing the pods on this node. Watched: edits apply
    /// without a restart; a bad file is rejected and the last good state stays in force.
    #[arg(long, env = "OUTRIGGER_PODS_FILE", default_value = "/etc/outrigger/mesh.yaml", visible_alias = "mesh-file")]
    pub pods_file: PathBuf,

    /// How often the pods file is checked for changes.
    #[arg(long, env = "OUTRIGGER_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,

    /// Admin server address (/live, /ready, /metrics, /config_dump). Keep it on
    /// localhost unless a firewall protects it: /config_dump shows the node's pods.
    #[arg(long, env = "OUTRIGGER_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Port the proxy listens on inside every meshed pod (127.0.0.1 and ::1);
    /// the kernel programs steer captured connects there. Pods must not use it.
    #[arg(long, env = "OUTRIGGER_OUTBOUND_PORT", default_value_t = outrigger_common::DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// SO_MARK carried by the proxy's own upstream sockets, so the kernel programs
    /// never capture them again (the loop guard). Decimal or 0x-hex; pick a value
    /// no other agent on the node uses for routing.
    #[arg(long, env = "OUTRIGGER_MARK", default_value = "0x4f52", value_parser = parse_mark)]
    pub mark: u32,

    /// cgroup v2 directory the capture programs attach to. Default: the root of the
    /// cgroup2 mount found in /proc/self/mounts, i.e. every process on the node.
    /// Tests and demos point it at a subtree holding only their pods.
    #[arg(long, env = "OUTRIGGER_CGROUP2_PATH")]
    pub cgroup2_path: Option<PathBuf>,

    /// Kernel programs to load instead of the ones built into this binary
    /// (for development; `cargo xtask build-ebpf` builds them).
    #[arg(long, env = "OUTRIGGER_EBPF_OBJECT")]
    pub ebpf_object: Option<PathBuf>,

    /// Time allowed for one upstream TCP connect attempt.
    #[arg(long, env = "OUTRIGGER_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Connect attempts for a connection to a service VIP: a refused or timed-out
    /// connect is retried on another endpoint, up to this many attempts in all.
    #[arg(long, env = "OUTRIGGER_CONNECT_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub connect_attempts: u32,

    /// How a service's endpoint is chosen for each new connection.
    #[arg(long, env = "OUTRIGGER_LB_ALGORITHM", value_enum, default_value_t = Algorithm::P2cEwma)]
    pub lb_algorithm: Algorithm,

    /// p2c-ewma: decay time of the latency estimate (linkerd2-proxy uses 10s).
    #[arg(long, env = "OUTRIGGER_LB_EWMA_DECAY", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lb_ewma_decay: Duration,

    /// p2c-ewma: latency assumed for an endpoint before its first sample.
    #[arg(long, env = "OUTRIGGER_LB_EWMA_DEFAULT_RTT", default_value = "30ms", value_parser = humantime::parse_duration)]
    pub lb_ewma_default_rtt: Duration,

    /// Consecutive connect failures (refused, timed out) that eject an endpoint
    /// from its service (Envoy's consecutive_5xx applied to connects). 0 disables ejection.
    #[arg(long, env = "OUTRIGGER_EJECTION_CONSECUTIVE_FAILURES", default_value_t = 5)]
    pub ejection_consecutive_failures: u32,

    /// First ejection time; each further ejection of the same endpoint lasts
    /// this times the number of ejections (Envoy's base_ejection_time).
    #[arg(long, env = "OUTRIGGER_EJECTION_BASE_TIME", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ejection_base_time: Duration,

    /// Longest ejection (Envoy's max_ejection_time).
    #[arg(long, env = "OUTRIGGER_EJECTION_MAX_TIME", default_value = "300s", value_parser = humantime::parse_duration)]
    pub ejection_max_time: Duration,

    /// Most endpoints of one service ejected at once, in percent (Envoy's
    /// max_ejection_percent; its default of 10 would never eject in services
    /// of fewer than ten endpoints).
    #[arg(long, env = "OUTRIGGER_EJECTION_MAX_PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub ejection_max_percent: u32,

    /// On SIGTERM/SIGINT: time open connections get to finish before the proxy exits.
    /// Keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "OUTRIGGER_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Size of each of the two copy buffers of a forwarded connection, in bytes.
    /// Memory per connection is twice this.
    #[arg(long, env = "OUTRIGGER_BUFFER_SIZE", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(4096..=16 * 1024 * 1024))]
    pub buffer_size: u32,

    /// SPIFFE trust domain: pods' identities are spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>,
    /// and tunnel peers must present an identity of this domain.
    #[arg(long, env = "OUTRIGGER_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Certificates from a watched directory: <dir>/ca.crt (trust bundle) and
    /// <dir>/<namespace>/<service-account>/tls.crt + tls.key per identity (what cert-manager's
    /// csi-driver-spiffe or a SPIRE helper writes). Rotated files are used for new connections.
    #[arg(long, env = "OUTRIGGER_CERT_DIR", conflicts_with = "ca_dir")]
    pub cert_dir: Option<PathBuf>,

    /// Certificates minted by the built-in CA in this directory (`outrigger ca init`). Every node
    /// holding the CA key can mint any identity: for self-contained meshes, not production.
    #[arg(long, env = "OUTRIGGER_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// --ca-dir: lifetime of minted workload certificates; they are renewed at half-life.
    #[arg(long, env = "OUTRIGGER_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,

    /// Port of the mutual-TLS tunnel listener on every meshed pod's own addresses (HBONE's 15008).
    #[arg(long, env = "OUTRIGGER_HBONE_PORT", default_value_t = crate::tunnel::DEFAULT_HBONE_PORT)]
    pub hbone_port: u16,

    /// Whether meshed pods may receive plaintext from outside the mesh.
    #[arg(long, env = "OUTRIGGER_MTLS", value_enum, default_value_t = MtlsMode::Permissive)]
    pub mtls: MtlsMode,

    /// Streams one tunnel connection carries before another is opened to the same peer.
    #[arg(long, env = "OUTRIGGER_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_streams_per_connection: u32,

    /// Tunnel connections to one peer (per source pod and identity pair) that concurrent
    /// streams spread over before sharing them; more spread TLS work over cores. Default: CPUs.
    #[arg(long, env = "OUTRIGGER_TUNNEL_CONNECTIONS_PER_PEER")]
    pub tunnel_connections_per_peer: Option<usize>,

    /// Tunnel connections with no stream for this long are closed.
    #[arg(long, env = "OUTRIGGER_TUNNEL_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tunnel_idle_timeout: Duration,

    /// Per-connection metrics (counts, bytes, latency histograms by source and destination).
    /// Turning them off is for measuring what they cost.
    #[arg(long, env = "OUTRIGGER_CONNECTION_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub connection_metrics: bool,

    /// Series of pods that left the node are dropped once they have seen no
    /// connection for this long (bounds the registry under pod churn).
    #[arg(long, env = "OUTRIGGER_METRICS_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub metrics_idle_timeout: Duration,

    /// Write the per-pod series to DIR/outrigger.prom for prometheus-node-exporter's textfile
    /// collector (--collector.textfile.directory=DIR). Written atomically (temp file + rename).
    #[arg(long, env = "OUTRIGGER_TEXTFILE_DIR")]
    pub textfile_dir: Option<PathBuf>,

    /// How often the textfile is rewritten.
    #[arg(long, env = "OUTRIGGER_TEXTFILE_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub textfile_interval: Duration,

    /// Log output format.
    #[arg(long, env = "OUTRIGGER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. "info", "outrigger=debug").
    #[arg(long, env = "OUTRIGGER_LOG", default_value = "info")]
    pub log_level: String,

    /// Worker threads of the async runtime. Default: one per CPU.
    #[arg(long, env = "OUTRIGGER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

impl RunArgs {
    pub fn balance_settings(&self) -> BalanceSettings {
        BalanceSettings {
            algorithm: self.lb_algorithm,
            ewma_decay: self.lb_ewma_decay,
            ewma_default_rtt: self.lb_ewma_default_rtt,
            ejection_consecutive_failures: self.ejection_consecutive_failures,
            ejection_base_time: self.ejection_base_time,
            ejection_max_time: self.ejection_max_time,
            ejection_max_percent: self.ejection_max_percent,
        }
    }
}

/// Accepts decimal or 0x-prefixed hex; zero would disable the loop guard.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) => Err("mark 0 cannot tell the proxy's sockets apart: pick a non-zero value".into()),
        Ok(mark) => Ok(mark),
        Err(e) => Err(format!("not a decimal or 0x-hex u32: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_accepts_hex_and_decimal() {
        assert_eq!(parse_mark("0x4f52"), Ok(0x4f52));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("0xzz").is_err());
    }

    #[test]
    fn run_defaults_parse() {
        let cli = Cli::try_parse_from(["outrigger", "run"]).expect("defaults parse");
        let Command::Run(args) = cli.command else { panic!("run expected") };
        assert_eq!(args.outbound_port, 15001);
        assert_eq!(args.connect_timeout, Duration::from_secs(5));
        assert_eq!(args.log_format, LogFormat::Text);
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

//! Command-line configuration: one typed struct per command, filled by clap.
//! Every flag has an environment fallback and a documented default, so
//! `outrigger run --help` is the reference.
#![forbid(unsafe_code)]

mod kubernetes;
mod protocol;
mod resilience;

pub use kubernetes::KubeArgs;
pub use protocol::{AccessLog, ProtocolArgs};
pub use resilience::ResilienceArgs;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::balance::{Algorithm, BalanceSettings};

/// How a service's endpoint is chosen (`--lb-algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LbAlgorithm {
    /// Power of two choices over peak-EWMA latency × connections in flight (linkerd2-proxy's).
    #[value(name = "p2c-ewma")]
    P2cEwma,
    /// Smooth weighted round robin (nginx's).
    RoundRobin,
    /// Weighted random.
    Random,
}

impl From<LbAlgorithm> for Algorithm {
    fn from(a: LbAlgorithm) -> Self {
        match a {
            LbAlgorithm::P2cEwma => Algorithm::P2cEwma,
            LbAlgorithm::RoundRobin => Algorithm::RoundRobin,
            LbAlgorithm::Random => Algorithm::Random,
        }
    }
}

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
    /// connect latency p50/p99; and, once it has served HTTP, requests per service and
    /// route: total, requests/s, success rate, latency p50/p99 (read from its admin
    /// server; requests/s over one second, or between refreshes with --watch).
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
    /// The source of the mesh state unless --kubernetes is given.
    #[arg(long, env = "OUTRIGGER_PODS_FILE", default_value = "/etc/outrigger/mesh.yaml", visible_alias = "mesh-file")]
    pub pods_file: PathBuf,

    #[command(flatten)]
    pub kubernetes: KubeArgs,

    #[command(flatten)]
    pub protocol: ProtocolArgs,

    #[command(flatten)]
    pub resilience: ResilienceArgs,

    /// How often the pods file is checked for changes; with --kubernetes, how often
    /// pods of this node still waiting for their network namespace are looked for.
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

    /// How a service's endpoint is chosen for each new connection (opaque TCP) and
    /// each HTTP request (the HTTP layer).
    #[arg(long, env = "OUTRIGGER_LB_ALGORITHM", value_enum, default_value_t = LbAlgorithm::P2cEwma)]
    pub lb_algorithm: LbAlgorithm,

    /// p2c-ewma: decay time of the latency estimate (linkerd2-proxy uses 10s).
    #[arg(long, env = "OUTRIGGER_LB_EWMA_DECAY", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lb_ewma_decay: Duration,

    /// p2c-ewma: latency assumed, per connection or request in flight, for an
    /// endpoint not measured yet (while idle it costs nothing, so it is tried and
    /// measured; an estimate older than a twentieth of --lb-ewma-decay is probed
    /// the same way).
    #[arg(long, env = "OUTRIGGER_LB_EWMA_DEFAULT_RTT", default_value = "30ms", value_parser = humantime::parse_duration)]
    pub lb_ewma_default_rtt: Duration,

    /// Consecutive failures that eject an endpoint from its service: connect
    /// failures (refused, timed out) and, for HTTP, 5xx answers (Envoy's
    /// consecutive_5xx, which counts both). 0 disables ejection.
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

    /// Largest read buffer of each direction of a relayed connection, in bytes. Buffers start
    /// at --initial-buffer-size, double while reads fill them, and are released whenever the
    /// connection goes quiet: an idle connection holds none.
    #[arg(long, env = "OUTRIGGER_BUFFER_SIZE", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(4096..=16 * 1024 * 1024))]
    pub buffer_size: u32,

    /// First read size of each direction of a relayed connection, in bytes (at most --buffer-size).
    #[arg(long, env = "OUTRIGGER_INITIAL_BUFFER_SIZE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(512..=16 * 1024 * 1024))]
    pub initial_buffer_size: u32,

    /// TCP keepalive on upstream and tunnel sockets: idle time before the first probe
    /// (0s turns keepalive off). With the interval and count, a peer that vanished is
    /// detected after idle + interval × count.
    #[arg(long, env = "OUTRIGGER_TCP_KEEPALIVE_IDLE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive_idle: Duration,

    /// TCP keepalive: time between probes.
    #[arg(long, env = "OUTRIGGER_TCP_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive_interval: Duration,

    /// TCP keepalive: unanswered probes that end the connection.
    #[arg(long, env = "OUTRIGGER_TCP_KEEPALIVE_COUNT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub tcp_keepalive_count: u32,

    /// TCP_USER_TIMEOUT on upstream and tunnel sockets: data left unacknowledged this long ends
    /// the connection (a peer gone mid-transfer). 0s leaves the kernel default (~15 minutes).
    #[arg(long, env = "OUTRIGGER_TCP_USER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub tcp_user_timeout: Duration,

    /// Largest mesh file accepted, in bytes; a bigger one is refused (the last good state stays).
    #[arg(long, env = "OUTRIGGER_MAX_MESH_FILE_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..=1024 * 1024 * 1024))]
    pub max_mesh_file_bytes: u64,

    /// Destinations outside the mesh and its services are labelled destination_service="external".
    /// Set N > 0 to label them by address instead, up to N addresses per source pod (later ones
    /// are still "external"), so one pod dialling many addresses cannot grow /metrics without bound.
    #[arg(long, env = "OUTRIGGER_METRICS_DESTINATION_ADDRESSES", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub metrics_destination_addresses: u32,

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

    /// --mtls strict: sources (CIDRs, comma-separated) that may still reach strict pods in
    /// plaintext — kubelet probes come from the node. Default: the addresses of the proxy's own
    /// network namespace (the node's, when the proxy runs with the host network). In a cluster
    /// where it does not, set the node's address on the pod network (e.g. the bridge gateway).
    #[arg(long, env = "OUTRIGGER_MTLS_STRICT_ALLOW", value_delimiter = ',', value_parser = parse_net)]
    pub mtls_strict_allow: Option<Vec<ipnet::IpNet>>,

    /// Permissive mode: new TCP connections arriving at a meshed pod from outside the mesh are
    /// taken by the proxy first (authorized — a plaintext source has no principal —, counted with
    /// security="plaintext", logged) and delivered to the application. false: they reach the
    /// application directly, unseen.
    #[arg(long, env = "OUTRIGGER_INBOUND_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub inbound_capture: bool,

    /// The proxy's listener for captured plaintext inside every meshed pod (0.0.0.0 and ::).
    /// Pods must not use it.
    #[arg(long, env = "OUTRIGGER_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,

    /// Deliver connections to the application with the real client's address as their source
    /// (transparent sockets; ztunnel's in-pod mode does the same), so access logs, pg_hba.conf,
    /// nginx allow/deny see the client, not the pod itself. Needs the pod netns set up with a
    /// routing rule for the delivery mark; false: the pod's own address is the source.
    #[arg(long, env = "OUTRIGGER_INBOUND_ORIGINAL_SOURCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub inbound_original_source: bool,

    /// SO_MARK of the proxy's delivery sockets (original source), and the routing table that
    /// brings their replies back to the proxy inside each pod. Must differ from --mark.
    #[arg(long, env = "OUTRIGGER_DELIVERY_MARK", default_value = "0x4f53", value_parser = parse_mark)]
    pub delivery_mark: u32,

    /// Streams one tunnel connection carries before another is opened to the same peer.
    #[arg(long, env = "OUTRIGGER_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_streams_per_connection: u32,

    /// Tunnel connections to one peer (per source pod, identity pair and connection
    /// thread: each thread drives its own) that concurrent streams spread over before
    /// sharing them; more spread TLS work over cores. Default: the CPUs divided among
    /// the connection threads (at least 1).
    #[arg(long, env = "OUTRIGGER_TUNNEL_CONNECTIONS_PER_PEER")]
    pub tunnel_connections_per_peer: Option<usize>,

    /// Most connections the proxy holds for one pod at once (outbound from it and inbound to it;
    /// each costs two file descriptors). Past it, the pod's new connections are reset at once and
    /// counted in outrigger_limit_refused_total{limit="pod_connections"}, so one pod cannot take
    /// the descriptors every other pod needs. Default: an eighth of the open-file limit.
    #[arg(long, env = "OUTRIGGER_MAX_CONNECTIONS_PER_POD")]
    pub max_connections_per_pod: Option<usize>,

    /// Most tunnel connections to one pod still in their handshake (TLS, HTTP/2, first CONNECT).
    /// Unauthenticated clients past it are reset at once.
    #[arg(long, env = "OUTRIGGER_MAX_PENDING_HANDSHAKES_PER_POD", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_pending_handshakes_per_pod: u32,

    /// Most tunnel connections to all pods of the node still in their handshake.
    #[arg(long, env = "OUTRIGGER_MAX_PENDING_HANDSHAKES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_pending_handshakes: u32,

    /// An arriving tunnel connection must finish TLS and HTTP/2 and send its first CONNECT within
    /// this, or it is closed.
    #[arg(long, env = "OUTRIGGER_TUNNEL_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tunnel_handshake_timeout: Duration,

    /// HTTP/2 PING on every pooled tunnel connection this often; a peer that does not answer
    /// within the same time is considered dead and its connection closed (0s: no pings).
    #[arg(long, env = "OUTRIGGER_TUNNEL_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub tunnel_keepalive_interval: Duration,

    /// A relayed connection that moves no byte either way for this long is cut (both sides see a
    /// reset; access-log flag SI). 0s: never (the default, as without the mesh).
    #[arg(long, env = "OUTRIGGER_IDLE_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Tunnel connections with no stream for this long are closed.
    #[arg(long, env = "OUTRIGGER_TUNNEL_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tunnel_idle_timeout: Duration,

    /// Per-connection metrics (counts, bytes, latency histograms by source and destination).
    /// Turning them off is for measuring what they cost.
    #[arg(long, env = "OUTRIGGER_CONNECTION_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub connection_metrics: bool,

    /// Series of pods that left the node, and series naming a peer pod that
    /// left the mesh, are dropped once they have seen no connection for
    /// this long (bounds the registry under pod churn on either side).
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

    /// Worker threads of the async runtime. Default: half the CPUs the
    /// process may run on, at least one. The proxy shares the node's CPUs
    /// with its pods, and its work per request is short: a second runnable
    /// worker competes with the applications and steals tasks (a futex
    /// wake-up and a migration each) more than it adds until the proxy
    /// needs more than a core. Measured on 2 CPUs, HTTP/1.1 with 16
    /// connections: 1 worker 1.08× HAProxy's request rate at 0.89× its
    /// p99, 2 workers 0.82× at 2.0×. Raise it on a node whose proxy
    /// saturates its workers (`outrigger stats`, CPU per proxy).
    #[arg(long, env = "OUTRIGGER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Threads that serve connections, each with its own single-threaded
    /// event loop (with 1, the async runtime above serves them). Each
    /// accepts connections (outbound, tunnels, plaintext arrivals) on every
    /// pod listener and serves them itself, handing one over only when it
    /// serves more connections than another: no task stealing, no wake-up
    /// that hops threads (HAProxy's and Envoy's model). Default: 2, or 1 on a single CPU (like
    /// ztunnel's two workers). Measured on 2 CPUs (`cargo xtask bench`), 2
    /// against 1: the L4 paths gain (plain hop 16-connection requests/s 0.97x
    /// -> 1.02-1.05x HAProxy's, 8 streams 0.97x -> 1.14-1.40x; mTLS pair
    /// requests/s 1.19x -> 1.27-1.32x). Raise it on a node whose proxy
    /// saturates its threads (CPU per proxy); each costs a thread and its
    /// event loop, nothing per pod.
    #[arg(long, env = "OUTRIGGER_CONNECTION_THREADS")]
    pub connection_threads: Option<usize>,

    /// With more than one connection thread: pin each to one CPU, in turn
    /// over the CPUs this process may run on. `auto` pins when there are
    /// exactly as many threads as such CPUs (a cpuset of its own); `always`
    /// also on a node whose CPUs it shares (a pinned thread cannot leave a
    /// CPU another workload keeps busy); `never` leaves placement to the
    /// kernel, which may put two busy threads on one CPU to take turns at
    /// its tick (measured on 2 CPUs: HTTP/1.1 16-connection p99 2.1x
    /// HAProxy's unpinned, 0.81x pinned).
    #[arg(long, env = "OUTRIGGER_PIN_CONNECTION_THREADS", value_enum, default_value_t = crate::transport::Pinning::Auto)]
    pub pin_connection_threads: crate::transport::Pinning,
}

/// A flag value that would panic or silently break the proxy, refused at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

pub(crate) fn bad(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { flag, problem: problem.into() }
}

fn within(flag: &'static str, value: Duration, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(bad(flag, format!("{value:?} is outside {min:?}..={max:?}")));
    }
    Ok(())
}

const DAY: Duration = Duration::from_secs(86_400);
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// A SPIFFE trust domain: lower-case letters, digits, '.', '-', '_'.
pub fn check_trust_domain(flag: &'static str, td: &str) -> Result<(), ConfigError> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if td.is_empty() || td.len() > 255 || !td.chars().all(ok) {
        return Err(bad(
            flag,
            format!("{td:?} is not a SPIFFE trust domain (lower-case letters, digits, '.', '-', '_')"),
        ));
    }
    Ok(())
}

/// Certificate lifetimes the CA commands and `--cert-lifetime` accept:
/// long enough to be renewed before expiry, short enough not to overflow
/// a certificate's validity fields.
pub fn check_lifetime(flag: &'static str, lifetime: Duration, max: Duration) -> Result<(), ConfigError> {
    within(flag, lifetime, Duration::from_secs(300), max)
}

pub const MAX_CA_LIFETIME: Duration = Duration::from_secs(100 * 365 * 86_400);
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

impl RunArgs {
    /// Refuses values that would panic, spin, or silently break capture,
    /// naming the flag and its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ms = Duration::from_millis;
        if self.outbound_port == 0 {
            return Err(bad("outbound-port", "0 is not a port: pods' connects would be steered nowhere"));
        }
        if self.hbone_port == 0 {
            return Err(bad("hbone-port", "0 is not a port"));
        }
        if self.outbound_port == self.hbone_port {
            return Err(bad("hbone-port", format!("{} is also --outbound-port: pick two ports", self.hbone_port)));
        }
        if self.inbound_port == 0 || self.inbound_port == self.outbound_port || self.inbound_port == self.hbone_port {
            return Err(bad(
                "inbound-port",
                format!("{} must be a port other than --outbound-port and --hbone-port", self.inbound_port),
            ));
        }
        if self.delivery_mark == self.mark {
            return Err(bad("delivery-mark", "must differ from --mark (the loop guard's)"));
        }
        let admin = self.admin_addr.port();
        if admin != 0 && (admin == self.outbound_port || admin == self.hbone_port || admin == self.inbound_port) {
            return Err(bad("admin-addr", format!("port {admin} is also the outbound or tunnel port")));
        }
        self.kubernetes.validate()?;
        self.protocol.validate()?;
        self.resilience.validate()?;
        within("reload-interval", self.reload_interval, ms(10), DAY)?;
        within("textfile-interval", self.textfile_interval, ms(10), DAY)?;
        within("connect-timeout", self.connect_timeout, ms(1), Duration::from_secs(600))?;
        within("drain-timeout", self.drain_timeout, Duration::ZERO, DAY)?;
        within("tunnel-idle-timeout", self.tunnel_idle_timeout, ms(100), DAY)?;
        within("metrics-idle-timeout", self.metrics_idle_timeout, ms(100), 30 * DAY)?;
        within("lb-ewma-decay", self.lb_ewma_decay, ms(1), DAY)?;
        within("lb-ewma-default-rtt", self.lb_ewma_default_rtt, Duration::from_micros(1), Duration::from_secs(60))?;
        within("ejection-base-time", self.ejection_base_time, ms(1), DAY)?;
        within("ejection-max-time", self.ejection_max_time, self.ejection_base_time, 30 * DAY)
            .map_err(|_| bad("ejection-max-time", "must be at least --ejection-base-time and at most 30 days"))?;
        check_lifetime("cert-lifetime", self.cert_lifetime, MAX_CERT_LIFETIME)?;
        check_trust_domain("trust-domain", &self.trust_domain)?;
        if self.initial_buffer_size > self.buffer_size {
            return Err(bad(
                "initial-buffer-size",
                format!("{} is larger than --buffer-size {}", self.initial_buffer_size, self.buffer_size),
            ));
        }
        within("tcp-keepalive-idle", self.tcp_keepalive_idle, Duration::ZERO, DAY)?;
        if !self.tcp_keepalive_idle.is_zero() {
            within(
                "tcp-keepalive-interval",
                self.tcp_keepalive_interval,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            )?;
        }
        within("tcp-user-timeout", self.tcp_user_timeout, Duration::ZERO, DAY)?;
        if let Some(n) = self.worker_threads {
            if n == 0 || n > 1024 {
                return Err(bad("worker-threads", format!("{n} is outside 1..=1024")));
            }
        }
        if let Some(n) = self.connection_threads.filter(|&n| n == 0 || n > 1024) {
            return Err(bad("connection-threads", format!("{n} is outside 1..=1024")));
        }
        if let Some(n) = self.tunnel_connections_per_peer {
            if n == 0 || n > 64 {
                return Err(bad("tunnel-connections-per-peer", format!("{n} is outside 1..=64")));
            }
        }
        if self.max_connections_per_pod == Some(0) {
            return Err(bad("max-connections-per-pod", "0 would refuse every connection"));
        }
        within("tunnel-handshake-timeout", self.tunnel_handshake_timeout, ms(10), Duration::from_secs(600))?;
        within("tunnel-keepalive-interval", self.tunnel_keepalive_interval, Duration::ZERO, DAY)?;
        if !self.tunnel_keepalive_interval.is_zero() && self.tunnel_keepalive_interval < ms(100) {
            return Err(bad("tunnel-keepalive-interval", "below 100ms it would flood peers with pings"));
        }
        within("idle-timeout", self.idle_timeout, Duration::ZERO, 30 * DAY)?;
        if self.mtls == MtlsMode::Strict && self.cert_dir.is_none() && self.ca_dir.is_none() {
            return Err(bad("mtls", "strict needs certificates: pass --cert-dir or --ca-dir"));
        }
        let _ = YEAR;
        Ok(())
    }

    /// How upstream and tunnel sockets are made.
    pub fn socket_options(&self) -> crate::transport::SocketOptions {
        crate::transport::SocketOptions {
            mark: self.mark,
            keepalive: (!self.tcp_keepalive_idle.is_zero()).then_some(crate::transport::Keepalive {
                idle: self.tcp_keepalive_idle,
                interval: self.tcp_keepalive_interval,
                count: self.tcp_keepalive_count,
            }),
            user_timeout: (!self.tcp_user_timeout.is_zero()).then_some(self.tcp_user_timeout),
            transparent: false,
        }
    }

    /// How delivery sockets (original source) are made: transparent, with
    /// the delivery mark. `None` without original-source delivery.
    pub fn delivery_socket_options(&self) -> Option<crate::transport::SocketOptions> {
        self.inbound_original_source.then(|| crate::transport::SocketOptions {
            mark: self.delivery_mark,
            transparent: true,
            ..self.socket_options()
        })
    }

    /// `--connection-threads`, or its default: 2, at most the CPUs this
    /// process may run on.
    pub fn connection_threads(&self) -> usize {
        self.connection_threads.unwrap_or_else(|| crate::transport::allowed_cpus().len().clamp(1, 2))
    }

    pub fn relay_options(&self) -> crate::transport::RelayOptions {
        crate::transport::RelayOptions {
            initial_buffer: self.initial_buffer_size as usize,
            max_buffer: self.buffer_size as usize,
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            a_armed: false,
            b_armed: false,
        }
    }

    /// Per-pod limits; the connection limit defaults to an eighth of the
    /// open-file limit (each connection costs two descriptors).
    pub fn pod_limits(&self, open_files: u64) -> crate::pod::PodLimits {
        crate::pod::PodLimits {
            connections: self.max_connections_per_pod.unwrap_or_else(|| (open_files / 8).max(64) as usize),
            pending_handshakes: self.max_pending_handshakes_per_pod as usize,
        }
    }

    pub fn balance_settings(&self) -> BalanceSettings {
        BalanceSettings {
            algorithm: self.lb_algorithm.into(),
            ewma_decay: self.lb_ewma_decay,
            ewma_default_rtt: self.lb_ewma_default_rtt,
            ejection_consecutive_failures: self.ejection_consecutive_failures,
            ejection_base_time: self.ejection_base_time,
            ejection_max_time: self.ejection_max_time,
            ejection_max_percent: self.ejection_max_percent,
        }
    }
}

/// A CIDR, or a bare address (as /32 or /128).
pub fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or CIDR (e.g. 10.244.1.1 or 10.244.1.0/24)"))
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

    fn run_args(extra: &[&str]) -> Result<(), String> {
        let mut argv = vec!["outrigger", "run"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Run(args) = cli.command else { panic!("run expected") };
        args.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn flags_that_would_break_the_proxy_are_refused_by_name() {
        assert_eq!(run_args(&[]), Ok(()));
        for (flags, expect) in [
            (&["--outbound-port", "0"][..], "--outbound-port"),
            (&["--reload-interval", "0s"], "--reload-interval"),
            (&["--textfile-interval", "0s"], "--textfile-interval"),
            (&["--cert-lifetime", "20000y"], "--cert-lifetime"),
            (&["--cert-lifetime", "0s"], "--cert-lifetime"),
            (&["--trust-domain", ""], "--trust-domain"),
            (&["--trust-domain", "bad domain/x"], "--trust-domain"),
            (&["--hbone-port", "15001"], "--hbone-port"),
            (&["--admin-addr", "127.0.0.1:15008"], "--admin-addr"),
            (&["--initial-buffer-size", "131072"], "--initial-buffer-size"),
            (&["--mtls", "strict"], "--mtls"),
            (&["--worker-threads", "0"], "--worker-threads"),
            (&["--connection-threads", "0"], "--connection-threads"),
        ] {
            let err = run_args(flags).expect_err(expect);
            assert!(err.contains(expect), "{flags:?}: {err}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

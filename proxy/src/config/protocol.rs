//! Flags of protocol detection on captured connections.

use std::time::Duration;

use clap::Args;

use super::{bad, ConfigError};

/// Linkerd's default opaque ports, plus FTP's control port: protocols that
/// are never HTTP, relayed without detection. SMTP 25 and 587, MySQL 3306, Galera 4444,
/// PostgreSQL 5432, Redis 6379, Elasticsearch 9300, memcached 11211, FTP 21.
pub const DEFAULT_OPAQUE_PORTS: &str = "21,25,587,3306,4444,5432,6379,9300,11211";

#[derive(Debug, Clone, Args)]
pub struct ProtocolArgs {
    /// How long a captured connection's first bytes are waited for to tell HTTP/1,
    /// HTTP/2 and opaque TCP apart. A server that speaks first (SSH, SMTP, MySQL
    /// banners) decides "opaque" at once, without waiting; this only bounds a
    /// connection on which neither side sends anything (then relayed as opaque
    /// TCP). 0s: no detection, everything opaque.
    #[arg(long, env = "OUTRIGGER_PROTOCOL_DETECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub protocol_detect_timeout: Duration,

    /// Destination ports relayed as opaque TCP without detection (comma-separated).
    /// A Service port's appProtocol (mesh file: protocol) overrides this: tcp is
    /// opaque, http / http2 / h2c / grpc are HTTP.
    #[arg(long, env = "OUTRIGGER_OPAQUE_PORTS", value_delimiter = ',', default_value = DEFAULT_OPAQUE_PORTS)]
    pub opaque_ports: Vec<u16>,

    /// Serve connections detected (or declared) as HTTP/1.1 or h2 with the HTTP
    /// layer: requests are routed (routes:), balanced one by one, filtered (header
    /// changes, mirrors, faults) and counted (outrigger_requests_total). false:
    /// HTTP is relayed as opaque TCP, as it was before detection.
    #[arg(long, env = "OUTRIGGER_HTTP", default_value_t = true, action = clap::ArgAction::Set)]
    pub http: bool,

    /// What the access log (target outrigger::access) records: "connections" (one
    /// line per connection, the default), "requests" (also one line per HTTP
    /// request: method, authority, path without query, status, duration, route,
    /// upstream, trace id, flags; costly at high request rates), "off".
    #[arg(long, env = "OUTRIGGER_ACCESS_LOG", value_enum, default_value_t = AccessLog::Connections)]
    pub access_log: AccessLog,

    /// Percentage (0-100) of HTTP requests without a W3C traceparent header that
    /// get a new one (a trace started here). A traceparent or tracestate the
    /// request carries always passes unchanged; its trace id is in the request's
    /// access-log line.
    #[arg(long, env = "OUTRIGGER_TRACE_SAMPLING", default_value_t = 0.0)]
    pub trace_sampling: f64,

    /// Idle upstream HTTP/1.1 connections a pod's pool keeps per endpoint for reuse
    /// by mirror copies (a client's HTTP/1.1 connection keeps its own upstream
    /// connections, one per endpoint; h2 shares one connection per endpoint and pod).
    #[arg(long, env = "OUTRIGGER_HTTP_MAX_IDLE_PER_ENDPOINT", default_value_t = 64)]
    pub http_max_idle_per_endpoint: usize,

    /// An idle pooled upstream HTTP connection is closed after this long.
    #[arg(long, env = "OUTRIGGER_HTTP_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,

    /// Mirror copies (RequestMirror) in flight per pod; beyond it a copy is
    /// skipped and counted (outrigger_mirrored_requests_total{result="skipped_busy"}),
    /// so a slow mirror never holds up real requests.
    #[arg(long, env = "OUTRIGGER_HTTP_MAX_MIRRORS", default_value_t = 64)]
    pub http_max_mirrors_in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLog {
    Requests,
    Connections,
    Off,
}

impl ProtocolArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.protocol_detect_timeout > Duration::from_secs(60) {
            return Err(bad(
                "protocol-detect-timeout",
                "at most 60s: a server-first protocol waits this long for its banner",
            ));
        }
        if !(0.0..=100.0).contains(&self.trace_sampling) {
            return Err(bad("trace-sampling", "a percentage: 0 to 100"));
        }
        if self.http_max_mirrors_in_flight == 0 || self.http_max_mirrors_in_flight > 10_000 {
            return Err(bad("http-max-mirrors-in-flight", "1 to 10000"));
        }
        if self.http_max_idle_per_endpoint > 10_000 {
            return Err(bad("http-max-idle-per-endpoint", "at most 10000"));
        }
        if self.opaque_ports.contains(&0) {
            return Err(bad("opaque-ports", "0 is not a port"));
        }
        Ok(())
    }
}

impl ProtocolArgs {
    /// The HTTP layer's settings.
    pub fn http_settings(&self) -> crate::outbound::HttpSettings {
        crate::outbound::HttpSettings {
            log_requests: self.access_log == AccessLog::Requests,
            trace_sampling: crate::model::Share::percent(self.trace_sampling),
            max_idle_per_endpoint: self.http_max_idle_per_endpoint,
            idle_timeout: self.http_idle_timeout,
            max_mirrors_in_flight: self.http_max_mirrors_in_flight,
            resilience: Default::default(),
        }
    }
}

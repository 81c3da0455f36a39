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

    /// Serve connections detected as HTTP/1 or h2 with the HTTP layer (hyper on
    /// both sides; experimental, being built). Off: HTTP is relayed as opaque TCP.
    #[arg(long, env = "OUTRIGGER_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub http: bool,
}

impl ProtocolArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.protocol_detect_timeout > Duration::from_secs(60) {
            return Err(bad(
                "protocol-detect-timeout",
                "at most 60s: a server-first protocol waits this long for its banner",
            ));
        }
        if self.opaque_ports.contains(&0) {
            return Err(bad("opaque-ports", "0 is not a port"));
        }
        Ok(())
    }
}

//! Why a connection could not be proxied: one typed enum that yields the
//! metric label, the access-log flag and whether the endpoint is to blame.

use std::{net::SocketAddr, time::Duration};

use crate::tunnel::TunnelError;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("no original destination for this connection (not captured, or its kernel entry was lost)")]
    NoOriginalDestination,
    #[error("original destination lookup failed: {0}")]
    OrigDstLookup(String),
    #[error("connection to {dest} refused: is anything listening there?")]
    Refused { dest: SocketAddr },
    #[error("connection to {dest} timed out after {after:?}: is the destination reachable from the pod?")]
    Timeout { dest: SocketAddr, after: Duration },
    #[error("no route to {dest}: {reason}")]
    NoRoute { dest: SocketAddr, reason: String },
    #[error("connecting to {dest}: {reason}")]
    Connect { dest: SocketAddr, reason: String },
    #[error("making a socket in the pod's netns: {0}")]
    Socket(String),
    #[error("tunnel: {0}")]
    Tunnel(#[from] TunnelError),
    #[error("{dest} is a meshed pod elsewhere, but this proxy has no certificates: pass --cert-dir or --ca-dir")]
    NoMtls { dest: SocketAddr },
    #[error("denied by authorization policy {policy}")]
    Denied { policy: String },
    #[error("service {service} has no endpoints: add some to the mesh state")]
    NoEndpoints { service: String },
    #[error("every endpoint of service {service} is ejected after connect failures: are its pods running?")]
    NoHealthyEndpoints { service: String },
}

/// The failure counter's `reason` label and the access log's flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NoOriginalDestination,
    ConnectRefused,
    ConnectTimeout,
    NoRoute,
    ConnectError,
    /// This proxy's side failed (netns, certificates): not the endpoint's fault.
    LocalError,
    TlsFailure,
    TunnelError,
    Denied,
    NoEndpoints,
    NoHealthyEndpoints,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Self::NoOriginalDestination => "no_original_destination",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::NoRoute => "no_route",
            Self::ConnectError => "connect_error",
            Self::LocalError => "local_error",
            Self::TlsFailure => "tls_failure",
            Self::TunnelError => "tunnel_error",
            Self::Denied => "denied",
            Self::NoEndpoints => "no_endpoints",
            Self::NoHealthyEndpoints => "no_healthy_endpoints",
        }
    }

    /// Envoy-style response flags.
    pub fn flag(self) -> &'static str {
        match self {
            Self::ConnectRefused | Self::ConnectError | Self::TunnelError => "UF",
            Self::ConnectTimeout => "UT",
            Self::NoRoute | Self::NoEndpoints | Self::NoOriginalDestination => "NR",
            Self::NoHealthyEndpoints => "UH",
            Self::Denied => "RBAC",
            Self::TlsFailure => "TLS",
            Self::LocalError => "LE",
        }
    }
}

impl Failure {
    pub fn reason(&self) -> Reason {
        match self {
            Self::NoOriginalDestination | Self::OrigDstLookup(_) => Reason::NoOriginalDestination,
            Self::Refused { .. } => Reason::ConnectRefused,
            Self::Timeout { .. } => Reason::ConnectTimeout,
            Self::NoRoute { .. } => Reason::NoRoute,
            Self::Connect { .. } => Reason::ConnectError,
            Self::Socket(_) => Reason::LocalError,
            Self::Tunnel(e) if !e.is_peer_fault() && !matches!(e, TunnelError::Denied { .. }) => Reason::LocalError,
            Self::Tunnel(e) => match e.reason() {
                "connect_refused" => Reason::ConnectRefused,
                "connect_timeout" => Reason::ConnectTimeout,
                "connect_error" => Reason::ConnectError,
                "tls_failure" => Reason::TlsFailure,
                "denied" => Reason::Denied,
                _ => Reason::TunnelError,
            },
            Self::NoMtls { .. } => Reason::TlsFailure,
            Self::Denied { .. } => Reason::Denied,
            Self::NoEndpoints { .. } => Reason::NoEndpoints,
            Self::NoHealthyEndpoints { .. } => Reason::NoHealthyEndpoints,
        }
    }

    /// Whether the endpoint is to blame: only then does the failure count
    /// towards ejecting it. A policy refusal, a missing local certificate
    /// or a netns problem says nothing about the endpoint.
    pub fn is_endpoint_fault(&self) -> bool {
        match self {
            Self::Refused { .. } | Self::Timeout { .. } | Self::NoRoute { .. } | Self::Connect { .. } => true,
            Self::Tunnel(e) => e.is_peer_fault(),
            _ => false,
        }
    }

    /// Whether another endpoint might do better (a refusal by policy will not).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Denied { .. } | Self::Tunnel(TunnelError::Denied { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_errors_are_not_the_endpoints_fault() {
        let dest = SocketAddr::from(([10, 0, 0, 1], 80));
        assert!(Failure::Refused { dest }.is_endpoint_fault());
        assert!(!Failure::Socket("EMFILE".into()).is_endpoint_fault());
        assert!(!Failure::NoMtls { dest }.is_endpoint_fault());
        assert!(!Failure::Denied { policy: "p".into() }.is_endpoint_fault());
        assert_eq!(Failure::Socket("x".into()).reason().flag(), "LE");
        assert_eq!(Failure::Timeout { dest, after: Duration::from_secs(1) }.reason().flag(), "UT");
    }
}

//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams inside mutual
//! TLS between node proxies — Istio ambient's convention, so Outrigger can
//! one day interoperate with ztunnel.
//!
//! A tunnel goes from the source pod's netns to `DEST_POD_IP:15008`, is
//! authenticated as the source pod's identity, checks that the peer is the
//! destination pod's identity, and asks `CONNECT <original ip:port>`. One
//! TLS+h2 connection carries many streams (`pool.rs`).
#![forbid(unsafe_code)]

mod client;
mod pool;

use std::net::SocketAddr;

pub use client::{Tunnel, TunnelClient, TunnelTarget};
pub use pool::{Pool, PoolStats, StreamGuard};

/// The HBONE port (ztunnel's).
pub const DEFAULT_HBONE_PORT: u16 = 15008;

// Flow-control windows large enough for one stream to fill a fast link
// (ztunnel uses the same sizes); frames up to 1 MiB cut per-frame work.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
pub const SEND_BUFFER: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connection to {peer} refused: is the peer node's proxy running and serving this pod?")]
    Refused { peer: SocketAddr },
    #[error("connection to {peer} timed out: is the peer node's proxy running?")]
    Timeout { peer: SocketAddr },
    #[error("connecting to {peer}: {source}")]
    Connect {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {peer} failed: {source}")]
    Tls {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no TLS configuration: {0}")]
    Config(#[from] crate::tls::TlsError),
    #[error("HTTP/2 with {peer}: {source}")]
    H2 {
        peer: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{peer} refused CONNECT {authority}: authorization policy denied it")]
    Denied { peer: SocketAddr, authority: SocketAddr },
    #[error("{peer} answered CONNECT {authority} with {status}{}", upstream_hint(*.status))]
    Status { peer: SocketAddr, authority: SocketAddr, status: u16 },
    #[error("making a socket in the pod's netns: {0}")]
    Netns(#[from] crate::netns::NetnsError),
    /// The outcome of a dial another stream made for the same peer.
    #[error(transparent)]
    Shared(std::sync::Arc<TunnelError>),
    #[error("no tunnel connection to {peer} could take a stream (connections closed as they opened)")]
    Unavailable { peer: SocketAddr },
}

fn upstream_hint(status: u16) -> &'static str {
    match status {
        503 => ": the destination application refused the connection",
        504 => ": the destination application did not answer in time",
        400 | 403 => ": the destination is not this pod's address",
        _ => "",
    }
}

impl TunnelError {
    /// Whether the failure is the peer's (it counts against the endpoint
    /// and may eject it) rather than this node's (no certificate, netns).
    pub fn is_peer_fault(&self) -> bool {
        match self {
            Self::Shared(e) => e.is_peer_fault(),
            e => !matches!(e, Self::Config(_) | Self::Netns(_) | Self::Denied { .. }),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Shared(e) => e.reason(),
            Self::Unavailable { .. } => "tunnel_error",
            Self::Refused { .. } => "connect_refused",
            Self::Timeout { .. } => "connect_timeout",
            Self::Connect { .. } | Self::Netns(_) => "connect_error",
            Self::Tls { .. } | Self::Config(_) => "tls_failure",
            Self::H2 { .. } => "tunnel_error",
            Self::Denied { .. } => "denied",
            Self::Status { status: 503, .. } => "connect_refused",
            Self::Status { status: 504, .. } => "connect_timeout",
            Self::Status { .. } => "tunnel_error",
        }
    }
}

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER);
    b
}

pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(max_streams);
    b
}

//! Protocol detection: what a captured connection speaks, from its first
//! bytes, without ever stalling a protocol in which the server speaks first.
//!
//! One bounded peek (at most [`MAX_PEEK`] bytes, within
//! `--protocol-detect-timeout`): the HTTP/2 prior-knowledge preface is h2; a
//! request line that parses (httparse) is HTTP/1.x; a TLS record (a
//! ClientHello from the application) and anything else are opaque TCP. A
//! port declared opaque (`--opaque-ports`, a Service port's `appProtocol:
//! tcp`) or declared HTTP skips the peek.
//!
//! Unlike Linkerd, which detects before connecting and makes SSH, SMTP or
//! MySQL on an undeclared port wait out its timeout for their banner, the
//! outbound path connects first and races the client's first bytes against
//! the server's: a server that speaks first decides "opaque" at once. The
//! timeout only ends a connection on which neither side says anything.

use std::time::Duration;

use crate::{
    model::AppProtocol,
    transport::{Duplex, Peekable},
};

/// The most bytes looked at: a request line longer than this (a very long
/// URL) is relayed as opaque, which still works.
pub const MAX_PEEK: usize = 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An h2 frame header's size.
pub const H2_FRAME_HEADER: usize = 9;

/// Whether a server's first bytes are an h2 SETTINGS frame (type 4 on
/// stream 0, a payload of whole 6-byte settings): an h2 server that sent
/// its preface first, not a protocol in which the server speaks first.
pub fn is_h2_settings(buf: &[u8]) -> bool {
    if buf.len() < H2_FRAME_HEADER {
        return false;
    }
    let length = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
    buf[3] == 0x04 && buf[4] & !0x01 == 0 && buf[5..9] == [0, 0, 0, 0] && length.is_multiple_of(6) && length <= 16_384
}

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    H2,
    Opaque,
}

impl Detected {
    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "h2",
            Self::Opaque => "opaque",
        }
    }
}

/// How the protocol was decided, for the counter
/// `outrigger_protocol_detections_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Http1,
    H2,
    /// A TLS record from the application.
    Tls,
    /// Bytes that are neither.
    Opaque,
    /// The server sent first (SSH, SMTP, MySQL banners): opaque at once.
    ServerFirst,
    /// Nothing (or not enough) from either side within the timeout.
    Timeout,
    /// The client closed or failed before anything could be decided.
    Closed,
    /// A declared port: no peek.
    Declared,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Http1,
        Outcome::H2,
        Outcome::Tls,
        Outcome::Opaque,
        Outcome::ServerFirst,
        Outcome::Timeout,
        Outcome::Closed,
        Outcome::Declared,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2 => "h2",
            Self::Tls => "tls",
            Self::Opaque => "opaque",
            Self::ServerFirst => "server_first",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Declared => "declared",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// What the bytes so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Decided(Detected, Outcome),
    NeedMore,
}

/// Classifies the first bytes of a connection (`eof`: the client will send
/// no more).
pub fn classify(buf: &[u8], eof: bool) -> Verdict {
    let opaque = Verdict::Decided(Detected::Opaque, Outcome::Opaque);
    if buf.is_empty() {
        return if eof { opaque } else { Verdict::NeedMore };
    }
    // A TLS handshake record: 0x16, then version 3.x.
    if buf[0] == 0x16 && buf.get(1).is_none_or(|v| *v == 3) {
        return Verdict::Decided(Detected::Opaque, Outcome::Tls);
    }
    if buf.starts_with(H2_PREFACE) {
        return Verdict::Decided(Detected::H2, Outcome::H2);
    }
    let undecided = if eof || buf.len() >= MAX_PEEK { opaque } else { Verdict::NeedMore };
    if H2_PREFACE.starts_with(buf) {
        return undecided;
    }
    // The request line alone decides: headers may be many, or slow.
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            Verdict::Decided(Detected::Http1, Outcome::Http1)
        }
        Ok(httparse::Status::Partial) if request.version.is_some() => Verdict::Decided(Detected::Http1, Outcome::Http1),
        Ok(httparse::Status::Partial) => undecided,
        Err(_) => opaque,
    }
}

/// The protocol a port declares, if any: `None` means detect.
pub fn declared(app_protocol: Option<&AppProtocol>, port: u16, opaque_ports: &[u16]) -> Option<Detected> {
    match app_protocol {
        Some(AppProtocol::Tcp) => return Some(Detected::Opaque),
        Some(AppProtocol::Http) => return Some(Detected::Http1),
        Some(AppProtocol::Http2 | AppProtocol::Grpc) => return Some(Detected::H2),
        Some(AppProtocol::Other(_)) | None => {}
    }
    opaque_ports.contains(&port).then_some(Detected::Opaque)
}

/// Peeks at `client` until its protocol is decided, at most `timeout`.
/// What was read stays buffered in `client` and is relayed first.
pub async fn detect<I: Duplex>(client: &mut Peekable<I>, timeout: Duration) -> (Detected, Outcome) {
    let decide = async {
        loop {
            let (buffered, eof) = match client.peek_more(MAX_PEEK).await {
                Ok(state) => state,
                Err(_) => return (Detected::Opaque, Outcome::Closed),
            };
            match classify(buffered, eof) {
                Verdict::Decided(detected, outcome) => {
                    let outcome = if eof && buffered.is_empty() { Outcome::Closed } else { outcome };
                    return (detected, outcome);
                }
                Verdict::NeedMore => {}
            }
        }
    };
    tokio::time::timeout(timeout, decide).await.unwrap_or((Detected::Opaque, Outcome::Timeout))
}

/// Detects what `client` speaks, unless `upstream` speaks first (a
/// server-speaks-first protocol, never HTTP: opaque at once instead of
/// after the timeout). What either side sent stays buffered.
pub async fn client_or_server_first<I: Duplex, U: Duplex>(
    client: &mut Peekable<I>,
    upstream: &mut Peekable<U>,
    timeout: Duration,
) -> (Detected, Outcome) {
    let first = tokio::select! {
        biased;
        decided = detect(client, timeout) => Some(decided),
        _ = upstream.peek_more(H2_FRAME_HEADER) => None,
    };
    match first {
        Some(decided) => decided,
        // An h2 server may send its SETTINGS before the client's preface
        // arrives (gRPC servers do): still the client's call.
        None if is_h2_settings(upstream.buffered()) => detect(client, timeout).await,
        // Anything else from the server before the client decided.
        None => {
            tracing::debug!(first = ?&upstream.buffered()[..upstream.buffered().len().min(16)], "the server spoke first: opaque");
            (Detected::Opaque, Outcome::ServerFirst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(buf: &[u8]) -> Option<(Detected, Outcome)> {
        match classify(buf, false) {
            Verdict::Decided(d, o) => Some((d, o)),
            Verdict::NeedMore => None,
        }
    }

    #[test]
    fn an_h2_servers_settings_are_told_from_a_banner() {
        // Empty SETTINGS, and SETTINGS with one setting (max concurrent streams 100).
        assert!(is_h2_settings(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        assert!(is_h2_settings(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]));
        assert!(!is_h2_settings(b"SSH-2.0-OpenSSH_9.2"));
        assert!(!is_h2_settings(b"220 smtp ready\r\n"));
        assert!(!is_h2_settings(&[0, 0, 0, 4]), "too short to tell");
    }

    #[test]
    fn request_lines_prefaces_and_tls() {
        assert_eq!(decided(b"GET / HTTP/1.1\r\n"), Some((Detected::Http1, Outcome::Http1)));
        assert_eq!(decided(b"GET /x HTTP/1.1\r\nHost: a\r\n"), Some((Detected::Http1, Outcome::Http1)));
        assert_eq!(decided(b"POST /upload HTTP/1.0\r\n\r\n"), Some((Detected::Http1, Outcome::Http1)));
        assert_eq!(decided(b"GET / HT"), None, "a request line in flight waits");
        assert_eq!(decided(b"G"), None);
        assert_eq!(decided(H2_PREFACE), Some((Detected::H2, Outcome::H2)));
        assert_eq!(decided(&H2_PREFACE[..10]), None, "a preface in flight waits");
        assert_eq!(decided(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some((Detected::Opaque, Outcome::Tls)));
        assert_eq!(decided(b"SSH-2.0-OpenSSH_9.2\r\n"), Some((Detected::Opaque, Outcome::Opaque)));
        assert_eq!(decided(b"*1\r\n$4\r\nPING\r\n"), Some((Detected::Opaque, Outcome::Opaque)), "redis");
        assert_eq!(decided(&[0, 0, 0, 8, 4, 210, 22, 47]), Some((Detected::Opaque, Outcome::Opaque)), "postgres");
    }

    #[test]
    fn bounded_and_eof_decide() {
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_PEEK));
        assert_eq!(decided(&long.as_bytes()[..MAX_PEEK]), Some((Detected::Opaque, Outcome::Opaque)));
        assert_eq!(classify(b"GET / HT", true), Verdict::Decided(Detected::Opaque, Outcome::Opaque));
        assert_eq!(classify(b"", true), Verdict::Decided(Detected::Opaque, Outcome::Opaque));
        assert_eq!(classify(b"", false), Verdict::NeedMore);
    }

    #[test]
    fn declared_ports_skip_detection() {
        let opaque = [25, 3306, 5432, 6379];
        assert_eq!(declared(None, 5432, &opaque), Some(Detected::Opaque));
        assert_eq!(declared(None, 8080, &opaque), None);
        assert_eq!(declared(Some(&AppProtocol::Tcp), 8080, &opaque), Some(Detected::Opaque));
        assert_eq!(declared(Some(&AppProtocol::Grpc), 5432, &opaque), Some(Detected::H2), "appProtocol wins");
        assert_eq!(declared(Some(&AppProtocol::Http), 80, &opaque), Some(Detected::Http1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_first_protocol_falls_back_at_the_timeout() {
        let (_client, proxy) = tokio::io::duplex(1024);
        let mut p = Peekable::new(crate::transport::Stream::new(proxy));
        let (d, o) = detect(&mut p, Duration::from_secs(1)).await;
        assert_eq!((d, o), (Detected::Opaque, Outcome::Timeout));
    }

    #[tokio::test]
    async fn split_request_lines_are_detected_and_kept() {
        use tokio::io::AsyncWriteExt;
        let (mut client, proxy) = tokio::io::duplex(1024);
        let mut p = Peekable::new(crate::transport::Stream::new(proxy));
        let writer = tokio::spawn(async move {
            for part in [&b"GE"[..], b"T /a HT", b"TP/1.1\r\n"] {
                client.write_all(part).await.expect("write");
                tokio::task::yield_now().await;
            }
            client
        });
        let (d, o) = detect(&mut p, Duration::from_secs(5)).await;
        assert_eq!((d, o), (Detected::Http1, Outcome::Http1));
        let _client = writer.await.expect("writer");
        assert!(p.buffered().starts_with(b"GE"), "the peeked bytes stay: {:?}", p.buffered());
    }
}

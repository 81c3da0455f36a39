//! Making upstream sockets: marked (so the capture programs never steer
//! them again), no Nagle delay, and with dead-peer detection.

use std::{io, net::IpAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

/// TCP keepalive probes: after `idle` without traffic, every `interval`,
/// `count` unanswered probes end the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// How every upstream socket is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// `SO_MARK`: the capture programs skip sockets carrying it.
    pub mark: u32,
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT`: unacknowledged data for this long ends the
    /// connection (a peer that vanished mid-transfer).
    pub user_timeout: Option<Duration>,
    /// `IP(V6)_TRANSPARENT`: the socket may bind a non-local address (the
    /// client's, when delivering a connection with its original source).
    pub transparent: bool,
}

impl SocketOptions {
    /// A non-blocking TCP socket for a connection to `dest`, in the calling
    /// thread's network namespace.
    pub fn tcp(&self, dest: IpAddr) -> io::Result<std::net::TcpStream> {
        let domain = if dest.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
        socket.set_mark(self.mark)?;
        socket.set_tcp_nodelay(true)?;
        if let Some(k) = self.keepalive {
            let params = TcpKeepalive::new().with_time(k.idle).with_interval(k.interval).with_retries(k.count);
            socket.set_tcp_keepalive(&params)?;
        }
        if let Some(timeout) = self.user_timeout {
            socket.set_tcp_user_timeout(Some(timeout))?;
        }
        if self.transparent {
            if dest.is_ipv4() {
                socket.set_ip_transparent_v4(true)?;
            } else {
                crate::sys::set_ipv6_transparent(std::os::fd::AsFd::as_fd(&socket))?;
            }
            // Several deliveries may come from one client address and port
            // (to different ports of the pod).
            socket.set_reuse_address(true)?;
        }
        Ok(socket.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_carry_the_options() {
        let opts = SocketOptions {
            mark: 0,
            keepalive: Some(Keepalive { idle: Duration::from_secs(30), interval: Duration::from_secs(5), count: 4 }),
            user_timeout: Some(Duration::from_secs(20)),
            transparent: false,
        };
        // Mark 0 needs no privilege; the rest is plain socket options.
        let s = Socket::from(opts.tcp("127.0.0.1".parse().expect("ip")).expect("socket"));
        assert!(s.keepalive().expect("keepalive"));
        assert_eq!(s.tcp_keepalive_time().expect("idle"), Duration::from_secs(30));
        assert_eq!(s.tcp_user_timeout().expect("user timeout"), Some(Duration::from_secs(20)));
        assert!(s.tcp_nodelay().expect("nodelay"));
    }
}
